"""plan_training: which parts of the fast path a training run takes, from train.py's settings."""
from __future__ import annotations

import torch

from ..linear_attention import has_linear_attention
from ..modeling import vision_language_core
from ..training import Plan
from .attention import use_packed_text_attention
from .compile import (COMPILE_FROM_STEPS, CUDA_GRAPH_PATCH_MULTIPLE, CUDA_GRAPH_ROW_MULTIPLE, CompileCache,
                      compile_decoder_layers, should_compile, should_use_cuda_graphs)
from .trainer import FastTrainer
from .upstream import drift
from .vision import PackedExtras, graph_vision_tower, takes_precomputed_vision


def check_settings(args) -> None:
    """Stops on a fast-path setting no run could take (a wrong COMPILE_LAYERS), before the model loads."""
    should_compile(args.compile_layers, 0)


def _vision_trains(model) -> bool:
    core = vision_language_core(model)
    return core is not None and any(p.requires_grad for p in core.visual.parameters())


def plan_training(model, args, *, processes: int, accumulation: int, planned_steps: int) -> Plan:
    """Switch the fast path on for `model` (LoRA already added) as train.py's settings `args` ask:
    packed text attention, compiled blocks and CUDA graphs where they pay. Returns the Plan: the
    TrainCollator and trainer options, and a one-line summary to print."""
    packed = args.packing
    linear_attention = has_linear_attention(model)  # Qwen3.5: keeps packed samples apart by the boundaries
    # a vision tower that trains (TUNE=lora_vision, UNFREEZE_MERGER/VISION) takes the model's own
    # forward: the sync-free step was checked with a frozen tower, and a CUDA graph records no backward
    vision_trains = _vision_trains(model)
    text_attention = (packed and args.packed_text_attention and args.attn_implementation == "sdpa"
                      and use_packed_text_attention(model))  # flash varlen on GPU: no work on masked-out scores
    # auto compiles only where it was measured: not with DeepSpeed or gradient checkpointing, nor (yet)
    # Qwen3.5, nor the training modes whose compiled step was never timed (a training vision tower,
    # TUNE=full, 4-bit, fp16)
    measured_setup = not (args.deepspeed or args.gradient_checkpointing or linear_attention or vision_trains
                          or args.tune == "full" or args.quantization != "none" or args.dtype == "fp16")
    compiled = should_compile(args.compile_layers, planned_steps, measured_setup)
    cuda_graphs = should_use_cuda_graphs(args.cuda_graphs, compiled, processes, accumulation)
    precomputed = packed and args.supervised_logits_only and takes_precomputed_vision(model) and not vision_trains
    vision_graphs, parts = None, []
    if text_attention:
        parts.append("packed text attention")
    if precomputed:
        parts.append("sync-free Qwen2-VL step")
    if compiled:
        cache = CompileCache()
        cache.use()
        n = compile_decoder_layers(model, cuda_graphs=cuda_graphs)
        # the frozen vision tower as one CUDA graph per padded patch count (Qwen2-VL, packed batches)
        vision_graphs = graph_vision_tower(model) if cuda_graphs and precomputed else None
        graphed = ("LLM blocks and vision tower" if vision_graphs else "LLM blocks") if cuda_graphs else ""
        parts.append(f"compiling {n} blocks{f' ({graphed} as CUDA graphs)' if graphed else ''}: ~1 min in the "
                     f"first steps, less once torch's cache {cache.folder} is warm (COMPILE_LAYERS=off skips it)")
    elif args.compile_layers.lower() == "auto" and torch.cuda.is_available():
        parts.append(f"eager (COMPILE_LAYERS=auto compiles from {COMPILE_FROM_STEPS} steps"
                     f"{' and without DeepSpeed / gradient checkpointing / linear attention' if not measured_setup else ''})")
    collator_options = {}
    if packed:
        collator_options["packed_extras"] = PackedExtras(
            text_attention=bool(text_attention) or linear_attention, precomputed_vision=precomputed,
            pad_patches_to_multiple_of=CUDA_GRAPH_PATCH_MULTIPLE if vision_graphs else None)
    if cuda_graphs:
        collator_options["pad_to_multiple_of"] = CUDA_GRAPH_ROW_MULTIPLE
    problems = drift()
    summary = "fast path: " + ("; ".join(parts) or "host-side bookkeeping only") + (
        f". WARNING: {len(problems) - 1} upstream hooks changed ({problems[0]} run "
        f"`pytest tests/test_fast.py -k upstream`)" if problems else "")
    return Plan(collator_options=collator_options, trainer_class=FastTrainer,
                trainer_options={"cuda_graphs": cuda_graphs, "vision_graphs": vision_graphs}, summary=summary)
