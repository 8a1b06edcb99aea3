"""GRPO step time on one GPU (issue 30): rollout / reward / update, completions per second, peak memory.

    python bench/bench_grpo.py                                   # 64 images x 8 completions per step
    python bench/bench_grpo.py --images 64 --generations 8 --steps 6 --micro 16
    python bench/bench_grpo.py --micro auto,2                    # auto's pass size against 2 images, one call

Builds a random-init Qwen2-VL-2B from ../shared/qwen2vl-2b (bench/common.py; or --model), trains an SFT
adapter on the real LaTeX_OCR images of ../shared/latex_ocr for --sft-steps steps with train.py, then runs
`train.py --method grpo` from it (SwanLab and evaluation off) and reads its log lines: per optimizer step,
rollout_seconds and reward_seconds come from the trainer; the update is the rest of the step's wall time
(images per step / samples_per_second). Medians over the steps after the first (the decoder's CUDA graphs
are captured in it). A random-init model's completions run to MAX_NEW_TOKENS (no end token learnt in a few
SFT steps): the table gives the completion length the rollout really had.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import DEFAULT_SHARED, ROOT, build_random_model, real_samples, write_json


def run(flags: list[str], work: Path, log: Path | None = None) -> str:
    """train.py with `flags`; its output streamed to this process's stdout and to `log` as it comes (a
    run cut at a time limit keeps its step lines), and returned."""
    env = {**os.environ, "SWANLAB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, flags)]
    print("$", " ".join(cmd), flush=True)
    lines = []
    with subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc, \
            (open(log, "a") if log else contextlib.nullcontext()) as sink:
        for line in proc.stdout:
            lines.append(line)
            print(line, end="", flush=True)
            if sink:
                sink.write(line)
                sink.flush()
    if proc.returncode:
        raise SystemExit(f"train.py exited {proc.returncode} (its output is above)")
    return "".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--model", type=Path, default=None, help="a model folder (default: random-init Qwen2-VL-2B)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_grpo"))
    parser.add_argument("--images", type=int, default=64, help="images per optimizer step (BATCH_SIZE)")
    parser.add_argument("--micro", default="auto", help="images per pass (MICRO_BATCH_SIZE); comma-separated: each in turn")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--log", type=Path, default=Path(os.environ["OUT"]) / "bench_grpo.log" if os.environ.get("OUT") else None,
                        help="train.py's output appended here as it comes (default: $OUT/bench_grpo.log where $OUT is set)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or build_random_model(args.shared, args.work / "qwen2vl-2b-random")
    data = write_json(real_samples(args.shared), args.images * (args.steps + 1), args.work / "train.json")
    common = ["--model-id", model, "--model-source", "local", "--train-json", data, "--val-json", args.work / "none.json",
              "--output-dir", args.work / "run", "--swanlab-mode", "disabled", "--no-eval-base-model",
              "--save-steps", 100000, "--logging-steps", 1, "--max-new-tokens", args.max_new_tokens]
    if not (args.work / "run" / "final" / "adapter_config.json").is_file():
        run([*common, "--max-steps", args.sft_steps, "--batch-size", 16], args.work, args.log)
    rows = []
    for micro in args.micro.split(","):  # several: each from the same SFT adapter, one after the other
        grpo = [*common, "--output-dir", args.work / f"run_m{micro}", "--init-adapter", args.work / "run" / "final"]
        out = run([*grpo, "--method", "grpo", "--max-steps", args.steps, "--batch-size", args.images,
                   "--micro-batch-size", micro, "--num-generations", args.generations], args.work, args.log)
        rows.append(table_row(out, micro, args.images, args.generations))
    print(f"\n| images x completions | MICRO_BATCH_SIZE (images per pass) | step s | rollout s | reward s | update s | "
          f"completions/s | completion length | peak GiB |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def table_row(out: str, micro: str, images: int, generations: int) -> str:
    lines = [ast.literal_eval(line) for line in out.splitlines() if line.startswith("{'loss'")][1:]
    if not lines:
        raise SystemExit("no steady-state log lines: raise --steps")
    passes = next((ln.split("GRPO: ", 1)[1].split(" images per pass")[0] for ln in out.splitlines()
                   if ln.startswith("GRPO: ") and "images per pass" in ln), micro)

    def median(key):
        return statistics.median(float(line[key]) for line in lines)

    step = images / median("samples_per_second")
    rollout, reward = median("rollout_seconds"), median("reward_seconds")
    return (f"| {images} x {generations} | {micro} ({passes}) | {step:.2f} | {rollout:.2f} | {reward:.2f} | "
            f"{step - rollout - reward:.2f} | {images * generations / step:.1f} | {median('completion_length'):.0f} | "
            f"{max(float(line.get('gpu_mem_peak_gib', 'nan')) for line in lines):.1f} |")


if __name__ == "__main__":
    main()
