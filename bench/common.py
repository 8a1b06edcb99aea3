"""Shared by the GPU benchmarks: random-init full-size models and real-shaped LaTeX_OCR samples."""
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
FAMILY_DIR = Path(__file__).resolve().parent / "families"  # published architectures: families/SOURCES.md
# name: (where its config.json + preprocessor_config.json are: "shared/" or "families/", billions of weights)
FAMILIES = {"qwen2vl-2b": ("shared/qwen2vl-2b", 2.2), "qwen2_5vl-3b": ("families/qwen2_5vl-3b", 3.8),
            "qwen3vl-2b": ("families/qwen3vl-2b", 2.1), "qwen3vl-4b": ("families/qwen3vl-4b", 4.4),
            "qwen3_5-0.8b": ("families/qwen3_5-0.8b", 0.9), "qwen3_5-2b": ("shared/qwen3_5-2b", 2.3),
            "qwen3_5-4b": ("families/qwen3_5-4b", 4.5)}


def family_name(name: str) -> str:
    """The FAMILIES key for a spelling of it (qwen2vl-2b, qwen2_vl_2b, Qwen3.5-2B ...); one line if unknown."""
    def key(text):
        return "".join(ch for ch in text.lower().replace("3.5", "3_5") if ch.isalnum())
    found = {key(k): k for k in FAMILIES}.get(key(name))
    if found is None:
        raise SystemExit(f"unknown family {name!r}: one of {', '.join(FAMILIES)}")
    return found


def family_folder(name: str, shared: Path) -> Path:
    where = FAMILIES[family_name(name)][0]
    return shared / where.split("/", 1)[1] if where.startswith("shared/") else FAMILY_DIR / where.split("/", 1)[1]


def family_config(name: str, shared: Path):
    """The transformers config of a family's published architecture."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(family_folder(name, shared))


def build_random(name: str, shared: Path, out: Path) -> Path:
    """A random-init bf16 model of family `name`'s published architecture, saved like a real checkpoint with a
    processor train.py and infer.py load (the tokenizer: Qwen2's BPE of shared/qwen2vl-2b, see below)."""
    name = family_name(name)
    folder = family_folder(name, shared)
    model_type = family_config(name, shared).model_type
    if model_type == "qwen2_vl":
        return build_random_model(shared, out)
    if model_type == "qwen3_5":
        return build_random_qwen3_5(shared, out, folder)
    return build_random_qwen_vl(shared, out, folder)


def build_random_qwen_vl(shared: Path, out: Path, src: Path) -> Path:
    """Qwen2.5-VL or Qwen3-VL (config in `src`) with random bf16 weights. Both use Qwen2's tokenizer (the same
    151,643 BPE entries and special-token ids as shared/qwen2vl-2b, vocabulary 151,936) and the Qwen2-VL chat
    template for a single image and text turn; the image processor is the family's (`src`)."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        return out
    bpe = shared / "qwen2vl-2b"
    tok = AutoTokenizer.from_pretrained(bpe)
    config = AutoConfig.from_pretrained(src)
    for token, key in (("<|image_pad|>", "image_token_id"), ("<|vision_start|>", "vision_start_token_id")):
        assert tok.convert_tokens_to_ids(token) == getattr(config, key), (token, key)
    image_processor = AutoImageProcessor.from_pretrained(src)
    template = json.loads((bpe / "chat_template.json").read_text())["chat_template"]
    if config.model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template,
                                        video_processor=Qwen2VLVideoProcessor())
    else:
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor
        processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template,
                                     video_processor=Qwen3VLVideoProcessor(patch_size=16))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    processor.save_pretrained(out)
    return out


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


def build_random_qwen3_5(shared: Path, out: Path, src: Path | None = None) -> Path:
    """Qwen3.5's exact architecture (`src`, default shared/qwen3_5-2b: its config.json and
    preprocessor_config.json; bench/families/ has the 0.8B and 4B) with random bf16 weights.

    Its 248k tokenizer is not in shared/: Qwen2's BPE (shared/qwen2vl-2b) in a Qwen3_5Tokenizer with
    Qwen3.5's chat template (latexocr/testing.py's, thinking switch included) gives LaTeX token counts
    close to the real ones. The config's special-token ids are set to that tokenizer's; vocab_size
    stays 248,320, so the embedding and the (tied) LM head cost what they cost.
    """
    import torch
    from transformers import (AutoConfig, AutoImageProcessor, Qwen3_5ForConditionalGeneration, Qwen3_5Tokenizer,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    from latexocr.testing import QWEN3_5_CHAT_TEMPLATE, THINK_TOKENS

    src, bpe = src or shared / "qwen3_5-2b", shared / "qwen2vl-2b"
    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        return out
    vocab = json.loads((bpe / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (bpe / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#")]
    tok = Qwen3_5Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                           eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                          "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    tok.add_tokens(THINK_TOKENS)
    tok.chat_template = QWEN3_5_CHAT_TEMPLATE
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in
           ("image_pad", "video_pad", "vision_start", "vision_end", "im_end")}
    config = AutoConfig.from_pretrained(src)
    config.image_token_id, config.video_token_id = ids["image_pad"], ids["video_pad"]
    config.vision_start_token_id, config.vision_end_token_id = ids["vision_start"], ids["vision_end"]
    config.text_config.eos_token_id = config.eos_token_id = ids["im_end"]
    config.text_config.pad_token_id = config.pad_token_id = tok.pad_token_id
    assert config.text_config.vocab_size == 248320 and len(tok) < config.text_config.vocab_size
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3_5ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = [ids["im_end"], tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    del model
    processor = Qwen3VLProcessor(image_processor=AutoImageProcessor.from_pretrained(src), tokenizer=tok,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=16), chat_template=tok.chat_template)
    processor.save_pretrained(out)
    return out


def build_random_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter of train.py's defaults (rank LORA_R, LORA_ALPHA, on the language model's seven
    projections) with random, non-zero B matrices, saved as train.py saves one: what infer.py loads after a
    user's run. Built once per `out` (on the CPU: no GPU memory is held)."""
    if (out / "adapter_config.json").exists():
        return out
    import torch

    import train  # its LoRA settings (ROOT is on sys.path)
    from latexocr.modeling import add_lora, load_model
    model = load_model(str(model_dir), torch.bfloat16)
    model = add_lora(model, r=train.LORA_R, alpha=train.LORA_ALPHA, dropout=train.LORA_DROPOUT)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1e-3)
    model.save_pretrained(out)
    return out


def _matched(root: Path, split: str) -> list[tuple[str, str]]:
    """(image path, label) of one split of a LaTeX_OCR folder: its matching file pairs each image with a
    line of its formulas file."""
    formulas = (root / "formulas" / f"{split}.formulas.norm.txt").read_text(encoding="utf-8").splitlines()
    return [(str(root / "images" / f"images_{split}" / name), formulas[int(idx)])
            for name, idx in (line.split() for line in (root / "matching" / f"{split}.matching.txt").read_text().splitlines())]


def real_samples(shared: Path) -> list[tuple[str, str]]:
    """(image path, label) of the real printed LaTeX_OCR images in shared/latex_ocr/small."""
    root = shared / "latex_ocr" / "small"
    pairs = [pair for split in ("train", "val", "test") for pair in _matched(root, split)]
    if not pairs:
        raise SystemExit(f"no samples under {root}")
    return pairs


def full_val_samples(shared: Path) -> list[tuple[str, str]]:
    """(image path, label) of the real images in shared/latex_ocr/full_val (4,096, distinct labels)."""
    root = shared / "latex_ocr" / "full_val"
    pairs = _matched(root, "val")
    if not pairs:
        raise SystemExit(f"no images under {root}")
    return pairs


def write_json(pairs, n: int, path: Path) -> Path:
    """A conversation JSON of n samples, cycling through `pairs` (absolute image paths)."""
    from latexocr.sample import make_record
    records = [make_record(i, pairs[i % len(pairs)][0], pairs[i % len(pairs)][1]) for i in range(n)]
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path
