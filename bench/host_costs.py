"""CPU-only numbers behind two CUDA-graph settings (no GPU needed):

    python bench/host_costs.py

1. Shapes: over random batches of 16 real LaTeX_OCR samples, how many distinct row lengths and
   vision patch counts occur when they are padded to a multiple of 256 (train.py's
   CUDA_GRAPH_ROW_MULTIPLE / CUDA_GRAPH_PATCH_MULTIPLE; one CUDA graph is recorded per shape), and
   how much padding that adds.
2. Module walks: host time of model.train(), model.zero_grad() and one model.parameters() walk on
   the full-size Qwen2-VL-2B with LoRA (built on the meta device: no weights, no memory), before
   and after latexocr.training.skip_redundant_module_walks.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from pathlib import Path

from common import DEFAULT_SHARED, real_samples


def shape_counts(shared: Path, batches: int, micro: int) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    from latexocr.batching import SampleEncoder
    from latexocr.sample import sizing_for
    from latexocr.fast.compile import CUDA_GRAPH_PATCH_MULTIPLE, CUDA_GRAPH_ROW_MULTIPLE

    processor = AutoProcessor.from_pretrained(shared / "qwen2vl-2b")
    encoder = SampleEncoder(processor, sizing_for(processor))
    pairs = real_samples(shared)
    tokens, patches = [], []
    for path, label in pairs:
        with Image.open(path) as im:
            image_tokens = encoder.image_tokens(*im.size)
        tokens.append(encoder.prompt_text_tokens + image_tokens + len(encoder.answer_ids(label)))
        patches.append(image_tokens * processor.image_processor.merge_size**2)
    print(f"{len(pairs)} samples: {statistics.mean(tokens):.1f} tokens, {statistics.mean(patches):.1f} patches each")
    rng = random.Random(0)
    for what, sizes, multiple in (("row tokens", tokens, CUDA_GRAPH_ROW_MULTIPLE),
                                  ("vision patches", patches, CUDA_GRAPH_PATCH_MULTIPLE)):
        shapes, real, padded = Counter(), 0, 0
        for _ in range(batches):
            total = sum(sizes[i] for i in rng.sample(range(len(sizes)), micro))
            shape = (total // multiple + 1) * multiple  # the collators always add 1..multiple
            shapes[shape] += 1
            real, padded = real + total, padded + shape
        print(f"{what}, x{multiple}: {len(shapes)} shapes over {batches} batches of {micro} "
              f"{dict(sorted(shapes.items()))}, padding {100 * (padded - real) / real:.1f} %")


def module_walks(shared: Path, repeats: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from latexocr.modeling import add_lora
    from latexocr.fast.trainer import skip_redundant_module_walks

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(shared / "qwen2vl-2b"))
    model = add_lora(model, 64, 16, 0.05)
    print(f"{sum(1 for _ in model.modules())} modules, {sum(1 for _ in model.parameters())} parameter tensors")

    def ms(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    calls = {"model.train()": lambda: model.train(), "model.zero_grad()": lambda: model.zero_grad(),
             "list(model.parameters())": lambda: list(model.parameters())}
    before = {name: ms(fn) for name, fn in calls.items()}
    trainable = skip_redundant_module_walks(model)
    model.train()  # the first call still switches every module
    after = {"model.train()": ms(lambda: model.train()), "model.zero_grad()": ms(lambda: model.zero_grad()),
             "list(model.parameters())": ms(lambda: list(trainable))}
    for name in calls:
        print(f"{name:26s} {before[name]:6.2f} ms -> {after[name]:6.3f} ms (median of {repeats})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    shape_counts(a.shared.resolve(), a.batches, a.micro)
    module_walks(a.shared.resolve(), a.repeats)


if __name__ == "__main__":
    main()
