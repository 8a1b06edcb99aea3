"""infer.py: batching, inputs and outputs, bad input, missing checkpoints, merged export. CPU, tiny model.

One adapter is trained once (train.py, a few seconds) and shared by the tests of this module.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import infer
from latexocr.sample import make_record

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["x ^ 2", "a + b = c", "\\pi", "y _ 1", "e ^ x", "1 / 2", "\\beta", "f ( x )"]
SCORE_KEYS = ["exact_match", "edit_distance", "edit_distance_ref", "bleu4", "render_ok", "truncated"]


def draw(path: Path, text: str, size) -> str:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((4, 4), text, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 labelled images of different sizes; a conversation JSON and a CSV with relative paths."""
    folder = tmp_path_factory.mktemp("infer_data")
    records, rows = [], []
    for i, label in enumerate(LABELS):
        draw(folder / "images" / f"{i}.png", label, (90 + 37 * i, 26 + 9 * (i % 4)))
        records.append(make_record(i, f"images/{i}.png", label))
        rows.append({"image_path": f"images/{i}.png", "text": label})
    (folder / "data.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image_path", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def trained(data, tiny_model_dir, tmp_path_factory):
    """train.py's output folder after a short run (OUTPUT_DIR/final holds the adapter)."""
    out = tmp_path_factory.mktemp("infer_train") / "out"
    # PYTHONPROFILEIMPORTTIME: its import trace, for test_a_command_with_an_adapter_imports_no_bitsandbytes
    env = dict(os.environ, SWANLAB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPROFILEIMPORTTIME="1")
    cmd = [sys.executable, str(ROOT / "train.py"), "--model-id", str(tiny_model_dir), "--model-source", "local",
           "--train-json", str(data / "data.json"), "--val-json", str(data / "missing.json"),
           "--output-dir", str(out), "--max-steps", "30", "--batch-size", "8", "--micro-batch-size", "8",
           "--learning-rate", "6e-3", "--lora-alpha", "64", "--lora-dropout", "0", "--num-workers", "0",
           "--save-steps", "1000", "--swanlab-mode", "disabled"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)  # limits: >= 5x idle
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "final" / "adapter_config.json").is_file()
    (out.parent / "train.stderr").write_text(proc.stderr)
    return out


def common(tiny_model_dir, out=None, adapter=None) -> list[str]:
    args = ["--model-id", str(tiny_model_dir), "--model-source", "local", "--num-workers", "0",
            "--max-new-tokens", "8"]
    if out is not None:
        args += ["--output-dir", str(out)]
    if adapter is not None:
        args += ["--adapter", adapter]
    return args


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def printed_metrics(stdout: str) -> dict:
    return json.loads(stdout[stdout.rindex("\n{") + 1:])


# ---------------------------------------------------------------------- 7. batched == unbatched
def test_batched_predictions_equal_unbatched(trained, tiny_model_dir, formula_images, monkeypatch, tmp_path):
    from latexocr import generation
    from latexocr.batching import SampleEncoder
    from latexocr.cli import parse_settings
    from latexocr.generation import predict
    from latexocr.sample import sizing_for

    args = parse_settings(infer.SETTINGS, None, common(tiny_model_dir, trained))
    model, processor, adapter = infer.load_for_inference(args)
    assert adapter == str(trained / "final")
    encoder = SampleEncoder(processor, sizing_for(processor))
    paths = [p for p, _ in formula_images[:10]]
    sizes = {encoder.sizing.target_size(*Image.open(p).size) for p in paths}
    assert len(sizes) >= 3, sizes  # the batch really mixes prompt lengths (left padding)
    # the reference: transformers' generate, one image at a time; infer.py's default engine: the static loop
    one = predict(model, encoder, paths, batch_size=1, max_new_tokens=8, num_workers=0, progress=False,
                  engine="generate")
    many = predict(model, encoder, paths, batch_size=8, max_new_tokens=8, num_workers=0, progress=False)
    assert all(r["error"] is None and isinstance(r["prediction"], str) for r in one + many)
    assert [r["prediction"] for r in many] == [r["prediction"] for r in one]
    # not a degenerate model that says the same thing for every image
    assert len({r["prediction"] for r in one}) > 1, one
    # the workers build one prefill chunk each (here 2 images), a batch is its chunks joined again: the
    # same texts, in input order, with an unreadable image's row an error in its place
    monkeypatch.setattr(generation, "PREFILL_CHUNK_ROWS", 2)
    bad = str(tmp_path / "broken.png")
    Path(bad).write_bytes(b"not an image")
    chunked = predict(model, encoder, paths[:5] + [bad] + paths[5:], batch_size=4, max_new_tokens=8, num_workers=2,
                      progress=False)
    assert chunked[5]["prediction"] is None and "broken.png" in chunked[5]["error"]
    assert [r["prediction"] for r in chunked[:5] + chunked[6:]] == [r["prediction"] for r in one]
    # a batch size that is not whole chunks (3 of chunks of 2): the workers still build chunks, each batch is
    # cut from them (generation.rebatched), not built by one worker while the GPU waits (docs/BENCHMARKS.md run V)
    cut = predict(model, encoder, paths[:5] + [bad] + paths[5:], batch_size=3, max_new_tokens=8, num_workers=2,
                  progress=False)
    assert [r["prediction"] for r in cut] == [r["prediction"] for r in chunked]
    assert cut[5]["error"] == chunked[5]["error"]
    assert generation.loader_unit(3, static=True) == generation.PREFILL_CHUNK_ROWS == 2
    # BATCH_SIZE=auto: the workers start on chunks before the memory probe, which prefills the loader's first
    # chunk (the largest images, with the position ids the decoder uses) instead of building its own; the
    # batches are made even (6 fit, 10 images: two of 5, not 6 + 4); a batch that is not whole chunks (here
    # chunks of 2) is cut from the chunks already built (generation.rebatched); the same texts
    probes = []

    def fake_fit_rows(model, encoder, largest_paths, max_new_tokens, static, batch_setting, chunk=None, **kwargs):
        probes.append(chunk)
        return generation.Fit(6, "monkeypatched", generation.PREFILL_CHUNK_ROWS)

    monkeypatch.setattr(generation, "fit_rows", fake_fit_rows)
    seen = []
    monkeypatch.setattr(generation, "_hand_over", lambda on_batch, results, done: seen.append(len(done)))
    probed = predict(model, encoder, paths, batch_size=None, max_new_tokens=8, num_workers=2, progress=False)
    assert [r["prediction"] for r in probed] == [r["prediction"] for r in one]
    assert seen == [5, 5]
    (chunk,) = probes
    assert "position_ids" in chunk and chunk["input_ids"].shape[0] == 2
    largest = [encoder.sizing.target_size(*Image.open(paths[i]).size) for i in generation._size_order(paths)[-2:]]
    patches = encoder.processor.image_processor.patch_size ** 2
    assert sorted(chunk["image_grid_thw"].prod(-1).tolist()) == sorted(w * h // patches for w, h in largest)


# --------------------------------------------------------------------------- 8. inputs, outputs
def test_inputs_and_outputs(trained, tiny_model_dir, data, tmp_path, capsys):
    base = common(tiny_model_dir, trained)
    images = sorted(str(p) for p in (data / "images").glob("*.png"))

    # a folder -> CSV with image, prediction, error
    infer.main([str(data / "images"), "--output", str(tmp_path / "folder.csv"), *base])
    folder_rows = read_csv(tmp_path / "folder.csv")
    assert list(folder_rows[0]) == ["image", "prediction", "error", "truncated"]
    assert [r["image"] for r in folder_rows] == images
    assert all(r["error"] == "" for r in folder_rows)
    by_image = {r["image"]: r["prediction"] for r in folder_rows}

    # a glob -> JSONL, same predictions
    infer.main(["--input", str(data / "images" / "[0-3].png"), "--output", str(tmp_path / "glob.jsonl"), *base])
    glob_rows = read_jsonl(tmp_path / "glob.jsonl")
    assert [set(r) for r in glob_rows] == [{"image", "prediction", "error", "truncated"}] * 4
    assert [r["image"] for r in glob_rows] == images[:4]
    assert [r["prediction"] for r in glob_rows] == [by_image[p] for p in images[:4]]

    # the conversation JSON -> CSV with labels and per-row scores, metrics printed; --profile: one line of
    # seconds per phase on stderr, adding up to the total a user waited
    capsys.readouterr()
    infer.main([str(data / "data.json"), "--output", str(tmp_path / "json.csv"), "--profile", *base])
    captured = capsys.readouterr()
    out = captured.out
    profile = [line for line in captured.err.splitlines() if line.startswith("time: ")]
    assert len(profile) == 1, captured.err
    phases = {name: float(value) for name, value in re.findall(r"([a-z][a-z -]*?) ([0-9.]+) s", profile[0])}
    assert {"model load", "data wait", "engine", "scoring wait", "write", "total"} <= set(phases), phases
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(phases["total"], abs=0.05)
    # and a line of what the model load is made of (the weights, the adapter and its merge apart), adding up to it
    load_line = [line for line in captured.err.splitlines() if line.startswith("time, model load: ")]
    assert len(load_line) == 1, captured.err
    parts = {name: float(value) for name, value in re.findall(r"([a-z][a-z +-]*?) ([0-9.]+) s", load_line[0][17:])}
    assert {"processor", "config + sample", "weights", "adapter", "merge", "rest"} <= set(parts), parts
    assert sum(parts.values()) == pytest.approx(phases["model load"], abs=0.05)
    metrics = printed_metrics(out)
    assert metrics["adapter"] == str(trained / "final") and metrics["n"] == 8 and metrics["errors"] == 0
    json_rows = read_csv(tmp_path / "json.csv")
    assert list(json_rows[0]) == ["image", "prediction", "error", "label", *SCORE_KEYS]
    assert [r["label"] for r in json_rows] == LABELS
    assert [r["image"] for r in json_rows] == [str(data / "images" / f"{i}.png") for i in range(8)]
    assert [r["prediction"] for r in json_rows] == [by_image[r["image"]] for r in json_rows]
    em = [float(r["exact_match"]) for r in json_rows]
    assert em == [float(r["prediction"].split() == r["label"].split()) for r in json_rows]  # spacing-blind
    assert metrics["exact_match"] == pytest.approx(sum(em) / 8)

    # a CSV (image_path,text) -> JSONL with the same rows
    infer.main([str(data / "data.csv"), "--output", str(tmp_path / "csv.jsonl"), *base])
    csv_rows = read_jsonl(tmp_path / "csv.jsonl")
    assert set(csv_rows[0]) == {"image", "prediction", "error", "label", *SCORE_KEYS}
    assert [(r["image"], r["prediction"], r["label"]) for r in csv_rows] == \
        [(r["image"], r["prediction"], r["label"]) for r in json_rows]

    # a labelled file with no --output: predictions next to it
    infer.main([str(data / "data.csv"), "--limit", "2", *base])
    assert len(read_csv(data / "data.predictions.csv")) == 2

    # one image: its LaTeX on stdout, nothing else
    capsys.readouterr()
    infer.main([images[5], *base])
    assert capsys.readouterr().out == by_image[images[5]] + "\n"


def test_truncated_rows_and_html_report(trained, tiny_model_dir, data, tmp_path, capsys):
    """One new token cannot finish any label: every row hit the limit, and says so."""
    report = tmp_path / "report.html"
    capsys.readouterr()
    infer.main([str(data / "data.json"), "--output", str(tmp_path / "cut.jsonl"), "--report", str(report),
                *common(tiny_model_dir, trained), "--max-new-tokens", "1"])
    metrics = printed_metrics(capsys.readouterr().out.split("\nreport: ")[0])
    rows = read_jsonl(tmp_path / "cut.jsonl")
    assert [r["truncated"] for r in rows] == [True] * 8 and metrics["truncated_rate"] == 1.0
    assert all(isinstance(r["render_ok"], bool) for r in rows)
    assert metrics["render_rate"] == pytest.approx(sum(r["render_ok"] for r in rows) / 8)
    page = report.read_text(encoding="utf-8")
    assert page.count("<tr><td>") == 8 + 1 and page.count("data:image/png;base64,") == 8  # + the summary's row
    assert page.count("hit MAX_NEW_TOKENS") == 8
    eds = [r["edit_distance"] for r in rows]
    order = [int(m) for m in re.findall(r'alt="[^"]*?(\d+)\.png"', page)]
    assert [eds[i] for i in order] == sorted(eds, reverse=True)  # worst first


def test_no_images_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        infer.main([str(tmp_path / "nothing" / "*.png"), *common(tiny_model_dir, adapter="none")])
    assert "no images found" in str(exc.value.code)
    (tmp_path / "empty.json").write_text("[]")  # a labelled file without rows: no crash writing nothing
    with pytest.raises(SystemExit) as exc:
        infer.main([str(tmp_path / "empty.json"), *common(tiny_model_dir, adapter="none")])
    assert "no samples" in str(exc.value.code)
    assert not list(tmp_path.glob("*.csv"))


def test_a_quantization_that_cannot_run_is_said_before_the_model_loads(tiny_model_dir, data, monkeypatch):
    """Run R: infer.py --quantization 4bit without bitsandbytes said so only after loading (24 s on an H200)."""
    monkeypatch.setattr(infer, "load_with_sample", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SystemExit) as exc:
        infer.main([str(data / "data.json"), "--quantization", "8bit", *common(tiny_model_dir, adapter="none")])
    assert "QUANTIZATION must be one of" in str(exc.value.code)


# ------------------------------------------------------------------------------ 9. bad input
def test_bad_images_become_error_rows(trained, tiny_model_dir, data, tmp_path, capsys):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = [make_record(0, str(data / "images" / "0.png"), LABELS[0]),
               make_record(1, "gone.png", "y"),
               make_record(2, "corrupt.png", "z"),
               make_record(3, str(data / "images" / "3.png"), LABELS[3])]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    infer.main([str(tmp_path / "bad.json"), "--output", str(tmp_path / "bad.jsonl"),
                *common(tiny_model_dir, trained)])
    captured = capsys.readouterr()
    rows = read_jsonl(tmp_path / "bad.jsonl")
    assert [r["image"] for r in rows] == [str(data / "images" / "0.png"), str(tmp_path / "gone.png"),
                                          str(tmp_path / "corrupt.png"), str(data / "images" / "3.png")]
    assert rows[0]["error"] == "" and isinstance(rows[0]["prediction"], str)
    assert rows[3]["error"] == "" and isinstance(rows[3]["prediction"], str)
    assert rows[1]["prediction"] is None and "image not found" in rows[1]["error"] and "gone.png" in rows[1]["error"]
    assert rows[2]["prediction"] is None and "cannot read image" in rows[2]["error"]
    assert rows[1]["exact_match"] == 0.0 and rows[1]["edit_distance"] == 1.0
    metrics = printed_metrics(captured.out)
    assert metrics["errors"] == 2 and metrics["n"] == 4
    assert "gone.png" in captured.err and "corrupt.png" in captured.err


def test_missing_checkpoint_lists_what_exists(tiny_model_dir, tmp_path, data):
    out = tmp_path / "run"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "adapter_config.json").write_text("{}")
    (out / "checkpoint-9").mkdir()  # no adapter in it: not listed
    env = dict(os.environ, SWANLAB_MODE="disabled", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(data / "images" / "0.png"),
                           *common(tiny_model_dir, out, adapter="final")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "no adapter at 'final'" in proc.stderr
    assert str(out / "checkpoint-5") in proc.stderr and "checkpoint-9" not in proc.stderr
    assert "--adapter none" in proc.stderr
    assert "Traceback" not in proc.stderr
    # --adapter last picks the newest checkpoint that has an adapter
    from latexocr.modeling import find_adapter
    assert find_adapter("last", out) == str(out / "checkpoint-5")


def imported_modules(trace: str) -> set[str]:
    """The modules a process imported, from its stderr under PYTHONPROFILEIMPORTTIME ("import time: us | us | name")."""
    return {line.rsplit("|", 1)[1].strip() for line in trace.splitlines() if line.startswith("import time:")}


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed: "
                    "nothing to keep out")
def test_a_command_with_an_adapter_imports_no_bitsandbytes(trained, tiny_model_dir, data, tmp_path):
    """peft imports bitsandbytes wherever it is installed, and bitsandbytes 0.50 sets up torch.compile as it is
    imported (1.8-2.5 s of a start on an H100 host, latexocr/fast/imports.py). train.py and infer.py run as
    commands with their default QUANTIZATION=none keep it out, and the adapter still trains, loads and merges;
    where other code runs their main() (these tests), a 4-bit model may still follow, so it stays importable."""
    train_trace = imported_modules((trained.parent / "train.stderr").read_text())
    assert "peft" in train_trace  # LoRA: peft was imported ...
    assert not any(m.startswith("bitsandbytes.") for m in train_trace)  # ... without bitsandbytes's own modules
    env = dict(os.environ, SWANLAB_MODE="disabled", HF_HUB_OFFLINE="1")
    out = tmp_path / "preds.csv"  # -X importtime: its trace, and an interpreter option before the script's name
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "infer.py"), str(data / "data.json"),
                           "--output", str(out), *common(tiny_model_dir, trained)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged into the weights" in proc.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(LABELS) + 1
    infer_trace = imported_modules(proc.stderr)
    assert "peft" in infer_trace and not any(m.startswith("bitsandbytes.") for m in infer_trace)
    assert "torch._inductor.compile_fx" not in infer_trace  # what bitsandbytes's import cost
    import bitsandbytes  # noqa: F401  (this process runs the scripts' main() in other tests: still importable)


# ---------------------------------------------------------------------------- 10. merged export
def test_merged_model_loads_plainly_and_predicts_the_same(trained, tiny_model_dir, data, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    merged = tmp_path / "merged"
    infer.main(["--merge-to", str(merged), *common(tiny_model_dir, trained)])
    assert "merged model written to" in capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(merged)
    processor = AutoProcessor.from_pretrained(merged)
    assert processor.image_processor.patch_size == 14
    names = [n for n, _ in model.named_parameters()]
    assert not any("lora" in n for n in names)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    merged_sd, base_sd = model.state_dict(), base.state_dict()
    assert merged_sd.keys() == base_sd.keys()
    changed = [k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])]
    assert changed and all("language_model" in k for k in changed)  # the LoRA deltas, LLM only

    infer.main([str(data / "data.json"), "--output", str(tmp_path / "adapter.csv"),
                *common(tiny_model_dir, trained)])
    infer.main([str(data / "data.json"), "--output", str(tmp_path / "merged.csv"),
                *common(merged, adapter="none")])
    infer.main([str(data / "data.json"), "--output", str(tmp_path / "base.csv"),
                *common(tiny_model_dir, adapter="none")])
    with_adapter = [r["prediction"] for r in read_csv(tmp_path / "adapter.csv")]
    assert [r["prediction"] for r in read_csv(tmp_path / "merged.csv")] == with_adapter
    assert [r["prediction"] for r in read_csv(tmp_path / "base.csv")] != with_adapter  # the adapter matters


def test_an_adapter_is_merged_for_inference_with_the_same_predictions(trained, tiny_model_dir, data, tmp_path,
                                                                        capsys, monkeypatch):
    """infer.py merges a LoRA adapter into the weights it loaded (a decode step then runs no peft layers)
    and says so; LATEXOCR_SPEED merge_adapter=off keeps peft's layers: the same predictions (fp32)."""
    args = common(tiny_model_dir, trained)
    from latexocr.cli import parse_settings
    model, _, _ = infer.load_for_inference(parse_settings(infer.SETTINGS, infer.__doc__, args))
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert "(merged into the weights for inference)" in capsys.readouterr().err
    infer.main([str(data / "data.json"), "--output", str(tmp_path / "merged.csv"), *args])
    monkeypatch.setenv("LATEXOCR_SPEED", "merge_adapter=off")
    infer.main([str(data / "data.json"), "--output", str(tmp_path / "separate.csv"), *args])
    assert "merged" not in capsys.readouterr().err.split("adapter: ")[-1].splitlines()[0]
    merged, separate = (read_csv(tmp_path / f"{n}.csv") for n in ("merged", "separate"))
    assert [r["prediction"] for r in merged] == [r["prediction"] for r in separate]


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_the_adapter_loads_with_the_values_train_py_saved(trained, tiny_model_dir, monkeypatch, quantization):
    """Every LoRA matrix infer.py loads equals the saved file's (fp32, not rounded on the way: peft's
    low_cpu_mem_usage loading rounded a 4-bit model's to bf16, so infer.py scored another adapter than
    train.py's evaluation had)."""
    if quantization == "4bit":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (requirements.txt has it)")
    from safetensors.torch import load_file
    from latexocr.cli import parse_settings
    monkeypatch.setenv("LATEXOCR_SPEED", "merge_adapter=off")  # the adapter's own matrices, not merged
    args = parse_settings(infer.SETTINGS, infer.__doc__, [*common(tiny_model_dir, trained), "--quantization", quantization])
    model, _, adapter = infer.load_for_inference(args)
    saved = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    loaded = {name.replace(".default", ""): p for name, p in model.named_parameters() if "lora_" in name}
    assert saved and set(saved) == set(loaded)
    for name, value in saved.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name].detach().cpu(), value), name


def test_merge_needs_an_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        infer.main(["--merge-to", str(tmp_path / "m"), *common(tiny_model_dir, adapter="none")])
    assert "needs an adapter" in str(exc.value.code)
    assert not (tmp_path / "m").exists()


def test_processor_saved_with_the_adapter_is_preferred(trained, tiny_model_dir, tmp_path):
    """infer.py loads the processor train.py saved next to the adapter, not the base model's."""
    import shutil

    from latexocr.cli import parse_settings

    adapter = tmp_path / "adapter"
    shutil.copytree(trained / "final", adapter)
    config_file = adapter / "processor_config.json"
    if not config_file.exists():  # transformers < 5
        config_file = adapter / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    image_config = config.get("image_processor", config)
    assert image_config["image_mean"] != [0.5, 0.5, 0.5]
    image_config["image_mean"] = [0.5, 0.5, 0.5]
    config_file.write_text(json.dumps(config))
    args = parse_settings(infer.SETTINGS, None, common(tiny_model_dir, adapter=str(adapter)))
    _, processor, loaded = infer.load_for_inference(args)
    assert loaded == str(adapter)
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]


def test_the_benchmarks_random_adapter_is_what_train_py_saves(tiny_model_dir, tmp_path, capsys):
    """bench/common.py build_random_adapter (bench_infer.py --adapter random: infer.py timed as a user runs
    it after training): train.py's LoRA settings, non-zero updates, and infer.py loads and merges it."""
    import train
    sys.path.insert(0, str(ROOT / "bench"))
    from common import build_random_adapter
    from latexocr.cli import parse_settings
    adapter = build_random_adapter(tiny_model_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (train.LORA_R, train.LORA_ALPHA)
    args = parse_settings(infer.SETTINGS, infer.__doc__, common(tiny_model_dir, adapter=str(adapter)))
    model, _, _ = infer.load_for_inference(args)
    assert "(merged into the weights for inference)" in capsys.readouterr().err
    from transformers import AutoModelForImageTextToText
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(base[k], v) for k, v in model.state_dict().items() if k in base)


def test_the_loader_started_before_the_model_gives_the_same_predictions(tiny_model_dir, formula_images, monkeypatch):
    """generation.Prefetch (infer.py starts it before the model loads): predict takes its loader over and
    predicts what it predicts on its own; a Prefetch of other images is let go and predict starts its own."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from latexocr.batching import SampleEncoder
    from latexocr.generation import Prefetch, predict
    from latexocr.sample import sizing_for
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    encoder = SampleEncoder(processor, sizing_for(processor))
    paths = [str(p) for p, _ in formula_images[:5]]
    early = Prefetch(encoder, paths, 1, torch.float32)  # before the model, one worker
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    kw = dict(max_new_tokens=6, num_workers=0, progress=False, batch_size=None)
    expected = predict(model, encoder, paths, **kw)
    other = Prefetch(encoder, list(paths), 1, torch.float32)  # another list: not these images
    from latexocr import generation
    started, start = [], generation.start_loader
    monkeypatch.setattr(generation, "start_loader", lambda *a, **k: started.append(1) or start(*a, **k))
    assert predict(model, encoder, paths, prefetched=early, **kw) == expected
    assert early.units is None and not started  # taken over: no loader of its own
    assert predict(model, encoder, paths, prefetched=other, **kw) == expected
    assert other.units is None and len(started) == 1  # let go; predict started its own
