"""infer.py's host side on the CPU (no GPU needed): what feeds the decode loop, and where a user's wait goes.

    python bench/bench_host.py                                  # 1 and 2: the input pipeline (~2 min here)
    python bench/bench_host.py --infer-py 9443 --parts 3        # 3: infer.py --profile, tiny model (slow on a CPU)

Real images: ../shared/latex_ocr/full_val (4,096, cycled), the real Qwen2-VL processor (../shared/qwen2vl-2b),
infer.py's default image sizing.

1. Per core: milliseconds (wall and CPU) per image of each step a DataLoader worker runs for the static
   loop (generation._Collate), in one process with one torch thread as in a worker: the image header
   (the size order, main process), load + RGB + resize, the processor per prefill chunk (pixel values,
   token ids), the M-RoPE positions. 1000 / the CPU ms = images/s one worker core can feed; the H200's
   decode loop takes 414-447 images/s (docs/BENCHMARKS.md), the issue's target 600.
2. The loader as predict() runs it, `--workers` processes: seconds to the first generation batch (what
   the GPU waits for first) and images/s over `--loader-images`, the workers building whole batches
   (before) or one prefill chunk each (now: generation.image_batches).
3. `python infer.py labelled.json --profile` with the tiny random model (latexocr/testing.py) in a
   process of its own: the seconds per phase infer.py prints, wall and CPU seconds. The tiny model's
   engine is not free on a CPU (fp32, 512 rows): read the phases other than "engine".

One JSON line per measurement (stdout and $OUT/bench_host.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_SHARED, ROOT, full_val_samples, write_json


def emit(a, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(a.out / "bench_host.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def clocked(fn):
    """(result, wall s, CPU s of this process)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def encoder_for(folder: Path):
    from latexocr.modeling import load_processor
    from latexocr.sample import SampleEncoder, set_processor_sizing, sizing_for
    processor = load_processor(str(folder))
    encoder = SampleEncoder(processor, sizing_for(processor))
    set_processor_sizing(processor, encoder.sizing)  # as infer.py's setup_sample does
    return encoder


def per_core(a, encoder, paths) -> None:
    import torch
    from latexocr import generation
    from latexocr.batching import generation_batch
    from latexocr.images import load_image

    torch.set_num_threads(1)  # as in a DataLoader worker
    rows = generation.PREFILL_CHUNK_ROWS
    merge = encoder.processor.image_processor.merge_size
    generation_batch(encoder, [load_image(p, encoder.sizing) for p in paths[:8]])  # first-call costs off the clock
    _, w_head, c_head = clocked(lambda: generation._size_order(paths))
    images, w_load, c_load = clocked(lambda: [load_image(p, encoder.sizing) for p in paths])
    order = sorted(range(len(images)), key=lambda i: images[i].size[0] * images[i].size[1])  # as predict sorts
    images = [images[i] for i in order]
    chunks, w_proc, c_proc = clocked(lambda: [generation_batch(encoder, images[j:j + rows])
                                              for j in range(0, len(images), rows)])
    _, w_pos, c_pos = clocked(lambda: [generation.prompt_positions(c["attention_mask"], c["mm_token_type_ids"],
                                                                   c["image_grid_thw"], merge) for c in chunks])
    n = len(paths)
    steps = {"header (size order)": (w_head, c_head), "load + RGB + resize": (w_load, c_load),
             f"processor per chunk of {rows}": (w_proc, c_proc), "M-RoPE positions": (w_pos, c_pos)}
    worker_cpu_ms = 1000 * (c_load + c_proc + c_pos) / n
    emit(a, {"part": "per core", "images": n, "processor": type(encoder.processor).__name__,
             **{k: {"wall_ms": round(1000 * w / n, 3), "cpu_ms": round(1000 * c / n, 3)} for k, (w, c) in steps.items()},
             "worker_cpu_ms_per_image": round(worker_cpu_ms, 3),
             "images_per_s_per_worker_core": round(1000 / worker_cpu_ms, 1),
             "pixel_values_MB_per_image": round(sum(c["pixel_values"].numel() * 4 for c in chunks) / n / 1e6, 3)})


def loader(a, encoder, paths) -> None:
    from torch.utils.data import DataLoader

    from latexocr import generation

    def whole_batches():  # before: one worker builds a whole generation batch (chunked inside)
        return DataLoader(generation._Images(paths, encoder.sizing), batch_size=a.batch_size, shuffle=False,
                          num_workers=a.workers, collate_fn=generation._Collate(encoder, generation.PREFILL_CHUNK_ROWS, True))

    def chunk_units():  # now
        return generation.image_batches(encoder, paths, a.batch_size, a.workers, static=True)

    for name, make in (("whole batch per worker (before)", whole_batches), ("one chunk per worker (now)", chunk_units)):
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        first, batches = None, 0
        for _ in make():
            batches += 1
            if first is None:
                first = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = children.ru_utime + children.ru_stime - children0.ru_utime - children0.ru_stime
        emit(a, {"part": "loader", "how": name, "workers": a.workers, "batch_size": a.batch_size, "images": len(paths),
                 "first_batch_s": round(first, 2), "wall_s": round(wall, 2), "images_per_s": round(len(paths) / wall, 1),
                 "workers_cpu_s": round(cpu, 1), "load_avg": os.getloadavg()[0]})


def infer_py(a, pairs) -> None:
    from latexocr.testing import build_tiny_model

    model = a.work / "tiny-qwen2vl"
    if not (model / "config.json").exists():
        build_tiny_model(model)
    labelled = write_json(pairs, a.infer_py, a.work / f"labelled_{a.infer_py}.json")
    cmd = [sys.executable, str(ROOT / "infer.py"), str(labelled), "--model-id", str(model), "--model-source", "local",
           "--adapter", "none", "--max-new-tokens", str(a.max_new_tokens), "--output", str(a.work / "predictions.csv"),
           "--profile", *a.infer_py_args.split()]
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], flush=True)
        raise SystemExit(proc.returncode)
    line = [x for x in proc.stderr.splitlines() if x.startswith("time: ")][-1]
    summary = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    emit(a, {"part": "infer.py", "images": a.infer_py, "args": a.infer_py_args, "wall_s": round(wall, 2),
             "cpu_s": round(children.ru_utime + children.ru_stime - children0.ru_utime - children0.ru_stime, 1),
             "profile": line, "load_avg": os.getloadavg()[0],
             "metrics": {k: summary[k] for k in ("exact_match", "edit_distance", "bleu4", "render_rate") if k in summary}})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench_host"))
    ap.add_argument("--parts", default="1,2", help="which parts: 1 per core, 2 loader, 3 infer.py")
    ap.add_argument("--processor", type=Path, help="parts 1-2: a model folder whose processor to run (default: "
                    "../shared/qwen2vl-2b's; e.g. a Qwen3.5 folder: its Qwen3VLProcessor, 16-pixel patches)")
    ap.add_argument("--images", type=int, default=1024, help="images of part 1")
    ap.add_argument("--loader-images", type=int, default=2048, help="images of part 2")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of part 2")
    ap.add_argument("--batch-size", type=int, default=512, help="generation batch of part 2 (infer.py's on an H200)")
    ap.add_argument("--infer-py", type=int, default=9443, help="labelled images of part 3 (full_val cycled)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--infer-py-args", default="", help="more infer.py flags for part 3, e.g. '--num-workers 2'")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    parts = set(a.parts.split(","))
    pairs = full_val_samples(a.shared.resolve())
    paths = [p for p, _ in pairs]
    if parts & {"1", "2"}:
        encoder = encoder_for(a.processor or a.shared.resolve() / "qwen2vl-2b")
        if "1" in parts:
            per_core(a, encoder, paths[:a.images])
        if "2" in parts:
            loader(a, encoder, [paths[i % len(paths)] for i in range(a.loader_images)])
    if "3" in parts:
        infer_py(a, pairs)


if __name__ == "__main__":
    main()
