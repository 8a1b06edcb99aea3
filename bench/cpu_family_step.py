"""CPU cost of one LoRA training step of each tiny test family (latexocr/testing.py), packed and padded:

    python bench/cpu_family_step.py                       # 16 real LaTeX_OCR samples per step
    python bench/cpu_family_step.py --families qwen3_vl qwen3_5 --steps 5

The number that matters is Qwen3.5's against Qwen3-VL's: without flash-linear-attention and
causal-conv1d (no CPU build), Qwen3.5's Gated DeltaNet layers run transformers' reference PyTorch
kernels, and a packed row passes them as one right-padded batch of its samples (latexocr/fast/linear_attention.py). The tiny
models have the same width (64); Qwen3.5's has 4 layers (3 linear-attention), the others 2.
Median of --steps steps after one warm-up step; torch threads as the machine gives them.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import DEFAULT_SHARED, real_samples


def step_seconds(family: str, pairs, packed: bool, steps: int) -> float:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from latexocr.batching import SampleEncoder, TrainCollator, sample_boundaries
    from latexocr.fast import keep_packed_samples_apart
    from latexocr.modeling import add_lora
    from latexocr.sample import sizing_for
    from latexocr.fast.attention import use_packed_text_attention
    from latexocr.testing import build_tiny_model
    from latexocr.training import supervised_loss

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp), family)
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa")
    model = add_lora(model, 64, 16, 0.0)
    if packed:
        use_packed_text_attention(model)
        keep_packed_samples_apart(model)
    # the boundaries, as train.py's plan adds them: without them a linear-attention layer would run
    # the packed row unsplit (fast, and wrong: state crosses samples)
    extras = {"packed_extras": sample_boundaries} if packed else {}
    batch = TrainCollator(SampleEncoder(processor, sizing_for(processor)), packed=packed, **extras)(pairs)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss, n = supervised_loss(model, dict(batch))
        (loss / n).backward()
        model.zero_grad()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["qwen2_vl", "qwen3_vl", "qwen3_5"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    args = parser.parse_args()
    import torch
    pairs = real_samples(args.shared)[: args.samples]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(pairs)} real samples per step")
    for family in args.families:
        packed = step_seconds(family, pairs, True, args.steps)
        padded = step_seconds(family, pairs, False, args.steps)
        print(f"{family:10s} packed {packed * 1000:7.0f} ms/step   padded {padded * 1000:7.0f} ms/step")


if __name__ == "__main__":
    main()
