"""Where a training step would stop the GPU's queue: its host syncs, counted on the CPU (no GPU needed).

    python bench/count_syncs.py                       # Qwen2-VL and Qwen3.5, train.py's batch (16 real samples)
    python bench/count_syncs.py --families qwen3_5 --micro 8

On a GPU every `.item()`, `.tolist()`, `bool(tensor)`, and every op whose output size depends on the data
(nonzero, boolean indexing, masked_select, unique, repeat_interleave without its size) waits for the GPU to
finish everything queued, then the GPU waits while the host queues the next kernels. torch.profiler shows them
only on a GPU (bench/profile_step.py); here they are counted by kind and by the source line that asked for them
in one forward and backward of the step train.py runs for the family (fast_supervised_loss: Qwen2-VL's packed
sync-free step; Qwen3.5's padded batches through the model's own forward), on a tiny random model of the
family's architecture (latexocr/testing.py: the same code paths, per image and per sample, as the full model)
and real LaTeX_OCR images (../shared/latex_ocr/full_val).

One JSON line per family: syncs in all, by kind, and the ten source lines that ask most. LATEXOCR_SPEED applies
(`padded_positions=off`: the model computes Qwen3.5's positions itself, as before).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import DEFAULT_SHARED, full_val_samples

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# aten ops whose result size, or value on the host, needs the device's data (a sync on a GPU)
DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                  "_local_scalar_dense", "is_nonzero", "equal"}


def _site() -> str:
    """The innermost source line outside torch and this file: who asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/torch/" in name or name.endswith("count_syncs.py"):
            continue
        short = name.split("site-packages/")[-1] if "site-packages/" in name else name.replace(str(ROOT) + "/", "")
        return f"{short}:{frame.lineno} {frame.name}"
    return "?"


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kinds, self.sites = collections.Counter(), collections.Counter()

    def note(self, kind: str):
        self.kinds[kind] += 1
        self.sites[_site()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in DATA_DEPENDENT:
            self.note(name)
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.note("boolean index")
        elif name == "repeat_interleave" and (kwargs or {}).get("output_size") is None:
            self.note("repeat_interleave")  # the tensor-repeats form (the int form decomposes before it gets here)
        return func(*args, **(kwargs or {}))


def count(family: str, samples: list, micro: int) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from latexocr.batching import SampleEncoder, TrainCollator
    from latexocr.fast import prepare_model, speed_choices
    from latexocr.fast.linear_attention import has_linear_attention
    from latexocr.fast.trainer import fast_supervised_loss
    from latexocr.fast.vision import PackedExtras, takes_precomputed_vision
    from latexocr.modeling import add_lora
    from latexocr.sample import sizing_for
    from latexocr.testing import build_tiny_model

    folder = build_tiny_model(Path(tempfile.mkdtemp()) / family, family)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa")
    speed = speed_choices()
    prepare_model(model, speed)  # as train.py: the vision tower's attention over all images in one call
    model = add_lora(model, 8, 16, 0.0)
    processor = AutoProcessor.from_pretrained(folder)
    encoder = SampleEncoder(processor, sizing_for(processor))
    packed = not has_linear_attention(model)  # train.py's packing=auto without fla's varlen path
    extras = PackedExtras() if packed and takes_precomputed_vision(model) else None
    batch = TrainCollator(encoder, packed=packed, packed_extras=extras,
                          padded_positions=not packed and speed.padded_positions)(samples[:micro])
    counter = SyncCounter()
    tolist = torch.Tensor.tolist  # .tolist() reads a CPU tensor without dispatching (.item() dispatches)
    torch.Tensor.tolist = lambda self, *a: counter.note("tolist") or tolist(self, *a)
    try:
        with counter:
            loss, n = fast_supervised_loss(model, dict(batch))
            (loss / n).backward()
    finally:
        torch.Tensor.tolist = tolist
    return {"family": family, "micro_batch": micro, "packed": packed, "syncs": sum(counter.kinds.values()),
            "by_kind": dict(counter.kinds.most_common()), "top_sites": dict(counter.sites.most_common(10))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--families", default="qwen2_vl,qwen3_5")
    ap.add_argument("--micro", type=int, default=16, help="samples a micro-batch (auto's choice on an H100/H200)")
    a = ap.parse_args()
    samples = full_val_samples(a.shared)  # (image path, label), as TrainCollator takes them
    for family in a.families.split(","):
        print(json.dumps(count(family, samples, a.micro)), flush=True)


if __name__ == "__main__":
    main()
