"""The training step train.py runs: `build_trainer` picks the trainer, its step and its batches.

FastTrainer is the fast path's: its step (`fast_supervised_loss`) and private-method overrides and
instance patches that keep the host ahead of the GPU. Each hook replaces transformers' or peft's
per-step bookkeeping by a host-side equivalent: the original made the host wait for the GPU, or walk the whole model, at every step, so the host could
not queue the next step while the GPU worked (docs/BENCHMARKS.md). Every hook is private or
patched API: latexocr/fast/upstream.py names the versions it was checked against, and
tests/test_fast.py fails when upstream renames, re-signs or stops calling it.
"""
from __future__ import annotations

import contextlib

import torch

from ..batching import (PRECOMPUTED_KEYS, REAL_TOKENS_KEY, VISION_PADDING_KEY, VISION_POSITIONS_KEY, TrainCollator,
                        sample_boundaries)
from .linear_attention import PADDED, choose_path, has_linear_attention
from ..modeling import vision_language_core
from ..training import OcrTrainer, summed_cross_entropy, supervised_logits, supervised_loss
from .attention import use_packed_text_attention
from .choices import ENV, SpeedChoices
from .head import head_can_be_sliced, head_loss, hidden_states_out
from .compile import (COMPILE_FROM_STEPS, COMPILE_FROM_STEPS_LINEAR_ATTENTION, CUDA_GRAPH_PATCH_MULTIPLE,
                      CUDA_GRAPH_ROW_MULTIPLE, CompileCache, compile_decoder_layers, should_compile,
                      should_use_cuda_graphs)
from .upstream import drift
from .vision import PackedExtras, VisionGraphs, graph_vision_tower, supervised_step_loss, takes_precomputed_vision


def fast_supervised_loss(model, batch: dict, supervised_logits_only: bool = True,
                         vision_graphs: VisionGraphs | None = None, sliced_head: bool = True) -> tuple[torch.Tensor, int]:
    """training.supervised_loss, except that packed batches of a Qwen2-VL model take the sync-free
    step of latexocr/fast/vision.py (its vision tower replayed by `vision_graphs`), and that with
    `sliced_head` the vocabulary projection and the loss run a slice of tokens at a time (fast/head.py)."""
    precomputed = {k: batch.pop(k) for k in PRECOMPUTED_KEYS if k in batch}
    with hidden_states_out(model, active=sliced_head and supervised_logits_only) as head:
        loss_of = summed_cross_entropy if head is None else lambda hidden, targets: head_loss(hidden, head, targets)
        # the collator precomputes the vision inputs only where the sync-free step applies (fast/trainer.py plan:
        # not when the vision tower trains); the token count alone (REAL_TOKENS_KEY) comes with every packed batch
        if VISION_POSITIONS_KEY in precomputed and supervised_logits_only and takes_precomputed_vision(model):
            return supervised_step_loss(model, {**batch, **precomputed}, vision_graphs, loss_of)
        if precomputed.get(VISION_PADDING_KEY):
            raise ValueError("pixel_values were padded (TrainCollator(pad_patches_to_multiple_of=...)) for a model "
                             "whose vision tower cannot take the padding (only Qwen2-VL can)")
        return loss_of(*supervised_logits(model, batch, supervised_logits_only))  # training.supervised_loss's


def probe_step_loss(model, speed: SpeedChoices, autocast: bool):
    """The step loss memory.fit_training_batch probes with (on the plain batches it builds): the one the trainer
    will run, so the probe measures its memory (fast path: the sliced head; peft's input cast off under
    `autocast`, as FastTrainer.step_loss)."""
    if not speed.fast:
        return supervised_loss
    no_cast = NoLoraInputCast(model)

    def step_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
        with no_cast(active=autocast):
            return fast_supervised_loss(model, batch, speed.supervised_logits_only, sliced_head=speed.sliced_head)
    return step_loss


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
    checked against torch 2.14.1 / transformers 5.24.0 and 5.25.0 (upstream.PATCHED, CALLED_BY_TRAINER).
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
    `_track_num_input_tokens`, `floating_point_ops`, `_clip_grad_norm` and `_get_train_sampler` below,
    `skip_redundant_module_walks` above, and `logging_nan_inf_filter=False` in train.py.

    cuda_graphs: the blocks replay as CUDA graphs (latexocr/fast/compile.py); vision_graphs: the
    vision tower's (latexocr.fast.vision.VisionGraphs), or None. latexocr/fast/plan.py chooses both.
    """

    def __init__(self, *args, cuda_graphs: bool = False, vision_graphs: VisionGraphs | None = None,
                 group_by_length: bool = False, sliced_head: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.cuda_graphs, self.vision_graphs, self.group_by_length = cuda_graphs, vision_graphs, group_by_length
        self.sliced_head = sliced_head
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
            return fast_supervised_loss(model, inputs, self.supervised_logits_only, self.vision_graphs,
                                        self.sliced_head)

    # private Trainer methods, checked against transformers 5.24.0 and 5.25.0 (upstream.OVERRIDDEN, CALLED_BY_TRAINER)
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

    def _get_train_sampler(self, train_dataset=None):
        # LATEXOCR_SPEED group_by_length: transformers' own length-grouped order, given the dataset's token
        # counts (its Trainer reads lengths from a `datasets.Dataset` column only, else from each item's
        # input_ids, which OcrDataset's (image, label) items do not have: they are encoded in the collator)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or not getattr(dataset, "lengths", None):
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=list(dataset.lengths))

    _parameter_count = None

    def floating_point_ops(self, inputs) -> int:
        # transformers' estimate (6 x tokens x parameters), with the parameter count taken once
        # instead of by walking the model's ~2,700 modules every step
        if self._parameter_count is None:
            self._parameter_count = self.accelerator.unwrap_model(self.model).num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._parameter_count if "input_ids" in inputs else 0




def build_trainer(model, settings, encoder, speed: SpeedChoices, *, processes: int, accumulation: int,
                  planned_steps: int, split_over: int | None = None, **trainer_kwargs) -> tuple[OcrTrainer, str]:
    """The Trainer train.py runs (LoRA already added; `settings`: its settings block) with its collator,
    and a one-line summary. By default FastTrainer (step: `fast_supervised_loss` above) on the batches
    `plan` below asks for; with `speed.fast` off (tests, bench/) training.OcrTrainer's plain step
    (training.supervised_loss) on packed batches that carry only the sample boundaries.

    split_over (latexocr/memory.py): micro-batches of more tokens run in halves. One process on a GPU
    without CUDA graphs (which need one pass per step) also runs a pass that ran out of memory again in
    halves (training.OcrTrainer.training_step)."""
    trainer_class, collator_options, trainer_options = OcrTrainer, {}, {}
    summary = f"fast path: off (${ENV}), plain transformers training"
    if speed.fast:
        trainer_class, (collator_options, trainer_options, summary) = FastTrainer, plan(
            model, settings, speed, processes=processes, accumulation=accumulation, planned_steps=planned_steps,
            split=split_over is not None)
    elif speed.packed and has_linear_attention(model):  # Qwen3.5 keeps packed samples apart only by these
        collator_options = {"packed_extras": sample_boundaries}
    splits = processes == 1 and torch.cuda.is_available() and not trainer_options.get("cuda_graphs")
    collator = TrainCollator(encoder, packed=speed.packed, split_over=split_over if splits else None,
                             keep_samples=splits, **collator_options)
    trainer = trainer_class(model=model, data_collator=collator, supervised_logits_only=speed.supervised_logits_only,
                            split_on_out_of_memory=splits, **trainer_options, **trainer_kwargs)
    return trainer, summary


def _vision_trains(model) -> bool:
    core = vision_language_core(model)
    return core is not None and any(p.requires_grad for p in core.visual.parameters())


def auto_compile_rule(settings, linear_attention: bool, vision_trains: bool) -> tuple[bool, int]:
    """(measured_setup, from_steps) for should_compile's "auto": whether this setup's compiled step was ever timed,
    and from how many optimizer steps compiling repays itself (fast/compile.py). linear_attention: the model has
    Qwen3.5's linear-attention layers."""
    # not with DeepSpeed or gradient checkpointing, nor Qwen3.5 on transformers' reference delta rule (timed
    # compiled only with fla's), nor the training modes whose compiled step was never timed (a training vision
    # tower, TUNE=full, 4-bit, fp16)
    reference_rule = linear_attention and choose_path()[0] == PADDED
    measured_setup = not (settings.deepspeed or settings.gradient_checkpointing or reference_rule or vision_trains
                          or settings.tune == "full" or settings.quantization != "none" or settings.dtype == "fp16")
    return measured_setup, COMPILE_FROM_STEPS_LINEAR_ATTENTION if linear_attention else COMPILE_FROM_STEPS


def plan(model, settings, speed: SpeedChoices, *, processes: int, accumulation: int,
         planned_steps: int, split: bool = False) -> tuple[dict, dict, str]:
    """Switch the fast path on for `model` as `speed` and train.py's `settings` allow: packed
    text attention, compiled blocks and CUDA graphs where they pay (not when some micro-batches
    run in parts, `split`: a graph replay reuses the previous pass's memory). Returns TrainCollator's
    and FastTrainer's keyword arguments, and a one-line summary to print."""
    packed = speed.packed
    linear_attention = has_linear_attention(model)  # Qwen3.5: keeps packed samples apart by the boundaries
    # a vision tower that trains (TUNE=lora_vision, UNFREEZE_MERGER/VISION) takes the model's own
    # forward: the sync-free step was checked with a frozen tower, and a CUDA graph records no backward
    vision_trains = _vision_trains(model)
    text_attention = (packed and speed.packed_text_attention and speed.attention == "sdpa"
                      and use_packed_text_attention(model))  # flash varlen on GPU: no work on masked-out scores
    measured_setup, from_steps = auto_compile_rule(settings, linear_attention, vision_trains)
    compiled = should_compile(speed.compile, planned_steps, measured_setup, from_steps)
    cuda_graphs = should_use_cuda_graphs(speed.cuda_graphs, compiled, processes, accumulation) and not split
    precomputed = packed and speed.supervised_logits_only and takes_precomputed_vision(model) and not vision_trains
    vision_graphs, parts = None, []
    if text_attention:
        parts.append("packed text attention")
    if precomputed:
        parts.append("sync-free Qwen2-VL step")
    sliced_head = speed.sliced_head and speed.supervised_logits_only and head_can_be_sliced(model)
    if sliced_head:
        parts.append("the loss's vocabulary projection in slices")
    if compiled:
        cache = CompileCache()
        cache.use()
        kernels = not (cuda_graphs and speed.compile_backend == "cudagraphs")
        n = compile_decoder_layers(model, cuda_graphs=cuda_graphs, kernels=kernels)
        # the frozen vision tower as one CUDA graph per padded patch count (Qwen2-VL, packed batches)
        vision_graphs = graph_vision_tower(model) if cuda_graphs and precomputed else None
        graphed = ("LLM blocks and vision tower" if vision_graphs else "LLM blocks") if cuda_graphs else ""
        if kernels:
            # cold, on an H100 / H200: Qwen2-VL-2B ~70 s (run E), Qwen3.5-2B ~140 s (run AC, its blocks in two parts)
            minutes = "~2 min" if linear_attention else "~1 min"
            parts.append(f"compiling {n} blocks{f' ({graphed} as CUDA graphs)' if graphed else ''}: {minutes} in "
                         f"the first steps, less once torch's cache {cache.folder} is warm ({ENV}=compile=off skips it)")
        else:
            parts.append(f"{graphed} as CUDA graphs of their own kernels (no kernels generated): a trace for each "
                         f"new row shape in the first steps, ~30 s for Qwen2-VL-2B on an H100 "
                         f"({ENV}=compile=off skips it)")
    elif speed.compile == "auto" and torch.cuda.is_available():
        unmeasured = " and without DeepSpeed / gradient checkpointing / QLoRA / fp16 / full or vision tuning" + (
            " / transformers' reference delta rule" if linear_attention else "")
        parts.append(f"eager ({ENV} compile=auto compiles from {from_steps} steps"
                     f"{unmeasured if not measured_setup else ''})")
    collator_options = {}
    if packed:
        collator_options["packed_extras"] = PackedExtras(
            text_attention=bool(text_attention) or linear_attention, precomputed_vision=precomputed,
            pad_patches_to_multiple_of=CUDA_GRAPH_PATCH_MULTIPLE if vision_graphs else None)
    elif speed.padded_positions:
        collator_options["padded_positions"] = True
        parts.append("M-RoPE positions from the collator")
    if cuda_graphs:  # few shapes, a graph each: packed rows by the row, padded batches by speed's multiple
        collator_options["pad_to_multiple_of"] = CUDA_GRAPH_ROW_MULTIPLE if packed else speed.padded_graph_multiple
    group_by_length = speed.group_by_length and not packed  # packed rows carry no padding to save
    if group_by_length:
        parts.append("length-grouped batches")
    problems = drift()
    summary = "fast path: " + ("; ".join(parts) or "host-side bookkeeping only") + (
        f". WARNING: {len(problems) - 1} upstream hooks changed ({problems[0]} run "
        f"`pytest tests/test_fast.py -k upstream`)" if problems else "")
    return (collator_options, {"cuda_graphs": cuda_graphs, "vision_graphs": vision_graphs,
                               "group_by_length": group_by_length, "sliced_head": sliced_head}, summary)
