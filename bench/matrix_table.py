"""The README's family x card tables from bench_memory.py's results (issue 28).

    python bench/matrix_table.py docs/results/bench_memory_runU.jsonl
    python bench/matrix_table.py --pairs docs/results/bench_memory_runX.jsonl   # auto against the hand grid

Reads the JSON lines bench_memory.py wrote (`--out`, or `--work`'s bench_memory.jsonl) and prints two
markdown tables, training and inference, one row per family and one column per card: what auto chose,
its speed, its peak, or the stop's one line. Only the default cells count (a cell set by hand, `_m16_ckpt`
or `_b256`, is a grid cell); where a cell ran more than once, the first result (the matrix's own call).
Speeds of cells that ran beside others (`--parallel`) share the GPU: the table says how many ran at once.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FAMILIES  # noqa: E402

NAME = re.compile(r"^(train|infer)_(.+?)_(\d+)gib(_4bit)?$")
LABELS = {"qwen2vl-2b": "Qwen2-VL-2B", "qwen2_5vl-3b": "Qwen2.5-VL-3B", "qwen3vl-2b": "Qwen3-VL-2B",
          "qwen3vl-4b": "Qwen3-VL-4B", "qwen3_5-0.8b": "Qwen3.5-0.8B", "qwen3_5-2b": "Qwen3.5-2B",
          "qwen3_5-4b": "Qwen3.5-4B"}


def load(paths: list[Path]) -> dict[tuple, dict]:
    """(kind, family, card, '4bit' or '') -> the first default cell's result."""
    cells: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            result = json.loads(line)
            match = NAME.match(result.get("name", ""))
            if match:
                kind, family, card, quantized = match.groups()
                cells.setdefault((kind, family, int(card), "4bit" if quantized else ""), result)
    return cells


def choice(auto: str) -> str:
    """'micro-batch 16, gradient checkpointing on (...' -> '16 + ckpt'."""
    match = re.match(r"micro-batch (\d+), gradient checkpointing (on|off)", auto or "")
    if not match:
        return "?"
    return match.group(1) + (" + ckpt" if match.group(2) == "on" else "")


def stopped(result: dict) -> str:
    line = result.get("last_line") or "(no line)"
    if result.get("traceback"):
        return "**traceback**"
    match = re.search(r"needs ([\d.]+) GiB of the ([\d.]+) GiB", line)
    return f"stops: needs {match.group(1)} of {match.group(2)} GiB" if match else f"stops: {line[:60]}"


def cell_text(kind: str, result: dict | None) -> str:
    if result is None:
        return ""
    if result.get("exit") != 0:
        return stopped(result)
    together = f" ({result['concurrent']} at once)" if (result.get("concurrent") or 1) > 1 else ""
    if kind == "train":
        return (f"{choice(result.get('auto_choice', ''))}: {number(result.get('samples_per_s'))} samples/s, "
                f"{number(result.get('train_peak_gib') or result.get('peak_gib'))} GiB{together}")
    return (f"{result.get('auto_rows')} rows: {number(result.get('images_per_s'))} images/s, "
            f"{number(result.get('peak_gib'))} GiB{together}")


PAIR_NAME = re.compile(r"^(train|infer)_(.+?)_(\d+)gib(_4bit)?(?:_(m\d+(?:_ckpt)?|b\d+))?(?:_r\d+)?$")


def pairs(paths: list[Path]) -> str:
    """Issue 28's comparison: per card, auto's speed against the best setting of the hand grid (`--grid`'s
    `_m16_ckpt` / `_b256` cells) measured in the same results, each the median of its repeats (`--repeat`'s
    `_r2`...), and their ratio. A cell that stopped counts as no speed."""
    speeds: dict[tuple, dict[str, list[float]]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            result = json.loads(line) if line.strip() else {}
            match = PAIR_NAME.match(result.get("name", ""))
            speed = result.get("samples_per_s") or result.get("images_per_s")
            if match and result.get("exit") == 0 and speed:
                kind, family, card, quantized, setting = match.groups()
                key = (kind, family, int(card), "4bit" if quantized else "")
                speeds.setdefault(key, {}).setdefault(setting or "auto", []).append(float(speed))
    unit = {"train": "samples/s", "infer": "images/s"}
    lines = ["| cell | auto | best by hand | auto / hand |", "|---|---|---|---|"]
    for (kind, family, card, q), settings in sorted(speeds.items()):
        if "auto" not in settings or len(settings) < 2:
            continue
        median = {name: statistics.median(v) for name, v in settings.items()}
        hand = max((name for name in median if name != "auto"), key=median.get)
        shown = {name: f"{median[name]:.1f}" + (f" (median of {len(settings[name])})" if len(settings[name]) > 1 else "")
                 for name in ("auto", hand)}
        lines.append(f"| {kind}, {LABELS.get(family, family)}, {card} GiB{', 4-bit' if q else ''} | "
                     f"{shown['auto']} {unit[kind]} | {hand}: {shown[hand]} | {median['auto'] / median[hand]:.2f} |")
    return "\n".join(lines)


def number(value) -> str:
    return "?" if value is None else f"{value:.1f}"


def table(cells: dict, kind: str) -> str:
    columns = sorted({(card, q) for (k, _, card, q) in cells if k == kind})
    head = ["family"] + [f"{card} GiB" + (", 4-bit" if q else "") for card, q in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family in FAMILIES:
        if not any((kind, family, card, q) in cells for card, q in columns):
            continue
        row = [LABELS.get(family, family)] + [cell_text(kind, cells.get((kind, family, card, q))) for card, q in columns]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="bench_memory.py's JSON lines")
    ap.add_argument("--pairs", action="store_true", help="auto against the best hand setting per card (--grid's cells)")
    a = ap.parse_args()
    if a.pairs:
        print(pairs(a.results))
        return
    cells = load(a.results)
    tracebacks = [r["name"] for r in cells.values() if r.get("traceback")]
    print("Training (train.py, 20 optimizer steps, its defaults: auto's micro-batch, samples/s of steps 10-20, peak):\n")
    print(table(cells, "train"))
    print("\nInference (infer.py, 2,048 labelled images, its defaults: auto's rows, images/s from the command, peak):\n")
    print(table(cells, "infer"))
    done = sum(r.get("exit") == 0 for r in cells.values())
    print(f"\n{len(cells)} cells: {done} completed, {len(cells) - done} stopped with their line, "
          f"{len(tracebacks)} tracebacks{': ' + ', '.join(tracebacks) if tracebacks else ''}")


if __name__ == "__main__":
    main()
