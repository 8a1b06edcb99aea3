"""How much padding infer.py's prefill carries (issue 32: would packing the prefill's prompts pay?). CPU only.

    python bench/prompt_padding.py                        # full_val's images, Qwen2-VL-2B's processor
    python bench/prompt_padding.py --model /tmp/w/model_qwen3_5-2b # another family: a folder with its processor

Also: what share of the static cache a decode step's attention reads when it stops at the step's write slot.
Each prompt's length from the processor's own count (the image's tokens after infer.py's sizing plus the
prompt's text tokens, SampleEncoder), the images in predict's order (by area, generation._size_order) and
cut into its prefill chunks (generation.PREFILL_CHUNK_ROWS): the tokens a padded prefill computes over the
prompts' own tokens.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from PIL import Image

from common import DEFAULT_SHARED, full_val_samples


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--model", type=Path, help="a folder with the processor's files (default: shared/qwen2vl-2b)")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=512, help="generation batch (infer.py's on a large card)")
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()

    from latexocr import generation
    from latexocr.batching import SampleEncoder
    from latexocr.modeling import load_processor
    from latexocr.fast.decoding import cache_slots
    from latexocr.sample import sizing_for

    processor = load_processor(str(a.model or a.shared / "qwen2vl-2b"))
    encoder = SampleEncoder(processor, sizing_for(processor))
    paths = sorted({image for image, _ in full_val_samples(a.shared)})[: a.images]
    order = generation._size_order(paths)
    lengths = []
    for i in order:
        with Image.open(paths[i]) as im:
            lengths.append(encoder.image_tokens(*im.size) + encoder.prompt_text_tokens)
    quantiles = statistics.quantiles(lengths, n=10)
    print(f"{len(lengths)} prompts: mean {statistics.mean(lengths):.1f} tokens, median {statistics.median(lengths):g}, "
          f"p90 {quantiles[-1]:g}, max {max(lengths)}")
    for rows in (generation.PREFILL_CHUNK_ROWS, 64, 32):
        chunks = [lengths[i:i + rows] for i in range(0, len(lengths), rows)]
        padded = sum(max(c) * len(c) for c in chunks)
        print(f"chunks of {rows} rows in predict's order: {padded / sum(lengths):.4f} x the prompts' tokens")
    # the decode steps' attention: each step's keys and values up to its write slot (kernels.decode_attention's
    # attend_upto) against the whole static cache (the batch's longest prompt + the new tokens, rounded up)
    upto = whole = 0
    for start in range(0, len(lengths), a.batch_size):
        batch = lengths[start:start + a.batch_size]
        prompt = max(batch)
        slots = cache_slots(prompt, a.new_tokens)
        for step in range(a.new_tokens - 1):  # the decode steps: the step's token is written at prompt + step
            upto += (prompt + step + 1) * len(batch)
            whole += slots * len(batch)
    print(f"decode steps at batch {a.batch_size}, {a.new_tokens} new tokens: the slots up to the write slot are "
          f"{upto / whole:.3f} of the static cache's")


if __name__ == "__main__":
    main()
