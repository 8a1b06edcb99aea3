"""Inference speed: one image at a time (the tutorial's way) against infer.py's batched generation, in one run.

    python bench/bench_infer.py                 # random-init Qwen2-VL-2B from ../shared, real LaTeX_OCR images

Both paths use the same model, images and the same code (latexocr.generation.predict); every
image generates exactly --new-tokens tokens (min = max), so the comparison is engine speed
alone. Prints images/s, the speed-up, and peak GPU memory of the batched run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import DEFAULT_SHARED, build_random_model, real_samples


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--single-images", type=int, default=16, help="images for the one-at-a-time run")
    ap.add_argument("--batched-images", type=int, default=1024)
    ap.add_argument("--batch-sizes", default="128,512", help="comma-separated; infer.py's default is 512")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers (infer.py's default: 4)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_infer.json")
    a = ap.parse_args()
    a.shared = a.shared.resolve()
    a.work.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers
    from latexocr.batching import SampleEncoder
    from latexocr.generation import predict
    from latexocr.modeling import load_model, load_processor, pick_dtype
    from latexocr.sample import sizing_for

    model_dir = a.model or build_random_model(a.shared, a.work / "qwen2vl-2b-random")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(str(model_dir), pick_dtype("auto"), "sdpa", device_map=device).eval()
    processor = load_processor(str(model_dir))
    encoder = SampleEncoder(processor, sizing_for(processor))
    images = [p for p, _ in real_samples(a.shared)]
    fixed = dict(min_new_tokens=a.new_tokens)  # random weights: force the same length for every image

    def timed(paths, batch_size):
        predict(model, encoder, paths[: min(len(paths), batch_size)], batch_size=batch_size,
                max_new_tokens=a.new_tokens, progress=False, num_workers=a.workers, **fixed)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        predict(model, encoder, paths, batch_size=batch_size, max_new_tokens=a.new_tokens, progress=False,
                num_workers=a.workers, **fixed)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        return len(paths) / dt, peak

    env = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "new_tokens": a.new_tokens}
    single, _ = timed([images[i % len(images)] for i in range(a.single_images)], 1)
    results = {"env": env, "single_images_per_s": single, "batched": []}
    print(json.dumps(env), f"\none at a time: {single:.2f} images/s", flush=True)
    for bs in (int(x) for x in a.batch_sizes.split(",")):
        rate, peak = timed([images[i % len(images)] for i in range(a.batched_images)], bs)
        results["batched"].append({"batch_size": bs, "images_per_s": rate, "speedup": rate / single, "peak_gib": peak})
        print(f"batch {bs}: {rate:.1f} images/s = {rate / single:.1f}x one-at-a-time, peak {peak:.1f} GiB", flush=True)
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
