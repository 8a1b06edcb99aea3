"""Memory of the training loss's vocabulary projection, in one piece or sliced (latexocr/fast/head.py). CPU only.

    python bench/head_memory.py                       # Qwen3.5's head (248,320 x 2,048), 1,130 and 2,635 tokens
    python bench/head_memory.py --vocab 151936 --hidden 1536 --tokens 1130   # Qwen2-VL-2B's

Each case runs in a fresh process: a frozen bf16 head, bf16 hidden states that need a gradient, random targets,
the forward under CPU bf16 autocast as training's runs under CUDA's, then the backward of loss / tokens. Printed:
what the forward leaves alive for the backward, and the peak above the start: the process's resident-memory
high-water mark (/proc/self/status VmHWM, reset through /proc/self/clear_refs), which tracks torch's CPU
allocations of this size (each its own mapping, returned when freed). `one piece` is
training.summed_cross_entropy(head(hidden), targets), the path before fast/head.py; `sliced` is head_loss.
The default token counts are `python bench/train_padding.py --samples full_val --micro 16`'s: 1,130, the median
supervised tokens of random micro-batches of 16 full_val samples; 2,635, those of the memory probe's batch of
16 long samples.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(mode: str, tokens: int, vocab: int, hidden_size: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from latexocr.fast.head import head_loss
    from latexocr.training import summed_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    leaf = torch.randn(tokens, hidden_size, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts here
    start = _status("VmRSS")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = leaf * 1.0  # a non-leaf, as the model's last hidden states
        loss, count = (summed_cross_entropy(head(hidden), targets) if mode == "one piece"
                       else head_loss(hidden, head, targets))
    kept = _status("VmRSS") - start
    (loss / count).backward()
    return {"mode": mode, "tokens": tokens, "vocab": vocab, "kept_gib": round(kept / 2**30, 2),
            "peak_gib": round((_status("VmHWM") - start) / 2**30, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", default="1130,2635", help="supervised tokens, comma-separated")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: mode tokens, in a fresh process
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], int(a.one[1]), a.vocab, a.hidden)))
        return
    print(f"| supervised tokens | loss | kept for the backward (GiB) | peak above the start (GiB) |\n|---|---|---|---|")
    for tokens in a.tokens.split(","):
        for mode in ("one piece", "sliced"):
            out = subprocess.run([sys.executable, __file__, "--vocab", str(a.vocab), "--hidden", str(a.hidden),
                                  "--one", mode, tokens], capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {r['tokens']:,} | {r['mode']} | {r['kept_gib']} | {r['peak_gib']} |", flush=True)


if __name__ == "__main__":
    main()
