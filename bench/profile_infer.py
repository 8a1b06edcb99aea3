"""Where one batch of inference spends its time: host vs device, prefill vs decode vs the rest.

    python bench/profile_infer.py --images 2048 --new-tokens 64        # random-init Qwen2-VL-2B, real images
    python bench/profile_infer.py --family qwen3_5-2b                  # random-init Qwen3.5-2B

Runs latexocr.generation.predict (infer.py's engine) on the real LaTeX_OCR images cycled, every row
generating exactly --new-tokens tokens, and reports (1) wall time split into the phases of
predict (waiting for the DataLoader, prefill, decode steps, the rest), each measured with a CUDA
sync around it, and predict's own phases (infer.py --profile's: data wait, to device, engine,
detokenise ...), (2) torch.profiler's top operators of one batch by host and by device time, and (3) where the
GPU waits in one batch run as infer.py runs it (no sync around the phases, which (1) and (2) add): every gap
between the device's kernels of at least --gap-us, charged to the host call that stopped the queue just before
it (a GPU->CPU sync: `.item()`, `.tolist()`, a copy to the CPU; by its source line) or, where none did, to the
phase the host was in (the host launching slower than the GPU runs).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

from common import DEFAULT_SHARED, build_random, full_val_samples, real_samples
from latexocr.profiling import PHASE  # the ranges naming the host's phase (common puts the repo on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--family", default="qwen2vl-2b", help="without --model: a random-init model of this family "
                    "(bench/common.py FAMILIES), built into --work")
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench"))
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--workers", type=int,
                    help="DataLoader workers (default: infer.py's NUM_WORKERS=auto, half the cores, 2-8; runs before V: 4)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--samples", choices=("small", "full_val"), default="full_val",
                    help="the real images cycled: ../shared/latex_ocr/small's 110 (runs before AB) or full_val's 4,096")
    ap.add_argument("--gap-us", type=float, default=20.0, help="the shortest device idle gap counted (microseconds)")
    a = ap.parse_args()
    if a.workers is None:
        from latexocr.generation import default_loader_workers
        a.workers = default_loader_workers()
    a.work.mkdir(parents=True, exist_ok=True)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from latexocr import generation
    from latexocr.fast import decoding
    from latexocr.batching import SampleEncoder
    from latexocr.modeling import load_model, load_processor, pick_dtype
    from latexocr.profiling import device_gaps
    from latexocr.sample import sizing_for
    from latexocr.fast import prepare_model
    from latexocr.timing import Stopwatch

    model_dir = a.model or build_random(a.family, a.shared.resolve(), a.work / f"model_{a.family}")
    model = prepare_model(load_model(str(model_dir), pick_dtype("auto"), "sdpa", device_map="cuda")).eval()
    processor = load_processor(str(model_dir))
    encoder = SampleEncoder(processor, sizing_for(processor))
    samples = (full_val_samples if a.samples == "full_val" else real_samples)(a.shared.resolve())
    paths = [samples[i % len(samples)][0] for i in range(a.images)]

    phases = collections.Counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.profiler.record_function(f"{PHASE}{name}"):  # the kernels' phase, in the profile below
                out = fn(*args, **kwargs)
                torch.cuda.synchronize()
            phases[name] += time.perf_counter() - t0
            return out
        return wrapper

    S = decoding.StaticDecoder
    plain = {name: getattr(S, name) for name in ("_prefill", "_run_step", "_compact", "generate")}
    S._prefill = timed("prefill (model forward per chunk, cache copies)", S._prefill)
    S._run_step = timed("decode steps (graph replays)", S._run_step)
    S._compact = timed("compaction", S._compact)
    S.generate = timed("StaticDecoder.generate (all)", S.generate)

    def run(n, stopwatch=None):
        return generation.predict(model, encoder, paths[:n], batch_size=a.batch_size, max_new_tokens=a.new_tokens,
                                  num_workers=a.workers, progress=False, min_new_tokens=a.new_tokens,
                                  stopwatch=stopwatch)

    run(a.batch_size)  # warm-up: CUDA graphs captured, kernels chosen
    phases.clear()
    torch.cuda.synchronize()
    clock = Stopwatch()  # predict's own phases (infer.py --profile's): what "outside generate" is made of
    t0 = time.perf_counter()
    run(a.images, clock)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rest = wall - phases["StaticDecoder.generate (all)"]
    table = {"images": a.images, "batch_size": a.batch_size, "new_tokens": a.new_tokens, "wall_s": wall,
             "images_per_s": a.images / wall, **{k: round(v, 3) for k, v in phases.items()},
             "outside generate (DataLoader wait, batch to GPU, decode text)": round(rest, 3),
             "predict's phases": {k: round(v, 3) for k, v in clock.seconds.items()}}
    print(json.dumps(table, indent=1), flush=True)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(a.batch_size)
        torch.cuda.synchronize()
    by_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    by_cuda = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
    by_phase = kernels_by_phase(prof)
    (a.out / "profile_infer.txt").write_text(json.dumps(table, indent=1) + "\n\nby host time\n" + by_cpu
                                             + "\n\nby device time\n" + by_cuda + "\n\n" + by_phase)
    print(by_cpu[:4000], flush=True)
    print(by_phase[:8000], flush=True)

    # (3) the same batch without the syncs above: where the GPU waits as infer.py runs
    for name, fn in plain.items():
        setattr(S, name, marked(name, fn))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        run(a.batch_size)
        torch.cuda.synchronize()
    waits = device_gaps(prof.events(), a.gap_us)
    (a.out / "profile_infer_gaps.json").write_text(json.dumps(waits, indent=1))
    print(json.dumps(waits, indent=1)[:6000], flush=True)


def marked(name, fn):
    """fn inside a profiler range named `phase: name` (no sync: the host's phase when the device waits)."""
    import torch

    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(f"{PHASE}{name}"):
            return fn(*args, **kwargs)
    return wrapper


def kernels_by_phase(prof, top: int = 15) -> str:
    """The device kernels of each phase (prefill, decode steps, ...): each kernel goes to the phase whose
    host range holds its start (every phase ends with a CUDA sync, so its kernels run inside it, CUDA graph
    replays' kernels included); per phase, the kernels with the most device time, their calls and mean."""
    import collections
    from torch.autograd import DeviceType

    events = prof.events()
    ranges = sorted((e.time_range.start, e.time_range.end, e.name[len(PHASE):]) for e in events
                    if e.name.startswith(PHASE) and e.name != f"{PHASE}StaticDecoder.generate (all)")
    totals = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for e in events:
        if e.device_type != DeviceType.CUDA or e.name.startswith(PHASE):  # the phases' own ranges on the device
            continue
        start = e.time_range.start
        phase = next((name for lo, hi, name in ranges if lo <= start <= hi), "outside the phases")
        entry = totals[phase][e.name[:90]]
        entry[0] += e.time_range.elapsed_us()
        entry[1] += 1
    lines = ["device kernels by phase (one batch)"]
    for phase, kernels in totals.items():
        total = sum(t for t, _ in kernels.values())
        lines.append(f"\n{phase}: {total / 1e3:.1f} ms of device time, {sum(n for _, n in kernels.values())} kernels")
        for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"  {t / 1e3:9.2f} ms {n:7d} x {t / n:8.1f} us  {name}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
