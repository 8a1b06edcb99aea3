"""Inference speed and agreement, one run: one image at a time (the tutorial's way), the batched
`generate` path (the reference), and the static-cache / CUDA-graph loop (infer.py's default engine).

    python bench/bench_infer.py                 # random-init Qwen2-VL-2B from ../shared, real LaTeX_OCR images

All paths run latexocr.generation.predict on the same model and images. For speed every image
generates exactly --new-tokens tokens (min = max), so the comparison is engine speed alone; the
agreement (identical texts, metrics against the labels) compares the batched engines' outputs on the
same images. --full-test then scores that many images (real images cycled, the `full` test split's
9,443 by default) with latexocr.evaluation.evaluate, from the image files to the metrics summary,
with the generation stopping where the model stops (random weights: rarely before the cap).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import DEFAULT_SHARED, build_random_model, real_samples


def infer_py(a, model_dir, pairs) -> dict:
    """`python infer.py <labelled json>` with infer.py's defaults, in a process of its own: the seconds from
    the command to the printed metrics, as a user waits for them. --adapter random: with a LoRA adapter of
    train.py's defaults (what a user's run leaves), else the base model alone."""
    import subprocess
    import sys

    from common import ROOT, build_random_adapter, write_json
    labelled = write_json(pairs, len(pairs), a.work / f"labelled_{len(pairs)}.json")
    adapter = str(build_random_adapter(model_dir, a.work / f"adapter_{model_dir.name}")) if a.adapter == "random" else "none"
    cmd = [sys.executable, str(ROOT / "infer.py"), str(labelled), "--model-id", str(model_dir), "--model-source",
           "local", "--adapter", adapter, "--max-new-tokens", str(a.infer_py_max_new_tokens),
           "--output", str(a.work / "infer_py_predictions.csv"), "--profile", *a.infer_py_args.split()]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
        return {"error": proc.returncode}
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    # infer.py --profile's lines: seconds per phase (start-up, imports, model load, memory probe, data wait, engine,
    # ...), then the parts of model load (processor, config + sample, loader start, weights, adapter, merge)
    profile = "\n".join(x for x in proc.stderr.splitlines() if x.startswith(("time: ", "time, ")))
    print(f"infer.py on {len(pairs)} labelled images (max {a.infer_py_max_new_tokens} new tokens): "
          f"{wall:.1f} s from the command to the printed metrics ({len(pairs) / wall:.0f} images/s); {summary}\n"
          f"{profile}", flush=True)
    return {"images": len(pairs), "max_new_tokens": a.infer_py_max_new_tokens, "wall_s": wall, "summary": summary,
            "samples": a.samples, "args": a.infer_py_args, "profile": profile}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--single-images", type=int, default=8, help="images for the one-at-a-time run")
    ap.add_argument("--reference-images", type=int, default=1024, help="images for the batched generate run")
    ap.add_argument("--images", type=int, default=4096, help="images for the static-loop run")
    ap.add_argument("--batch-size", type=int, default=512, help="infer.py's default is 512")
    ap.add_argument("--workers", type=int,
                    help="DataLoader workers (default: infer.py's NUM_WORKERS=auto, half the cores, 2-8; runs before V: 4)")
    ap.add_argument("--noise-batch-size", type=int, default=256,
                    help="also run generate at this batch size: its agreement with itself (0: skip)")
    ap.add_argument("--full-test", type=int, default=9443, help="images scored end to end (0: skip)")
    ap.add_argument("--full-max-new-tokens", default="64,256", help="comma-separated caps for --full-test")
    ap.add_argument("--infer-py", type=int, default=9443,
                    help="images for `python infer.py labelled.json` timed as a user waits for it: from the "
                         "command to the printed metrics, a process of its own (0: skip)")
    ap.add_argument("--infer-py-max-new-tokens", type=int, default=64,
                    help="its cap (random weights rarely stop before it; 64 ids ~ a median label and a half)")
    ap.add_argument("--only-infer-py", action="store_true", help="run only the infer.py measurement")
    ap.add_argument("--adapter", choices=("none", "random"), default="none",
                    help="infer.py's run: the base model (none), or with a random LoRA adapter of train.py's defaults "
                         "(random: what a user's run leaves; LATEXOCR_SPEED=merge_adapter=off keeps it unmerged)")
    ap.add_argument("--infer-py-args", default="", help="more infer.py flags, e.g. '--num-workers 4' (the old default)")
    ap.add_argument("--samples", choices=("small", "full_val"), default="small",
                    help="the real images cycled: ../shared/latex_ocr/small's 110 (runs J-N) or full_val's 4,096 "
                         "(distinct labels: scoring's caches do not answer for it)")
    ap.add_argument("--prefill-rows", type=lambda text: [int(r) for r in text.split(",")],
                    help="images per prefill chunk in this process's loops (generation.PREFILL_CHUNK_ROWS, 128): run "
                         "AB found the prefill's host falling behind its short elementwise kernels, which larger "
                         "chunks lengthen; infer.py's own run keeps 128. Several (128,256,128,256): the static loop "
                         "timed with each in turn, one model load")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_infer.json")
    a = ap.parse_args()
    if a.workers is None:
        from latexocr.generation import default_loader_workers
        a.workers = default_loader_workers()
    a.shared = a.shared.resolve()
    a.work.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers
    from latexocr import generation
    from latexocr.batching import SampleEncoder
    from latexocr.evaluation import evaluate
    from latexocr.generation import predict
    from latexocr.metrics import summarize
    from latexocr.modeling import load_model, load_processor, pick_dtype
    from latexocr.fast import prepare_model
    from latexocr.sample import sizing_for

    if a.prefill_rows:
        generation.PREFILL_CHUNK_ROWS = a.prefill_rows[0]  # read at each call: the loader's unit, the probe, the prefill
    model_dir = a.model or build_random_model(a.shared, a.work / "qwen2vl-2b-random")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = prepare_model(load_model(str(model_dir), pick_dtype("auto"), "sdpa", device_map=device)).eval()
    processor = load_processor(str(model_dir))
    encoder = SampleEncoder(processor, sizing_for(processor))
    if a.samples == "full_val":
        from common import full_val_samples
        samples = full_val_samples(a.shared)
    else:
        samples = real_samples(a.shared)
    cycled = [samples[i % len(samples)] for i in range(max(a.images, a.reference_images, a.full_test, a.infer_py))]
    fixed = dict(min_new_tokens=a.new_tokens)  # random weights: force the same length for every image

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    phases = {}  # predict's own phases of the last timed run (infer.py --profile's names)

    def timed(n, batch_size, engine):
        """(images/s, peak GiB, results) of predict over the first n images, after a one-batch warm-up. The
        loader's workers start inside the timed call (infer.py starts them before the model loads)."""
        from latexocr.timing import Stopwatch
        paths = [p for p, _ in cycled[:n]]
        predict(model, encoder, paths[:batch_size], batch_size=batch_size, max_new_tokens=a.new_tokens,
                progress=False, num_workers=a.workers, engine=engine, **fixed)
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = Stopwatch()
        t0 = time.perf_counter()
        results = predict(model, encoder, paths, batch_size=batch_size, max_new_tokens=a.new_tokens,
                          progress=False, num_workers=a.workers, engine=engine, stopwatch=clock, **fixed)
        sync()
        dt = time.perf_counter() - t0
        phases.clear()
        phases.update({k: round(v, 3) for k, v in clock.seconds.items()})
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        return n / dt, peak, results

    env = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "new_tokens": a.new_tokens, "batch_size": a.batch_size,
           "workers": a.workers, "prefill_rows": generation.PREFILL_CHUNK_ROWS}
    print(json.dumps(env), flush=True)
    out = {"env": env}

    def save():
        a.out.write_text(json.dumps(out, indent=1))

    if a.infer_py:
        out["infer_py"] = infer_py(a, model_dir, cycled[:a.infer_py])
        save()
    if a.only_infer_py:
        return

    # --single-images 0 / --reference-images 0 skip those runs (the static loop alone: its rate, no ratios)
    single = ref_rate = None
    ref = []
    if a.single_images:
        single, _, _ = timed(a.single_images, 1, "generate")
        out["single_images_per_s"] = single
        print(f"one at a time (generate, batch 1): {single:.2f} images/s", flush=True)
        save()
    if a.reference_images:
        ref_rate, ref_peak, ref = timed(a.reference_images, a.batch_size, "generate")
        out["generate"] = {"images_per_s": ref_rate, "speedup": ref_rate / single if single else None,
                           "peak_gib": ref_peak}
        print(f"generate, batch {a.batch_size}: {ref_rate:.1f} images/s"
              + (f" = {ref_rate / single:.1f}x one-at-a-time" if single else "") + f", peak {ref_peak:.1f} GiB",
              flush=True)
        save()
    rate, peak, new = timed(a.images, a.batch_size, "static")
    # the loop without its waits for the loader (its workers' start and first chunks, which infer.py overlaps
    # with the model load: 0.12-0.14 s of data wait over 9,443 images in run AA), as infer.py's engine runs it
    def without_waits(rate):  # of the last timed run
        return a.images / max(a.images / rate - phases.get("data wait", 0.0), 1e-9)

    waiting = phases.get("data wait", 0.0)
    fed = without_waits(rate)
    out["static"] = {"images_per_s": rate, "speedup": rate / single if single else None,
                     "vs_generate": rate / ref_rate if ref_rate else None, "peak_gib": peak,
                     "phases": dict(phases), "images_per_s_fed": fed}
    print(f"static loop, batch {a.batch_size}: {rate:.1f} images/s"
          + (f" = {rate / single:.1f}x one-at-a-time" if single else "")
          + (f" ({rate / ref_rate:.1f}x batched generate)" if ref_rate else "") + f", peak {peak:.1f} GiB"
          + f"; {waiting:.2f} s waiting for the loader, {fed:.1f} images/s without it", flush=True)
    save()
    if a.prefill_rows and len(a.prefill_rows) > 1:  # the others in turn, the first's run above counted as one
        rounds = [{"prefill_rows": a.prefill_rows[0], "images_per_s": rate, "images_per_s_fed": fed}]
        for rows in a.prefill_rows[1:]:
            generation.PREFILL_CHUNK_ROWS = rows
            rate_r, _, _ = timed(a.images, a.batch_size, "static")
            fed_r = without_waits(rate_r)
            rounds.append({"prefill_rows": rows, "images_per_s": rate_r, "images_per_s_fed": fed_r})
            print(f"static loop, batch {a.batch_size}, prefill rows {rows}: {rate_r:.1f} images/s, {fed_r:.1f} "
                  "without the loader's waits", flush=True)
            out["static_by_prefill_rows"] = rounds
            save()
        generation.PREFILL_CHUNK_ROWS = a.prefill_rows[0]

    n = a.reference_images
    if n and a.noise_batch_size:  # bf16 noise floor: the reference against itself at another batch size
        _, _, other = timed(n, a.noise_batch_size, "generate")
        floor = sum(r["prediction"] == o["prediction"] for r, o in zip(ref, other)) / n
        out["generate_vs_itself"] = {"batch_size": a.noise_batch_size, "identical_texts": floor}
        print(f"generate at batch {a.noise_batch_size} vs {a.batch_size}: {100 * floor:.2f} % identical texts",
              flush=True)
    if n:
        labels = [t for _, t in cycled[:n]]
        same = sum(r["prediction"] == s["prediction"] for r, s in zip(ref, new[:n])) / n
        m_ref = summarize([r["prediction"] for r in ref], labels)
        m_new = summarize([s["prediction"] for s in new[:n]], labels)
        out["agreement"] = {"identical_texts": same, "metrics_generate": m_ref, "metrics_static": m_new}
        print(f"agreement on {n} images: {100 * same:.2f} % identical texts; metrics generate {m_ref} / static {m_new}",
              flush=True)
        save()

    for cap in (int(x) for x in a.full_max_new_tokens.split(",")) if a.full_test else ():
        sync()
        t0 = time.perf_counter()
        summary, rows = evaluate(model, encoder, cycled[:a.full_test], batch_size=a.batch_size,
                                 max_new_tokens=cap, num_workers=a.workers, progress=False)
        sync()
        dt = time.perf_counter() - t0
        cut = sum(bool(r.get("truncated")) for r in rows) if "truncated" in rows[0] else None
        out.setdefault("full_test", []).append({"images": a.full_test, "max_new_tokens": cap, "seconds": dt,
                                                "summary": summary, "rows_at_cap": cut})
        print(f"full test, {a.full_test} images, max {cap} new tokens: files -> metrics in {dt:.1f} s "
              f"({a.full_test / dt:.0f} images/s); summary {summary}", flush=True)
        save()


if __name__ == "__main__":
    main()
