"""Where a training step's time goes, read from train.py's own run (bench/bench_train.py --profile-steps).

With $LATEXOCR_PROFILE_STEPS set ("first:last", optimizer steps counted from 1), the trainer records those
steps with torch.profiler and writes, per step, the device time of each kernel (CPU operators' time on a
machine without a GPU) summed into categories: matrix products, attention, linear attention (Qwen3.5's delta
rule and convolution kernels), normalization, copies, the optimizer, other elementwise work, and the rest;
plus the busiest kernels; and the host's side: the steps' wall time, the share of it the GPU was busy, the
device's idle gaps charged to the host call before them (a GPU->CPU sync) or to the host launching (device_gaps),
and the operators and kernel launches the host dispatched a step. It goes to $LATEXOCR_PROFILE_OUT (a JSON file;
default step_profile.json in the output folder), and one line goes to stderr. A bench setting, like $LATEXOCR_SPEED: train.py's settings stay
as they are. The steps profiled run slower (the profiler's own work), so bench_train times the others.
"""
from __future__ import annotations

import bisect
import collections
import json
import os
import re
import sys
import time
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


ROOT = Path(__file__).resolve().parents[1]
# host calls after which the GPU's queue is empty: the host waited for the device (a GPU->CPU sync)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
              "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::tolist")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaMemcpyAsync", "cudaMemsetAsync")
PHASE = "phase: "  # record_function ranges a caller opens to name the host's phase in device_gaps


def _user_line(stack) -> str:
    """The innermost frame of a profiler event's Python stack outside torch and the profiling code."""
    for frame in stack or []:
        if "/torch/" in frame or "profil" in frame.rsplit("/", 1)[-1] or frame.startswith("<built-in"):
            continue
        return frame.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
    return "?"


def device_gaps(events, min_us: float = 20.0) -> dict:
    """The device's idle time in a profiled stretch (torch.profiler's events()), between its first and last kernel:
    every gap of at least min_us between busy intervals, charged to the last sync-like host call that ended inside
    the gap or just before it (with its source line where the profiler kept stacks), else to the host launching, in
    its innermost `phase:` range if a caller opened one (the device then ran faster than the host queued work)."""
    from torch.autograd import DeviceType

    # the device's kernels and copies; not the `phase:` ranges, which the profiler also shows on the device
    busy = sorted((e.time_range.start, e.time_range.end) for e in events
                  if e.device_type == DeviceType.CUDA and not e.name.startswith(PHASE))
    merged = []
    for lo, hi in busy:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    host = [e for e in events if e.device_type != DeviceType.CUDA]
    syncs = sorted((e.time_range.end, e.name, _user_line(getattr(e, "stack", None))) for e in host
                   if e.name.startswith(SYNC_CALLS))
    sync_ends = [end for end, _, _ in syncs]
    phases = sorted((e.time_range.start, e.time_range.end, e.name[len(PHASE):]) for e in host
                    if e.name.startswith(PHASE))
    by_cause = collections.defaultdict(lambda: [0.0, 0])
    total_gap = 0.0
    for (_, end), (start, _) in zip(merged, merged[1:]):
        gap = start - end
        if gap < min_us:
            continue
        total_gap += gap
        i = bisect.bisect_right(sync_ends, start) - 1  # the last sync ending before the next kernel starts
        if i >= 0 and sync_ends[i] >= end - 50:
            cause = f"after a sync: {syncs[i][1]} at {syncs[i][2]}"
        else:
            inside = [name for lo, hi, name in phases if lo <= end <= hi]
            cause = f"host launching, no sync{f' (in {inside[-1]})' if inside else ''}"
        by_cause[cause][0] += gap
        by_cause[cause][1] += 1
    span = merged[-1][1] - merged[0][0] if merged else 0.0
    return {"device_span_ms": round(span / 1e3, 2), "device_busy_ms": round(sum(hi - lo for lo, hi in merged) / 1e3, 2),
            "idle_in_gaps_ms": round(total_gap / 1e3, 2), "min_gap_us": min_us,
            "by_cause_ms": {cause: {"ms": round(t / 1e3, 2), "gaps": n}
                            for cause, (t, n) in sorted(by_cause.items(), key=lambda kv: -kv[1][0])[:25]}}


def host_side(events, steps: int, wall_s: float) -> dict:
    """What the host did in the profiled steps, per step: its wall time, the operators it dispatched (aten::, nested
    ones included) and the kernels it launched, the operators with the most host time of their own, and where the
    device waited (device_gaps; on a GPU)."""
    from torch.autograd import DeviceType

    host = [e for e in events if e.device_type != DeviceType.CUDA]
    own = collections.Counter()
    for e in host:
        if e.name.startswith("aten::"):
            own[e.name] += e.self_cpu_time_total
    out = {"wall_ms_per_step": round(wall_s * 1e3 / steps, 2),
           "aten_ops_per_step": round(sum(e.name.startswith("aten::") for e in host) / steps),
           "launches_per_step": round(sum(e.name.startswith(LAUNCHES) for e in host) / steps),
           "host_busiest_ops": [{"name": name, "ms_per_step": round(us / 1e3 / steps, 3)}
                                for name, us in own.most_common(15)]}
    if any(e.device_type == DeviceType.CUDA for e in events):
        gaps = device_gaps(events)
        out["device_busy_share"] = round(gaps["device_busy_ms"] / (wall_s * 1e3), 4) if wall_s else 0.0
        out["device_gaps"] = gaps
    return out


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
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None or state.global_step != self.last:
            return
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        steps = self.last - self.first + 1
        summary = {"steps_profiled": [self.first, self.last], **summarize(self.profiler.key_averages(), steps),
                   "host": host_side(self.profiler.events(), steps, wall)}
        self.profiler = None
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(summary, indent=1))
        shares = ", ".join(f"{k} {v['share']:.0%}" for k, v in summary["categories"].items())
        host = summary["host"]
        busy = f", the GPU busy {host['device_busy_share']:.0%} of it" if "device_busy_share" in host else ""
        print(f"profile of steps {self.first}-{self.last}: {summary['ms_per_step']:.1f} ms a step "
              f"({summary['timed']}): {shares}; wall {host['wall_ms_per_step']:.1f} ms a step{busy}, "
              f"{host['aten_ops_per_step']} operators and {host['launches_per_step']} launches dispatched; "
              f"{self.out}", file=sys.stderr, flush=True)
