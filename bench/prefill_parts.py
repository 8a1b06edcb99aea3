"""Where a batch's prefill goes (issue 32): the vision tower and the language model, wall against kernels, by the
rows in one prefill call. Says whether fewer, larger calls would pay (the host falls behind in the prefill's many
short elementwise kernels: docs/BENCHMARKS.md run AB) before anything is built for it.

    python bench/prefill_parts.py --model /tmp/w/model_qwen2vl-2b        # a GPU; random-init Qwen2-VL-2B

One generation batch of --batch-size full_val images, taken from predict's own order (largest first) at
--batch-index (default 2: a middle-sized batch of 4,096), is built by predict's loader for each prefill size in
--rows and prefilled by the static decoder as infer.py does (StaticDecoder._prefill: every chunk's forward, the
cache copies, the first token), --repeat times after two warm-ups. For each size it prints the median wall with a
sync at each end, the vision tower's wall inside it (a sync around the tower's forward), and from one profiled
repeat (the tower's syncs kept, so that each kernel runs inside the host range that launched it) the device
time of the kernels in the tower and in the rest. Wall minus kernels is the time the
GPU waited on the host (and on the two syncs this script adds around the tower).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from common import DEFAULT_SHARED, build_random_model, full_val_samples
from latexocr.profiling import PHASE  # the ranges naming the host's phase (common puts the repo on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench"))
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--batch-index", type=int, default=2)
    ap.add_argument("--rows", default="128,256,512", help="rows per prefill call, each in turn")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: the script's own check on a tiny model (no timings worth reading)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "prefill_parts.json")
    a = ap.parse_args()

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from latexocr import generation
    from latexocr.batching import SampleEncoder
    from latexocr.fast import StaticDecoder, plain_text_attention, prepare_model
    from latexocr.modeling import load_model, load_processor, pick_dtype, vision_tower_of
    from latexocr.sample import END_OF_TURN, sizing_for

    model_dir = a.model or build_random_model(a.shared.resolve(), a.work / "qwen2vl-2b-random")
    model = prepare_model(load_model(str(model_dir), pick_dtype("auto"), "sdpa", device_map=a.device)).eval()
    processor = load_processor(str(model_dir))
    encoder = SampleEncoder(processor, sizing_for(processor))
    tok = encoder.tokenizer
    paths = [p for p, _ in full_val_samples(a.shared.resolve())]
    ordered = [paths[i] for i in generation._size_order(paths)[::-1]]
    batch = ordered[a.batch_index * a.batch_size:(a.batch_index + 1) * a.batch_size]
    stop_ids = [tok.convert_tokens_to_ids(END_OF_TURN)] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    decoder = StaticDecoder(model, stop_ids, tok.pad_token_id, 64)  # predict's stop tokens
    _, tower = vision_tower_of(model)
    pixels, pinned = generation.vision_dtype(model), generation.pinned_chunks(model.config)

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    tower_wall, timing = [0.0], [False]
    plain_forward = tower.forward

    def tower_forward(*args, **kwargs):  # the tower's own wall (a sync each side) and its kernels' profiler range
        if timing[0]:
            sync()
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"{PHASE}vision"):
            out = plain_forward(*args, **kwargs)
            if timing[0]:
                sync()
        tower_wall[0] += time.perf_counter() - t0
        return out

    tower.forward = tower_forward
    rows_list = [int(r) for r in a.rows.split(",")]
    results = []
    with torch.inference_mode(), plain_text_attention(model), torch.compiler.set_stance("force_eager"):
        for rows in rows_list:
            generation.PREFILL_CHUNK_ROWS = rows  # the loader's chunks (read when its collate is built)
            units = generation.start_loader(encoder, batch, a.batch_size, a.workers, True, pixels, pinned)
            _, failed, chunks = next(units)
            del units
            chunks = [c.to(a.device) for c in chunks]
            n = sum(c["input_ids"].shape[0] for c in chunks)
            for _ in range(2):  # warm-up: kernels chosen, the allocator's blocks
                decoder._prefill(chunks, n)
            sync()
            walls, towers = [], []
            timing[0] = True
            for _ in range(a.repeat):
                tower_wall[0] = 0.0
                sync()
                t0 = time.perf_counter()
                decoder._prefill(chunks, n)
                sync()
                walls.append(time.perf_counter() - t0)
                towers.append(tower_wall[0])
            timing[0] = False
            sync()
            t0 = time.perf_counter()
            for _ in range(a.repeat):  # without the tower's syncs: the prefill as infer.py runs it
                decoder._prefill(chunks, n)
            sync()
            plain_wall = (time.perf_counter() - t0) / a.repeat
            timing[0] = True  # the tower's syncs again: its kernels run inside its host range, where they are counted
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                with torch.profiler.record_function(f"{PHASE}prefill"):
                    decoder._prefill(chunks, n)
                    sync()
            timing[0] = False
            events = prof.events()
            vision_ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == f"{PHASE}vision"]
            kernel_us = {"vision": 0.0, "rest": 0.0}
            launches = {"vision": 0, "rest": 0}
            for e in events:
                if e.device_type != DeviceType.CUDA or e.name.startswith(PHASE):
                    continue
                part = "vision" if any(lo <= e.time_range.start <= hi for lo, hi in vision_ranges) else "rest"
                kernel_us[part] += e.time_range.elapsed_us()
                launches[part] += 1
            row = {"rows_per_call": rows, "calls": len(chunks), "images": n, "failed": len(failed),
                   "patches": int(sum(c["image_grid_thw"].prod(-1).sum() for c in chunks)),
                   "text_tokens_padded": int(sum(c["input_ids"].numel() for c in chunks)),
                   "prefill_wall_ms": round(1e3 * statistics.median(walls), 1),
                   "prefill_wall_no_tower_syncs_ms": round(1e3 * plain_wall, 1),
                   "vision_wall_ms": round(1e3 * statistics.median(towers), 1),
                   "rest_wall_ms": round(1e3 * statistics.median(w - t for w, t in zip(walls, towers)), 1),
                   "vision_kernels_ms": round(kernel_us["vision"] / 1e3, 1),
                   "rest_kernels_ms": round(kernel_us["rest"] / 1e3, 1),
                   "vision_kernel_launches": launches["vision"], "rest_kernel_launches": launches["rest"]}
            results.append(row)
            print(json.dumps(row), flush=True)
    out = {"gpu": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "batch_index": a.batch_index,
           "repeat": a.repeat, "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
