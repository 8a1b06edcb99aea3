"""train.py and infer.py as a user runs them: separate processes, tiny random-init models, CPU.

The overfit test is the core check of the whole pipeline: a tiny model memorises 16 short labels
with train.py, and infer.py, a new process loading the saved adapter from disk, reproduces every
one of them exactly; sizing the images differently at inference breaks it, so training and
inference provably see the same pixels.
"""
from __future__ import annotations

import io
import json
import math
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from helpers import (LABELS, PY, ROOT, TINY, default_sigint, draw_formula, losses, make_dataset, printed_metrics, read_csv, run_main, run_script, script_env, trainer_state)
from latexocr.sample import make_record


# ------------------------------------------------------------------------------------ 1. overfit
@pytest.fixture(scope="module")
def overfit(tmp_path_factory, tiny_model_dir):
    """train.py memorises 16 samples; the run's folder, data and output."""
    work = tmp_path_factory.mktemp("overfit")
    data = make_dataset(work, LABELS)
    out = work / "out"
    proc = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, "--val-json", data,
                      "--output-dir", out, "--max-steps", 120, "--batch-size", 16, "--micro-batch-size", 16,
                      "--learning-rate", 6e-3, "--lora-alpha", 64, "--save-steps", 1000, "--logging-steps", 40,
                      *TINY)
    return work, data, out, proc


def test_overfit_then_infer_reproduces_every_label(overfit, tiny_model_dir):
    work, data, out, train = overfit
    assert "train: 16 samples" in train.stdout and "no samples skipped" in train.stdout
    assert (out / "final" / "adapter_config.json").is_file()
    assert (out / "final" / "adapter_model.safetensors").is_file()
    # the processor is saved with the adapter (transformers >= 5: processor_config.json)
    assert (out / "final" / "processor_config.json").is_file() or (out / "final" / "preprocessor_config.json").is_file()
    assert (out / "final" / "tokenizer_config.json").is_file()
    # train.py's own evaluation at the end (same generation code as infer.py)
    assert "[eval @ step 120] exact_match 1," in train.stdout, train.stdout[-3000:]

    # A new process, loading base + OUTPUT_DIR/final from disk (the default --adapter final).
    preds = work / "preds.csv"
    proc = run_main("infer.py", data, "--model-id", tiny_model_dir, "--model-source", "local",
                      "--output-dir", out, "--output", preds, "--num-workers", "0", "--max-new-tokens", "12")
    assert f"adapter: {out / 'final'}" in proc.stderr
    metrics = printed_metrics(proc.stdout)
    assert metrics["exact_match"] == 1.0 and metrics["edit_distance"] == 0.0
    assert metrics["n"] == 16 and metrics["errors"] == 0
    assert math.isclose(metrics["bleu4"], 100.0, rel_tol=1e-6)
    rows = read_csv(preds)
    assert [r["label"] for r in rows] == LABELS
    assert [r["prediction"] for r in rows] == LABELS
    assert all(r["exact_match"] == "1.0" and r["error"] == "" for r in rows)

    # Sizing matters: the same adapter shown the images at 4x the area no longer reads them.
    resized = work / "preds_4x.csv"
    proc = run_main("infer.py", data, "--model-id", tiny_model_dir, "--model-source", "local",
                      "--output-dir", out, "--output", resized, "--num-workers", "0", "--max-new-tokens", "12",
                      "--image-min-pixels", 4 * 32 * 28 * 28)
    metrics = printed_metrics(proc.stdout)
    assert metrics["exact_match"] < 1.0, metrics
    assert [r["prediction"] for r in read_csv(resized)] != LABELS


# ------------------------------------------------------------------------------- 2. end to end

def _write_parquet(path: Path, labels: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    structs = []
    for i, label in enumerate(labels):
        buf = io.BytesIO()
        img = Image.new("RGB", (100 + 20 * (i % 4), 30), "white")
        ImageDraw.Draw(img).text((4, 4), label, fill=(0, 0, 0))
        img.save(buf, format="PNG")
        structs.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(structs, type=image_type), "text": pa.array(labels, type=pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_end_to_end_data2csv_csv2json_train_infer(tmp_path, tiny_model_dir):
    source = _write_parquet(tmp_path / "src" / "train-00000-of-00001.parquet", LABELS[:8])
    work = tmp_path / "project"
    work.mkdir()
    # step 1: parquet -> PNGs + CSV (paths relative to the CSV)
    run_main("data2csv.py", "--source", source, "--limit", "all", "--workers", "0", cwd=work)
    csv_rows = read_csv(work / "latex_ocr_train.csv")
    assert len(csv_rows) == 8 and sorted(r["text"] for r in csv_rows) == sorted(LABELS[:8])
    assert all((work / r["image_path"]).is_file() for r in csv_rows)
    # step 2: CSV -> conversation JSONs (train / val split)
    run_main("csv2json.py", "--val-size", "2", cwd=work)
    train = json.loads((work / "latex_ocr_train.json").read_text(encoding="utf-8"))
    val = json.loads((work / "latex_ocr_val.json").read_text(encoding="utf-8"))
    assert len(train) == 6 and len(val) == 2
    # step 3: train with the default file names, a few steps
    proc = run_main("train.py", "--model-id", tiny_model_dir, "--max-steps", 3, "--batch-size", 2,
                      "--micro-batch-size", 2, "--save-steps", 2, "--output-dir", "output/run", *TINY, cwd=work)
    assert "train: 6 samples" in proc.stdout and "validation: 2 samples" in proc.stdout
    assert "[eval @ step 3] exact_match" in proc.stdout
    out = work / "output" / "run"
    assert (out / "final" / "adapter_config.json").is_file()
    assert (out / "checkpoint-2" / "adapter_config.json").is_file()
    assert trainer_state(out / "checkpoint-3")["global_step"] == 3
    # step 4: infer on the validation JSON (default input name), predictions next to it
    proc = run_main("infer.py", "--model-id", tiny_model_dir, "--model-source", "local", "--output-dir",
                      "output/run", "--num-workers", "0", "--max-new-tokens", "8", cwd=work)
    metrics = printed_metrics(proc.stdout)
    assert {"exact_match", "edit_distance", "bleu4"} <= set(metrics)
    assert metrics["n"] == 2 and metrics["errors"] == 0
    rows = read_csv(work / "latex_ocr_val.predictions.csv")
    assert [r["label"] for r in rows] == [rec["conversations"][1]["value"] for rec in val]


# (the other families train, infer and merge in tests/test_modes.py's one chain)


# ----------------------------------------------------------------------------- 4. Ctrl-C, resume
def _train_until_logged(cmd: list[str], env: dict, n_logs: int, timeout: float = 900.0):
    """Start train.py, send SIGINT once `n_logs` loss lines were printed; (returncode, output)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_sigint)
    chunks: list[str] = []

    def reader():
        for line in proc.stdout:
            chunks.append(line)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while "".join(chunks).count("'loss'") < n_logs:
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                pytest.fail("train.py logged no progress in time:\n" + "".join(chunks)[-4000:])
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    thread.join(timeout=10)
    return rc, "".join(chunks)


def test_ctrl_c_saves_checkpoint_and_resume_finishes(tmp_path, tiny_model_dir):
    data = make_dataset(tmp_path, LABELS[:8])
    out = tmp_path / "out"
    args = ["--model-id", str(tiny_model_dir), "--train-json", str(data), "--val-json", str(tmp_path / "none.json"),
            "--output-dir", str(out), "--max-steps", "40", "--batch-size", "8", "--micro-batch-size", "8",
            "--save-steps", "20", "--logging-steps", "1", *TINY]
    cmd = [PY, str(ROOT / "train.py"), *args]
    rc, output = _train_until_logged(cmd, script_env(), n_logs=3)
    assert rc == 130, output[-4000:]
    assert "interrupted: saving a checkpoint" in output
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, output[-4000:]
    k = int(checkpoints[-1].name.split("-")[1])
    assert 3 <= k < 40, output[-4000:]
    assert trainer_state(checkpoints[-1])["global_step"] == k
    assert (checkpoints[-1] / "adapter_config.json").is_file()
    assert not (out / "final").exists()

    proc = run_main("train.py", *args, "--resume")
    # it continued from step k: only steps k+1..40 were trained (one loss line each)
    assert proc.stdout.count("'loss'") == 40 - k, proc.stdout[-4000:]
    assert trainer_state(out / "checkpoint-40")["global_step"] == 40
    assert (out / "final" / "adapter_config.json").is_file()
    proc = run_main("infer.py", tmp_path / "images" / "0.png", "--model-id", tiny_model_dir, "--model-source",
                      "local", "--output-dir", out, "--num-workers", "0", "--max-new-tokens", "4")
    assert f"adapter: {out / 'final'}" in proc.stderr


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir):
    data = make_dataset(tmp_path, LABELS[:2])
    out = tmp_path / "fresh"
    proc = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, "--val-json", data,
                      "--output-dir", out, "--max-steps", 2, "--resume", *TINY, check=False)
    assert proc.returncode != 0
    assert "no checkpoint" in proc.stderr and str(out) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_profile_of_chosen_steps_says_where_a_step_goes(tmp_path, tiny_model_dir):
    """bench/bench_train.py --profile-steps: $LATEXOCR_PROFILE_STEPS=2:3 makes train.py record optimizer steps 2
    and 3 with torch.profiler and write their time per step by category (the CPU operators' own time here; the
    CUDA kernels' on a GPU) and the busiest operators, with one line saying so; a malformed value is one line."""
    data = make_dataset(tmp_path, LABELS[:4])
    report = tmp_path / "profile.json"
    args = ["--model-id", tiny_model_dir, "--train-json", data, "--val-json", data, "--output-dir", tmp_path / "out",
            "--max-steps", 3, "--batch-size", 2, "--micro-batch-size", 2, *TINY]
    proc = run_main("train.py", *args, env={"LATEXOCR_PROFILE_STEPS": "2:3", "LATEXOCR_PROFILE_OUT": str(report)})
    summary = json.loads(report.read_text())
    assert summary["steps_profiled"] == [2, 3] and summary["steps"] == 2
    assert summary["timed"].startswith("cpu") and summary["ms_per_step"] > 0
    assert summary["categories"]["matrix products"]["ms"] > 0  # the projections' aten::mm / addmm
    assert abs(sum(c["ms"] for c in summary["categories"].values()) - summary["ms_per_step"]) < 0.01 * summary["ms_per_step"] + 0.01
    assert summary["busiest"] and all(b["category"] in summary["categories"] for b in summary["busiest"])
    assert f"profile of steps 2-3: " in proc.stderr and str(report) in proc.stderr
    # the host's side: its wall time and dispatches a step (where the GPU waited: on a GPU only)
    host = summary["host"]
    assert host["wall_ms_per_step"] > 0 and host["aten_ops_per_step"] > 100 and host["host_busiest_ops"]
    assert "device_gaps" not in host and "operators and 0 launches dispatched" in proc.stderr
    proc = run_main("train.py", *args, env={"LATEXOCR_PROFILE_STEPS": "two"}, check=False)
    assert proc.returncode != 0 and "LATEXOCR_PROFILE_STEPS: 'two'" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- 5. bad train data
def test_bad_training_samples_are_skipped_and_counted(tmp_path, tiny_model_dir):
    data = make_dataset(tmp_path, LABELS[:4])
    records = json.loads(data.read_text())
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    draw_formula(tmp_path / "images" / "long.png", "long", (100, 30))
    draw_formula(tmp_path / "images" / "empty.png", "empty", (100, 30))
    records += [make_record(10, "images/missing.png", "x"),
                make_record(11, "images/corrupt.png", "y"),
                make_record(12, "images/empty.png", ""),
                make_record(13, "images/long.png", "x + " * 300 + "y")]  # > 1024 tokens (byte-level)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    out = tmp_path / "out"
    proc = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", bad, "--val-json", bad,
                      "--output-dir", out, "--max-steps", 2, "--batch-size", 4, "--micro-batch-size", 4,
                      "--max-length", 1024, *TINY)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("train: "))
    assert line.startswith("train: 4 samples from"), line
    # the reasons of images.image_problem, the one image check of every script
    assert "1 (missing image, e.g. " in line and "missing.png" in line
    assert "1 (not an image (undecodable), e.g. " in line and "corrupt.png" in line
    assert "1 (empty or missing label, e.g. " in line and "empty.png" in line
    assert "1 (longer than max_length=1024 tokens, e.g. " in line and "long.png" in line
    assert (out / "final" / "adapter_config.json").is_file()
    # The validation pass over the same file reports the unreadable images as errors, not a crash.
    assert "validation: 8 samples" in proc.stdout
    eval_line = next(l for l in proc.stdout.splitlines() if l.startswith("[eval @ step 2]"))
    assert "n 8, errors 2" in eval_line, eval_line


# ------------------------------------------------------------------------ length-grouped batches
def test_length_grouped_batches_see_every_sample_once_longest_first(tmp_path, tiny_model_dir, monkeypatch):
    """LATEXOCR_SPEED group_by_length=on, with the padded batches it is for (packing=off): an epoch still
    sees every sample exactly once, and micro-batches hold samples of similar token counts (transformers'
    LengthGroupedSampler over OcrDataset.lengths: random windows of up to 50 optimizer steps, each sorted
    longest first; here a window is one step of 8), the longest sample of the run first."""
    from latexocr.modeling import load_processor
    from latexocr.sample import SampleEncoder, sizing_for
    from latexocr.training import OcrDataset
    labels = ["x + " * n + "y" for n in (1, 9, 3, 12, 5, 2, 15, 7, 4, 11, 6, 14, 8, 13, 10, 0)]
    data = make_dataset(tmp_path, labels)
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv("LATEXOCR_TRACE_BATCHES", str(trace))
    monkeypatch.setenv("LATEXOCR_SPEED", "group_by_length=on,packing=off")
    # 2 steps of 2 micro-batches of 4: one epoch of the 16 samples
    proc = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data, "--val-json", data,
                    "--output-dir", tmp_path / "out", "--max-steps", 2, "--batch-size", 8, "--micro-batch-size", 4,
                    "--save-steps", 1000, "--eval-samples", 2, *TINY)
    assert "length-grouped batches" in proc.stdout
    batches = [json.loads(line) for f in sorted(trace.glob("*.jsonl")) for line in f.read_text().splitlines()]
    names = [Path(p).name for batch in batches[:4] for p in batch]
    assert sorted(names) == sorted(f"{i}.png" for i in range(len(labels))), batches
    processor = load_processor(str(tiny_model_dir))
    dataset = OcrDataset(data, SampleEncoder(processor, sizing_for(processor)), 2048)
    length = {Path(p).name: n for (p, _), n in zip(dataset.samples, dataset.lengths)}
    counts = [length[n] for n in names]
    assert counts[0] == max(dataset.lengths), counts  # an out-of-memory shows in the first step
    # each step's first micro-batch holds its longest samples (its first one may be the one the sampler swapped
    # with the run's longest)
    for step in (counts[:8], counts[8:]):
        assert min(step[1:4]) >= max(step[4:]), counts


# ------------------------------------------------------------------------- compiled blocks (CPU)
def test_compiled_training_matches_eager_and_generation_does_not_recompile(tmp_path, tiny_model_dir):
    """COMPILE_LAYERS=on (torch.compile of every block) trains the same model as eager, and the
    evaluation afterwards generates with the blocks run eagerly (no recompiles for eval mode/KV cache)."""
    data = make_dataset(tmp_path, LABELS[:8])
    common = ["--model-id", tiny_model_dir, "--train-json", data, "--val-json", data, "--max-steps", 3,
              "--batch-size", 4, "--micro-batch-size", 4, "--logging-steps", 1, "--save-steps", 1000, *TINY]
    eager = run_main("train.py", *common, "--output-dir", tmp_path / "eager")  # auto: no GPU -> eager
    # a process of its own: torch reads TORCH_LOGS when it is imported
    compiled = run_script("train.py", *common, "--output-dir", tmp_path / "compiled",
                          env=script_env(TORCH_LOGS="recompiles", LATEXOCR_SPEED="compile=on"), timeout=3600)
    assert "compiling" not in eager.stdout and "compiling" in compiled.stdout
    assert len(losses(eager.stdout)) == 3
    assert losses(compiled.stdout) == pytest.approx(losses(eager.stdout), rel=1e-3)
    assert "[eval @ step 3] exact_match" in compiled.stdout
    # training compiles a few entries (vision vs text block, first vs later layers); generation would
    # add one per eval/no-grad mode and per KV-cache layer if it ran the compiled blocks
    reasons = [line for line in compiled.stderr.splitlines() if "[__recompiles]     - " in line]
    assert reasons and not [r for r in reasons if "grad_mode" in r or "cache" in r], "\n".join(reasons)


def test_device_gaps_are_charged_to_the_sync_before_them_or_to_the_host():
    """latexocr/profiling.py device_gaps (bench/profile_infer.py, --profile-steps on a GPU): a gap after a sync goes
    to the sync's source line, one without to the host launching in its phase; short gaps and the phases' own
    device ranges are not gaps."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from latexocr.profiling import device_gaps

    def event(name, start, end, device=DeviceType.CPU, stack=()):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                               stack=list(stack))
    gpu = DeviceType.CUDA
    events = [event("k1", 0, 100, gpu), event("k2", 100, 200, gpu),
              event("aten::_local_scalar_dense", 150, 205, stack=["/x/torch/a.py(1): f", f"{ROOT}/latexocr/x.py(10): g"]),
              event("k3", 300, 400, gpu),  # 100 us idle after the sync
              event("phase: prefill", 350, 1000), event("phase: prefill", 350, 1000, gpu),  # the range, shown on both
              event("k4", 450, 500, gpu),  # 50 us idle, no sync: the host launching
              event("k5", 505, 600, gpu)]  # 5 us: not a gap
    gaps = device_gaps(events, min_us=20)
    assert gaps["device_busy_ms"] == 0.45 and gaps["idle_in_gaps_ms"] == 0.15
    assert gaps["by_cause_ms"] == {"after a sync: aten::_local_scalar_dense at latexocr/x.py(10): g": {"ms": 0.1, "gaps": 1},
                                   "host launching, no sync (in prefill)": {"ms": 0.05, "gaps": 1}}


def test_throughput_excludes_evaluation_time():
    from types import SimpleNamespace

    from latexocr.training import ThroughputCallback

    cb = ThroughputCallback(samples_per_step=10)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    cb.on_train_begin(None, state, None)
    time.sleep(0.05)
    with cb.excluded():  # an evaluation between two log lines
        time.sleep(0.5)
    state.global_step = 1
    logs = {"loss": 1.0}
    cb.on_log(None, state, None, logs=logs)
    # 10 samples in ~0.05 s of training: ~200/s; counting the evaluation would give < 20/s
    assert logs["samples_per_second"] > 50
