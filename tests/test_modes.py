"""Training modes (train.py TUNE, UNFREEZE_MERGER, VISION_LEARNING_RATE, QUANTIZATION, DTYPE) on tiny models, CPU.

Each mode trains on 16 samples (the loss falls), saves, is reloaded by infer.py in a new process
with the predictions train.py's own final evaluation scored, and merges into a plain model folder
that predicts the same again. The trainable-parameter counts of README's table are recomputed for
the real Qwen2-VL-2B architecture on the meta device.
"""
from __future__ import annotations

import ast
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from helpers import LABELS, TINY, make_dataset, printed_metrics, read_csv, run_main

ROOT = Path(__file__).resolve().parents[1]
SHARED_CONFIG = ROOT.parent / "shared" / "qwen2vl-2b" / "config.json"
# Settings that differ from train.py's defaults, and why: 12 steps at a high learning rate so that a tiny
# model learns on a CPU in seconds; TINY's local model, no workers, no tracking, short generation. The
# base-model evaluation stays on, as by default (TINY turns it off elsewhere): QLoRA once crashed after it.
FAST = ["--max-steps", 12, "--batch-size", 16, "--learning-rate", 6e-3,
        "--lora-alpha", 64, "--save-steps", 1000, "--logging-steps", 1, *TINY, "--eval-base-model"]


def logged_losses(stdout: str) -> list[float]:
    return [float(ast.literal_eval(m)["loss"]) for m in re.findall(r"\{'loss': [^}]*\}", stdout)]


def eval_line(stdout: str) -> dict:
    """train.py's last '[eval @ step N] exact_match x, edit_distance y, ...' as numbers (4 digits)."""
    line = [ln for ln in stdout.splitlines() if ln.startswith("[eval @ step")][-1]
    return {k: float(v) for k, v in re.findall(r"(\w+) ([-\d.e]+)", line.split("] ", 1)[1])}


def same_scores(train_eval: dict, metrics: dict) -> bool:
    return all(float(f"{metrics[k]:.4g}") == train_eval[k] for k in ("exact_match", "edit_distance", "bleu4"))


def load(folder):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(folder).eval()


def vision_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.model.visual.state_dict().items()}


def vision_output(model, seed: int = 0) -> torch.Tensor:
    """The vision tower's (merger included) features of one fixed random image of 8x8 patches."""
    visual = model.model.visual
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 8, 8]])
    dim = 3 * model.config.vision_config.temporal_patch_size * model.config.vision_config.patch_size ** 2
    with torch.no_grad():
        return visual(torch.rand(64, dim, generator=g), grid_thw=grid).pooler_output


# ------------------------------------------------------------------------------ target selection
def test_lora_targets_are_found_by_walking_the_model(tiny_family_dirs):
    from latexocr.modeling import lora_targets, vision_tower_of
    model = load(tiny_family_dirs["qwen2_vl"])
    # the tutorial's default, byte for byte: what adapters trained before these modes recorded
    tutorial = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_targets(model, "lora") == r".*language_model.*\.(" + "|".join(tutorial) + r")$"
    for family, folder in tiny_family_dirs.items():
        model = load(folder)
        pattern = lora_targets(model, "lora_vision")
        matched = {n for n, _ in model.named_modules() if re.fullmatch(pattern, n)}
        linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        assert matched == linears, (family, matched ^ linears)  # every linear layer but the LM head, nothing else
        vision_name, _ = vision_tower_of(model)
        assert not {n for n, _ in model.named_modules() if re.fullmatch(lora_targets(model, "lora"), n)
                    and n.startswith(vision_name)}, family


def test_vision_learning_rate_is_applied_to_the_vision_groups(tiny_model_dir, tmp_path):
    from transformers import TrainingArguments

    from latexocr.modeling import setup_training_mode, vision_parameter_ids
    from latexocr.training import OcrTrainer
    model = setup_training_mode(load(tiny_model_dir), "lora_vision", 8, 16, 0.0, unfreeze_merger=True)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.01, report_to="none",
                             use_cpu=True)
    trainer = OcrTrainer(model=model, args=args, vision_learning_rate=3e-5)
    optimizer = trainer.create_optimizer()
    vision = vision_parameter_ids(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable weight once, nothing frozen
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= vision or not ids & vision  # a group is all vision or none
        assert group["lr"] == (3e-5 if ids <= vision else 1e-4), group["lr"]
    assert {g["lr"] for g in optimizer.param_groups} == {3e-5, 1e-4}
    assert any(g["weight_decay"] == 0.01 for g in optimizer.param_groups)  # transformers' decay split kept


@pytest.mark.skipif(not SHARED_CONFIG.exists(), reason="../shared/qwen2vl-2b/config.json not present")
def test_trainable_parameter_counts_match_readme_for_the_real_2b_config():
    sys.path.insert(0, str(ROOT / "bench"))
    from mode_params import mode_parameter_counts
    counts = mode_parameter_counts(SHARED_CONFIG)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for label, c in counts.items():
        row = re.search(rf"^\| `?{re.escape(label)}`? \| ([\d,]+) \| ([\d,]+) \|", readme, re.M)
        assert row, f"README has no modes-table row for {label!r}"
        assert (int(row[1].replace(",", "")), int(row[2].replace(",", ""))) == (c["trainable"], c["trainable_vision"])
    assert counts["lora"]["trainable"] == 73_859_072  # what the tutorial's print_trainable_parameters shows
    assert counts["full + UNFREEZE_VISION"]["trainable"] == counts["full"]["total"]


# ------------------------------------------------------------------------ each mode, end to end
MODE_FLAGS = {"lora": [], "lora_vision": ["--tune", "lora_vision", "--vision-learning-rate", 3e-3],
              "full": ["--tune", "full", "--learning-rate", 1e-3]}


# The one train -> infer -> merge chain: every mode on Qwen2-VL, LoRA on every other family.
CHAIN = [("qwen2_vl", "lora"), ("qwen2_vl", "lora_vision"), ("qwen2_vl", "full"),
         ("qwen2_5_vl", "lora"), ("qwen3_vl", "lora"), ("qwen3_5", "lora")]


@pytest.mark.parametrize("family,mode", CHAIN, ids=[f"{f}-{m}" for f, m in CHAIN])
def test_train_infer_merge_chain(family, mode, tmp_path, tiny_family_dirs):
    """train.py learns (the loss falls), saves what infer.py loads with no extra flag (the scores train.py's
    evaluation printed), and --merge-to writes one plain model folder that predicts the same."""
    model_dir = tiny_family_dirs[family]
    data = make_dataset(tmp_path, LABELS)
    out = tmp_path / "out"
    train = run_main("train.py", "--model-id", model_dir, "--train-json", data, "--val-json", data,
                     "--output-dir", out, *FAST, *MODE_FLAGS[mode])
    losses = logged_losses(train.stdout)
    assert len(losses) >= 10 and losses[-1] < 0.7 * losses[0], losses
    assert f"TUNE={mode}: trainable params" in train.stdout
    final = out / "final"
    assert (final / ("config.json" if mode == "full" else "adapter_config.json")).is_file()
    assert (final / "tokenizer_config.json").is_file()
    if mode == "lora":  # LoRA sits on the language model's linear layers only
        from safetensors import safe_open
        with safe_open(final / "adapter_model.safetensors", "pt") as f:
            keys = list(f.keys())
        assert keys and all("language_model" in k for k in keys), keys[:5]
        assert {k.split(".")[-3] for k in keys if "lora_A" in k} >= {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"}

    # infer.py with no extra flags: the predictions train.py's evaluation scored
    preds = tmp_path / "preds.csv"
    proc = run_main("infer.py", data, "--model-id", model_dir, "--model-source", "local", "--output-dir", out,
                    "--output", preds, "--num-workers", 0, "--max-new-tokens", 12)
    assert str(final) in proc.stderr
    assert same_scores(eval_line(train.stdout), printed_metrics(proc.stdout))
    # --merge-to: one plain model folder, loaded as --model-id, predicts the same
    merged = tmp_path / "merged"
    run_main("infer.py", "--model-id", model_dir, "--model-source", "local", "--output-dir", out,
             "--merge-to", merged)
    merged_preds = tmp_path / "merged.csv"
    run_main("infer.py", data, "--model-id", merged, "--model-source", "local", "--adapter", "none",
             "--output", merged_preds, "--num-workers", 0, "--max-new-tokens", 12)
    assert [r["prediction"] for r in read_csv(merged_preds)] == [r["prediction"] for r in read_csv(preds)]
    assert not any("lora" in n for n, _ in load(merged).named_parameters())

    # only lora_vision changes the vision tower (merger included): every other mode leaves each of its
    # weights as loaded (on a GPU training loads, and merges into, bf16: compared in the saved dtype)
    base, trained = vision_weights(load(model_dir)), vision_weights(load(merged))
    assert base.keys() == trained.keys()
    same = {k for k, w in trained.items() if torch.equal(base[k].to(w.dtype), w)}
    if mode == "lora_vision":
        changed = set(trained) - same
        assert any(k.endswith("attn.qkv.weight") for k in changed) and any(k.startswith("merger.") for k in changed)
        assert not torch.allclose(vision_output(load(model_dir)), vision_output(load(merged)).float(), atol=1e-4)
    else:
        assert same == set(trained), sorted(set(trained) - same)[:5]


def test_qlora_4bit_trains_and_reloads(tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (requirements.txt has it)")
    data = make_dataset(tmp_path, LABELS)
    out = tmp_path / "out"
    train = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, "--val-json", data,
                       "--output-dir", out, *FAST, "--quantization", "4bit")
    losses = logged_losses(train.stdout)
    assert losses[-1] < 0.7 * losses[0], losses
    proc = run_main("infer.py", data, "--model-id", tiny_model_dir, "--model-source", "local", "--output-dir", out,
                      "--output", tmp_path / "p.csv", "--num-workers", 0, "--max-new-tokens", 12,
                      "--quantization", "4bit")
    assert same_scores(eval_line(train.stdout), printed_metrics(proc.stdout))


@pytest.mark.parametrize("flags,message", [
    (["--tune", "full", "--quantization", "4bit"], "QUANTIZATION=4bit trains LoRA on a 4-bit base"),
    (["--tune", "lora", "--unfreeze-vision"], "UNFREEZE_VISION trains the whole vision tower"),
    (["--tune", "qlora"], "TUNE must be one of lora, lora_vision, full"),
    (["--dtype", "fp16"], "DTYPE=fp16 needs a CUDA GPU"),
])
def test_wrong_mode_settings_stop_with_one_line(flags, message, tmp_path, tiny_model_dir):
    if flags == ["--dtype", "fp16"] and torch.cuda.is_available():
        pytest.skip("fp16 trains on a CUDA GPU")
    data = make_dataset(tmp_path, LABELS[:2])
    proc = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, "--output-dir", tmp_path / "o",
                      *TINY, *flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_fp16_overflow_stops_with_one_line_naming_what_to_use():
    from types import SimpleNamespace

    from latexocr.training import Fp16OverflowStop
    stop, state = Fp16OverflowStop(), SimpleNamespace(global_step=7)
    stop.on_log(SimpleNamespace(fp16=True), state, None, logs={"loss": 2.5})       # finite: goes on
    stop.on_log(SimpleNamespace(fp16=False), state, None, logs={"loss": float("nan")})  # not fp16: not ours
    with pytest.raises(SystemExit, match=r"DTYPE=fp16: the loss is nan at step 7 .*DTYPE=bf16.*DTYPE=fp32"):
        stop.on_log(SimpleNamespace(fp16=True), state, None, logs={"loss": float("nan")})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training (loss scaling) needs a CUDA GPU")
def test_fp16_trains_on_gpu(tmp_path, tiny_model_dir):
    data = make_dataset(tmp_path, LABELS)
    train = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, "--val-json", data,
                       "--output-dir", tmp_path / "out", *FAST, "--dtype", "fp16")
    losses = logged_losses(train.stdout)
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.7 * losses[0], losses


def test_wrapping_the_model_in_lora_prints_no_library_warning(tiny_model_dir, recwarn):
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` while it wraps a model: that one
    FutureWarning, printed by every train.py and infer.py run, is left out (modeling.peft_wrapping); the
    adapter is added as before."""
    from transformers import AutoModelForImageTextToText

    from latexocr.modeling import add_lora
    model = add_lora(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), r=4, alpha=8, dropout=0.0)
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]
    assert any("lora_A" in name for name, _ in model.named_parameters())
