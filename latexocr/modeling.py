"""Finding, loading and adapting the model: ModelScope / Hugging Face / local folder, LoRA.

LoRA targets are found by walking the model (lora_targets): every linear layer of the language model,
which in a Qwen2-VL are the tutorial's seven projections (q/k/v/o, gate/up/down) and in Qwen3.5 also
the five of its Gated DeltaNet layers (linear_attn.in_proj_qkv/z/b/a, out_proj), as ms-swift and
LLaMA-Factory target all linear layers.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

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


def load_model(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa", device_map=None, quantization=None):
    """The model in `dtype`, as transformers loads it. quantization: a quantization_config() (4-bit
    language model), or None. (The scripts then call latexocr.fast.prepare_model.)"""
    from transformers import AutoModelForImageTextToText

    # use_kernels=False: transformers 5.25 (which requires the `kernels` package) swaps layers (RMSNorm,
    # activations, the linear-attention convolution) for kernels downloaded from the Hub at every load
    # unless told not to; 5.24 did not. Off keeps what is measured in docs/BENCHMARKS.md, the same on
    # both versions, and no download at load (GPU machines may have no network).
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                        device_map=device_map, quantization_config=quantization,
                                                        use_kernels=False)
    if quantization is not None:
        keep_4bit_layout_trainable(model)
    return model


@contextlib.contextmanager
def peft_wrapping():
    """While peft wraps a model (get_peft_model, PeftModel.from_pretrained): peft 0.21 reads the model's
    `is_gradient_checkpointing`, which transformers 5.24 / 5.25 deprecated with a FutureWarning that every run of
    train.py and infer.py printed; that one warning is left out, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model, r: int, alpha: int, dropout: float, targets=None, modules_to_save=None):
    """Wrap the language model's projections in LoRA adapters (vision tower untouched).

    targets: a peft target_modules regex (default: lora_targets(model, "lora")); modules_to_save:
    modules trained in full and saved with the adapter (e.g. the merger)."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets or lora_targets(model, "lora"), bias="none",
                        modules_to_save=modules_to_save or None)
    with peft_wrapping():
        return get_peft_model(model, config)


# ---- training modes: which weights learn ---------------------------------------------------
TUNE_MODES = ("lora", "lora_vision", "full")
QUANTIZATIONS = ("none", "4bit")
LANGUAGE_MODEL_NAMES = ("language_model",)  # the attribute holding the LLM in every Qwen-VL family
VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")


def _find_part(model, names) -> tuple[str, "torch.nn.Module"]:
    """(full name, module) of the first submodule whose own name is one of `names`."""
    for full_name, module in model.named_modules():
        if full_name.rsplit(".", 1)[-1] in names:
            return full_name, module
    raise ValueError(f"{type(model).__name__} has no submodule named {' or '.join(names)}")


def language_model_of(model):
    return _find_part(model, LANGUAGE_MODEL_NAMES)


def vision_tower_of(model):
    return _find_part(model, VISION_TOWER_NAMES)


def mergers_of(model) -> list[tuple[str, "torch.nn.Module"]]:
    """The vision tower's mergers (patch features -> LLM width): Qwen2/2.5-VL `merger`, Qwen3-VL
    also each of `deepstack_merger_list`. Full names, as peft's modules_to_save takes them."""
    vision_name, vision = vision_tower_of(model)
    found = []
    for name, child in vision.named_children():
        if "merger" not in name:
            continue
        items = child.named_children() if isinstance(child, torch.nn.ModuleList) else [("", child)]
        found += [(".".join(filter(None, (vision_name, name, i))), m) for i, m in items]
    return found


def _linear_pattern(part_name: str, part, skip=()) -> str:
    r"""A peft target regex matching exactly the nn.Linear modules of `part` (minus those under `skip`).

    By their own names (`.*language_model.*\.(q_proj|...)$`, in order of first appearance) where
    no other module of the part shares one; else by their paths inside the part, layer numbers
    generalised (`.*visual\.(blocks\.\d+\.attn\.qkv|...)$`: the ViT's `proj` is also its patch
    embedding's Conv3d)."""
    import re

    linears, others = {}, set()
    for name, module in part.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and not any(f"{part_name}.{name}".startswith(s + ".")
                                                          or f"{part_name}.{name}" == s for s in skip):
            linears.setdefault(leaf, []).append(name)
        else:
            others.add(leaf)
    if not linears:
        raise ValueError(f"no nn.Linear modules in {part_name}")
    root = re.escape(part_name.rsplit(".", 1)[-1])
    if not others & set(linears):
        return rf".*{root}.*\.(" + "|".join(linears) + r")$"
    paths = dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n))
                          for names in linears.values() for n in names)
    return rf".*{root}\.(" + "|".join(paths) + r")$"


def lora_targets(model, mode: str = "lora", skip=()) -> str:
    """peft target_modules for a TUNE mode, found by walking the model: every nn.Linear of the
    language model (Qwen2-VL: the tutorial's seven projections), and for "lora_vision" also
    every nn.Linear of the vision tower and its merger. `skip`: full names of modules left out
    (trained in full instead)."""
    if mode not in ("lora", "lora_vision"):
        raise ValueError(f"no LoRA targets for TUNE={mode!r}")
    patterns = [_linear_pattern(*language_model_of(model), skip=skip)]
    if mode == "lora_vision":
        patterns.append(_linear_pattern(*vision_tower_of(model), skip=skip))
    return patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)


def check_training_mode(tune: str, unfreeze_vision: bool = False, quantization: str = "none") -> None:
    """Stops with one line on a TUNE / UNFREEZE_VISION / QUANTIZATION combination no run can take
    (train.py calls it before any model loads; setup_training_mode again, for other callers)."""
    if tune not in TUNE_MODES:
        raise SystemExit(f"TUNE must be one of {', '.join(TUNE_MODES)}, not {tune!r}")
    if unfreeze_vision and tune != "full":
        raise SystemExit("UNFREEZE_VISION trains the whole vision tower and applies to TUNE=full; "
                         "for LoRA on the vision tower use TUNE=lora_vision")
    if quantization != "none" and tune == "full":
        raise SystemExit("QUANTIZATION=4bit trains LoRA on a 4-bit base: use TUNE=lora or lora_vision")


def setup_training_mode(model, tune: str = "lora", r: int = 64, alpha: int = 16, dropout: float = 0.05,
                        unfreeze_merger: bool = False, unfreeze_vision: bool = False):
    """The model with the weights of a TUNE mode trainable (everything else frozen).

    lora: LoRA on the language model's linear layers; lora_vision: also on the vision tower's
    and merger's; full: every language-model weight (embeddings and LM head included).
    unfreeze_merger trains the merger's own weights in any mode (with LoRA: saved with the
    adapter); unfreeze_vision (full only) the whole vision tower. Trainable weights are kept in
    fp32 (the optimizer's master copy: bf16 would round away small updates, fp16 loss scaling
    refuses fp16 gradients), the frozen rest stays in the loaded dtype.
    """
    check_training_mode(tune, unfreeze_vision)
    merger_names = [name for name, _ in mergers_of(model)] if unfreeze_merger else []
    if tune == "full":
        model.requires_grad_(False)
        parts = [language_model_of(model)[1], model.get_output_embeddings()]
        parts += [vision_tower_of(model)[1]] if unfreeze_vision else [m for _, m in mergers_of(model) if unfreeze_merger]
        for part in parts:
            part.requires_grad_(True)
    else:
        model = add_lora(model, r, alpha, dropout, targets=lora_targets(model, tune, skip=merger_names),
                         modules_to_save=merger_names)
    return trainable_in_fp32(model)


def trainable_in_fp32(model):
    """The model with its trainable weights in fp32, the optimizer's master copy (see setup_training_mode)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return model


def unwrap(model):
    """The transformers model under DistributedDataParallel / peft (LoRA layers stay injected)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def keep_4bit_layout_trainable(model) -> None:
    """QLoRA on a CPU with AVX512-BF16: bitsandbytes (checked on 0.50.2) repacks a Linear4bit's weight
    for its inference kernel the first time the layer runs in eval mode without gradients (train.py's
    base-model evaluation) and never packs it back, after which the training forward fails ("a view of
    a leaf Variable that requires grad is being used in an in-place operation"). Every 4-bit model
    keeps the trainable layout, the one loaded by infer.py too, so that train.py's evaluation and
    infer.py run the same kernel and print the same scores. (`support_avx512bf16_for_cpu` is the
    instance flag bitsandbytes reads; listed in latexocr/fast/upstream.py's drift check.)"""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def vision_language_core(model):
    """The Qwen2VLModel-like module (has .visual and .language_model) under DDP / peft / the LM head, or None."""
    core = unwrap(model)
    core = getattr(core, "model", core)
    return core if hasattr(core, "visual") and hasattr(core, "language_model") else None


def vision_parameter_ids(model) -> set[int]:
    """ids of the vision tower's parameters (merger included), for their own learning rate."""
    return {id(p) for p in vision_tower_of(model)[1].parameters()}


def parameter_counts(model) -> dict[str, int]:
    """Trainable and total parameters (shared tensors once), and the trainable ones of the vision side."""
    vision = vision_parameter_ids(model)
    unique = {id(p): p for p in model.parameters()}.values()
    return {"trainable": sum(p.numel() for p in unique if p.requires_grad),
            "trainable_vision": sum(p.numel() for p in unique if p.requires_grad and id(p) in vision),
            "total": sum(p.numel() for p in unique)}


def quantization_config(quantization: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for QUANTIZATION, or None for "none".

    4bit: NF4 with double quantisation, bf16 compute (fp16 on GPUs without bf16), the language
    model only: the vision tower (about a third of the 2B model) stays in `dtype`, as the
    precomputed-vision step (latexocr/fast/vision.py) reads its dtype, and the LM head too.
    """
    if quantization not in QUANTIZATIONS:
        raise SystemExit(f"QUANTIZATION must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    if quantization == "none":
        return None
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit("QUANTIZATION=4bit needs bitsandbytes (pip install 'bitsandbytes>=0.50'); "
                         "or use QUANTIZATION=none")
    from transformers import BitsAndBytesConfig
    skip = [rf".*\.{name}" for name in VISION_TOWER_NAMES] + ["lm_head"]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float16 if dtype == torch.float16 else torch.bfloat16,
                              llm_int8_skip_modules=skip)


def is_full_model(path: str | Path) -> bool:
    """A folder train.py's TUNE=full wrote: a whole model (config.json), not an adapter."""
    path = Path(path)
    return (path / "config.json").exists() and not (path / "adapter_config.json").exists()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders under a training output folder, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob("checkpoint-*") if (p / "adapter_config.json").exists() or is_full_model(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


def find_adapter(adapter: str, output_dir: str | Path | None = None) -> str | None:
    """The adapter folder to load: a path, 'none', 'final' (train.py's fixed path), or 'last'.
    A full model folder (TUNE=full) is returned too: the caller loads it instead of the base."""
    if adapter in ("none", "", None):
        return None
    candidates = []
    if adapter == "last" and output_dir is not None:
        ckpts = list_checkpoints(output_dir)
        if ckpts:
            return str(ckpts[-1])
    path = Path(output_dir) / "final" if adapter == "final" and output_dir is not None else Path(adapter)
    if (path / "adapter_config.json").exists() or is_full_model(path):
        return str(path)
    if output_dir is not None:
        candidates = [str(p) for p in list_checkpoints(output_dir)]
        final = Path(output_dir) / "final"
        if (final / "adapter_config.json").exists() or is_full_model(final):
            candidates.append(str(final))
    listing = "\n  ".join(candidates) if candidates else "(none found)"
    raise SystemExit(f"no adapter at {adapter!r} (a folder with adapter_config.json).\n"
                     f"Adapters under {output_dir}:\n  {listing}\n"
                     f"Train one with train.py, pass one of these with --adapter, or --adapter none for the base model.")
