"""Memory-aware defaults (latexocr/memory.py): what "auto" chooses, the line it prints, explicit values
winning, and an out-of-memory that still happens ending in one line with a checkpoint to --resume from.

The choice itself runs on a GPU (probe steps); here it runs on a fake probe whose peaks and times are
those of a 2B model on a 16 GiB card, so the rule can be checked on the CPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import LABELS, TINY, make_dataset, run_main
from latexocr.memory import (DoesNotFit, Probe, balanced_rows, choose_generation_rows, choose_training_batch, divisors_descending,
                             out_of_memory_message, parse_auto, percentile_samples, worst_case_samples)

GIB = 2**30


def fake_probe(weights_gib: float, per_sample_gib: float, seconds_per_sample: float, checkpointing_saves: float = 0.6,
               calls: list | None = None):
    """A probe of a model whose peak is weights + micro x per-sample activations (checkpointing keeps
    40 % of them and costs a third more time); per-sample time falls with the batch as on a GPU."""
    def probe(micro, checkpointing):
        if calls is not None:
            calls.append((micro, checkpointing))
        activations = micro * per_sample_gib * ((1 - checkpointing_saves) if checkpointing else 1)
        efficiency = min(1.0, 0.4 + 0.15 * micro)  # small batches leave the GPU idle
        seconds = micro * seconds_per_sample / efficiency * (4 / 3 if checkpointing else 1)
        return Probe(micro, checkpointing, int((weights_gib + activations) * GIB), seconds, tokens=100 * micro)
    return probe


def test_auto_takes_the_largest_micro_batch_that_fits_without_checkpointing_when_the_batch_fits_whole():
    calls = []
    choice = choose_training_batch(divisors_descending(16), fake_probe(5, 0.8, 0.01, calls=calls), 60 * GIB)
    assert (choice.micro, choice.checkpointing) == (16, False)
    assert calls == [(16, False)]  # nothing else probed: the whole batch fits
    assert "60.0 GiB usable" in choice.reason and "micro-batch 16: 17.8 GiB" in choice.reason


def test_auto_weighs_checkpointing_at_a_larger_batch_against_the_smaller_batch_that_fits_without_it():
    calls = []
    # 14 GiB: without checkpointing 8 samples fit (11.4 GiB), with it 16 (10.1 GiB)
    choice = choose_training_batch(divisors_descending(16), fake_probe(5, 0.8, 0.01, calls=calls), 14 * GIB)
    assert calls == [(16, False), (8, False), (16, True)]
    # per sample: micro 8 plain = 0.01 / 1.0; micro 16 checkpointed = 0.01 / 1.0 * 4/3: plain wins
    assert (choice.micro, choice.checkpointing) == (8, False)
    assert "micro-batch 16 + checkpointing" in choice.reason  # both timings are in the log line
    # a card where only a micro-batch of 1 fits plainly (8 GiB) and 4 with checkpointing (9.8 GiB): the
    # batch of 4 keeps the GPU busier, which outweighs the recomputation
    choice = choose_training_batch(divisors_descending(16), fake_probe(5, 3.0, 0.01), 10 * GIB)
    assert (choice.micro, choice.checkpointing) == (4, True)


def test_explicit_values_win():
    calls = []
    probe = fake_probe(5, 0.8, 0.01, calls=calls)
    assert choose_training_batch([16], probe, 14 * GIB).checkpointing is True  # MICRO_BATCH_SIZE=16 given
    calls.clear()
    choice = choose_training_batch(divisors_descending(16), probe, 14 * GIB, checkpointing=False)
    assert (choice.micro, choice.checkpointing) == (8, False) and all(not c for _, c in calls)
    choice = choose_training_batch(divisors_descending(16), probe, 14 * GIB, checkpointing=True)
    assert (choice.micro, choice.checkpointing) == (16, True)


def test_nothing_fits_stops_with_one_line_naming_what_to_change():
    with pytest.raises(SystemExit) as stop:
        choose_training_batch(divisors_descending(16), fake_probe(7.5, 0.8, 0.01), 7 * GIB)
    message = str(stop.value.code)
    assert isinstance(stop.value, DoesNotFit) and "\n" not in message
    assert "--quantization 4bit" in message and "7.0 GiB" in message


def test_an_out_of_memory_probe_counts_as_not_fitting():
    def probe(micro, checkpointing):
        return Probe(micro, checkpointing, None if micro > 4 else int(3 * GIB), 0.1)
    assert choose_training_batch(divisors_descending(16), probe, 10 * GIB).micro == 4


def test_the_worst_case_batch_is_the_longest_samples():
    assert worst_case_samples([10, 50, 20, 40, 30], 2) == [1, 3]


def run_m_probe(tokens: dict, calls: list | None = None):
    """Probes of Qwen2-VL-2B as run M measured them (docs/BENCHMARKS.md): 4.5 GiB that do not grow with the
    batch, 6.4 MiB per token without checkpointing (the 4 longest samples, 1,238 tokens: 12.2 GiB) and
    30 % of that with it; per token a batch of 8 runs twice as fast as one of 4 (the GPU is busier), and
    checkpointing costs 60 % more time (run M's grid: micro-batch 8 plain 36.8 samples/s, 16 with
    checkpointing 24.6). tokens: {micro: tokens of the probed batch}."""
    speed = {4: 1.0, 8: 2.0, 16: 2.2}  # tokens per ms

    def probe(micro, checkpointing):
        if calls is not None:
            calls.append((micro, checkpointing, tokens[micro]))
        mib = tokens[micro] * 6.4 * (0.3 if checkpointing else 1)
        seconds = tokens[micro] / speed[micro] / 1000 * (1.6 if checkpointing else 1)
        return Probe(micro, checkpointing, int(4.5 * GIB + mib * 2**20), seconds, tokens[micro], size=tokens[micro],
                     base=int(4.5 * GIB))  # the weights: what does not grow with the batch
    return probe


# the tokens of micro-batches of the 2,048 training samples of run M (shared/latex_ocr/full_val, Qwen2-VL's
# processor): the 90th percentile of random ones, and the longest samples'
RUN_M_P90 = {4: 712, 8: 1371, 16: 2650}
RUN_M_WORST = {4: 1238, 8: 2389, 16: 4599}


def test_auto_picks_the_fast_setting_on_a_16_gib_card_and_splits_the_rare_larger_batch():
    """Run M at 16 GiB (13.5 GiB usable after the margin): the 8 longest samples do not fit without
    checkpointing (19.4 GiB), a 90th-percentile batch of 8 does (13.1 GiB). Auto takes micro-batch 8
    plain, the hand grid's best (the worst-case rule took 16 + checkpointing: 67 % of it), and a
    micro-batch over what the budget holds at the probed batch's bytes per token runs in halves: 1,440
    tokens (9 of the 13.5 GiB beside the weights at 6.4 MiB a token), not the probed 1,371 (run P: splitting at
    the probed size split batches the hand setting ran whole)."""
    calls = []
    choice = choose_training_batch(divisors_descending(16), run_m_probe(RUN_M_P90, calls), int(13.5 * GIB),
                                   worst_probe=run_m_probe(RUN_M_WORST, calls))
    assert (choice.micro, choice.checkpointing, choice.split_over) == (8, False, 1440)
    assert calls == [(16, False, 2650), (8, False, 1371), (16, True, 2650), (8, False, 2389)]
    assert "micro-batches over 1440 tokens run in two halves" in choice.reason
    assert "micro-batch 8: 13.1 GiB (4.5 GiB held before it, 1371 tokens)" in choice.reason
    assert "micro-batch 16 + checkpointing" in choice.reason
    # the worst-case rule (the longest samples must fit) on the same card: micro-batch 4, or 16 checkpointed
    worst_rule = choose_training_batch(divisors_descending(16), run_m_probe(RUN_M_WORST), int(13.5 * GIB))
    assert (worst_rule.micro, worst_rule.checkpointing) == (16, True)  # what run M's auto chose


def test_checkpointing_needs_a_clear_win_not_a_probe_that_ran_fast_by_chance():
    """Run O at 16 GiB: single probes ranked micro-batch 8 plain against 16 + checkpointing anywhere from
    0.92x to 1.24x per token, while training the plain 8 ran 25 % faster (30.9 against 23.5 samples/s;
    one run's auto took checkpointing on a probe that had it 9 % ahead). Within the margin plain stays;
    a clear win (a card where only a small batch fits plainly) still takes checkpointing."""
    def probes(plain_ms_per_k, checkpointed_ms_per_k):
        def probe(micro, checkpointing):
            tokens = RUN_M_P90[micro]
            mib = tokens * 6.4 * (0.3 if checkpointing else 1)
            ms = checkpointed_ms_per_k if checkpointing else plain_ms_per_k
            return Probe(micro, checkpointing, int(4.5 * GIB + mib * 2**20), tokens * ms / 1e6, tokens, size=tokens)
        return probe
    budget = int(13.5 * GIB)
    # run O's first call: 6.6k tokens/s plain, 7.2k with checkpointing (152 vs 139 ms per 1k tokens)
    choice = choose_training_batch(divisors_descending(16), probes(152, 139), budget)
    assert (choice.micro, choice.checkpointing) == (8, False)
    # checkpointing 30 % faster per token: a clear win
    choice = choose_training_batch(divisors_descending(16), probes(152, 106), budget)
    assert (choice.micro, choice.checkpointing) == (16, True)


def test_where_the_longest_samples_fit_too_nothing_is_split():
    # a whole H200 (125 GiB usable): micro-batch 16 plain, its worst batch 33 GiB
    choice = choose_training_batch(divisors_descending(16), run_m_probe(RUN_M_P90), 125 * GIB,
                                   worst_probe=run_m_probe(RUN_M_WORST))
    assert (choice.micro, choice.checkpointing, choice.split_over) == (16, False, None)
    assert "the longest samples fit too" in choice.reason


def test_the_probed_batch_is_real_samples_at_the_percentile_of_random_micro_batches():
    import random
    lengths = [random.Random(i).randint(80, 320) for i in range(2000)]
    for packed in (True, False):
        picked = percentile_samples(lengths, 8, packed)
        size = sum(lengths[i] for i in picked) if packed else 8 * max(lengths[i] for i in picked)
        rng = random.Random(1)
        draws = [[lengths[i] for i in rng.sample(range(2000), 8)] for _ in range(2000)]
        sizes = [sum(d) if packed else 8 * max(d) for d in draws]
        share_over = sum(s > size for s in sizes) / len(sizes)
        assert len(set(picked)) == 8 and 0.05 < share_over <= 0.12  # ~1 in 10 micro-batches holds more
    assert sorted(percentile_samples(lengths, 8, True, percentile=1.0)) == sorted(worst_case_samples(lengths, 8))
    # a single sample longer than the percentile batch: the probe holds at least as many tokens
    lengths = [100] * 50 + [2000]
    assert sum(lengths[i] for i in percentile_samples(lengths, 2, True)) >= 2000


def test_generation_rows_follow_the_memory_model():
    # 2 GiB of prefill, 10 MiB a row: 8 GiB free -> 614 rows -> capped at 512; 3 GiB -> 102 -> 96 (x8)
    assert choose_generation_rows(2 * GIB, 10 * 2**20, 8 * GIB, 512) == 512
    assert choose_generation_rows(2 * GIB, 10 * 2**20, 3 * GIB, 512) == 96
    assert choose_generation_rows(2 * GIB, 300 * 2**20, 3 * GIB, 512) == 3
    assert choose_generation_rows(3 * GIB, 10 * 2**20, 2 * GIB, 512) == 0


def test_generation_batches_are_even():
    # run Q (Qwen3.5-2B, 16 GiB card): 136 rows fit; 2,048 images as 15 x 136 + one batch of 8 rows (a whole
    # decode loop for 8 images) -> 16 x 128, which is also a whole number of prefill chunks
    assert balanced_rows(2048, 136) == 128
    assert balanced_rows(2048, 512) == 512 and balanced_rows(300, 512) == 512  # one batch: as it was
    assert balanced_rows(256, 120) == 88     # the validation set: 3 x 88 (not 120 + 120 + 16)
    assert balanced_rows(10, 6) == 5 and balanced_rows(3, 512) == 512
    for count, most in [(2048, 136), (9443, 296), (1000, 64), (7, 3)]:
        rows = balanced_rows(count, most)
        assert rows <= most and -(-count // rows) == -(-count // most)  # never more batches than `most` makes


@pytest.mark.parametrize("value,kind,expected", [("auto", int, None), ("8", int, 8), (4, int, 4), ("auto", bool, None),
                                                  (True, bool, True), ("off", bool, False)])
def test_auto_settings_parse(value, kind, expected):
    assert parse_auto(value, "MICRO_BATCH_SIZE", kind) == expected


@pytest.mark.parametrize("flag,value", [("--micro-batch-size", "lots"), ("--eval-batch-size", "0"),
                                        ("--gradient-checkpointing", "maybe")])
def test_a_wrong_auto_setting_stops_before_the_model_loads(flag, value, tmp_path, tiny_model_dir):
    data = make_dataset(tmp_path, LABELS[:2])
    if flag == "--gradient-checkpointing":  # a flag without a value; the settings block's value is checked
        import train
        args = ["--model-id", tiny_model_dir, "--train-json", data, *TINY]
        original = train.SETTINGS["GRADIENT_CHECKPOINTING"]
        train.SETTINGS["GRADIENT_CHECKPOINTING"] = value
        try:
            proc = run_main("train.py", *args, check=False)
        finally:
            train.SETTINGS["GRADIENT_CHECKPOINTING"] = original
    else:
        proc = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, *TINY, flag, value, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(("MICRO_BATCH_SIZE", "EVAL_BATCH_SIZE", "GRADIENT_CHECKPOINTING"))
    assert "Traceback" not in proc.stderr and "trainable params" not in proc.stdout


def test_the_out_of_memory_message_names_the_setting_and_a_value_that_fits():
    assert out_of_memory_message("MICRO_BATCH_SIZE", 16, "in training") == \
        "out of GPU memory in training at MICRO_BATCH_SIZE=16: run again with --micro-batch-size 8"
    assert "--quantization 4bit" in out_of_memory_message("BATCH_SIZE", 1, "while generating")


def test_an_out_of_memory_mid_run_saves_a_checkpoint_and_resume_continues(tmp_path, tiny_model_dir, monkeypatch):
    """A step that runs out of memory (simulated: transformers' training_step raises torch.OutOfMemoryError
    at the 7th micro-batch) ends train.py with one line naming the setting and a value that fits, after the
    Trainer saved a checkpoint; --resume with that value finishes the run."""
    from transformers import Trainer

    data = make_dataset(tmp_path, LABELS)
    out = tmp_path / "out"
    real_step, calls = Trainer.training_step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_step(self, *args, **kwargs)

    # BATCH_SIZE 8 in micro-batches of 4 (accumulation 2): the 7th micro-batch is the 4th step's first half
    common = ["--model-id", tiny_model_dir, "--train-json", data, "--val-json", data, "--output-dir", out,
              "--max-steps", 6, "--batch-size", 8, "--save-steps", 1000, *TINY]
    monkeypatch.setattr(Trainer, "training_step", step)
    proc = run_main("train.py", *common, "--micro-batch-size", 4, check=False)
    monkeypatch.setattr(Trainer, "training_step", real_step)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("out of GPU memory in training (a micro-batch of ") and "Traceback" not in proc.stderr
    assert "MICRO_BATCH_SIZE=4: run again with --micro-batch-size 2" in last
    assert f"{out}/checkpoint-4 saved, add --resume" in last
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file() and not (out / "final").exists()

    resumed = run_main("train.py", *common, "--micro-batch-size", 2, "--resume")
    assert (out / "final" / "adapter_config.json").is_file()
    assert "[eval @ step 6]" in resumed.stdout


def test_gradient_checkpointing_with_packing_trains_the_same(tmp_path, tiny_model_dir):
    """GRADIENT_CHECKPOINTING (what auto turns on for small cards) with packed rows, the default: the same
    losses as without it (the recomputed forward is the same computation), and infer.py loads the result."""
    from test_modes import logged_losses

    data = make_dataset(tmp_path, LABELS)
    losses = {}
    for flag in ("--gradient-checkpointing", "--no-gradient-checkpointing"):
        out = tmp_path / flag
        # 6 steps of 4 samples, logged each step: enough to compare, short on a CPU
        proc = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, "--output-dir", out,
                        "--max-steps", 6, "--batch-size", 4, "--logging-steps", 1, "--save-steps", 1000,
                        "--learning-rate", 3e-3, *TINY, flag)
        losses[flag] = logged_losses(proc.stdout)
        assert (out / "final" / "adapter_config.json").is_file()
    assert len(losses["--gradient-checkpointing"]) >= 6
    assert losses["--gradient-checkpointing"] == pytest.approx(losses["--no-gradient-checkpointing"], rel=1e-4)


def test_auto_says_what_it_chose_on_a_cpu(tmp_path, tiny_model_dir):
    """train.py's defaults (MICRO_BATCH_SIZE and GRADIENT_CHECKPOINTING auto) print the one line of the choice
    on a CPU too, where nothing is probed."""
    data = make_dataset(tmp_path, LABELS[:4])
    # 1 step of 4 samples: the line comes before training, nothing more is needed
    proc = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, "--output-dir", tmp_path / "out",
                    "--max-steps", 1, "--batch-size", 4, *TINY)
    assert ("micro-batch 4, gradient checkpointing off (MICRO_BATCH_SIZE=auto, GRADIENT_CHECKPOINTING=auto): "
            "no GPU: nothing probed, the whole per-process batch") in proc.stdout


def lora_trainer(model_dir, tmp_path, accumulation: int, **collator_options):
    """train.py's plain OcrTrainer on the tiny model (LoRA, CPU), its collator packing as the default does."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

    from latexocr.batching import SampleEncoder, TrainCollator
    from latexocr.modeling import setup_training_mode
    from latexocr.sample import sizing_for
    from latexocr.training import OcrTrainer

    processor = AutoProcessor.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = setup_training_mode(AutoModelForImageTextToText.from_pretrained(model_dir), "lora", 8, 16, 0.0)
    collator = TrainCollator(SampleEncoder(processor, sizing_for(processor)), packed=True, **collator_options)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True,
                             gradient_accumulation_steps=accumulation, report_to="none", remove_unused_columns=False,
                             label_names=["labels"])
    trainer = OcrTrainer(model=model, args=args, data_collator=collator, split_on_out_of_memory=True)
    return trainer, collator


def one_step(trainer, batches) -> tuple[float, dict]:
    """The micro-batches of one optimizer step as the Trainer runs them: the step's supervised-token count
    from their labels, then training_step on each. Returns the summed loss and the LoRA gradients."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer.out_of_memory.pending = False
    num_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    trainer.current_gradient_accumulation_steps = len(batches)
    loss = sum(float(trainer.training_step(model, dict(b), num_items)) for b in batches)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_micro_batch_over_the_probed_size_runs_in_halves_with_the_same_loss_and_gradients(
        tiny_model_dir, formula_images, tmp_path):
    """A micro-batch of more tokens than the probe measured comes in halves (TrainCollator split_over): its
    loss and every LoRA gradient are those of the whole micro-batch (each pass divided by the step's
    supervised-token count), also as the second micro-batch of an accumulated step."""
    from latexocr.batching import PARTS_KEY

    trainer, whole = lora_trainer(tiny_model_dir, tmp_path, accumulation=2)
    first, second = formula_images[:3], formula_images[3:8]
    reference = one_step(trainer, [whole(first), whole(second)])
    size = whole(second)["input_ids"].shape[1]
    split = dataclasses.replace(whole, split_over=size - 1)  # only the second micro-batch is over the size
    batches = [split(first), split(second)]
    assert PARTS_KEY not in batches[0] and len(batches[1][PARTS_KEY]) == 2
    assert sum(p["input_ids"].shape[1] for p in batches[1][PARTS_KEY]) == size
    loss, grads = one_step(trainer, batches)
    assert trainer.out_of_memory.split == 1
    assert loss == pytest.approx(reference[0], rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[1][name], rtol=1e-4, atol=1e-6)


def test_a_pass_that_runs_out_of_memory_runs_again_in_halves(tiny_model_dir, formula_images, tmp_path, monkeypatch):
    """A simulated torch.OutOfMemoryError in a micro-batch's forward (another process took memory):
    the pass runs again once as two halves, rebuilt from its samples, and the step's loss and gradients
    are the whole micro-batch's; a half that runs out too stops training (checkpoint path) instead."""
    trainer, collator = lora_trainer(tiny_model_dir, tmp_path, accumulation=1, keep_samples=True)
    samples = formula_images[:4]
    reference = one_step(trainer, [collator(samples)])
    real_forward, calls = type(trainer).step_loss, []

    def step_loss(self, model, inputs):
        calls.append(inputs["input_ids"].shape[1])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, model, inputs)

    monkeypatch.setattr(type(trainer), "step_loss", step_loss)
    loss, grads = one_step(trainer, [collator(samples)])
    assert len(calls) == 3 and calls[1] + calls[2] == calls[0]  # the whole, then its two halves
    assert trainer.out_of_memory.retried == 1 and trainer.out_of_memory.hit is None
    assert loss == pytest.approx(reference[0], rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[1][name], rtol=1e-4, atol=1e-6)

    calls.clear()
    monkeypatch.setattr(type(trainer), "step_loss", lambda self, model, inputs: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory (simulated)")))
    trainer.model.zero_grad(set_to_none=True)
    assert float(trainer.training_step(trainer.model, collator(samples), 10)) == 0.0
    assert trainer.out_of_memory.hit and trainer.out_of_memory.retried == 2


def test_grpo_passes_hold_the_tokens_the_sft_probe_fitted():
    # run on an H200: the SFT probe fitted 64 samples (~13k tokens) and GRPO took 64 / 8 = 8 images per
    # pass, 64 completions of 256 new tokens (21k tokens): out of memory. Passes are sized by tokens now.
    from latexocr.memory import grpo_images_per_pass

    assert grpo_images_per_pass(13_000, share=64, generations=8, longest_sample=300, max_new_tokens=256) == 2
    assert grpo_images_per_pass(200_000, share=64, generations=8, longest_sample=300, max_new_tokens=256) == 32
    assert grpo_images_per_pass(100, share=64, generations=8, longest_sample=300, max_new_tokens=256) == 1
    assert grpo_images_per_pass(20_000, share=12, generations=8, longest_sample=300, max_new_tokens=256) == 4


def test_grpo_passes_grow_into_the_memory_the_sft_probe_left_free():
    """Run O2 on an H200: SFT's probe stopped at its largest candidate (BATCH_SIZE 64: 14,906 tokens in
    98.9 GiB of 125.4 usable, ~5 GiB of it weights and optimizer state), and GRPO's passes, sized by those
    tokens, held 2 images (16 completions) and peaked at 35 GiB. Scaled by the measured bytes per token to
    the budget, a pass holds 4 images; a probe that filled the card leaves the passes as they were."""
    from latexocr.memory import Choice, grpo_images_per_pass

    o2 = Choice(64, False, "", tokens=14_906, peak=int(98.9 * GIB), base=5 * GIB, budget=int(125.4 * GIB))
    assert 19_000 < o2.tokens_within_budget() < 20_500
    images = dict(share=64, generations=8, longest_sample=274, max_new_tokens=256)
    assert grpo_images_per_pass(o2.tokens, **images) == 2  # before: the probed tokens only
    assert grpo_images_per_pass(o2.tokens_within_budget(), **images) == 4
    full = dataclasses.replace(o2, peak=int(125 * GIB))  # the probe used the card: nothing more
    assert 14_906 <= full.tokens_within_budget() < 15_000
    assert grpo_images_per_pass(full.tokens_within_budget(), **images) == 2
    assert Choice(16, False, "", tokens=1_000).tokens_within_budget() == 1_000  # not probed (a CPU, a given size)


def test_the_choice_carries_the_probe_that_measured_its_tokens():
    budget = 125 * GIB
    choice = choose_training_batch(divisors_descending(16), run_m_probe(RUN_M_P90), budget,
                                   worst_probe=run_m_probe(RUN_M_WORST))
    assert choice.tokens == RUN_M_WORST[16]  # the longest samples fitted: theirs is the larger batch
    assert choice.peak == run_m_probe(RUN_M_WORST)(16, False).peak and choice.budget == budget
    split = choose_training_batch(divisors_descending(16), run_m_probe(RUN_M_P90), int(13.5 * GIB),
                                  worst_probe=run_m_probe(RUN_M_WORST))
    assert (split.tokens, split.peak) == (RUN_M_P90[8], run_m_probe(RUN_M_P90)(8, False).peak)
    assert split.tokens_within_budget() >= split.tokens


def test_checkpointing_switched_off_after_a_probe_leaves_no_gradient_flowing_into_the_embeddings(tiny_model_dir):
    """Auto probes with checkpointing on, then may train without it. Checkpointing makes the frozen embedding's
    output carry gradient (a forward hook); switched off, the model must be as before. transformers registers
    that hook itself, and a second registration orphaned it: training after the probe kept ~2 GiB more at a
    16 GiB cap and ran at 0.76-0.84 of the same setting given by hand (docs/BENCHMARKS.md run P)."""
    from latexocr.memory import set_checkpointing
    from latexocr.modeling import add_lora, load_model

    model = add_lora(load_model(str(tiny_model_dir), torch.float32), 8, 16, 0.0)
    embeddings = model.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3]])
    before = (embeddings(ids).requires_grad, len(embeddings._forward_hooks))
    set_checkpointing(model, True)
    assert embeddings(ids).requires_grad and len(embeddings._forward_hooks) == 1
    set_checkpointing(model, False)
    assert (embeddings(ids).requires_grad, len(embeddings._forward_hooks)) == before == (False, 0)


@pytest.mark.parametrize("tune", ["lora", "lora_vision"])
def test_checkpointing_runs_no_backward_through_a_frozen_vision_tower(tiny_model_dir, tune):
    """With the tower frozen (LoRA on the language model), checkpointing makes only the language model's input
    carry gradient: the tower's output carries none, so the step's backward does not reach it and its
    checkpointed blocks do not run their forward again (transformers' own hook on the tower's patch embedding
    made both happen every step). With the tower trained (lora_vision), gradient reaches it as before."""
    from latexocr.memory import set_checkpointing
    from latexocr.modeling import add_lora, load_model, lora_targets, vision_tower_of

    base = load_model(str(tiny_model_dir), torch.float32)
    model = add_lora(base, 8, 16, 0.0, targets=lora_targets(base, tune))
    model.train()
    _, tower = vision_tower_of(model)
    seen = []
    hook = tower.register_forward_hook(lambda module, args, out: seen.append(out.pooler_output.requires_grad))
    pixels = torch.randn(16, 3 * 2 * 14 * 14)
    grid = torch.tensor([[1, 4, 4]])
    set_checkpointing(model, True)
    tower(pixels, grid_thw=grid)
    hook.remove()
    assert seen == [tune == "lora_vision"]
    set_checkpointing(model, False)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_checkpointing_gives_the_same_adapter_gradients(tiny_family_dirs, tmp_path_factory, formula_images, family):
    """A training step with gradient checkpointing (the input-gradient hook on the language model's embeddings
    only, the frozen tower left out) gives the LoRA weights the gradients the plain step gives (fp32), in the
    families whose towers differ (Qwen3-VL's deepstack features enter the language model at several layers)."""
    from transformers import AutoProcessor

    from latexocr.batching import SampleEncoder, TrainCollator
    from latexocr.memory import set_checkpointing
    from latexocr.modeling import add_lora, load_model
    from latexocr.sample import sizing_for
    from latexocr.testing import build_tiny_model
    from latexocr.training import supervised_loss

    folder = (tiny_family_dirs[family] if family in tiny_family_dirs
              else build_tiny_model(tmp_path_factory.mktemp(f"tiny_{family}"), family))
    processor = AutoProcessor.from_pretrained(folder)
    batch = TrainCollator(SampleEncoder(processor, sizing_for(processor)), packed=False)(formula_images[:3])
    torch.manual_seed(0)
    model = add_lora(load_model(str(folder), torch.float32), 8, 16, 0.0)
    model.train()

    def adapter_grads(checkpointing: bool) -> dict:
        set_checkpointing(model, checkpointing)
        model.zero_grad(set_to_none=True)
        loss, count = supervised_loss(model, dict(batch))
        (loss / count).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    assert plain.keys() == checkpointed.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6), name
    set_checkpointing(model, False)


def test_the_logged_peak_counts_training_not_the_probe_before_it(monkeypatch):
    """gpu_mem_peak_gib on the log lines is training's own peak: the counter is reset when training begins,
    so MICRO_BATCH_SIZE=auto's probe of the longest samples (near the card's limit) does not show as
    training's (run P: 14.39 GiB reported, the probe's, above what its passes reached)."""
    from types import SimpleNamespace

    from latexocr.training import ThroughputCallback

    peak = {"bytes": int(14.39 * GIB)}  # what the probe left in the counter
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: peak.update(bytes=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: peak["bytes"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a: {})
    callback = ThroughputCallback(16)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    peak["bytes"] = max(peak["bytes"], int(11.44 * GIB))  # training's passes
    state.global_step, state.num_input_tokens_seen = 10, 1000
    logs = {"loss": 1.0}
    callback.on_log(None, state, None, logs=logs)
    assert logs["gpu_mem_peak_gib"] == 11.44


def test_bench_memory_runs_cells_at_once_within_the_card():
    """bench_memory --parallel: never more cells at once than asked, their caps together within the card
    (a whole-GPU cell alone), every cell run once, and a larger cell waiting lets smaller ones go ahead."""
    import sys
    import threading
    import time
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_memory import run_in_parallel

    cells = [("f", cap, "train", f"c{i}", (), 1) for i, cap in enumerate([40, 40, 24, 16, 12, 40, 0.0, 12, 16])]
    lock, running, seen, started, ran = threading.Lock(), [], [], [], []

    def run_cell(cell, concurrent):
        with lock:
            started.append(cell[3])
            running.append(cell)
            seen.append((len(running), sum(c[1] or 100 for c in running), any(c[1] == 0 for c in running)))
        time.sleep(0.02)
        with lock:
            running.remove(cell)
            ran.append(cell[3])

    run_in_parallel(cells, most=3, gib=100, run_cell=run_cell)
    assert sorted(ran) == sorted(c[3] for c in cells)
    assert max(n for n, _, _ in seen) == 3 and all(n <= 3 and gib <= 100 for n, gib, _ in seen)
    assert all(n == 1 for n, _, whole in seen if whole)  # "none" (the whole GPU) runs alone
    assert started[:3] == ["c0", "c1", "c3"]  # 16 started beside 40 + 40 while 24 waited

    # --deadline: a cell whose turn comes after the deadline is not started, and is returned for --resume
    ran.clear()
    left = run_in_parallel(cells, most=3, gib=100, run_cell=run_cell, starts=lambda cell: len(ran) < 4)
    assert len(ran) >= 4 and sorted(ran + [c[3] for c in left]) == sorted(c[3] for c in cells) and left

    # the deadline passing just as the last running cell ends: nothing runs, nothing waits, and the call returns
    # (it waited forever for a cell to end: a CI run hung here). In a thread, so that a regression fails, not hangs.
    ran.clear()
    answer = []
    caller = threading.Thread(target=lambda: answer.append(run_in_parallel(
        cells[:2], most=1, gib=100, run_cell=run_cell, starts=lambda cell: not ran)), daemon=True)
    caller.start()
    caller.join(timeout=30)
    assert answer == [[cells[1]]] and ran == ["c0"]


def test_matrix_table_shows_each_cells_choice_or_its_stop(tmp_path):
    """bench/matrix_table.py (the README's family x card tables): a completed cell shows auto's choice, speed
    and peak, a stopped one the memory its probe needed; a cell set by hand is not auto's; a traceback is
    counted, never hidden."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    results = tmp_path / "bench_memory.jsonl"
    cells = [
        {"name": "train_qwen2vl-2b_16gib", "exit": 0, "traceback": False, "samples_per_s": 31.7, "train_peak_gib": 11.97,
         "auto_choice": "micro-batch 8, gradient checkpointing off (MICRO_BATCH_SIZE=auto, ...): ...", "concurrent": 6},
        {"name": "train_qwen2vl-2b_16gib_m16_ckpt", "exit": 0, "traceback": False, "samples_per_s": 99.0},
        {"name": "train_qwen3_5-4b_12gib", "exit": 1, "traceback": False,
         "last_line": "out of GPU memory: the smallest probe (micro-batch 1, checkpointing) needs 11.2 GiB of the 9.9 GiB"},
        {"name": "infer_qwen3_5-2b_8gib_4bit", "exit": 0, "traceback": False, "images_per_s": 40.9, "peak_gib": 5.19,
         "auto_rows": "96"},
        {"name": "infer_qwen3_5-4b_12gib", "exit": 1, "traceback": True, "last_line": "Traceback"},
    ]
    results.write_text("".join(json.dumps(c) + "\n" for c in cells))
    script = Path(__file__).resolve().parents[1] / "bench" / "matrix_table.py"
    out = subprocess.run([sys.executable, str(script), str(results)], capture_output=True, text=True, check=True).stdout
    assert "| Qwen2-VL-2B |" in out and "8: 31.7 samples/s, 12.0 GiB (6 at once)" in out and "99.0" not in out
    assert "stops: needs 11.2 of 9.9 GiB" in out
    assert "96 rows: 40.9 images/s, 5.2 GiB" in out and "8 GiB, 4-bit" in out
    assert "**traceback**" in out and "1 tracebacks: infer_qwen3_5-4b_12gib" in out


def test_the_probe_step_runs_under_the_autocast_training_does(monkeypatch):
    """training_step_probe's forward runs under the autocast the Trainer's forward has (bf16 / fp16 on a GPU:
    accelerate wraps the model's forward), so the probe measures training's activations: without it the fp32
    LoRA weights and Qwen3.5's fp32 delta rule kept fp32 ones training does not (run X: 12.8 GiB probed,
    9.56 trained). On the CPU, with stand-ins for the CUDA memory counters and checkpointing switch."""
    from latexocr import memory
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: GIB)
    monkeypatch.setattr(memory, "release", lambda: None)
    monkeypatch.setattr(memory, "set_checkpointing", lambda model, on: None)
    model, seen = torch.nn.Linear(4, 4), []

    def step_loss(model, batch):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        out = model(batch["x"])
        seen.append(out.dtype)
        return out.float().sum(), out.shape[0]

    class Samples:
        lengths = [3, 5, 7, 9]

        def __getitem__(self, i):
            return i

    class Collate:
        packed = False

        def __call__(self, items):
            return {"x": torch.ones(len(items), 4), "input_ids": torch.ones(len(items), 9)}

    for dtype in (torch.bfloat16, None):
        seen.clear()
        probed = memory.training_step_probe(model, Samples(), Collate(), step_loss, 0, autocast_dtype=dtype)(2, False)
        assert set(seen) == ({torch.bfloat16} if dtype else {None, torch.float32}), seen
        assert probed.peak == GIB and probed.micro == 2
    assert model.weight.grad is None  # the probe leaves no gradient behind


def test_matrix_table_pairs_auto_with_the_best_hand_setting(tmp_path):
    """bench/matrix_table.py --pairs (issue 28's 90 % check): per card, the median of auto's repeats against the
    best hand setting's median, their ratio printed; a stopped cell has no speed; a card without both is left out."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    cells = [("train_qwen3_5-2b_16gib_r1", 15.0), ("train_qwen3_5-2b_16gib_r2", 19.0), ("train_qwen3_5-2b_16gib_r3", 18.0),
             ("train_qwen3_5-2b_16gib_m16_ckpt_r1", 20.0), ("train_qwen3_5-2b_16gib_m16_ckpt_r2", 18.0),
             ("train_qwen3_5-2b_16gib_m4_r1", 30.0), ("infer_qwen2vl-2b_24gib", 80.0), ("infer_qwen2vl-2b_24gib_b512", 90.0),
             ("infer_qwen2vl-2b_24gib_b256", 95.0), ("infer_qwen3_5-2b_16gib", 70.0)]
    lines = [{"name": name, "exit": 0, ("samples_per_s" if name.startswith("train") else "images_per_s"): speed}
             for name, speed in cells]
    lines[5]["exit"] = 1  # m4 stopped: not the best by hand whatever it printed
    results = tmp_path / "bench_memory.jsonl"
    results.write_text("".join(json.dumps(c) + "\n" for c in lines))
    script = Path(__file__).resolve().parents[1] / "bench" / "matrix_table.py"
    out = subprocess.run([sys.executable, str(script), "--pairs", str(results)], capture_output=True, text=True,
                         check=True).stdout
    assert "| train, Qwen3.5-2B, 16 GiB | 18.0 (median of 3) samples/s | m16_ckpt: 19.0 (median of 2) | 0.95 |" in out
    assert "| infer, Qwen2-VL-2B, 24 GiB | 80.0 images/s | b256: 95.0 | 0.84 |" in out
    assert "infer, Qwen3.5-2B" not in out  # no hand cell at that card: no row


def test_bench_memory_keeps_infer_pys_time_lines_with_the_cell(monkeypatch, tmp_path):
    """bench_memory's inference cell run with --extra=--profile: infer.py's seconds per phase and the model load's
    parts come back in the cell's result (the logs stay on the GPU machine)."""
    import subprocess
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_memory
    stderr = ("BATCH_SIZE=auto: 512 images per batch (probed)\n"
              "time: imports 3.1 s, model load 4.2 s, engine 9.9 s, other 0.1 s, total 17.3 s\n"
              "time, model load: processor 0.4 s, weights 2.9 s, rest 0.9 s\n")
    done = subprocess.CompletedProcess([], 0, stdout="", stderr=stderr)
    monkeypatch.setattr(bench_memory, "run", lambda cmd, work, cap, name: (done, 17.5))
    cell = bench_memory.infer(tmp_path / "model", tmp_path, 24, "infer_x_24gib")
    assert cell["auto_rows"] == "512" and cell["images_per_s"] == round(2048 / 17.5, 1)
    assert cell["profile"] == stderr.splitlines()[1:]
    done.stderr = "BATCH_SIZE=auto: 512 images per batch (probed)\n"  # without --profile: no such key
    assert "profile" not in bench_memory.infer(tmp_path / "model", tmp_path, 24, "infer_x_24gib")


def test_bench_memory_repeats_pairs_in_turned_order(tmp_path):
    """--repeat: every other round runs its cells in reverse (a, b, b, a, a, b), so that going first, and so
    paying the machine's cold start (Triton's kernel cache, a cold disk), falls on auto and on the hand setting
    alike (run Y: auto went first in every pair; Qwen2-VL-2B auto's first cell, the machine's first, ran 64.8
    images/s against 92.1 in its second)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "bench_memory.py"), "--work", str(tmp_path),
                          "--families", "qwen2vl-2b", "--caps", "24", "--repeat", "3", "--dry-run",
                          "--cells", "infer_qwen2vl-2b_24gib,infer_qwen2vl-2b_24gib_b512"],
                         capture_output=True, text=True, check=True).stdout
    order = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  infer_")]
    assert order == ["infer_qwen2vl-2b_24gib_r1", "infer_qwen2vl-2b_24gib_b512_r1",
                     "infer_qwen2vl-2b_24gib_b512_r2", "infer_qwen2vl-2b_24gib_r2",
                     "infer_qwen2vl-2b_24gib_r3", "infer_qwen2vl-2b_24gib_b512_r3"]
