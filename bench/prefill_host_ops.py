"""Host-side work of the static decoder: the torch operators one prefill chunk and one decode step dispatch.

    python bench/prefill_host_ops.py                          # tiny Qwen2-VL, 128 full_val images (one chunk)
    python bench/prefill_host_ops.py --family qwen3_5

On a GPU each operator is a dispatch and most are a kernel launch (~5-10 us of the host each); where one comes
after a GPU->CPU sync (`.tolist()`, `.item()`) the GPU waits for them. Counted here on the CPU with a tiny
random model of the family (the counts depend on the images and the code, not on the model's width; the
layers' share grows with the depth, which the tiny model lacks) and real image sizes: per prefill chunk, the
operators inside the vision tower's input functions (transformers' vision_utils: patch positions, attention
boundaries), and the whole prefill; per decode step; with LATEXOCR_SPEED vision_inputs on (the loader gives
those inputs, batching.vision_inputs) and off. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_SHARED, full_val_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"))
    ap.add_argument("--images", type=int, default=128, help="images: one prefill chunk of 128 by default")
    a = ap.parse_args()

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from latexocr import generation
    from latexocr.batching import SampleEncoder
    from latexocr.fast import decoding, prepare_model, standins
    from latexocr.sample import sizing_for
    from latexocr.testing import build_tiny_model

    class Count(TorchDispatchMode):
        """Operators dispatched, by the part of the run named in `where`."""
        def __init__(self):
            super().__init__()
            self.ops, self.where = collections.Counter(), []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[self.where[-1] if self.where else "elsewhere"] += 1
            return func(*args, **(kwargs or {}))

    counter = Count()
    calls = collections.Counter()

    def counted(owners, name, label):
        """owners' `name` (one function, held by each) counted under `label`, except inside the loader's work."""
        original = getattr(owners[0], name)

        def wrapper(*args, **kwargs):
            inside_loader = counter.where[-1:] == ["loader"]
            calls[label] += not inside_loader
            counter.where.append("loader" if inside_loader else label)
            try:
                return original(*args, **kwargs)
            finally:
                counter.where.pop()
        for owner in owners:
            setattr(owner, name, wrapper)

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "model", a.family)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        model = prepare_model(model).eval()  # as infer.py loads it: the vision tower's packed attention
        processor = AutoProcessor.from_pretrained(folder)
    encoder = SampleEncoder(processor, sizing_for(processor))
    paths = [p for p, _ in full_val_samples(a.shared)[:a.images]]
    from transformers import vision_utils
    module = sys.modules[type(decoding.vision_language_core(model)).__module__]
    for name in standins.VISION_FUNCTIONS:  # the tower's calls of transformers' own functions (the same object in
        counted([vision_utils, module], name, "vision input functions")  # both, so the decoder still swaps it)
    counted([generation], "vision_inputs", "loader")  # the workers' CPU (here: this process, num_workers=0)
    counted([decoding.StaticDecoder], "_prefill", "prefill")
    counted([decoding.StaticDecoder], "_run_step", "decode step")
    chunks = -(-a.images // generation.PREFILL_CHUNK_ROWS)
    report = {"family": a.family, "images": a.images, "prefill chunks": chunks}
    for setting in ("on", "off"):
        os.environ["LATEXOCR_SPEED"] = f"vision_inputs={setting}"
        counter.ops.clear()
        calls.clear()
        with counter:
            generation.predict(model, encoder, paths, batch_size=a.images, max_new_tokens=3, min_new_tokens=3,
                               num_workers=0, progress=False, engine="static")
        ops = dict(counter.ops)
        report[f"vision_inputs={setting}"] = {
            "ops per prefill chunk in the tower's input functions": ops.get("vision input functions", 0) // chunks,
            "ops per prefill chunk": (ops.get("prefill", 0) + ops.get("vision input functions", 0)) // chunks,
            "ops per decode step": ops.get("decode step", 0) // max(1, calls["decode step"]),
            "ops per prefill chunk in the loader (CPU, the workers)": ops.get("loader", 0) // chunks}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
