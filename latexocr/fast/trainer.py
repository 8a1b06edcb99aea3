"""The Trainer of the fast path: private-method overrides and instance patches that keep the host ahead of the GPU.

Each hook here replaces transformers' or peft's per-step bookkeeping by a host-side equivalent: the
original made the host wait for the GPU, or walk the whole model, at every step, so the host could
not queue the next step while the GPU worked (docs/BENCHMARKS.md). Every hook is private or
patched API: latexocr/fast/upstream.py names the versions it was checked against, and
tests/test_fast.py fails when upstream renames, re-signs or stops calling it.
"""
from __future__ import annotations

import contextlib

import torch

from ..training import OcrTrainer, supervised_loss
from .vision import (PRECOMPUTED_KEYS, REAL_TOKENS_KEY, VISION_PADDING_KEY, VISION_POSITIONS_KEY, VisionGraphs,
                     supervised_step_loss, takes_precomputed_vision)


def fast_supervised_loss(model, batch: dict, supervised_logits_only: bool = True,
                         vision_graphs: VisionGraphs | None = None) -> tuple[torch.Tensor, int]:
    """training.supervised_loss, except that packed batches of a Qwen2-VL model take the sync-free
    step of latexocr/fast/vision.py (its vision tower replayed by `vision_graphs`)."""
    precomputed = {k: batch.pop(k) for k in PRECOMPUTED_KEYS if k in batch}
    # the collator precomputes the vision inputs only where the sync-free step applies (plan_training:
    # not when the vision tower trains); the token count alone (REAL_TOKENS_KEY) comes with every packed batch
    if VISION_POSITIONS_KEY in precomputed and supervised_logits_only and takes_precomputed_vision(model):
        return supervised_step_loss(model, {**batch, **precomputed}, vision_graphs)
    if precomputed.get(VISION_PADDING_KEY):
        raise ValueError("pixel_values were padded (TrainCollator(pad_patches_to_multiple_of=...)) for a model "
                         "whose vision tower cannot take the padding (only Qwen2-VL can)")
    return supervised_loss(model, batch, supervised_logits_only)


class NoLoraInputCast:
    """While active, peft's LoRA layers skip casting their input to the adapter's dtype.

    Under bf16 autocast that cast is a full fp32 copy of every LoRA input for nothing (autocast
    casts back). peft.helpers.disable_input_dtype_casting does the same but walks all ~2,700
    modules of the 2B model (named_modules) twice per call; this finds the LoRA layers once.
    Sets a peft attribute, checked against peft 0.21.2 (upstream.SOURCES: BaseTunerLayer._cast_input_dtype).
    """

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def __call__(self, active: bool = True):
        if not active:  # without autocast the cast is what makes fp32 adapters work
            yield
            return
        saved = [m.cast_input_dtype_enabled for m in self.layers]
        for m in self.layers:
            m.cast_input_dtype_enabled = False
        try:
            yield
        finally:
            for m, value in zip(self.layers, saved):
                m.cast_input_dtype_enabled = value


def skip_redundant_module_walks(model) -> list:
    """The Trainer calls model.train() and model.zero_grad() at every step, and clips gradients
    over model.parameters(): each walks all ~2,700 modules / ~1,100 parameters of the 2B model
    (4.1, 2.1 and 2.0 ms of host time per step on a 2-core CPU: bench/host_costs.py), while only
    the ~400 LoRA tensors have gradients. After this call, train() returns at once when the previous train() already put
    every module in training mode (eval() and the train() after it still switch every module;
    switching a submodule alone is not seen), and zero_grad() clears the trainable parameters
    only. Returns those parameters (for clipping). Patches torch.nn.Module methods on the instance,
    checked against torch 2.14.1 / transformers 5.24.0 (upstream.PATCHED, CALLED_BY_TRAINER).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    module_train = type(model).train
    # Whether the last switch put every module in training mode. (model.training alone does not
    # say so: peft's wrapper starts in training mode around a base model loaded in eval mode.)
    all_training = [False]

    def train(mode: bool = True):
        if mode and all_training[0]:
            return model
        out = module_train(model, mode)
        all_training[0] = mode
        return out

    def zero_grad(set_to_none: bool = True):
        for p in trainable:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    model.train, model.zero_grad = train, zero_grad  # instance attributes shadow nn.Module's methods
    return trainable


class FastTrainer(OcrTrainer):
    """OcrTrainer with the fast path's step (`fast_supervised_loss`) and host-side bookkeeping:
    `_track_num_input_tokens`, `floating_point_ops` and `_clip_grad_norm` below,
    `skip_redundant_module_walks` above, and `logging_nan_inf_filter=False` in train.py.

    cuda_graphs: the blocks replay as CUDA graphs (latexocr/fast/compile.py); vision_graphs: the
    vision tower's (latexocr.fast.vision.VisionGraphs), or None. latexocr/fast/plan.py chooses both.
    """

    def __init__(self, *args, cuda_graphs: bool = False, vision_graphs: VisionGraphs | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cuda_graphs, self.vision_graphs = cuda_graphs, vision_graphs
        # per-step train()/zero_grad()/clip: the LoRA tensors only
        self._trainable = skip_redundant_module_walks(self.accelerator.unwrap_model(self.model))
        self._no_lora_input_cast = None

    def step_loss(self, model, inputs: dict) -> tuple[torch.Tensor, int]:
        # Under bf16 autocast, peft's cast of every LoRA input to the fp32 adapter dtype is a
        # full copy of the activations for nothing (autocast casts back): switch it off.
        if self._no_lora_input_cast is None:
            self._no_lora_input_cast = NoLoraInputCast(self.accelerator.unwrap_model(model))
        if self.cuda_graphs:  # a new forward pass: the graphs may reuse the previous pass's output memory
            torch.compiler.cudagraph_mark_step_begin()
        with self._no_lora_input_cast(active=self.args.bf16 or self.args.fp16):
            return fast_supervised_loss(model, inputs, self.supervised_logits_only, self.vision_graphs)

    # private Trainer methods, checked against transformers 5.24.0 (upstream.OVERRIDDEN, CALLED_BY_TRAINER)
    def _clip_grad_norm(self, model):
        # the norm over the LoRA tensors only (the only ones with gradients), without walking the
        # whole model; DeepSpeed, FSDP and fp16 loss scaling keep accelerate's own clipping
        if self._trainable is None or self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.fp16:
            return super()._clip_grad_norm(model)
        return torch.nn.utils.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

    def _track_num_input_tokens(self, inputs):
        # transformers puts the count on the GPU and reads it back (.item()): a GPU->CPU sync per
        # step. Packed batches report their real token count (padding excluded) on the host.
        if (self.args.include_num_input_tokens_seen == "no" or self.accelerator.num_processes > 1
                or REAL_TOKENS_KEY not in inputs):
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += inputs[REAL_TOKENS_KEY]

    _parameter_count = None

    def floating_point_ops(self, inputs) -> int:
        # transformers' estimate (6 x tokens x parameters), with the parameter count taken once
        # instead of by walking the model's ~2,700 modules every step
        if self._parameter_count is None:
            self._parameter_count = self.accelerator.unwrap_model(self.model).num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._parameter_count if "input_ids" in inputs else 0


