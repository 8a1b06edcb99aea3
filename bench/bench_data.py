"""Benchmark of the data stage: a LaTeX_OCR-sized parquet source through data2csv.py + csv2json.py.

    python bench/bench_data.py                         # 76,000 rows in ./.bench
    python bench/bench_data.py --rows 5000 --work-dir /tmp/bench

Generates (once, reused on later runs) a parquet file shaped like LaTeX_OCR's default/train:
~400x50 RGB PNGs with drawn formula-like text and lines, ~50 space-separated tokens per label,
in row groups of 500 like hub parquet files. Then runs both scripts as subprocesses, as a
user would, and prints wall time, rows/s and peak memory (largest single process from
getrusage, and the sampled total of the whole process tree, pool workers included).
Not a test: it takes minutes.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ("x y z a b c n i j k \\alpha \\beta \\gamma \\theta \\pi \\sum \\int \\frac \\sqrt ^ _ { } ( ) "
          "+ - = , . 0 1 2 3 4 5 \\left \\right \\cdot \\partial \\mathrm \\infty").split()
ROW_GROUP = 500

# Run a command and report the peak RSS of its largest process (the command or a worker).
RUSAGE_WRAPPER = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                  "print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def make_chunk(args: tuple[int, int]) -> tuple[list[dict], list[str]]:
    from PIL import Image, ImageDraw

    start, count = args
    images, texts = [], []
    for i in range(start, start + count):
        rng = random.Random(i)
        tokens = [rng.choice(TOKENS) for _ in range(50)]
        w, h = rng.randint(360, 440), rng.randint(40, 60)
        im = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(im)
        d.text((rng.randint(2, 12), rng.randint(2, 15)), " ".join(tokens)[: w // 6], fill=(0, 0, 0))
        for _ in range(3):  # fraction bars, sqrt strokes: makes the PNGs non-trivial
            y = rng.randint(0, h - 1)
            d.line((rng.randint(0, w // 2), y, rng.randint(w // 2, w - 1), y), fill=(0, 0, 0), width=1)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
        texts.append(" ".join(tokens))
    return images, texts


def generate(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("text", pa.string())])
    tmp = path.with_suffix(".tmp")
    t0 = time.time()
    with pq.ParquetWriter(tmp, schema) as writer, Pool(2) as pool:
        chunks = [(s, min(ROW_GROUP, rows - s)) for s in range(0, rows, ROW_GROUP)]
        for n, (images, texts) in enumerate(pool.imap(make_chunk, chunks)):
            writer.write_table(pa.table({"image": images, "text": texts}, schema=schema))
            print(f"\rgenerating source: {(n + 1) * ROW_GROUP:>7}/{rows}", end="", flush=True)
    tmp.replace(path)
    print(f"\ngenerated {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.time() - t0:.0f}s")


def run_measured(cmd: list[str], cwd: Path) -> dict:
    """Run `cmd`, sampling the summed RSS of its process tree; return times and peaks."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", RUSAGE_WRAPPER, *cmd], cwd=cwd,
                            stdout=subprocess.PIPE, text=True)
    peak_tree = 0

    def sample():
        nonlocal peak_tree
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak_tree = max(peak_tree, total - _wrapper_rss)
                time.sleep(0.2)
        except psutil.Error:
            pass

    _wrapper_rss = 0
    try:
        _wrapper_rss = psutil.Process(proc.pid).memory_info().rss  # the tiny wrapper itself
    except psutil.Error:
        pass
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    th.join()
    wall = time.time() - t0
    lines = out.strip().splitlines()
    for line in lines[:-1]:
        print("   ", line)
    result = json.loads(lines[-1])
    return {"wall_s": wall, "rc": result["rc"], "peak_rss_mib": result["maxrss_kb"] / 1024,
            "peak_tree_rss_mib": peak_tree / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=76000)
    p.add_argument("--work-dir", default=str(ROOT / ".bench"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the exported images and CSV/JSON")
    args = p.parse_args(argv)

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"source_{args.rows}.parquet"
    if not source.exists():
        generate(source, args.rows)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)  # measure a cold export, not a resumed one
    out.mkdir()

    stages = {
        "data2csv": [sys.executable, str(ROOT / "data2csv.py"), "--source", str(source), "--limit", "all",
                     "--workers", str(args.workers), "--csv-path", "latex_ocr_train.csv",
                     "--image-dir", "latex_ocr_images"],
        "csv2json": [sys.executable, str(ROOT / "csv2json.py"), "--csv-path", "latex_ocr_train.csv"],
    }
    results = {}
    for name, cmd in stages.items():
        print(f"== {name}")
        r = results[name] = run_measured(cmd, out)
        if r["rc"] != 0:
            print(f"{name} failed with exit code {r['rc']}")
            return 1
        print(f"   {name}: {r['wall_s']:.1f}s, {args.rows / r['wall_s']:.0f} rows/s, peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB (largest process), {r['peak_tree_rss_mib']:.0f} MiB (process tree)")
    total = sum(r["wall_s"] for r in results.values())
    peak = max(r["peak_tree_rss_mib"] for r in results.values())
    print(f"== total: {args.rows} rows in {total:.1f}s = {args.rows / total:.0f} rows/s end to end; "
          f"peak RSS {max(r['peak_rss_mib'] for r in results.values()):.0f} MiB (largest process), "
          f"{peak:.0f} MiB (process tree)")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
