"""train.py and infer.py with their defaults on a card of 8-80 GiB, simulated on one large GPU (issue 28).

    python bench/bench_memory.py --families qwen2_vl_2b --caps 0,24,16,12 --hand 16
    python bench/bench_memory.py --families qwen3_5_2b --caps 0,24,16 --hand 24

Each run is a separate process of the real script. A sitecustomize put on PYTHONPATH caps the process
(torch.cuda.set_per_process_memory_fraction, before the script allocates anything) at the card's size
less 1 GiB (what a card of that size leaves torch after the driver's context): cap 16 stands in for a
16 GiB card. Cap 0: the whole GPU. It also prints the process's peak allocated memory at exit.

Per (family, cap): `python train.py` (20 optimizer steps, its defaults: MICRO_BATCH_SIZE and
GRADIENT_CHECKPOINTING auto, the base-model and final evaluation on 256 validation images) and
`python infer.py` on 2,048 labelled images (BATCH_SIZE auto), each from the command to its exit.
--hand: at these caps, also the micro-batch x checkpointing grid by hand (the best of which auto is
compared with). Models: random-init of the published architectures (bench/common.py), data: the real
images and distinct labels of ../shared/latex_ocr/full_val. Generation capped at 64 new tokens (a random
model never stops; the full test set's median label is 64 Qwen2 tokens). Results: $OUT/bench_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_SHARED, ROOT, build_random_model, build_random_qwen3_5
from bench_train import parse_logs

SITECUSTOMIZE = '''
import atexit, os, sys
_cap = float(os.environ.get("BENCH_CARD_GIB", "0") or 0)
if _cap > 0:
    import torch
    _total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (_cap - 1) * 2**30 / _total), 0)

_pid = os.getpid()

def _peak():  # the script's own process, not a forked DataLoader worker
    torch = sys.modules.get("torch")
    if os.getpid() == _pid and torch is not None and torch.cuda.is_initialized():
        print(f"bench: peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", file=sys.stderr)
atexit.register(_peak)
'''
BUILDERS = {"qwen2_vl_2b": build_random_model, "qwen3_5_2b": build_random_qwen3_5}
HAND_GRID = [(16, False), (8, False), (4, False), (16, True), (8, True)]


def full_val_pairs(shared: Path) -> list[tuple[str, str]]:
    root = shared / "latex_ocr" / "full_val"
    formulas = (root / "formulas" / "val.formulas.norm.txt").read_text(encoding="utf-8").splitlines()
    pairs = []
    for line in (root / "matching" / "val.matching.txt").read_text().splitlines():
        name, idx = line.split()
        pairs.append((str(root / "images" / "images_val" / name), formulas[int(idx)]))
    return pairs


def write_json(pairs, path: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from latexocr.sample import make_record
    path.write_text(json.dumps([make_record(i, p, t) for i, (p, t) in enumerate(pairs)], ensure_ascii=False))
    return path


def run(cmd, work: Path, cap: float, name: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", BENCH_CARD_GIB=str(cap),
               PYTHONPATH=os.pathsep.join(filter(None, [str(work / "site"), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    (work / f"log_{name}.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc, wall


def outcome(proc) -> dict:
    text = proc.stdout + proc.stderr
    peak = re.findall(r"bench: peak allocated ([\d.]+) GiB", text)
    last = proc.stderr.strip().splitlines()[-2:] if proc.returncode else []
    return {"exit": proc.returncode, "peak_gib": float(peak[-1]) if peak else None,
            "traceback": "Traceback" in proc.stderr,
            "last_line": next((ln for ln in reversed(proc.stderr.strip().splitlines()) if not ln.startswith("bench:")), "")
            if proc.returncode else ""}


def train(model, work, cap, name, flags, steps=20):
    cmd = [sys.executable, str(ROOT / "train.py"), "--model-id", str(model), "--model-source", "local",
           "--train-json", str(work / "train.json"), "--val-json", str(work / "val.json"),
           "--output-dir", str(work / f"out_{name}"), "--max-steps", str(steps), "--save-steps", "100000",
           "--swanlab-mode", "disabled", "--max-new-tokens", "64", *flags]
    proc, wall = run(cmd, work, cap, name)
    logs = [entry for entry in parse_logs(proc.stdout + proc.stderr) if "samples_per_second" in entry]
    choice = next((ln for ln in proc.stdout.splitlines() if ln.startswith("micro-batch ")), "")
    evals = re.findall(r"EVAL_BATCH_SIZE=auto: (\d+) images", proc.stderr)
    return {"name": name, "cap_gib": cap, "wall_s": round(wall, 1), **outcome(proc),
            "samples_per_s": logs[-1]["samples_per_second"] if logs else None,  # steps 10-20: after warm-up
            "auto_choice": choice, "eval_rows": evals}


def infer(model, work, cap, name, flags=()):
    out = work / f"out_{name}"
    cmd = [sys.executable, str(ROOT / "infer.py"), str(work / "infer.json"), "--model-id", str(model),
           "--model-source", "local", "--adapter", "none", "--output", str(out) + ".csv", "--max-new-tokens", "64",
           *flags]
    proc, wall = run(cmd, work, cap, name)
    rows = re.findall(r"BATCH_SIZE=auto: (\d+) images per batch \(([^)]*)\)", proc.stderr)
    return {"name": name, "cap_gib": cap, "wall_s": round(wall, 1), **outcome(proc),
            "images_per_s": round(2048 / wall, 1) if proc.returncode == 0 else None,
            "auto_rows": rows[0][0] if rows else None, "auto_reason": rows[0][1] if rows else ""}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench_memory"))
    ap.add_argument("--families", default="qwen2_vl_2b")
    ap.add_argument("--caps", default="0,24,16,12", help="card sizes in GiB (0: the whole GPU)")
    ap.add_argument("--hand", default="", help="caps at which the hand grid runs too")
    ap.add_argument("--infer-hand", default="", help="caps at which infer.py runs at batch 512/256/128 too")
    ap.add_argument("--only", default="train,infer")
    ap.add_argument("--extra", default="", help="extra train.py flags, e.g. '--quantization 4bit'")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_memory.json")
    args = ap.parse_args()
    work = args.work
    (work / "site").mkdir(parents=True, exist_ok=True)
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    args.shared = args.shared.resolve()  # the JSON files hold absolute image paths
    pairs = full_val_pairs(args.shared)
    write_json(pairs[:2048], work / "train.json")
    write_json(pairs[2048:2304], work / "val.json")
    write_json(pairs[2048:4096], work / "infer.json")
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    caps = [float(c) for c in args.caps.split(",") if c]
    hand = {float(c) for c in args.hand.split(",") if c}
    infer_hand = {float(c) for c in args.infer_hand.split(",") if c}
    extra = args.extra.split()
    for family in args.families.split(","):
        model = BUILDERS[family](args.shared, work / f"model_{family}")
        for cap in caps:
            tag = f"{family}_{int(cap)}gib{'_' + '_'.join(e.strip('-') for e in extra) if extra else ''}"
            todo = []
            if "train" in args.only:
                todo.append(lambda: train(model, work, cap, f"train_{tag}", extra))
                for micro, ckpt in HAND_GRID if cap in hand else []:
                    flags = ["--micro-batch-size", str(micro), "--gradient-checkpointing" if ckpt else
                             "--no-gradient-checkpointing", "--eval-batch-size", "128", "--no-eval-base-model", *extra]
                    todo.append(lambda f=flags, m=micro, c=ckpt: train(model, work, cap, f"train_{tag}_m{m}{'_ckpt' if c else ''}", f))
            if "infer" in args.only:
                todo.append(lambda: infer(model, work, cap, f"infer_{tag}", extra[:2] if "--quantization" in extra else ()))
                for rows in (512, 256, 128) if cap in infer_hand else ():
                    todo.append(lambda r=rows: infer(model, work, cap, f"infer_{tag}_b{r}", ["--batch-size", str(r)]))
            for job in todo:
                result = {"family": family, **job()}
                results.append(result)
                args.out.write_text(json.dumps(results, indent=1))
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
