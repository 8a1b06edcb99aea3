"""train.py under torchrun: 2 CPU processes (gloo) against 1 process, on a tiny model.

One data-parallel run (2 processes x micro-batch 2 x accumulation 2) and one single-process run
(micro-batch 8 x accumulation 1) train the same tiny Qwen2-VL on 16 samples with the same global
batch of 8 and the same seed, 4 optimizer steps (2 epochs). The test checks that

  (a) the two processes see different samples, together exactly the 8 of each step, every sample
      once per epoch, and the same 8 per step as the single process (the seeded sampler and
      accelerate's batch sharding keep the global order);
  (b) both processes end with identical LoRA weights, and OUTPUT_DIR/final holds exactly them;
  (c) the logged loss and gradient norm of every step, and the final weights, match the
      single-process run. The first step's loss/grad norm come from identical weights and the same
      8 samples, so only float32 summation order differs (observed ~1e-7 relative, allowed 1e-5 for
      the loss, 1e-4 for the norm); later steps also differ only by that rounding, carried through
      1-3 Adam updates of lr 1e-4 (allowed 1e-4 / 1e-3). The gradient norm is what catches a wrong
      gradient scale: Adam's update is nearly scale-free, so the weights alone would not.

The samples have labels of very different lengths, so the two processes hold different numbers
of supervised tokens: normalising the loss per process or per micro-batch instead of over the
whole optimizer step changes the loss and the gradient (and so the checks in (c)).

The per-process trace of samples comes from latexocr.batching's LATEXOCR_TRACE_BATCHES; the
per-process weights and log history are dumped by a small launcher that wraps Trainer.train and
then runs train.py unchanged (runpy), so the code under test is train.py itself.
"""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import free_port
import torch

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS, SAMPLES = 8, 4, 16

LAUNCHER = """
import json, os, runpy, sys
import torch
from peft import get_peft_model_state_dict
from latexocr.training import OcrTrainer

dump = os.environ["LATEXOCR_TEST_DUMP"]
rank = os.environ.get("RANK", "0")
train = OcrTrainer.train

def train_and_dump(self, *args, **kwargs):
    result = train(self, *args, **kwargs)
    model = self.accelerator.unwrap_model(self.model)
    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    torch.save(state, os.path.join(dump, f"lora-rank{rank}.pt"))
    with open(os.path.join(dump, f"log-rank{rank}.json"), "w") as f:
        json.dump({"log_history": self.state.log_history,
                   "world_size": self.accelerator.num_processes,
                   "distributed_type": str(self.accelerator.distributed_type),
                   "accumulation": self.args.gradient_accumulation_steps,
                   "micro": self.args.per_device_train_batch_size}, f)
    return result

OcrTrainer.train = train_and_dump
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """16 formula images (labels of 1 to ~40 tokens) and 4 validation ones, as conversation JSON."""
    from PIL import Image, ImageDraw

    from latexocr.sample import make_record
    folder = tmp_path_factory.mktemp("ddp_data")
    labels = ["x", "\\frac { a } { b }", "a + b = c", "\\sqrt { x ^ { 2 } + y ^ { 2 } }", "k",
              "e ^ { i \\pi } + 1 = 0", "\\sum _ { n = 1 } ^ { \\infty } \\frac { 1 } { n ^ { 2 } } = "
              "\\frac { \\pi ^ { 2 } } { 6 }", "y", "( a + b ) ^ { 2 }", "\\int _ { 0 } ^ { 1 } x d x",
              "\\alpha", "f ( x ) = \\lim _ { h \\to 0 } \\frac { g ( x + h ) - g ( x ) } { h }", "\\beta",
              "x _ { 1 } + x _ { 2 }", "z", "\\mathrm { d } y"]
    val_labels = ["a", "b + c", "\\gamma", "x ^ { 3 }"]
    records = {"train": [], "val": []}
    for split, names in (("train", labels), ("val", val_labels)):
        for i, label in enumerate(names):
            img = Image.new("RGB", (80 + 20 * (i % 4), 28 + 6 * (i % 3)), "white")
            ImageDraw.Draw(img).text((3, 3), label[:20], fill=(0, 0, 0))
            path = folder / f"{split}_{i:02d}.png"
            img.save(path)
            records[split].append(make_record(i, str(path), label))
    for split, rows in records.items():
        (folder / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    assert len(records["train"]) == SAMPLES
    return folder


def _run(tmp, name, model_dir, data, processes, micro):
    """Train with `processes` processes; returns (proc, output dir, dump dir, trace dir, seconds)."""
    out, dump, trace = tmp / name / "out", tmp / name / "dump", tmp / name / "trace"
    for d in (out, dump, trace):
        d.mkdir(parents=True)
    launcher = tmp / "launch_train.py"
    launcher.write_text(textwrap.dedent(LAUNCHER))
    flags = ["--model-id", str(model_dir), "--model-source", "local",
             "--train-json", str(data / "train.json"), "--val-json", str(data / "val.json"),
             "--output-dir", str(out), "--batch-size", str(GLOBAL_BATCH), "--micro-batch-size", str(micro),
             "--max-steps", str(STEPS), "--logging-steps", "1", "--save-steps", "1000",
             "--lora-dropout", "0", "--num-workers", "0", "--swanlab-mode", "disabled",
             "--eval-batch-size", "4", "--max-new-tokens", "4", "--seed", "42"]
    script = [str(launcher), str(ROOT / "train.py")]
    logs = tmp / name / "rank-logs"
    if processes == 1:
        cmd = [sys.executable, *script, *flags]
    else:
        # --redirects/--tee: each rank's stdout/stderr also lands in its own file under `logs`, so a
        # failure shows every rank's own last lines (torchrun's merged stream interleaves them)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "--log-dir", str(logs), "--redirects", "3", "--tee", "3", *script, *flags]
    env = {**os.environ, "LATEXOCR_TRACE_BATCHES": str(trace), "LATEXOCR_TEST_DUMP": str(dump),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           # a rank that dies of a signal (SIGABRT from C++, SIGSEGV) prints every thread's Python stack
           "PYTHONFAULTHANDLER": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(var, None)
    start = time.perf_counter()
    # ~40-60 s on 2 idle cores; the limit leaves room for a machine busy with other work
    proc = subprocess.run(cmd, cwd=tmp / name, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, (f"{name} failed ({_exit_reason(proc.returncode)}):\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-8000:]}{_rank_logs(logs)}")
    return proc, out, dump, trace, seconds


def _exit_reason(rc: int) -> str:
    import signal
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"


def _rank_logs(folder: Path) -> str:
    """The end of every rank's own stderr, for the failure message."""
    parts = []
    for f in sorted(folder.rglob("stderr.log")) if folder.exists() else []:
        parts.append(f"\n---- {f.relative_to(folder)} (last 3000 chars) ----\n{f.read_text(errors='replace')[-3000:]}")
    return "".join(parts)


def _trace(trace_dir, rank):
    files = sorted(trace_dir.glob(f"rank{rank}-pid*.jsonl"))
    assert len(files) == 1, f"rank {rank}: expected one traced process, found {files}"
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def _steps(log):
    """{step: (loss, grad_norm)} from a Trainer log history."""
    return {e["step"]: (e["loss"], e["grad_norm"]) for e in log["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):
    from latexocr.testing import build_tiny_model
    tmp = tmp_path_factory.mktemp("ddp_runs")
    model_dir = build_tiny_model(tmp / "model", "qwen2_vl")
    single = _run(tmp, "single", model_dir, dataset, processes=1, micro=GLOBAL_BATCH)
    ddp = _run(tmp, "ddp", model_dir, dataset, processes=2, micro=2)
    print(f"\nsingle process: {single[4]:.1f} s, torchrun x2: {ddp[4]:.1f} s")
    return {"single": single, "ddp": ddp}


def test_processes_split_each_step(runs):
    proc, _, dump, trace, _ = runs["ddp"]
    logs = [json.loads((dump / f"log-rank{r}.json").read_text()) for r in (0, 1)]
    for log in logs:  # really distributed, with accumulation: 2 processes x 2 micro-batches x 2 samples
        assert log["world_size"] == 2 and log["distributed_type"].endswith("MULTI_CPU")
        assert (log["micro"], log["accumulation"]) == (2, 2)
    per_rank = [_trace(trace, r) for r in (0, 1)]
    single = _trace(runs["single"][3], 0)
    assert len(single) == STEPS and all(len(b) == GLOBAL_BATCH for b in single)
    for rank_batches in per_rank:
        assert len(rank_batches) == STEPS * 2 and all(len(b) == 2 for b in rank_batches)
    epoch_samples = []
    for step in range(STEPS):
        mine = [sum(per_rank[r][2 * step: 2 * step + 2], []) for r in (0, 1)]
        assert not set(mine[0]) & set(mine[1]), f"step {step + 1}: both processes got {set(mine[0]) & set(mine[1])}"
        assert len(set(mine[0] + mine[1])) == GLOBAL_BATCH
        # the same 8 samples as the single process's step (the seeded sampler's global order is kept)
        assert sorted(mine[0] + mine[1]) == sorted(single[step]), f"step {step + 1} differs from 1 process"
        epoch_samples += mine[0] + mine[1]
    epoch = SAMPLES // GLOBAL_BATCH * GLOBAL_BATCH
    assert len(set(epoch_samples[:epoch])) == len(set(epoch_samples[epoch:])) == SAMPLES  # each epoch: all once
    # evaluation ran split over both processes and was reported once, by the main process
    assert proc.stdout.count("[eval @ step 4]") == 1, proc.stdout[-3000:]


def test_ranks_hold_identical_weights_and_final_adapter_is_them(runs):
    from safetensors.torch import load_file
    _, out, dump, _, _ = runs["ddp"]
    rank0, rank1 = (torch.load(dump / f"lora-rank{r}.pt") for r in (0, 1))
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert rank0.keys() == rank1.keys() == saved.keys() and len(saved) == 2 * 7 * 2  # A, B x 7 modules x 2 layers
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"{k}: the two processes diverged"
        assert torch.equal(saved[k], rank0[k]), f"{k}: OUTPUT_DIR/final is not the trained weights"
    initial_b = [k for k in saved if "lora_B" in k]  # LoRA B starts at zero: training really moved it
    assert all(saved[k].abs().max() > 0 for k in initial_b)
    assert (out / "final" / "adapter_config.json").exists()


def test_losses_and_weights_match_single_process(runs):
    single_log = json.loads((runs["single"][2] / "log-rank0.json").read_text())
    ddp_logs = [json.loads((runs["ddp"][2] / f"log-rank{r}.json").read_text()) for r in (0, 1)]
    single, ddp = _steps(single_log), _steps(ddp_logs[0])
    assert sorted(single) == sorted(ddp) == list(range(1, STEPS + 1))
    assert _steps(ddp_logs[1]) == ddp  # the logged values are gathered, the same on both processes
    # step 1: identical weights and samples, float32 summation order only
    assert ddp[1][0] == pytest.approx(single[1][0], rel=1e-5), (single, ddp)
    assert ddp[1][1] == pytest.approx(single[1][1], rel=1e-4), (single, ddp)
    for step in range(2, STEPS + 1):  # the same, carried through a few Adam steps
        assert ddp[step][0] == pytest.approx(single[step][0], rel=1e-4), (step, single, ddp)
        assert ddp[step][1] == pytest.approx(single[step][1], rel=1e-3), (step, single, ddp)
    # Adam's first updates are ~lr * sign(gradient), so an element whose gradient is ~0 can move
    # either way on float32 rounding: compare each tensor as a whole (observed: <= 5e-5 relative).
    w_single = torch.load(runs["single"][2] / "lora-rank0.pt")
    w_ddp = torch.load(runs["ddp"][2] / "lora-rank0.pt")
    assert w_single.keys() == w_ddp.keys()
    for k in w_single:
        assert (w_ddp[k] - w_single[k]).norm() <= 1e-3 * w_single[k].norm(), k
