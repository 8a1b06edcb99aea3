"""The fast path: everything that makes training fast on a GPU beyond plain transformers + peft, behind one door.

    attention.py  packed attention for the vision tower and the language model (one varlen call)
    vision.py     the sync-free packed step of Qwen2-VL (inputs precomputed by the collator), the
                  vision tower as CUDA graphs
    compile.py    torch.compile of the blocks, CUDA graphs, the compile cache, when they pay
    trainer.py    FastTrainer: the step above and host-side replacements of per-step bookkeeping
    upstream.py   the private / patched transformers and peft hooks used, checked against versions

The rest of the project reaches it only through latexocr/speed.py (plan_training, prepare_model,
plain_text_attention); without this package it trains with plain transformers (tests/test_fast.py).
"""
from __future__ import annotations

import torch

from .attention import configure_cuda, plain_text_attention, use_packed_text_attention, use_packed_vision_attention
from .compile import (CUDA_GRAPH_PATCH_MULTIPLE, CUDA_GRAPH_ROW_MULTIPLE, COMPILE_COLD_FROM_STEPS,
                      COMPILE_WARM_FROM_STEPS, CompileCache, compile_decoder_layers, should_compile,
                      should_use_cuda_graphs)
from .trainer import FastTrainer
from .upstream import drift
from .vision import PackedExtras, graph_vision_tower, takes_precomputed_vision

__all__ = ["check_settings", "plan_training", "prepare_model", "plain_text_attention"]


def check_settings(args) -> None:
    """Stops on a fast-path setting no run could take (a wrong COMPILE_LAYERS), before the model loads."""
    should_compile(args.compile_layers, 0)


def prepare_model(model, attn_implementation: str = "sdpa", packed_vision_attention: bool = True):
    """At loading (training and inference): CUDA backend settings, and with sdpa the vision tower's
    attention over all images of a batch in one call."""
    configure_cuda()
    if packed_vision_attention and attn_implementation == "sdpa":
        use_packed_vision_attention(model)
    return model


def _vision_parameters(model):
    from ..modeling import vision_language_core
    core = vision_language_core(model)
    return core.visual.parameters() if core is not None else ()


def plan_training(model, args, *, processes: int, accumulation: int, planned_steps: int):
    """Switch the fast path on for `model` (LoRA already added) as train.py's settings `args` ask:
    packed text attention, compiled blocks and CUDA graphs where they pay. Returns the Plan: the
    TrainCollator and trainer options, and a one-line summary to print."""
    from ..linear_attention import has_linear_attention
    from ..speed import Plan

    packed = args.packing
    linear_attention = has_linear_attention(model)  # Qwen3.5: keeps packed samples apart by the boundaries
    # a vision tower that trains (TUNE=lora_vision, UNFREEZE_MERGER/VISION) takes the model's own
    # forward: the sync-free step was checked with a frozen tower, and a CUDA graph records no backward
    vision_trains = any(p.requires_grad for p in _vision_parameters(model))
    text_attention = (packed and args.packed_text_attention and args.attn_implementation == "sdpa"
                      and use_packed_text_attention(model))  # flash varlen on GPU: no work on masked-out scores
    # auto compiles only where it was measured: not with DeepSpeed or gradient checkpointing, nor (yet)
    # Qwen3.5, whose linear-attention layers split packed rows per sample on the host, nor the training
    # modes whose compiled step was never timed (a training vision tower, TUNE=full, 4-bit, fp16)
    measured_setup = not (args.deepspeed or args.gradient_checkpointing or linear_attention or vision_trains
                          or getattr(args, "tune", "lora") == "full" or getattr(args, "quantization", "none") != "none"
                          or getattr(args, "dtype", "auto") == "fp16")
    graphs_if_compiled = should_use_cuda_graphs(args.cuda_graphs, True, processes, accumulation)
    cache = CompileCache(model, graphs_if_compiled) if args.compile_layers.lower() != "off" else None
    warm = cache is not None and cache.warm
    compiled = should_compile(args.compile_layers, planned_steps, measured_setup, warm_cache=warm)
    cuda_graphs = graphs_if_compiled and compiled
    vision_graphs, callbacks, parts = None, [], []
    if text_attention:
        parts.append("packed text attention")
    precomputed = packed and args.supervised_logits_only and takes_precomputed_vision(model) and not vision_trains
    if precomputed:
        parts.append("sync-free Qwen2-VL step")
    if compiled:
        cache.use()
        n = compile_decoder_layers(model, cuda_graphs=cuda_graphs)
        # the frozen vision tower as one CUDA graph per padded patch count (Qwen2-VL, packed batches)
        vision_graphs = graph_vision_tower(model) if cuda_graphs and precomputed else None
        callbacks.append(cache.callback())
        graphed = ("LLM blocks and vision tower" if vision_graphs else "LLM blocks") if cuda_graphs else ""
        cost = "from the warm compile cache" if warm else "cold compile cache, ~1 min once in the first steps"
        parts.append(f"compiling {n} blocks{f' ({graphed} as CUDA graphs)' if graphed else ''}: {cost} "
                     f"(cache {cache.folder}; COMPILE_LAYERS=off skips it)")
    elif args.compile_layers.lower() == "auto" and torch.cuda.is_available():
        from_steps = COMPILE_WARM_FROM_STEPS if warm else COMPILE_COLD_FROM_STEPS
        parts.append(f"eager (COMPILE_LAYERS=auto compiles from {from_steps} steps"
                     f"{' and without DeepSpeed / gradient checkpointing / linear attention' if not measured_setup else ''})")
    collator_options = {}
    if packed:
        collator_options["packed_extras"] = PackedExtras(
            text_attention=bool(text_attention) or linear_attention, precomputed_vision=precomputed,
            pad_patches_to_multiple_of=CUDA_GRAPH_PATCH_MULTIPLE if vision_graphs else None)
    if cuda_graphs:
        collator_options["pad_to_multiple_of"] = CUDA_GRAPH_ROW_MULTIPLE
    plan = Plan(collator_options=collator_options, trainer_class=FastTrainer, summary="",
                cuda_graphs=cuda_graphs, vision_graphs=vision_graphs, callbacks=callbacks)
    plan.trainer_options = {"fast_plan": plan}
    problems = drift()
    plan.summary = "fast path: " + ("; ".join(parts) or "host-side bookkeeping only") + (
        f". WARNING: {len(problems) - 1} upstream hooks changed ({problems[0]} run "
        f"`pytest tests/test_fast.py -k upstream`)" if problems else "")
    return plan
