"""The training pieces train.py puts together: the dataset, the loss, the Trainer, throughput logging."""
from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from .batching import IGNORE_INDEX, SampleEncoder
from .records import read_labelled
from .sample import is_valid_label
from .fast.vision import (PRECOMPUTED_KEYS, REAL_TOKENS_KEY, VISION_PADDING_KEY, VisionGraphs, supervised_step_loss,
                     takes_precomputed_vision)


class OcrDataset(Dataset):
    """(image_path, label) pairs of a labelled file, checked once up front.

    The check reads only each image's header and tokenises each label, so it is fast; it drops
    (and counts, by reason) samples with a missing/unreadable image, an empty label, or more
    tokens than `max_length` (a sample is never cut through its image tokens). `lengths` holds
    each kept sample's token count.
    """

    def __init__(self, path, encoder: SampleEncoder, max_length: int):
        self.samples, self.lengths = [], []
        self.skipped: Counter = Counter()
        self.examples_skipped: dict[str, str] = {}
        pairs = read_labelled(path)
        answers = [label if is_valid_label(label) else "" for _, label in pairs]
        answer_lens = [len(ids) + 1 for ids in encoder.tokenizer(answers, add_special_tokens=False).input_ids]
        for (image_path, label), answer_len in zip(pairs, answer_lens):
            reason = None
            if not is_valid_label(label):
                reason = "empty or missing label"
            else:
                try:
                    with Image.open(image_path) as im:
                        size = im.size
                except FileNotFoundError:
                    reason = "image not found"
                except Exception:
                    reason = "unreadable image"
            if reason is None:
                length = encoder.prompt_text_tokens + encoder.image_tokens(*size) + answer_len
                if length > max_length:
                    reason = f"longer than max_length={max_length} tokens"
            if reason:
                self.skipped[reason] += 1
                self.examples_skipped.setdefault(reason, image_path)
                continue
            self.samples.append((image_path, label))
            self.lengths.append(length)
        if not self.samples:
            raise ValueError(f"{path}: no usable samples ({self.report()})")

    def report(self) -> str:
        if not self.skipped:
            return "no samples skipped"
        return "skipped " + ", ".join(f"{n} ({reason}, e.g. {self.examples_skipped[reason]})"
                                      for reason, n in self.skipped.items())

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def supervised_loss(model, batch: dict, supervised_logits_only: bool = True,
                    vision_graphs: VisionGraphs | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the supervised tokens, and their count.

    Logits are computed only where the next token is supervised (`logits_to_keep`): the answer
    is ~1/3 of a sample, so this skips ~2/3 of the 151,936-wide vocabulary projection and never
    materialises logits for prompt, image or padding tokens. Packed batches of a Qwen2-VL model
    take the sync-free path of latexocr/vision.py (its vision tower replayed by `vision_graphs`).
    """
    precomputed = {k: batch.pop(k) for k in PRECOMPUTED_KEYS if k in batch}
    if precomputed and supervised_logits_only and takes_precomputed_vision(model):
        return supervised_step_loss(model, {**batch, **precomputed}, vision_graphs)
    if precomputed.get(VISION_PADDING_KEY):
        raise ValueError("pixel_values were padded (TrainCollator(pad_patches_to_multiple_of=...)) for a model "
                         "whose vision tower cannot take the padding (only Qwen2-VL can)")
    labels = batch.pop("labels")
    targets = labels[:, 1:]
    keep = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)
    if supervised_logits_only:
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
    else:  # every position's logits, as a plain causal-LM loss does (kept to measure the difference)
        logits = model(**batch, use_cache=False).logits[keep]
    targets = targets[targets != IGNORE_INDEX]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum")
    return loss, targets.numel()


class NoLoraInputCast:
    """While active, peft's LoRA layers skip casting their input to the adapter's dtype.

    Under bf16 autocast that cast is a full fp32 copy of every LoRA input for nothing (autocast
    casts back). peft.helpers.disable_input_dtype_casting does the same but walks all ~2,700
    modules of the 2B model (named_modules) twice per call; this finds the LoRA layers once.
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
    only. Returns those parameters (for clipping).
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


class OcrTrainer(Trainer):
    """transformers' Trainer with the supervised-positions-only loss above.

    The loss is normalised by the supervised-token count of the whole optimizer step
    (`num_items_in_batch`, summed over accumulation steps and processes), as transformers
    does for its own causal-LM loss, so micro-batch size and GPU count don't change it.

    Some of transformers' per-step bookkeeping is replaced by host-side equivalents: each call made
    the host wait for the GPU, or walk the whole model, at every step, so the host could not queue
    the next step while the GPU worked (docs/BENCHMARKS.md): `_track_num_input_tokens`,
    `floating_point_ops` and `_clip_grad_norm` below, `skip_redundant_module_walks` above (set
    `_trainable` to its result), `logging_nan_inf_filter=False` in train.py.
    """

    supervised_logits_only = True
    cuda_graphs = False  # the LLM blocks replay as CUDA graphs (latexocr.speed.compile_decoder_layers)
    vision_graphs = None  # the vision tower replays as CUDA graphs (latexocr.vision.VisionGraphs)
    _no_lora_input_cast = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Under bf16 autocast, peft's cast of every LoRA input to the fp32 adapter dtype is a
        # full copy of the activations for nothing (autocast casts back): switch it off.
        if self._no_lora_input_cast is None:
            self._no_lora_input_cast = NoLoraInputCast(self.accelerator.unwrap_model(model))
        if self.cuda_graphs:  # a new forward pass: the graphs may reuse the previous pass's output memory
            torch.compiler.cudagraph_mark_step_begin()
        with self._no_lora_input_cast(active=self.args.bf16 or self.args.fp16):
            loss, n = supervised_loss(model, dict(inputs), self.supervised_logits_only, self.vision_graphs)
        if num_items_in_batch is None:
            self.loss_is_scaled_for_ga = False
            loss = loss / max(n, 1)
        else:
            self.loss_is_scaled_for_ga = True
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, None) if return_outputs else loss

    _trainable = None

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


class ThroughputCallback(TrainerCallback):
    """Adds samples/s and tokens/s (real tokens, padding excluded) to every log line."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.last = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)
        if logs is not None and "loss" in logs and self.last is not None and now[1] > self.last[1]:
            dt = now[0] - self.last[0]
            logs["samples_per_second"] = round((now[1] - self.last[1]) * self.samples_per_step / dt, 2)
            if now[2]:
                logs["tokens_per_second"] = round((now[2] - self.last[2]) / dt, 1)
            if torch.cuda.is_available():
                logs["gpu_mem_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.last = now

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)
