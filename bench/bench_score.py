"""Time `infer.py --score` on 9,443 pairs built from distinct real labels (CPU), and where it goes.

    python bench/bench_score.py                 # 9,443 pairs, infer.py --score 3 times, then the phases
    python bench/bench_score.py --repeat 1 --no-phases
    python bench/bench_score.py --repeat 3 --no-phases --before /tmp/before   # and an older checkout, alternately
    python bench/bench_score.py --check-parse     # KaTeX's parse-only verdict = renderToString's, on
                                                  # every shared label and every prediction here

Pairs: a string-keyed cache must not be what is measured, so the labels are distinct real ones:
all 8,475 of ../shared/latex_ocr/full_val (8,470 distinct strings), then the 50 distinct labels of
../shared/latex_ocr/small (none of them in full_val), then the first 918 of full_val a second time
to reach 9,443 (the `full` test split's size): 8,520 distinct labels, 918 rows (10 %) repeating one.
60 % of predictions equal their label; the rest are one token off (changed to another token of the
labels, deleted, or one inserted; seeded), so nearly every prediction is a distinct string too.
They are written as infer.py's predictions CSV, then:
(a) `infer.py --score` as a subprocess, from the command to the printed summary: the user's wait;
    wall and CPU seconds (its workers included), ``--repeat`` times, as the CPU may be shared; each time
    first with no kept label verdicts (a fresh $LATEXOCR_VERDICT_CACHE: the first scoring of a data set),
    then again with the verdicts that run kept (latexocr/verdicts.py: the same set scored again);
(b) the phases in this process, one core: reading the file, tokenising, score_pair (tokens,
    Levenshtein, BLEU statistics), KaTeX's render check of the distinct predictions (equal to their
    label, or not; one KaTeX child, 128 formulas a request, its CPU counted): the floor of the work,
    as no string's verdict implies another's. The load average is printed with the times.
"""
from __future__ import annotations

import argparse
import csv
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
sys.path.insert(0, str(ROOT))
LATEX_OCR = ROOT.parent / "shared" / "latex_ocr"
FULL_VAL = LATEX_OCR / "full_val" / "formulas" / "val.formulas.norm.txt"
SMALL = LATEX_OCR / "small" / "formulas"
ROWS = 9443


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def real_labels(rows: int = ROWS) -> list[str]:
    """``rows`` labels: full_val's, small's distinct ones, then full_val's again from the start."""
    full = lines(FULL_VAL)
    small = list(dict.fromkeys(line for f in sorted(SMALL.glob("*.formulas.norm.txt")) for line in lines(f)))
    labels = full + [s for s in small if s not in set(full)]
    return (labels + full * (rows // len(full) + 1))[:rows]


def one_token_off(tokens: list[str], vocab: list[str], rng: random.Random) -> list[str]:
    """The tokens with one changed, deleted or inserted (a two-thirds majority of changes)."""
    tokens, at, how = list(tokens), rng.randrange(len(tokens)), rng.random()
    if how < 2 / 3:
        old = tokens[at]
        while tokens[at] == old:
            tokens[at] = rng.choice(vocab)
    elif how < 5 / 6 and len(tokens) > 1:
        del tokens[at]
    else:
        tokens.insert(at, rng.choice(vocab))
    return tokens


def realistic_pairs(labels: list[str], exact: float = 0.6, seed: int = 0) -> list[tuple[str, str]]:
    """(prediction, label): a share ``exact`` predicted exactly, the rest one token off."""
    rng = random.Random(seed)
    vocab = sorted({tok for label in labels for tok in label.split()})
    return [(label if rng.random() < exact else " ".join(one_token_off(label.split(), vocab, rng)), label)
            for label in labels]


def write_predictions(pairs: list[tuple[str, str]], path: Path) -> None:
    """infer.py's predictions CSV columns (the score columns are recomputed by --score anyway)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "prediction", "error", "label", "truncated"])
        writer.writeheader()
        for i, (pred, label) in enumerate(pairs):
            writer.writerow({"image": f"images/{i}.png", "prediction": pred, "error": "", "label": label,
                             "truncated": False})


def _children_cpu() -> float:  # this process's waited-for children (the phases' KaTeX child, stopped)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_counting_cpu(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """(the finished process, CPU s of it and every process under it). Sampled every 20 ms with psutil:
    infer.py ends with os._exit and does not wait for its KaTeX children, so their CPU never reaches
    RUSAGE_CHILDREN (what this bench read until run R); each process counts as last seen (up to 20 ms
    of each one's end is missed)."""
    import psutil
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    seen: dict[int, float] = {}
    while proc.poll() is None:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                seen[p.pid] = t.user + t.system
            except psutil.Error:  # ended between the listing and the reading
                pass
        time.sleep(0.02)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), sum(seen.values())


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def time_infer_score(csv_path: Path, verdicts: Path, root: Path = ROOT) -> tuple[float, float, dict]:
    """(wall s, CPU s, printed summary) of `infer.py --score` (``root``'s) in a process of its own, keeping
    label verdicts in the folder `verdicts`."""
    start = time.perf_counter()
    done, cpu = run_counting_cpu([sys.executable, str(root / "infer.py"), "--score", str(csv_path)], cwd=root,
                                 env=dict(os.environ, LATEXOCR_VERDICT_CACHE=str(verdicts)))
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"infer.py --score failed:\n{done.stderr}")
    if done.stderr.strip():
        print(f"    stderr: {done.stderr.strip()}")
    return took, cpu, json.loads(done.stdout)


def phase(name: str, work, rows: int) -> None:
    start, cpu = time.perf_counter(), time.process_time() + _children_cpu()
    work()
    took, cpu = time.perf_counter() - start, time.process_time() + _children_cpu() - cpu
    print(f"    {name:<52} {took:6.2f} s wall, {cpu:6.2f} CPU s ({rows} rows)")


def phases(csv_path: Path, pairs: list[tuple[str, str]]) -> None:
    """The work of --score, piece by piece, in this process (no cache: each string once)."""
    from latexocr import metrics
    from latexocr.latex import _katex, render_errors
    from latexocr.scoring import CHUNK_ROWS, read_predictions

    def katex(strings):
        for start in range(0, len(strings), CHUNK_ROWS):
            render_errors(strings[start:start + CHUNK_ROWS])
        _katex.stop()  # its CPU time counted (a child's is, once it has exited)

    exact = list(dict.fromkeys(pred for pred, label in pairs if pred == label))
    wrong = list(dict.fromkeys(pred for pred, label in pairs if pred != label))
    phase("read_predictions", lambda: read_predictions(csv_path), len(pairs))
    phase("tokenize both sides", lambda: [(metrics.tokenize(p), metrics.tokenize(r)) for p, r in pairs], len(pairs))
    phase("score_pair (tokens, Levenshtein, BLEU)", lambda: [metrics.score_pair(p, r) for p, r in pairs],
          len(pairs))
    # every distinct prediction must be parsed once: no verdict implies another's
    phase("KaTeX render check, distinct exact predictions", lambda: katex(exact), len(exact))
    phase("KaTeX render check, distinct wrong predictions", lambda: katex(wrong), len(wrong))


def check_parse(pairs: list[tuple[str, str]]) -> None:
    """KaTeX's parse-only verdict (what scoring asks) against renderToString's, error text included."""
    from latexocr.fast.katex import Engine
    from latexocr.latex import strip_math

    labels = list(dict.fromkeys(line for f in sorted(LATEX_OCR.glob("*/formulas/*.formulas.norm.txt"))
                                for line in lines(f)))
    strings = list(dict.fromkeys(labels + [strip_math(p) for p, _ in pairs]))
    engine = Engine()
    start = time.process_time()
    parsed = [v for i in range(0, len(strings), 256) for v in engine.check(strings[i:i + 256])]
    parse_s, start = time.process_time() - start, time.process_time()
    rendered = [engine.render(s)[1] for s in strings]
    render_s = time.process_time() - start
    differ = [(s, a, b) for s, a, b in zip(strings, parsed, rendered) if a != b]
    print(f"{len(strings)} distinct strings ({len(labels)} shared labels, then the predictions): "
          f"{sum(v is None for v in parsed)} parse; parse-only verdicts {parse_s:.2f} CPU s, renderToString "
          f"{render_s:.2f} CPU s; KaTeX {engine.version}; verdicts or errors that differ: {len(differ)}")
    for s, a, b in differ[:10]:
        print(f"    {s!r}: parse {a!r}, render {b!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs of infer.py --score")
    parser.add_argument("--no-phases", action="store_true", help="skip (b), the in-process phases")
    parser.add_argument("--before", metavar="DIR", help="also time DIR's infer.py (an older checkout, e.g. "
                        "`git archive COMMIT | tar -x -C DIR`), alternately with this one's")
    parser.add_argument("--check-parse", action="store_true",
                        help="only compare KaTeX's parse-only verdicts with renderToString's")
    args = parser.parse_args()
    if not FULL_VAL.is_file() or not SMALL.is_dir():
        raise SystemExit(f"skipped: the real labels are not here ({FULL_VAL}, {SMALL}): "
                         "this benchmark needs the project's ../shared folder")
    pairs = realistic_pairs(real_labels())
    if args.check_parse:
        return check_parse(pairs)
    print(f"{len(pairs)} pairs, {len({r for _, r in pairs})} distinct labels, {sum(p == r for p, r in pairs)} exact, "
          f"{len({p for p, _ in pairs})} distinct predictions; {os.cpu_count()} CPUs, load average {_load()}")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "predictions.csv"
        write_predictions(pairs, csv_path)
        print("(a) infer.py --score, end to end (a subprocess):")
        roots = [("before: ", Path(args.before).resolve()), ("after: ", ROOT)] if args.before else [("", ROOT)]
        for run in range(args.repeat):
            for name, root in roots:  # before and after alternately: the same minutes' load for both
                verdicts = Path(tmp) / f"verdicts{run}{name.strip(': ')}"
                for kept in ("no kept verdicts", "the verdicts it kept"):
                    took, cpu, summary = time_infer_score(csv_path, verdicts, root)
                    print(f"    {name}{took:.2f} s wall, {cpu:.2f} CPU s (its workers included), {kept}; "
                          f"load average now {_load()}")
                    if run == args.repeat - 1:
                        print("    " + json.dumps(summary))
        if not args.no_phases:
            print("(b) the phases, in this process:")
            phases(csv_path, pairs)


if __name__ == "__main__":
    main()
