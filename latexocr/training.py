"""The training pieces train.py puts together: the dataset, the loss, the plain Trainer, the callbacks.

Which trainer and step a run takes is decided in one place: latexocr/fast/trainer.py build_trainer.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections import Counter

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from .batching import IGNORE_INDEX, PARTS_KEY, SAMPLES_KEY, SampleEncoder
from .records import read_labelled
from .images import image_problem
from .sample import is_valid_label, write_sample_definition


class OcrDataset(Dataset):
    """(image_path, label) pairs of a labelled file, checked once up front.

    The check decodes each image once (images.image_problem: ~0.15 ms for a formula PNG) and
    tokenises each label; it drops (and counts, by reason) samples with a missing, empty,
    truncated or undecodable image, an empty label, or more tokens than `max_length` (a sample
    is never cut through its image tokens). `lengths` holds
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
                reason = image_problem(image_path)  # the check csv2json and infer.py make, too
                if reason is None:
                    with Image.open(image_path) as im:
                        size = im.size
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


def supervised_logits(model, batch: dict, supervised_logits_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits: supervised tokens x vocabulary, their targets), in row order; pops batch["labels"].

    Logits are computed only where the next token is supervised (`logits_to_keep`): the answer
    is ~1/3 of a sample, so this skips ~2/3 of the 151,936-wide vocabulary projection and never
    materialises logits for prompt, image or padding tokens. (The fast path's own step for packed
    Qwen2-VL batches is latexocr/fast/vision.py.)
    """
    labels = batch.pop("labels")
    targets = labels[:, 1:]
    keep = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)
    if supervised_logits_only:
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
    else:  # every position's logits, as a plain causal-LM loss does (kept to measure the difference)
        logits = model(**batch, use_cache=False).logits[keep]
    return logits.reshape(-1, logits.shape[-1]), targets[targets != IGNORE_INDEX]


def supervised_loss(model, batch: dict, supervised_logits_only: bool = True) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the supervised tokens (supervised_logits), and their count."""
    return summed_cross_entropy(*supervised_logits(model, batch, supervised_logits_only))


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over the supervised tokens (in fp32), and their count: the loss of one
    forward pass, plain or fast (latexocr/fast/vision.py); OcrTrainer.compute_loss divides it by the step's count."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum"), targets.numel()


class OcrTrainer(Trainer):
    """transformers' Trainer with the supervised-positions-only loss above.

    The loss is normalised by the supervised-token count of the whole optimizer step
    (`num_items_in_batch`, summed over accumulation steps and processes), as transformers
    does for its own causal-LM loss, so micro-batch size and GPU count don't change it.
    The fast path (latexocr/fast/trainer.py) subclasses it and replaces `step_loss`.

    supervised_logits_only: False computes every position's logits (kept to measure the difference);
    vision_learning_rate > 0: the vision tower's (and merger's) trainable weights learn at this rate.
    """

    def __init__(self, *args, supervised_logits_only: bool = True, vision_learning_rate: float = 0.0,
                 split_on_out_of_memory: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.supervised_logits_only = supervised_logits_only
        self.vision_learning_rate = vision_learning_rate
        # one process, batches that carry their samples (TrainCollator keep_samples): see training_step
        self.split_on_out_of_memory = split_on_out_of_memory
        self.out_of_memory = StopOnOutOfMemory()
        self.add_callback(self.out_of_memory)
        self._forward_done = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        """transformers' step, once per pass of the micro-batch (a micro-batch over the split size comes
        in parts: TrainCollator split_over). On one GPU, a pass that runs out of memory (the rare batch
        larger than any probed, another process took memory, fragmentation) is run again once as two
        halves where none of its gradient was added yet (it failed in the forward, or it was the step's
        first pass); else training ends with a checkpoint instead of a traceback (StopOnOutOfMemory).
        Every pass's loss is divided by the whole step's supervised-token count (`num_items_in_batch`,
        counted from the micro-batch's labels before the step), so the parts' gradients and losses add
        up to the unsplit micro-batch's."""
        if self.out_of_memory.hit:  # the rest of that optimizer step's micro-batches
            return torch.zeros((), device=self.args.device)
        if PARTS_KEY in inputs:
            self.out_of_memory.split += 1
            if num_items_in_batch is None:  # each part's own mean would weigh them wrongly: the step's count
                num_items_in_batch = int((inputs["labels"] != IGNORE_INDEX).sum()) * self.current_gradient_accumulation_steps
        return self._passes(model, inputs, num_items_in_batch, retry=self.split_on_out_of_memory)

    def _passes(self, model, inputs, num_items_in_batch, retry: bool):
        parts = inputs.pop(PARTS_KEY, None)
        if parts is not None:
            losses = [self._passes(model, part, num_items_in_batch, retry) for part in parts]
            return torch.stack(losses).sum()
        samples = inputs.pop(SAMPLES_KEY, None)
        if self.out_of_memory.hit:
            return torch.zeros((), device=self.args.device)
        self._forward_done = False
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.out_of_memory.pending = True  # this step's gradients now hold a pass's
            return loss
        except torch.OutOfMemoryError:
            if self.accelerator.num_processes > 1:  # the other processes wait in a collective: no way back
                raise
            clean = not self._forward_done or not self.out_of_memory.pending  # no gradient of this pass added
            if not (retry and clean and samples and len(samples) > 1):
                tokens = inputs["input_ids"].numel() if "input_ids" in inputs else 0
                self.out_of_memory.hit = f"a micro-batch of {tokens} tokens"
                # no update from a partial step: AdamW skips weights without a gradient
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                return torch.zeros((), device=self.args.device)
        # out of the except block: the failed pass's activations, held by the traceback, are freed
        del inputs
        if not self.out_of_memory.pending:
            model.zero_grad(set_to_none=True)  # what the failed backward added, if it got that far
        torch.cuda.empty_cache()
        self.out_of_memory.retried += 1
        half = len(samples) // 2
        return torch.stack([self._passes(model, self.data_collator(part), num_items_in_batch, retry=False)
                            for part in (samples[:half], samples[half:])]).sum()

    def step_loss(self, model, inputs: dict) -> tuple[torch.Tensor, int]:
        """The summed loss of one forward pass and its supervised-token count."""
        return supervised_loss(model, inputs, self.supervised_logits_only)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, n = self.step_loss(model, dict(inputs))
        self._forward_done = True  # an out-of-memory from here on may have added part of a gradient
        if num_items_in_batch is None:
            self.loss_is_scaled_for_ga = False
            loss = loss / max(n, 1)
        else:
            self.loss_is_scaled_for_ga = True
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, None) if return_outputs else loss

    def get_optimizer_cls_and_kwargs(self, args, model=None):
        # transformers' own optimizer choice; with a vision learning rate, its parameter groups
        # (the create_optimizer hook: kwargs["params"]) split in two, the vision side at its own lr
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if self.vision_learning_rate > 0 and model is not None:
            from .modeling import vision_parameter_ids
            vision, decay = vision_parameter_ids(model), set(self.get_decay_parameter_names(model))
            groups = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    key = (id(p) in vision, name in decay)
                    groups.setdefault(key, []).append(p)
            kwargs["params"] = [{"params": params, "weight_decay": args.weight_decay if decayed else 0.0,
                                 **({"lr": self.vision_learning_rate} if is_vision else {})}
                                for (is_vision, decayed), params in sorted(groups.items())]
        return cls, kwargs


class ThroughputCallback(TrainerCallback):
    """Adds samples/s and tokens/s (real tokens, padding excluded) to every log line.

    Time spent in :meth:`excluded` blocks (evaluation inside the training loop) is not training
    time and is left out.
    """

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.last = None
        self.paused = 0.0  # seconds excluded since the last log line

    @contextlib.contextmanager
    def excluded(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)
        if logs is not None and "loss" in logs and self.last is not None and now[1] > self.last[1]:
            dt = max(now[0] - self.last[0] - self.paused, 1e-9)
            logs["samples_per_second"] = round((now[1] - self.last[1]) * self.samples_per_step / dt, 2)
            if now[2]:
                logs["tokens_per_second"] = round((now[2] - self.last[2]) / dt, 1)
            if torch.cuda.is_available():
                # the highest since training began (reset then: before, without an evaluation first, it reported
                # MICRO_BATCH_SIZE=auto's probe of the longest samples, docs/BENCHMARKS.md run P)
                logs["gpu_mem_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                # what the allocator holds from the card now (in use + cached): near the card's limit, memory held
                # by something other than training (a leftover cache or graph pool) shows here
                logs["gpu_mem_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
                # cudaMalloc failures the allocator answered by freeing its whole cache and retrying (a
                # sync each): near a card's limit they cost speed without any error
                logs["gpu_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        if logs is not None and "loss" in logs:
            self.last, self.paused = now, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)
        self.paused = 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


class Fp16OverflowStop(TrainerCallback):
    """With DTYPE=fp16, stops at the first logged loss that is not finite, saying what to use instead.

    Loss scaling skips steps whose gradients overflow, but a forward pass that overflows fp16 (Qwen's
    models were trained in bf16; their activations can exceed fp16's 65504) gives a NaN loss at every
    step: the run would go on learning nothing.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if args.fp16 and loss is not None and not math.isfinite(float(loss)):
            raise SystemExit(f"DTYPE=fp16: the loss is {loss} at step {state.global_step} (fp16 overflow); "
                             f"train with DTYPE=bf16 where the GPU has it, else DTYPE=fp32 or QUANTIZATION=4bit "
                             f"with DTYPE=fp32")


class StopOnOutOfMemory(TrainerCallback):
    """After a step that ran out of GPU memory (OcrTrainer.training_step sets `hit`), saves a checkpoint
    through the Trainer's own save and stops: the weights are those of the last completed update (the
    failed step changed nothing), so --resume with a smaller micro-batch continues the same run."""

    def __init__(self):
        self.hit: str | None = None
        self.pending = False  # a pass of the current optimizer step has added its gradient
        self.split = 0        # micro-batches over the split size, run in parts (TrainCollator split_over)
        self.retried = 0      # passes that ran out of memory and ran again in halves

    def on_step_end(self, args, state, control, **kwargs):
        self.pending = False  # the optimizer step consumed the gradients and zeroed them
        if self.hit:
            control.should_save = True
            control.should_training_stop = True


class SaveSampleDefinition(TrainerCallback):
    """Writes the sample definition (latexocr/sample.py) into every checkpoint, for infer.py and --resume."""

    def __init__(self, output_dir, definition: dict):
        self.output_dir, self.definition = output_dir, definition

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_sample_definition(f"{self.output_dir}/checkpoint-{state.global_step}", self.definition)


class EvaluateEvery(TrainerCallback):
    """Calls evaluate(step) every `steps` optimizer steps (not at the last one: train.py scores the end)."""

    def __init__(self, steps: int, evaluate):
        self.steps, self.evaluate = steps, evaluate

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps > 0 and state.global_step % self.steps == 0 and state.global_step < state.max_steps:
            self.evaluate(state.global_step)


class SaveOnInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) ends training at the end of the current optimizer step with a checkpoint
    (`--resume` continues from it), through the Trainer's own save: `interrupted` then says so.
    A second Ctrl-C stops at once, as usual (KeyboardInterrupt, no checkpoint)."""

    def __init__(self):
        self.interrupted = False
        self._previous, self._pid = None, None

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked DataLoader worker inherited the handler: the main process decides
            return
        if self.interrupted:  # the second Ctrl-C: the user does not want to wait for the step
            raise KeyboardInterrupt
        self.interrupted = True
        print("\ninterrupted: saving a checkpoint at the end of this step (Ctrl-C again to stop now) ...",
              flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        # a process started with SIGINT ignored (nohup, a background job) keeps ignoring it
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._pid = os.getpid()
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
