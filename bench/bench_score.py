"""Time scoring 9,443 realistic predictions (CPU): the old single-process path vs `infer.py --score`.

    python bench/bench_score.py                  # 9,443 pairs, old path from git commit c2454c7
    python bench/bench_score.py --rows 2048 --old-commit none

Pairs: the real labels of ../shared/latex_ocr/small, cycled; 60 % of predictions are the label,
the rest have one token replaced by another token of the labels (seeded). They are written as
infer.py's predictions CSV. (a) scores them with the scoring code of --old-commit (metrics.py
and latex.py read with `git show`; its score_row + summarize_rows copied below), in this process;
(b) runs `infer.py --score` as a subprocess, start to printed summary. Both summaries are
printed, and must agree. The CPU may be shared: the load average is printed with the times.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "latex_ocr" / "small"


def real_labels() -> list[str]:
    files = sorted((SHARED / "formulas").glob("*.formulas.norm.txt"))
    return [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def realistic_pairs(labels: list[str], rows: int, exact: float = 0.6, seed: int = 0) -> list[tuple[str, str]]:
    """(prediction, label): labels cycled; a share ``exact`` predicted exactly, the rest one token off."""
    rng = random.Random(seed)
    vocab = sorted({tok for label in labels for tok in label.split()})
    pairs = []
    for i in range(rows):
        label = labels[i % len(labels)]
        tokens = label.split()
        if rng.random() >= exact:
            at = rng.randrange(len(tokens))
            tokens[at] = rng.choice([t for t in vocab if t != tokens[at]])
        pairs.append((" ".join(tokens), label))
    return pairs


def write_predictions(pairs: list[tuple[str, str]], path: Path) -> None:
    """infer.py's predictions CSV columns (the score columns are recomputed by --score anyway)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "prediction", "error", "label", "truncated"])
        writer.writeheader()
        for i, (pred, label) in enumerate(pairs):
            writer.writerow({"image": f"images/{i}.png", "prediction": pred, "error": "", "label": label,
                             "truncated": False})


def old_scoring(commit: str, folder: Path):
    """(score_row, summarize_rows) of the scoring code at ``commit``, or None when git cannot show it."""
    package = folder / "old_latexocr"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    for name in ("metrics.py", "latex.py"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:latexocr/{name}"],
                               capture_output=True, text=True)
        if shown.returncode != 0:
            return None
        (package / name).write_text(shown.stdout, encoding="utf-8")
    sys.path.insert(0, str(folder))
    old = importlib.import_module("old_latexocr.metrics")

    def score_row(prediction, label, truncated=False):  # latexocr/evaluation.py at that commit
        return {**old.sample_scores(prediction, label), "render_ok": old.render_ok(prediction),
                "truncated": bool(truncated)}

    def summarize_rows(rows):
        return old.summarize([r["prediction"] for r in rows], [r["label"] for r in rows],
                             truncated=[r["truncated"] for r in rows], rendered=[r["render_ok"] for r in rows])

    return score_row, summarize_rows


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=9443)
    parser.add_argument("--old-commit", default="c2454c7", help="the scoring code to compare with; 'none' skips (a)")
    args = parser.parse_args()
    labels = real_labels()
    if not labels:
        raise SystemExit(f"no labels under {SHARED}")
    pairs = realistic_pairs(labels, args.rows)
    print(f"{len(pairs)} pairs from {len(labels)} real label lines ({len(set(labels))} distinct); {sum(p == r for p, r in pairs)} exact; "
          f"{len(set(p for p, _ in pairs))} distinct predictions; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "predictions.csv"
        write_predictions(pairs, csv_path)
        old = old_scoring(args.old_commit, Path(tmp)) if args.old_commit != "none" else None
        if old is None:
            print("(a) old single-process path: skipped (--old-commit none or not in this git history)")
        else:
            score_row, summarize_rows = old
            start, cpu_start = time.perf_counter(), time.process_time()
            rows = [{"prediction": p, "label": r, **score_row(p, r, False)} for p, r in pairs]
            summary = summarize_rows(rows)
            took, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            print(f"(a) old single-process score_row + summarize_rows ({args.old_commit}): {took:.2f} s "
                  f"({len(pairs) / took:.0f} rows/s), {cpu:.2f} CPU s; load average now {os.getloadavg()[0]:.2f}")
            print("    " + json.dumps(summary))
        start, cpu_before = time.perf_counter(), _children_cpu()
        done = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--score", str(csv_path)],
                              capture_output=True, text=True, cwd=ROOT)
        took, cpu = time.perf_counter() - start, _children_cpu() - cpu_before
        if done.returncode != 0:
            raise SystemExit(f"infer.py --score failed:\n{done.stderr}")
        print(f"(b) infer.py --score, end to end (a subprocess): {took:.2f} s ({len(pairs) / took:.0f} rows/s), "
              f"{cpu:.2f} CPU s (its workers included); load average now {os.getloadavg()[0]:.2f}")
        new = json.loads(done.stdout)
        print("    " + json.dumps(new))
        if done.stderr.strip():
            print(f"    stderr: {done.stderr.strip()}")
        if old is not None:
            differ = {k: (summary[k], new[k]) for k in summary if abs(summary[k] - new[k]) > 1e-9}
            print("    same metrics as (a)" if not differ else f"    DIFFERENT from (a): {differ}")


if __name__ == "__main__":
    main()
