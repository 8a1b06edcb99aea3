"""How often compiled training blocks compile again as the sequence length changes, on the CPU (no GPU needed).

    python bench/compile_lengths.py                          # Qwen3.5 and Qwen2-VL, the blocks as train.py compiles them
    python bench/compile_lengths.py --families qwen3_5 --conv transformers   # Qwen3.5 with transformers' convolution

A compiled run (LATEXOCR_SPEED compile, latexocr/fast/compile.py) meets a new padded length at almost every step
of its first minutes. Blocks compiled with dynamic shapes should reuse their graphs for any length; a block
whose graph specialises on the length compiles again for each new one, until dynamo's limit (8 per function)
leaves that part eager for the rest of the run. This runs a tiny random model of the family's architecture
(latexocr/testing.py; LoRA on train.py's targets) through forward and backward at ten lengths and prints, per
family, the graphs dynamo compiled (in all, and after each length) and each step's seconds (a step that compiles takes seconds; one that reuses
its graphs, or runs eagerly past the limit, ~0.02 s). `--conv transformers` leaves Qwen3.5's causal convolution as
transformers wrote it (F.conv1d) instead of fast/linear_attention.py's shifted_causal_conv1d. `--backend cudagraphs`
compiles the blocks as LATEXOCR_SPEED=compile_backend=cudagraphs does (no kernels generated; one trace per length;
on a CPU the backend skips its CUDA graphs and runs the traced graphs): what its tracing costs a new length.

Each family runs in a process of its own (compiling changes process-wide state), with torch's compile caches
empty (a cold compile, as a machine's first run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (40, 57, 33, 71, 48, 64, 39, 80, 52, 45)


def one_family(family: str, conv: str, backend: str = "inductor") -> dict:
    import torch
    from torch._dynamo.utils import counters
    from transformers import AutoModelForImageTextToText

    import latexocr.fast.linear_attention as la
    from latexocr.fast.compile import compile_decoder_layers
    from latexocr.modeling import add_lora, vision_language_core
    from latexocr.testing import build_tiny_model

    if conv == "transformers":
        la.convolution_traces_dynamically = lambda model: False
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_model(Path(folder), family)
        model = add_lora(AutoModelForImageTextToText.from_pretrained(folder), 8, 16, 0.0)
    if backend == "cudagraphs":
        compile_decoder_layers(model, cuda_graphs=True, kernels=False)
    else:
        compile_decoder_layers(model)
    text = vision_language_core(model).language_model
    seconds, graphs = [], []
    for length in LENGTHS:
        start = time.perf_counter()
        out = text(inputs_embeds=torch.randn(2, length, text.config.hidden_size),
                   attention_mask=torch.ones(2, length, dtype=torch.long), use_cache=False)
        out.last_hidden_state.pow(2).mean().backward()
        seconds.append(round(time.perf_counter() - start, 2))
        graphs.append(counters["stats"]["unique_graphs"])
    return {"family": family, "conv": conv if family == "qwen3_5" else "-", "backend": backend,
            "lengths": list(LENGTHS), "graphs": graphs[-1], "graphs_after_each": graphs, "seconds": seconds,
            "total_s": round(sum(seconds), 1), "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="qwen3_5,qwen2_vl")
    ap.add_argument("--conv", choices=("shifted", "transformers"), default="shifted",
                    help="Qwen3.5's causal convolution: shifted_causal_conv1d (what compiled training takes) or "
                         "transformers' F.conv1d")
    ap.add_argument("--backend", choices=("inductor", "cudagraphs"), default="inductor",
                    help="how the blocks compile: inductor (train.py's compile=on) or cudagraphs (compile_backend=cudagraphs)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one family
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_family(a.one, a.conv, a.backend)), flush=True)
        return
    for family in a.families.split(","):
        with tempfile.TemporaryDirectory() as cache:  # a cold compile: torch's caches empty, as on a first run
            proc = subprocess.run([sys.executable, __file__, "--one", family, "--conv", a.conv, "--backend", a.backend],
                                  cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        if proc.returncode != 0:
            sys.exit(f"{family}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
