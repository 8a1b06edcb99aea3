"""Finding, loading and adapting the model: ModelScope / Hugging Face / local folder, LoRA."""
from __future__ import annotations

import os
from pathlib import Path

import torch

# The seven projections of each LLM layer (attention and MLP), as in the tutorial. The vision
# tower stays frozen, so it needs no backward pass at all.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def resolve_model(model_id: str, source: str = "modelscope") -> str:
    """A local folder holding the model: `model_id` itself if it is a folder, else downloaded.

    source: "modelscope" (the tutorial's choice, fast in China), "huggingface", or "local".
    """
    if Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser())
    if source == "local":
        raise FileNotFoundError(f"model folder not found: {model_id}")
    try:
        if source == "modelscope":
            from modelscope import snapshot_download
            return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                               "*.jinja"])
        if source == "huggingface":
            from huggingface_hub import snapshot_download
            return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    except Exception as exc:  # network errors come in many types; say what to do instead
        raise SystemExit(f"could not download {model_id!r} from {source}: {type(exc).__name__}: {exc}\n"
                         f"Check your network, try --model-source huggingface/modelscope, "
                         f"or pass a local model folder as --model-id.") from None
    raise ValueError(f"unknown model source {source!r}: modelscope, huggingface or local")


def pick_dtype(name: str = "auto") -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_processor(path: str):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(path)


def load_model(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa", device_map=None,
               packed_vision_attention: bool = True):
    """The model in `dtype`; with sdpa, its vision tower attends over all images of a batch in one call."""
    from transformers import AutoModelForImageTextToText

    from .speed import prepare_model
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                        device_map=device_map)
    return prepare_model(model, attn_implementation, packed_vision_attention)


def add_lora(model, r: int, alpha: int, dropout: float, targets=LORA_TARGETS):
    """Wrap the language model's projections in LoRA adapters (vision tower untouched)."""
    from peft import LoraConfig, get_peft_model
    # Match only modules inside the language model: the ViT has q/k/v-like names too in some families.
    pattern = r".*language_model.*\.(" + "|".join(targets) + r")$"
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=pattern, bias="none")
    return get_peft_model(model, config)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders under a training output folder, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob("checkpoint-*") if (p / "adapter_config.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


def find_adapter(adapter: str, output_dir: str | Path | None = None) -> str | None:
    """The adapter folder to load: a path, 'none', 'final' (train.py's fixed path), or 'last'."""
    if adapter in ("none", "", None):
        return None
    candidates = []
    if adapter == "last" and output_dir is not None:
        ckpts = list_checkpoints(output_dir)
        if ckpts:
            return str(ckpts[-1])
    path = Path(output_dir) / "final" if adapter == "final" and output_dir is not None else Path(adapter)
    if (path / "adapter_config.json").exists():
        return str(path)
    if output_dir is not None:
        candidates = [str(p) for p in list_checkpoints(output_dir)]
        final = Path(output_dir) / "final"
        if (final / "adapter_config.json").exists():
            candidates.append(str(final))
    listing = "\n  ".join(candidates) if candidates else "(none found)"
    raise SystemExit(f"no adapter at {adapter!r} (a folder with adapter_config.json).\n"
                     f"Adapters under {output_dir}:\n  {listing}\n"
                     f"Train one with train.py, pass one of these with --adapter, or --adapter none for the base model.")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
