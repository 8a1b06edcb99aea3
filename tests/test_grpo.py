"""train.py --method grpo (latexocr/grpo.py, latexocr/rewards.py): the pure parts against hand-computed
values, then runs of the script from a tiny SFT adapter on CPU."""
from __future__ import annotations

import ast
import json
import math

import pytest
import torch

import latexocr.generation as generation
import latexocr.grpo as grpo
from helpers import LABELS, TINY, make_dataset, printed_metrics, run_main, script_env, trainer_state
from latexocr.grpo import group_advantages, grpo_token_loss, split_completions
from latexocr.rewards import Rewards, formula_scores, parse_weights
from latexocr.sample import SAMPLE_FILE


# ---------------------------------------------------------------------------------- rewards
def test_formula_scores_and_no_render_credit_when_truncated():
    scores = formula_scores(["a + b", "a + b", "\\frac { 1", "x y z w"], ["a + b", "a + b", "\\frac { 1 } { 2 }", "x"],
                            truncated=[False, True, False, False])
    assert scores["exact"] == [1.0, 1.0, 0.0, 0.0]
    assert scores["edit"] == pytest.approx([1.0, 1.0, 1 - 4 / 7, 1 - 3 / 4])  # 1 - distance / longer length
    # the same renderable text earns render credit only when it ended with the end token
    assert scores["render"] == [1.0, 0.0, 0.0, 1.0]


def test_reward_weights():
    assert parse_weights("edit=1,exact=2") == ({"edit": 1.0, "exact": 2.0, "render": 0.0}, "")
    assert parse_weights("edit=1,my_rewards:fn=2") == ({"edit": 1.0, "exact": 0.0, "render": 0.0, "function": 2.0},
                                                      "my_rewards:fn")
    for bad in ("edit", "speed=1", "edit=x", "edit=nan"):
        with pytest.raises(SystemExit, match="REWARD_WEIGHTS"):
            parse_weights(bad)
    total, parts = Rewards("edit=1,render=0.5")(["a + b", "a"], ["a + b", "a + b"], [False, True])
    assert set(parts) == {"edit", "render"}  # a component of weight 0 is neither computed nor logged
    assert total == pytest.approx([1.0 + 0.5, (1 - 2 / 3) + 0.0])
    with pytest.raises(SystemExit, match="nothing to learn"):
        Rewards("edit=0")


# ------------------------------------------------------------------------ advantages, loss
def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4
    adv = group_advantages(rewards, 4, eps=0.0)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert group_advantages(rewards, 4)[4:].tolist() == [0.0] * 4  # equal rewards: advantage 0


def test_a_group_with_equal_rewards_contributes_no_gradient():
    logits = torch.randn(8, 5, requires_grad=True)  # 2 groups x 4 completions of one token each
    logprobs = torch.log_softmax(logits, -1)[:, 0]
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.3, 0.3, 0.3, 0.3]), 4)
    loss, _, _ = grpo_token_loss(logprobs, logprobs.detach(), adv)
    loss.sum().backward()
    assert logits.grad[:4].abs().sum() > 0
    assert torch.equal(logits.grad[4:], torch.zeros(4, 5))


def test_clipped_objective_against_hand_values():
    old = torch.zeros(4)
    logprobs = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1]))  # ratios 1.5, 1.5, 0.5, 1.1
    adv = torch.tensor([1.0, -1.0, -2.0, 1.0])
    loss, clipped, kl = grpo_token_loss(logprobs, old, adv, epsilon=0.2)
    # -min(r A, clip(r) A): A > 0 caps the ratio at 1.2; A < 0 keeps the worse (larger) ratio 1.5, and
    # floors the ratio at 0.8
    assert loss.tolist() == pytest.approx([-1.2, 1.5, 1.6, -1.1])
    assert clipped.tolist() == [True, False, True, False]
    assert kl is None
    # the KL term: k3 = exp(ref - logp) - (ref - logp) - 1, weighted by beta
    ref = torch.zeros(4)
    loss_kl, _, kl = grpo_token_loss(logprobs, old, adv, epsilon=0.2, ref_logprobs=ref, beta=0.5)
    expected = [1 / r + math.log(r) - 1 for r in (1.5, 1.5, 0.5, 1.1)]
    assert kl.tolist() == pytest.approx(expected)
    assert (loss_kl - loss).tolist() == pytest.approx([0.5 * k for k in expected], abs=1e-6)  # float32


def test_token_level_normalisation_weighs_every_token_alike():
    """One completion of 1 token and one of 3, advantages +1 and -1: the step's loss is the sum over
    its 4 tokens / 4 (DAPO), not the mean of the two completions' means (which would be 0)."""
    adv = torch.tensor([1.0, -1.0, -1.0, -1.0])  # per token: completion 1's one token, completion 2's three
    logprobs = torch.zeros(4)
    loss, _, _ = grpo_token_loss(logprobs, logprobs, adv)
    assert (loss.sum() / loss.numel()).item() == pytest.approx((-1 + 3) / 4)


def test_split_completions():
    stop, pad, image = 9, 0, 7
    tokens = torch.tensor([[1, 2, stop, pad], [1, 2, 3, 4], [1, image, 2, stop]])
    completions, truncated = split_completions(tokens, torch.tensor([True, False, True]), [stop], {image})
    assert completions == [[1, 2, stop], [1, 2, 3, 4], [1]]
    assert truncated == [False, True, True]  # no end token; a placeholder ends it as truncated


def test_a_step_s_prompt_chunks_are_grouped_in_order_within_the_rows_per_call():
    chunks = [{"input_ids": torch.zeros(n, 3)} for n in (16, 16, 16, 40, 8)]
    sizes = [[c["input_ids"].shape[0] for c in group] for group in grpo.group_chunks(chunks, 32)]
    assert sizes == [[16, 16], [16], [40], [8]]  # order kept; a chunk above the rows goes alone
    assert len(grpo.group_chunks(chunks, 512)) == 1


def test_sampling_decoder_draws_from_the_nucleus():
    from latexocr.fast.decoding import sample_tokens
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    counts = torch.bincount(sample_tokens(logits, 1.0), minlength=4) / 4000
    assert counts.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)
    nucleus = torch.bincount(sample_tokens(logits, 1.0, top_p=0.7), minlength=4) / 4000  # {0, 1} reach 0.8
    assert nucleus[2:].sum() == 0 and nucleus[0].item() == pytest.approx(0.5 / 0.8, abs=0.03)


# ------------------------------------------------------------------------ runs of train.py
@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_model_dir):
    """A tiny SFT adapter trained with a non-default image sizing (its sample definition must travel)."""
    work = tmp_path_factory.mktemp("grpo")
    data = make_dataset(work, LABELS[:8])
    run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, "--val-json", work / "none.json",
             "--output-dir", work / "sft", "--max-steps", 30, "--batch-size", 8, "--micro-batch-size", 8,
             "--learning-rate", 6e-3, "--lora-alpha", 64, "--save-steps", 1000, "--logging-steps", 10,
             "--image-min-pixels", 2 * 32 * 28 * 28, *TINY)
    return work, data


def grpo_args(tiny_model_dir, work, data, *extra):
    return ["--method", "grpo", "--model-id", tiny_model_dir, "--train-json", data, "--val-json", work / "none.json",
            "--output-dir", work / "sft", "--batch-size", 4, "--micro-batch-size", 2, "--num-generations", 3,
            "--learning-rate", 1e-3, "--logging-steps", 1, *TINY, *extra]


def logged(stdout: str) -> list[dict]:
    return [ast.literal_eval(line) for line in stdout.splitlines() if line.startswith("{'loss'")]


def test_grpo_run_writes_an_adapter_infer_loads_and_resumes(sft, tiny_model_dir, monkeypatch):
    """train.py --method grpo from the SFT adapter: rollout prompts are infer.py's for the same images
    (the sample definition travels), every log line carries the rewards, OUTPUT_DIR-grpo/final loads in
    infer.py, and --resume continues."""
    work, data = sft
    prompts = []  # every prompt batch built by generation's collate: the rollouts', then infer.py's
    original = generation._Collate.__call__

    def record(self, items):
        indices, failed, chunks = original(self, items)
        prompts.append(chunks)
        return indices, failed, chunks

    monkeypatch.setattr(generation._Collate, "__call__", record)
    # step 2 trains on step 1's completions again (STEPS_PER_ROLLOUT 2): the clip can bind
    proc = run_main("train.py", *grpo_args(tiny_model_dir, work, data, "--max-steps", 2, "--save-steps", 2,
                                           "--kl-beta", 0.05, "--steps-per-rollout", 2, "--learning-rate", 5e-2))
    out = work / "sft-grpo"
    lines = logged(proc.stdout)
    assert len(lines) == 2
    for line in lines:
        assert {"reward", "reward_edit", "reward_exact", "reward_render", "reward_std", "zero_std_groups",
                "completion_length", "kl", "clip_fraction", "rollout_seconds"} <= set(line)
    assert lines[0]["reward"] == lines[1]["reward"] and float(lines[1]["rollout_seconds"]) == 0
    assert float(lines[0]["clip_fraction"]) == 0 < float(lines[1]["clip_fraction"])
    assert (out / "final" / "adapter_config.json").is_file()
    assert json.loads((out / "final" / SAMPLE_FILE).read_text())["image"]["min_pixels"] == 2 * 32 * 28 * 28
    assert (work / "sft" / "final" / "adapter_config.json").is_file()  # the starting adapter is untouched
    rollout_prompts = [c for chunks in prompts for c in chunks]
    prompts.clear()

    proc = run_main("infer.py", data, "--model-id", tiny_model_dir, "--model-source", "local", "--output-dir", out,
                    "--output", work / "preds.csv", "--num-workers", "0", "--max-new-tokens", "12")
    assert f"adapter: {out / 'final'}" in proc.stderr
    assert printed_metrics(proc.stdout)["n"] == 8
    # the same image's prompt tokens, image patches and positions, in the rollout and in infer.py
    def by_prompt(chunks):
        rows = {}
        for chunk in chunks:
            starts = chunk["image_grid_thw"].prod(-1).cumsum(0).tolist()
            for r in range(chunk["input_ids"].shape[0]):
                keep = chunk["attention_mask"][r].bool()
                patches = chunk["pixel_values"][(starts[r - 1] if r else 0):starts[r]]
                rows[(tuple(chunk["input_ids"][r, keep].tolist()), patches.sum().item())] = \
                    chunk["position_ids"][:, r, keep].tolist()
        return rows

    rollout, inference = by_prompt(rollout_prompts), by_prompt([c for chunks in prompts for c in chunks])
    assert rollout and set(rollout) <= set(inference)
    assert all(rollout[key] == inference[key] for key in rollout)

    proc = run_main("train.py", *grpo_args(tiny_model_dir, work, data, "--max-steps", 3, "--save-steps", 2, "--resume",
                                           "--steps-per-rollout", 2))
    assert len(logged(proc.stdout)) == 1  # steps 1-2 came from checkpoint-2
    assert trainer_state(out / "checkpoint-3")["global_step"] == 3


def test_the_adapter_it_starts_from_is_never_its_output(sft, tiny_model_dir):
    work, data = sft
    inside = work / "other-grpo" / "final"  # a GRPO run's own output, given back as its start
    inside.mkdir(parents=True)
    (inside / "adapter_config.json").write_text("{}")
    proc = run_main("train.py", *grpo_args(tiny_model_dir, work, data, "--output-dir", work / "other",
                                           "--init-adapter", inside), check=False)
    assert proc.returncode == 1 and "would overwrite it" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("body, spec, message", [
    ("", "no_such_module_here:fn", "cannot load no_such_module_here"),
    ("def other(p, l):\n    return [0.0] * len(p)\n", "FILE:fn", "has no function 'fn'"),
    ("def fn(p, l):\n    return [1.0]\n", "FILE:fn", "returned 1 rewards for 4 predictions"),
    ("def fn(p, l):\n    return [float('nan')] * len(p)\n", "FILE:fn", "not a finite number"),
])
def test_a_bad_reward_function_stops_with_one_line_before_the_model_loads(tmp_path, body, spec, message):
    data = make_dataset(tmp_path, LABELS[:4])
    (tmp_path / "reward.py").write_text(body)
    spec = spec.replace("FILE", str(tmp_path / "reward.py"))
    # no model folder and no adapter exist: the reward is judged before either is looked at
    proc = run_main("train.py", "--method", "grpo", "--model-id", tmp_path / "no-model", "--train-json", data,
                    "--output-dir", tmp_path / "out", "--reward-weights", f"edit=1,{spec}=1", *TINY, check=False)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_grpo_raises_a_learnable_reward_and_not_without_advantages(sft, tiny_model_dir, monkeypatch):
    """A reward the tiny model can learn (the share of 'x' in its output) rises within a few steps from
    the SFT adapter, with a fixed seed; with the advantages zeroed (no KL) nothing moves it."""
    work, data = sft
    (work / "xreward.py").write_text("def share_x(predictions, labels):\n"
                                     "    return [p.count('x') / max(1, len(p)) for p in predictions]\n")

    def rewards(*extra):
        proc = run_main("train.py", *grpo_args(tiny_model_dir, work, data, "--max-steps", 6, "--batch-size", 8,
                                               "--micro-batch-size", 8, "--num-generations", 4, "--learning-rate", 1e-2,
                                               "--save-steps", 1000, "--reward-weights", f"{work / 'xreward.py'}:share_x=1",
                                               "--output-dir", work / "learn", "--init-adapter", work / "sft" / "final",
                                               *extra))
        return [float(line["reward"]) for line in logged(proc.stdout)]

    learnt = rewards()
    monkeypatch.setattr(grpo, "group_advantages", lambda r, n, eps=1e-4: torch.zeros_like(r))
    frozen = rewards()
    assert learnt[0] == frozen[0]  # the same seed: the same first rollout
    assert sum(learnt[-2:]) / 2 > learnt[0] + 0.3, learnt
    assert sum(frozen[-2:]) / 2 < frozen[0] + 0.1, frozen


def test_models_the_static_decoder_does_not_take_roll_out_with_generate(sft, tiny_model_dir):
    work, data = sft
    # eager attention ($LATEXOCR_SPEED, latexocr/fast/choices.py): a model the static decoder refuses
    proc = run_main("train.py", *grpo_args(tiny_model_dir, work, data, "--max-steps", 1, "--save-steps", 1000,
                                           "--output-dir", work / "eager", "--init-adapter", work / "sft" / "final"),
                    env=script_env(LATEXOCR_SPEED="attention=eager"))
    line, = logged(proc.stdout)
    assert 0 < float(line["completion_length"]) <= 12 and "reward" in line


def test_a_step_is_rolled_out_in_as_few_decoder_calls_as_fit(sft, tiny_model_dir, monkeypatch):
    """The prompts of all a step's micro-batches go through the decoder together, in one call where they
    fit, and each micro-batch gets the update batch (completions, advantages) that sampling it alone
    gives. Sampling is made deterministic by a tiny temperature, and the reward tells a group's rows
    apart by position so that the advantages are not all 0."""
    from latexocr.fast import StaticDecoder
    work, data = sft
    (work / "position.py").write_text("def by_position(predictions, labels):\n"
                                      "    return [len(p) + 0.1 * (i % 3) for i, p in enumerate(predictions)]\n")
    calls, updates = [], []  # rows per decoder call; each step's update batches
    generate, get_batch_samples, sample = StaticDecoder.generate, grpo.GrpoTrainer.get_batch_samples, grpo.GrpoTrainer.sample

    def counted(self, chunks):
        calls.append(sum(c["input_ids"].shape[0] for c in chunks))
        return generate(self, chunks)

    def kept(self, *args):
        batches, count = get_batch_samples(self, *args)
        updates.append([dict(b) for b in batches])  # the loss pops the advantages from the batch itself
        return batches, count

    monkeypatch.setattr(StaticDecoder, "generate", counted)
    monkeypatch.setattr(grpo.GrpoTrainer, "get_batch_samples", kept)

    def run(name):  # one step of 2 micro-batches of 2 images x 3 completions
        return run_main("train.py", *grpo_args(tiny_model_dir, work, data, "--max-steps", 1, "--save-steps", 1000,
                                               "--temperature", 1e-5, "--output-dir", work / name,
                                               "--init-adapter", work / "sft" / "final",
                                               "--reward-weights", f"{work / 'position.py'}:by_position=1"))

    proc = run("together")
    assert calls == [12]  # 512 rows fit on a CPU: the step's 12 in one call
    assert "GRPO rollouts: up to 512 completions per decoder call, a step's 12 in 1" in proc.stdout
    together, = updates
    calls.clear(), updates.clear()
    # the reference: each micro-batch sampled on its own, as before the step was rolled out at once
    monkeypatch.setattr(grpo.GrpoTrainer, "sample", lambda self, batches: [out for b in batches for out in sample(self, [b])])
    run("apart")
    assert calls == [6, 6]
    apart, = updates
    assert len(together) == len(apart) == 2
    for a, b in zip(together, apart):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    assert any(b[grpo.ADVANTAGES_KEY].abs().sum() > 0 for b in together)
