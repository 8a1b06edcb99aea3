"""Whether loading the model's weights in a thread while the processor loads would shorten infer.py's model load
(issue 32): both in turn, then the weights in a thread beside the processor, in fresh processes.

    python bench/load_overlap.py --model /tmp/m2b                  # a full-size random model folder (common.py
                                                                    # build_random_model), weights to the CPU
    python bench/load_overlap.py --model /tmp/w/model_qwen2vl-2b --device cuda    # on a GPU, as infer.py loads

Each line: the imports infer.py makes, the processor's and the weights' own seconds, and the load phase's wall.
Both parts hold Python's lock for most of their time (imports; per-tensor work), so the thread helps only by
what the other part spends outside it (copies, file reads).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(model: str, device: str, threaded: bool) -> str:
    import threading

    t0 = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    from latexocr.generation import predict  # noqa: F401  (infer.py's imports)
    from latexocr.modeling import load_model, load_processor
    t1 = time.perf_counter()
    seconds = {}

    def weights():
        start = time.perf_counter()
        load_model(model, torch.bfloat16, "sdpa", device_map=device)
        seconds["weights"] = time.perf_counter() - start

    thread = threading.Thread(target=weights) if threaded else None
    if thread:
        thread.start()
    start = time.perf_counter()
    load_processor(model)
    seconds["processor"] = time.perf_counter() - start
    if thread:
        thread.join()
    else:
        weights()
    t2 = time.perf_counter()
    return (f"{'threaded' if threaded else 'in turn'}: imports {t1 - t0:.2f} s, processor {seconds['processor']:.2f} s, "
            f"weights {seconds['weights']:.2f} s, load phase {t2 - t1:.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", choices=("serial", "threaded"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(one(a.model, a.device, a.one == "threaded"), flush=True)
        return
    for _ in range(a.rounds):
        for mode in ("serial", "threaded"):
            out = subprocess.run([sys.executable, __file__, "--model", a.model, "--device", a.device, "--one", mode],
                                 capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
            line = [x for x in out.stdout.splitlines() if "load phase" in x]
            print(line[-1] if line else out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
