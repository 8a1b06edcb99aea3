"""Where a training step's time goes, read from train.py's own run (bench/bench_train.py --profile-steps).

With $LATEXOCR_PROFILE_STEPS set ("first:last", optimizer steps counted from 1), the trainer records those
steps with torch.profiler and writes, per step, the device time of each kernel (CPU operators' time on a
machine without a GPU) summed into categories: matrix products, attention, linear attention (Qwen3.5's delta
rule and convolution kernels), normalization, copies, the optimizer, other elementwise work, and the rest;
plus the busiest kernels. It goes to $LATEXOCR_PROFILE_OUT (a JSON file; default step_profile.json in the
output folder), and one line goes to stderr. A bench setting, like $LATEXOCR_SPEED: train.py's settings stay
as they are. The steps profiled run slower (the profiler's own work), so bench_train times the others.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from transformers import TrainerCallback

ENV, OUT_ENV = "LATEXOCR_PROFILE_STEPS", "LATEXOCR_PROFILE_OUT"
# kernel (or CPU operator) name -> category, first match wins: fla's delta-rule kernels and ours before the
# generic Triton names; cuBLAS / CUTLASS names before "elementwise"
CATEGORIES = (
    ("matrix products", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|splitk|aten::(add|b|baddb)?mm$|aten::matmul"),
    ("attention", r"flash|fmha|attention|attn"),
    ("linear attention", r"delta|chunk_|solve_tril|wy_fast|recompute_w_u|kkt|causal_conv|conv1d|conv_update"),
    ("normalization", r"norm"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copies", r"copy|memcpy|memset|catarray|cat_|aten::cat|index_put|index_copy|scatter|gather"),
    ("elementwise", r"elementwise|vectorized|pointwise|reduce|softmax|triton|aten::"),
)


def parse_steps(text: str) -> tuple[int, int]:
    """"first:last" (or one step) -> (first, last); one clear line on anything else."""
    first, _, last = text.partition(":")
    try:
        first, last = int(first), int(last or first)
    except ValueError:
        raise SystemExit(f"{ENV}: {text!r}: give the optimizer steps to profile as first:last, e.g. 12:14") from None
    if not 1 <= first <= last:
        raise SystemExit(f"{ENV}: {text!r}: steps count from 1, first <= last")
    return first, last


def category(name: str) -> str:
    lowered = name.lower()
    return next((what for what, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def summarize(events, steps: int) -> dict:
    """Per-step milliseconds by category and the busiest kernels, from torch.profiler's key_averages():
    the CUDA kernels' device time where any ran, else the CPU operators' own time."""
    kernels = [e for e in events if getattr(e, "self_device_time_total", 0) > 0 and "cuda" in str(e.device_type).lower()]
    on_device = bool(kernels)
    rows = kernels if on_device else [e for e in events if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    times = [(e.key, (e.self_device_time_total if on_device else e.self_cpu_time_total) / 1e3 / steps, e.count // steps,
              category(e.key)) for e in rows]
    by_category: dict[str, float] = {}
    for _, ms, _, what in times:
        by_category[what] = by_category.get(what, 0.0) + ms
    total = sum(by_category.values())
    return {"timed": "device (CUDA kernels)" if on_device else "cpu (operators' own time)", "steps": steps,
            "ms_per_step": round(total, 3),
            "categories": {k: {"ms": round(v, 3), "share": round(v / total, 4) if total else 0.0}
                           for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "busiest": [{"name": name[:160], "ms": round(ms, 3), "calls": calls, "category": what}
                        for name, ms, calls, what in sorted(times, key=lambda t: -t[1])[:40]]}


class StepProfile(TrainerCallback):
    """torch.profiler around optimizer steps first..last (main process only); the summary written at the last."""

    def __init__(self, first: int, last: int, out: Path):
        self.first, self.last, self.out = first, last, out
        self.profiler = None

    @classmethod
    def from_env(cls, output_dir) -> list:
        """[the callback] where $LATEXOCR_PROFILE_STEPS is set, else []."""
        text = os.environ.get(ENV, "").strip()
        if not text:
            return []
        first, last = parse_steps(text)
        return [cls(first, last, Path(os.environ.get(OUT_ENV) or Path(output_dir) / "step_profile.json"))]

    def on_step_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.profiler is None and state.global_step + 1 == self.first:
            import torch
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None or state.global_step != self.last:
            return
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        summary = {"steps_profiled": [self.first, self.last],
                   **summarize(self.profiler.key_averages(), self.last - self.first + 1)}
        self.profiler = None
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(summary, indent=1))
        shares = ", ".join(f"{k} {v['share']:.0%}" for k, v in summary["categories"].items())
        print(f"profile of steps {self.first}-{self.last}: {summary['ms_per_step']:.1f} ms a step "
              f"({summary['timed']}): {shares}; {self.out}", file=sys.stderr, flush=True)
