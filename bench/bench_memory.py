"""train.py and infer.py with their defaults on a card of 8-80 GiB, simulated on one large GPU (issue 28).

    python bench/bench_memory.py --families qwen2vl-2b,qwen3_5-2b --caps 16,24 --grid   # auto vs the hand grid
    python bench/bench_memory.py --families qwen2_5vl-3b,qwen3vl-2b --caps 12,16,24,40  # auto only
    python bench/bench_memory.py --families qwen2vl-2b,qwen3_5-2b --caps 8 --quantization 4bit
    python bench/bench_memory.py --families all --caps 12,16,24,40,none --dry-run       # the plan and its time
    python bench/bench_memory.py --families all --caps 12,16,24,40 --parallel 4         # the matrix: completes or
                                                     # stops, cells at once (their speeds then not comparable)

Each cell is a separate process of the real script. A sitecustomize put on PYTHONPATH caps the process
(torch.cuda.set_per_process_memory_fraction, before the script allocates anything) at the card's size
less 1 GiB (what a card of that size leaves torch after the driver's context): cap 16 stands in for a
16 GiB card; "none": the whole GPU. It also prints the process's peak allocated memory at exit.

Per (family, cap): `python train.py` (20 optimizer steps, --train-steps; samples/s: the median of the 5-step
intervals after the first; its defaults: MICRO_BATCH_SIZE and
GRADIENT_CHECKPOINTING auto, the base-model and final evaluation on 256 validation images) and
`python infer.py` on 2,048 labelled images (BATCH_SIZE auto), each from the command to its exit.
--grid: at the same cap, also the hand grid, train.py at micro-batch 16/8/4 x checkpointing off/on (every
other setting its default, the evaluations included) and infer.py at batch 512/256/128 (auto is compared
with the best of it). Families (bench/common.py FAMILIES;
architectures: bench/families/SOURCES.md): random-init models of the published architectures; data: the
real images and distinct labels of ../shared/latex_ocr/full_val. Generation capped at 64 new tokens (a
random model never stops; the full test set's median label is 64 Qwen2 tokens).

BENCH_TIMELINE=1 also prints, per second of each script's run, the lowest and highest memory allocated and what
the allocator reserved (what stays allocated between passes; docs/BENCHMARKS.md run P).

One JSON line per cell is printed as it ends and appended to $OUT/bench_memory.jsonl, so a run cut at a time
limit keeps what it finished: the choice auto made, samples/s (train) or images/s (infer), the peak GiB,
or the one-line message it stopped with. Before each cell, its estimated duration (one device call may run
600 s: split the matrix by --families / --caps / --only / --cells, or run one command in several calls on a
warm machine with --deadline 480 --resume: each call starts only the cells its estimates say end in time and
skips those an earlier call finished).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import DEFAULT_SHARED, FAMILIES, ROOT, build_random, family_name, full_val_samples, write_json
from bench_train import parse_logs

SITECUSTOMIZE = '''
import atexit, os, sys
_cap = float(os.environ.get("BENCH_CARD_GIB", "0") or 0)
if _cap > 0:
    import torch
    _total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (_cap - 1) * 2**30 / _total), 0)

_pid = os.getpid()

_checkpointed = [0]  # torch.utils.checkpoint calls: what really recomputes (transformers binds it at import, after this)
if "torch" in sys.modules:
    import torch.utils.checkpoint as _ckpt
    _plain = _ckpt.checkpoint
    def _counted(*args, **kwargs):
        _checkpointed[0] += 1
        return _plain(*args, **kwargs)
    _ckpt.checkpoint = _counted

def _peak():  # the script's own process, not a forked DataLoader worker
    torch = sys.modules.get("torch")
    if os.getpid() == _pid and torch is not None and torch.cuda.is_initialized():
        stats = torch.cuda.memory_stats()
        print(f"bench: peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", file=sys.stderr)
        print(f"bench: allocator cudaMalloc {stats.get('num_device_alloc', 0)} cudaFree {stats.get('num_device_free', 0)} "
              f"retries {stats.get('num_alloc_retries', 0)} ooms {stats.get('num_ooms', 0)}; "
              f"checkpointed calls {_checkpointed[0]}", file=sys.stderr)
atexit.register(_peak)
# infer.py ends with os._exit (no interpreter teardown), which skips atexit: the peak is printed first
_plain_exit = os._exit
def _exit(code):
    _peak()
    _plain_exit(code)
os._exit = _exit

# BENCH_TIMELINE=1: what the script's process holds over time (sampled every 20 ms by a thread: the lowest
# and highest allocated and the reserved GiB of each second), to see what stays allocated between passes
if os.environ.get("BENCH_TIMELINE") == "1" and "torch" in sys.modules:
    import threading, time
    _samples = []
    def _sample():
        torch = sys.modules["torch"]
        start = time.perf_counter()
        while True:
            time.sleep(0.02)
            if torch.cuda.is_initialized():
                _samples.append((time.perf_counter() - start, torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
    threading.Thread(target=_sample, daemon=True).start()
    def _timeline():
        if os.getpid() != _pid or not _samples:
            return
        seconds = {}
        for t, allocated, reserved in _samples:
            low, high, held = seconds.get(int(t), (allocated, allocated, reserved))
            seconds[int(t)] = (min(low, allocated), max(high, allocated), max(held, reserved))
        print("bench: timeline (s: min-max allocated / reserved GiB) " + " ".join(
            f"{t}:{low / 2**30:.2f}-{high / 2**30:.2f}/{held / 2**30:.2f}" for t, (low, high, held) in sorted(seconds.items())),
            file=sys.stderr)
    atexit.register(_timeline)
'''
HAND_GRID = [(micro, ckpt) for micro in (16, 8, 4) for ckpt in (False, True)]
HAND_ROWS = (512, 384, 256, 128)  # 384: three whole prefill chunks (run U: 256 beat auto's 344 at 24 GiB)
# seconds per cell for a 2B model on an H200 (run M: start-up, model load, probes, 20 steps, two evaluations;
# infer.py: 2,048 images); larger models scale with their weights
EXTRA: list[str] = []  # --extra: more flags for every cell's script (the last of a flag given twice wins)
DEADLINE = [None]  # --deadline as a time.monotonic() value: a cell still running then is killed


class CutAtDeadline(Exception):
    """A cell killed at --deadline: not a result (the next call's --resume runs it again)."""


# a 2B model's cell, seconds (larger models scale by their size); run X, one H200, 30 steps: training with auto
# 58-91 s, by hand 56-70 s, infer.py on 2,048 images 22-29 s
ESTIMATE_S = {"train": 110, "train_hand": 80, "infer": 35, "build": 20}


def run(cmd, work: Path, cap: float, name: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", BENCH_CARD_GIB=str(cap),
               PYTHONPATH=os.pathsep.join(filter(None, [str(work / "site"), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    # its own process group: a cell cut at --deadline goes with its DataLoader workers and scoring pool
    child = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    cut = False
    try:
        out, err = child.communicate(timeout=None if DEADLINE[0] is None else max(1.0, DEADLINE[0] - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        cut = True
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    wall = time.perf_counter() - start
    # cells run with --extra get its flags in the log's name: a later call's same cell keeps its own log
    suffix = re.sub(r"[^A-Za-z0-9]+", "_", " ".join(EXTRA)).strip("_")
    (work / f"log_{name}{'_' + suffix if suffix else ''}.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if cut:  # its log kept: how far it got
        raise CutAtDeadline(name)
    return proc, wall


def outcome(proc) -> dict:
    text = proc.stdout + proc.stderr
    peak = re.findall(r"bench: peak allocated ([\d.]+) GiB", text)
    # every process the script spawns (the scoring pool) runs the sitecustomize and prints its own lines, most
    # of them zeros: the script's own process is the one that allocated most
    allocator = max(re.findall(r"bench: (allocator cudaMalloc (\d+).*)", text), key=lambda m: int(m[1]), default=("", 0))[0]
    return {"exit": proc.returncode, "peak_gib": max(map(float, peak)) if peak else None,
            "allocator": allocator,
            "traceback": "Traceback" in proc.stderr,
            "last_line": next((ln for ln in reversed(proc.stderr.strip().splitlines()) if not ln.startswith("bench:")), "")
            if proc.returncode else ""}


TRAIN_STEPS = [20]  # --train-steps: optimizer steps of each training cell
LOGGING_STEPS = 5  # train.py logs samples/s every 5 steps: the speed is the median of the intervals after the first


def train(model, work, cap, name, flags):
    cmd = [sys.executable, str(ROOT / "train.py"), "--model-id", str(model), "--model-source", "local",
           "--train-json", str(work / "train.json"), "--val-json", str(work / "val.json"),
           "--output-dir", str(work / f"out_{name}"), "--max-steps", str(TRAIN_STEPS[0]), "--save-steps", "100000",
           "--logging-steps", str(LOGGING_STEPS), "--swanlab-mode", "disabled", "--max-new-tokens", "64", *flags,
           *EXTRA]
    proc, wall = run(cmd, work, cap, name)
    logs = [entry for entry in parse_logs(proc.stdout + proc.stderr) if "samples_per_second" in entry]
    # one slow interval (a CUDA graph recorded for a new vision shape, an allocator flush) moved the last 10 steps'
    # figure by up to 30 % between cells of one setting in run W; the median of the intervals after warm-up does not
    steady = [entry["samples_per_second"] for entry in logs[1:]] or [entry["samples_per_second"] for entry in logs]
    choice = next((ln for ln in proc.stdout.splitlines() if ln.startswith("micro-batch ")), "")
    evals = re.findall(r"EVAL_BATCH_SIZE=auto: (\d+) images", proc.stderr)
    split = next((ln for ln in proc.stdout.splitlines() if ln.startswith("memory: ")), "")  # passes run in parts
    result = {"name": name, "cap_gib": cap, "wall_s": round(wall, 1), **outcome(proc),
              "samples_per_s": statistics.median(steady) if steady else None,  # after the first 5 steps' warm-up
              "samples_per_s_intervals": [entry["samples_per_second"] for entry in logs],  # every 5 steps
              # all 20 steps (the Trainer's own figure, the first step included): where splits fall matters less
              "samples_per_s_all": next((float(e["train_samples_per_second"]) for e in parse_logs(proc.stdout)
                                         if "train_samples_per_second" in e), None),
              "auto_choice": choice, "split": split, "eval_rows": evals}
    peaks = [float(entry["gpu_mem_peak_gib"]) for entry in logs if "gpu_mem_peak_gib" in entry]
    if peaks:  # the training steps' own peak (the exit hook's can miss it: the Trainer resets the counter)
        result["train_peak_gib"] = max(peaks)
        result["alloc_retries"] = int(logs[-1].get("gpu_alloc_retries", 0))  # the allocator's flush-and-retry count
        result["reserved_gib"] = [float(entry.get("gpu_mem_reserved_gib", "nan")) for entry in logs]
    return result


def infer(model, work, cap, name, flags=()):
    out = work / f"out_{name}"
    cmd = [sys.executable, str(ROOT / "infer.py"), str(work / "infer.json"), "--model-id", str(model),
           "--model-source", "local", "--adapter", "none", "--output", str(out) + ".csv", "--max-new-tokens", "64",
           *flags, *EXTRA]
    proc, wall = run(cmd, work, cap, name)
    rows = re.findall(r"BATCH_SIZE=auto: (\d+) images per batch \(([^)]*)\)", proc.stderr)
    # with --extra=--profile: infer.py's seconds per phase and the model load's parts, kept with the cell
    profile = [ln for ln in proc.stderr.splitlines() if ln.startswith(("time: ", "time, "))]
    return {"name": name, "cap_gib": cap, "wall_s": round(wall, 1), **outcome(proc),
            "images_per_s": round(2048 / wall, 1) if proc.returncode == 0 else None,
            "auto_rows": rows[0][0] if rows else None, "auto_reason": rows[0][1] if rows else "",
            **({"profile": profile} if profile else {})}


def estimate(kind: str, family: str) -> int:
    return int(ESTIMATE_S[kind] * max(1.0, FAMILIES[family][1] / 2.2))


def plan(families, caps, grid: bool, only: set, quantization: str) -> list[tuple]:
    """(family, cap, kind, name, flags, estimated seconds) of every cell, in the order they run."""
    quant = ["--quantization", quantization] if quantization else []
    cells = []
    for family in families:
        for cap in caps:
            tag = f"{family}_{'whole' if cap == 0 else f'{cap:g}gib'}{'_' + quantization if quantization else ''}"
            if "train" in only:
                cells.append((family, cap, "train", f"train_{tag}", quant, estimate("train", family)))
                for micro, ckpt in HAND_GRID if grid else []:
                    # only the two settings differ from auto's cell, which runs the base-model evaluation (a
                    # default) before training: the grid does too (run Q compared them with it skipped)
                    flags = ["--micro-batch-size", str(micro), "--gradient-checkpointing" if ckpt else
                             "--no-gradient-checkpointing", *quant]
                    cells.append((family, cap, "train", f"train_{tag}_m{micro}{'_ckpt' if ckpt else ''}", flags,
                                  estimate("train_hand", family)))
            if "infer" in only:
                cells.append((family, cap, "infer", f"infer_{tag}", quant, estimate("infer", family)))
                for rows in HAND_ROWS if grid else ():
                    cells.append((family, cap, "infer", f"infer_{tag}_b{rows}", ["--batch-size", str(rows), *quant],
                                  estimate("infer", family)))
    return cells


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench_memory"))
    ap.add_argument("--families", default="qwen2vl-2b", help=f"comma-separated, or all: {', '.join(FAMILIES)}")
    ap.add_argument("--caps", default="16,24", help="card sizes in GiB (8, 12, 16, 24, 40 ...), none: the whole GPU")
    ap.add_argument("--grid", action="store_true", help="also the hand grid at each cap (micro-batch x checkpointing, "
                                                         "generation batch)")
    ap.add_argument("--quantization", default="", help="e.g. 4bit: train.py and infer.py with --quantization 4bit")
    ap.add_argument("--only", default="train,infer")
    ap.add_argument("--cells", default="", help="comma-separated cell names (as --dry-run prints them): only these")
    ap.add_argument("--extra", default="", help="more flags for every cell's train.py / infer.py, given with '=' "
                                                 "(--extra=--eval-base-model); they come last, so they win")
    ap.add_argument("--train-steps", type=int, default=20, help="optimizer steps of each train.py cell (auto "
                    "against the hand setting: more steps, more intervals in the median)")
    ap.add_argument("--repeat", type=int, default=1, help="run the cells this many times, interleaved: the "
                                                             "spread between runs of one setting")
    ap.add_argument("--parallel", type=int, default=1, help="run up to this many cells at once, their caps together "
                    "within the GPU: whether each completes or stops, in less device time; their speeds are not "
                    "comparable (shared GPU and cores: each result says concurrent)")
    ap.add_argument("--resume", nargs="?", const=True, default=False, metavar="JSONL",
                    help="skip the cells an earlier call finished: their results in --work's bench_memory.jsonl "
                    "(a warm machine), or in JSONL (what an earlier call's $OUT brought back, carried to a fresh "
                    "machine): the matrix split over device calls by one command")
    ap.add_argument("--deadline", type=float, default=0, help="seconds: start no cell that its estimate says would "
                    "end after this, and kill one still running then, so the bench ends and prints before the device "
                    "call's limit (a call cut there returns nothing); what is left is printed, for the next call's "
                    "--resume")
    ap.add_argument("--dry-run", action="store_true", help="print the cells and their estimated time, run nothing")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_memory.jsonl")
    args = ap.parse_args()
    EXTRA.extend(args.extra.split())
    TRAIN_STEPS[0] = args.train_steps
    families = list(FAMILIES) if args.families == "all" else [family_name(f) for f in args.families.split(",") if f]
    caps = [0.0 if c.strip().lower() in ("none", "0") else float(c) for c in args.caps.split(",") if c]
    # --cells picks from the whole plan, hand grid included (run R lost a call's hand cells to a --cells
    # without --grid); a name that is in no plan stops the bench before any device time is spent
    cells = plan(families, caps, args.grid or bool(args.cells), set(args.only.split(",")), args.quantization)
    if args.cells:  # e.g. auto against the best hand setting of an earlier run, to fit one device call
        wanted = args.cells.split(",")
        unknown = sorted(set(wanted) - {c[3] for c in cells})
        if unknown:
            raise SystemExit(f"bench_memory: no such cell {', '.join(unknown)} for these --families/--caps/--only "
                             f"(--dry-run lists them)")
        cells = [c for c in cells if c[3] in wanted]
    done_file = args.work / "bench_memory.jsonl"
    earlier_file = done_file if args.resume is True else Path(args.resume) if args.resume else None
    earlier = [json.loads(line) for line in earlier_file.read_text().splitlines() if line.strip()] \
        if earlier_file and earlier_file.exists() else []
    if earlier_file and earlier_file != done_file and earlier and not args.dry_run:  # this machine's file: them first
        args.work.mkdir(parents=True, exist_ok=True)
        done_file.write_text("".join(json.dumps(r) + "\n" for r in earlier))
    if earlier:
        done = {r["name"] for r in earlier}
        print(f"bench_memory: --resume: {sum(c[3] in done for c in cells)} cells done in an earlier call", flush=True)
        cells = [c for c in cells if c[3] not in done]
    if args.parallel > 1:  # the longest first: the call's tail is then short cells, not one long one alone
        cells.sort(key=lambda c: -c[-1])
    if args.repeat > 1:  # interleaved, every other round reversed (a, b, b, a, a, b): drift over the call falls
        # on both alike, and so does going first: run X/Y's first cell of a pair paid the machine's cold start
        # (Triton's on-disk kernel cache, imports from a cold disk) that its partner then found warm
        cells = [(*c[:3], f"{c[3]}_r{r + 1}", *c[4:]) for r in range(args.repeat)
                 for c in (cells if r % 2 == 0 else cells[::-1])]
    total = sum(c[-1] for c in cells) + ESTIMATE_S["build"] * len(families)
    at_once = f", {args.parallel} at a time: less wall, by how much the GPU's sharing decides" if args.parallel > 1 else ""
    print(f"bench_memory: {len(cells)} cells, ~{total} s estimated one at a time{at_once} (one device call: at most "
          f"600 s)", flush=True)
    for family, cap, kind, name, flags, seconds in cells:
        print(f"  {name}: ~{seconds} s {' '.join(flags)}", flush=True)
    if args.dry_run:
        return
    work = args.work
    (work / "site").mkdir(parents=True, exist_ok=True)
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    args.shared = args.shared.resolve()  # the JSON files hold absolute image paths
    pairs = full_val_samples(args.shared)
    write_json(pairs[:2048], 2048, work / "train.json")
    write_json(pairs[2048:2304], 256, work / "val.json")
    write_json(pairs[2048:4096], 2048, work / "infer.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models = {}
    cut = []  # cells killed at the deadline
    # the most a finished cell ran over its estimate (cells at once run longer), from the first cell on:
    # an earlier call's cells of the same --parallel (run T's second call overran: its first cells started
    # with no such figure)
    slowdown = [max([r["wall_s"] / r["estimate_s"] for r in earlier
                     if r.get("concurrent", 1) == args.parallel and r.get("estimate_s")], default=1.0)]

    def run_cell(cell, concurrent: int = 1) -> None:
        family, cap, kind, name, flags, seconds = cell
        print(f"bench_memory: {name} (~{seconds} s)", flush=True)
        job = train if kind == "train" else infer
        try:
            result = {"family": family, "estimate_s": seconds, **job(models[family], work, cap, name, flags)}
        except CutAtDeadline:
            cut.append(cell)
            print(f"bench_memory: {name}: cut at --deadline {args.deadline:g} s, not a result", flush=True)
            return
        if concurrent > 1:
            result["concurrent"] = concurrent
        slowdown[0] = max(slowdown[0], result["wall_s"] / seconds)
        with WRITE_LOCK:
            for path in {args.out.resolve(), done_file.resolve()}:  # done_file: what --resume skips next call
                with path.open("a") as f:
                    f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)

    began = time.monotonic()
    if args.deadline:
        DEADLINE[0] = began + args.deadline

    def starts(cell) -> bool:  # --deadline: a cell whose estimate ends past it is left for the next call
        return not args.deadline or time.monotonic() - began + cell[-1] * slowdown[0] <= args.deadline

    if args.parallel <= 1:
        left = []
        for cell in cells:
            if not starts(cell):
                left.append(cell)
                continue
            if cell[0] not in models:
                models[cell[0]] = build_random(cell[0], args.shared, work / f"model_{cell[0]}")
            run_cell(cell)
    else:
        # the models are built one after another in the order the cells need them, while the first cells run
        # (a cell waits for its own model only): seven families' builds one by one took minutes of a call
        built = {family: threading.Event() for family in dict.fromkeys(c[0] for c in cells)}

        def build_all():
            import torch
            for family, event in built.items():
                try:
                    models[family] = build_random(family, args.shared, work / f"model_{family}")
                finally:  # a failed build: its cells say so instead of waiting for ever
                    torch.cuda.empty_cache()  # this process's build memory back to the cells
                    event.set()

        threading.Thread(target=build_all, daemon=True).start()

        def run_built(cell, concurrent):
            built[cell[0]].wait()
            if cell[0] not in models:
                print(f"bench_memory: {cell[3]}: not run, the {cell[0]} model could not be built", flush=True)
                return
            run_cell(cell, concurrent)

        left = run_in_parallel(cells, args.parallel, gpu_gib() - PARALLEL_RESERVE_GIB, run_built, starts)
    left = cut + left
    if left:
        print(f"bench_memory: --deadline {args.deadline:g} s: {len(left)} cells left for the next call (--resume): "
              f"{','.join(c[3] for c in left)}", flush=True)


# --parallel: cells at once on one GPU, each within its cap, the caps together within the card (less what
# each process's CUDA context and kernels hold outside torch's allocator, ~8 GiB, and what the bench's own
# process holds while it builds the next model beside them, a 4B model in bf16: 8 GiB). What completes and
# what stops is the same as alone; speeds are not (the cells share the GPU's time and the host's cores)
PARALLEL_RESERVE_GIB = 16.0
WRITE_LOCK = threading.Lock()


def gpu_gib() -> float:
    import torch
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def run_in_parallel(cells: list[tuple], most: int, gib: float, run_cell, starts=lambda cell: True) -> list[tuple]:
    """Run `cells` (cap at index 1; 0: the whole GPU) at most `most` at once and their caps within `gib`:
    each time one ends, start the first waiting cell that fits (a larger one waits, the smaller go ahead).
    A cell for which `starts(cell)` is false when its turn comes is not run (a deadline); returns those."""
    waiting, running, left, lock = list(cells), [], [], threading.Condition()

    def need(cell) -> float:
        return cell[1] or gib

    def body(cell):
        try:
            run_cell(cell, concurrent=most)
        finally:
            with lock:
                running.remove(cell)
                lock.notify()

    with lock:
        while True:
            # starts() asked once a cell: its answer may turn while cells run (a deadline)
            turned = [c for c in waiting if not starts(c)]
            left += turned
            waiting = [c for c in waiting if c not in turned]
            if not waiting and not running:  # checked after the deadline moved cells out: none left to wait for
                break
            held = sum(map(need, running))
            fits = next((c for c in waiting if len(running) < most and held + need(c) <= gib), None)
            if fits is None:
                lock.wait()
                continue
            waiting.remove(fits)
            running.append(fits)
            threading.Thread(target=body, args=(fits,), daemon=True).start()
    return left


if __name__ == "__main__":
    main()
