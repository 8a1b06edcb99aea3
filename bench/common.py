"""Shared by the GPU benchmarks: a random-init full-size model and real-shaped LaTeX_OCR samples."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_SHARED = ROOT.parent / "shared"
PROCESSOR_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json",
                   "preprocessor_config.json"]


def build_random_model(shared: Path, out: Path) -> Path:
    """Qwen2-VL-2B's exact architecture with random bf16 weights, saved like a real checkpoint.

    Speed and memory do not depend on the weights' values; no machine here can download them.
    """
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    src = shared / "qwen2vl-2b"
    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        return out
    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in PROCESSOR_FILES:
        shutil.copy(src / name, out / name)
    del model
    return out


def real_samples(shared: Path) -> list[tuple[str, str]]:
    """(image path, label) of the real printed LaTeX_OCR images in shared/latex_ocr/small."""
    root = shared / "latex_ocr" / "small"
    pairs = []
    for split, folder in (("train", "images_train"), ("val", "images_val"), ("test", "images_test")):
        formulas = (root / "formulas" / f"{split}.formulas.norm.txt").read_text(encoding="utf-8").splitlines()
        for line in (root / "matching" / f"{split}.matching.txt").read_text().splitlines():
            name, idx = line.split()
            pairs.append((str(root / "images" / folder / name), formulas[int(idx)]))
    if not pairs:
        raise SystemExit(f"no samples under {root}")
    return pairs


def write_json(pairs, n: int, path: Path) -> Path:
    """A conversation JSON of n samples, cycling through `pairs` (absolute image paths)."""
    from latexocr.sample import make_record
    records = [make_record(i, pairs[i % len(pairs)][0], pairs[i % len(pairs)][1]) for i in range(n)]
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path
