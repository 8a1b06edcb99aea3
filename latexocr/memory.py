"""What fits on the card: the micro-batch and gradient checkpointing of training, and the rows of a
generation batch, chosen from a measurement on the card (never from its name).

Training (`fit_training_batch`): a probe step (forward + backward, the step the trainer runs:
fast/trainer.py probe_step_loss) on a large batch
of the run, real samples holding the tokens of the PERCENTILE-th of the run's random micro-batches
(memory grows with a micro-batch's tokens: batching.micro_batch_tokens), at each candidate micro-batch
from the largest down; the first that fits without gradient checkpointing, and a larger one with it
where that fits, are timed, and checkpointing wins only where it measured clearly faster per token
(CHECKPOINTING_MARGIN). Fits means: the probe's peak plus the
optimizer's state (AdamW keeps two moments of every trainable weight, not yet allocated when the probe
runs) within the memory this process can use, less MARGIN (fragmentation, what the probe did not see).
Requiring the worst batch the data can produce (its longest samples) to fit would cost speed on every
step for a batch the run may never meet (docs/BENCHMARKS.md, run M: the 8 longest samples hold twice
the tokens of a typical 8): instead the chosen setting is probed once more on that worst batch, and
where it does not fit, a micro-batch of more tokens than the budget holds at the probed batch's bytes per
token runs in halves (the rare batch;
batching.TrainCollator split_over, the loss and gradients unchanged: training.OcrTrainer.training_step),
and a pass that still runs out of memory runs again in halves before the run stops with a checkpoint.
With several processes (whose gradient exchange needs one pass per micro-batch everywhere) the worst
batch itself is probed, as the rule for all.

Generation (`generation.fit_rows`, with `choose_generation_rows` here): a memory model calibrated by
one probe. The static decoder's cache grows linearly with the rows (keys/values or linear-attention
states, decoding.bytes_per_row), computed from the config; what does not grow with them, the prefill
of one chunk of the largest images, is measured.

A value the user gives wins; on the CPU nothing is probed (host memory is not what runs out).
"""
from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass

import torch

MARGIN = 0.10           # of the usable memory, kept free
TIMED_PASSES = 3        # timed probe passes after the warm-up one; the fastest counts (interference only adds time)
# Checkpointing must measure this much faster per token before it is chosen: one probe's timing varies by
# ~15 % between runs (docs/BENCHMARKS.md run O: on a 16 GiB card the plain micro-batch 8 trained 25 % faster
# than 16 + checkpointing, while single probes ranked them anywhere from 0.92x to 1.24x)
CHECKPOINTING_MARGIN = 0.15
PERCENTILE = 0.90       # the probed micro-batch holds the tokens of this quantile of the run's random ones
MAX_GENERATION_ROWS = 512  # the largest generation batch "auto" picks (docs/BENCHMARKS.md: no gain above)
ADAM_STATE_BYTES = 8    # exp_avg + exp_avg_sq, fp32, per trainable weight (trainable weights are fp32)

AUTO = "auto"


def parse_auto(value, name: str, kind=int, minimum: int = 1):
    """None for "auto", else the value as `kind` (an int setting of at least `minimum`, or on/off/true/false
    for a bool one); a wrong value stops with one line naming the setting."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("on", "true", "1", "yes"):
            return True
        if text in ("off", "false", "0", "no"):
            return False
    else:
        try:
            number = int(value)
            if number >= minimum:
                return number
        except (TypeError, ValueError):
            pass
    flag = "--" + name.lower().replace("_", "-")
    allowed = "auto, on or off" if kind is bool else f"auto or a whole number >= {minimum}"
    raise SystemExit(f"{name} ({flag}) must be {allowed}, not {value!r}")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def usable_bytes(device=None) -> int:
    """The memory this process can allocate: what the card has free plus what torch already holds,
    within the per-process cap (torch.cuda.set_per_process_memory_fraction)."""
    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    return int(min(free + held, total * fraction))


def release(collect: bool = True) -> None:
    """Give back what a probe (or a failed step) left in torch's cache. collect: first free what only Python's
    cycle collector can (the frames of a caught out-of-memory error, which hold the failed pass's tensors);
    a full collection walks every object the imports made (~0.2 s with transformers and torch loaded, this
    2-core box), so a probe that caught no error leaves it out."""
    if collect:
        gc.collect()
    torch.cuda.empty_cache()


def divisors_descending(n: int) -> list[int]:
    return [m for m in range(n, 0, -1) if n % m == 0]


# ---- training ------------------------------------------------------------------------------------
@dataclass
class Probe:
    """One probe step: its micro-batch, checkpointing, peak bytes (optimizer state added), seconds, and
    the batch's tokens (the longest samples: a batch of 16 of them holds fewer per sample than one of 8)."""

    micro: int
    checkpointing: bool
    peak: int | None          # None: ran out of memory
    seconds: float = 0.0
    tokens: int = 0           # real tokens (what the cost divides by)
    size: int = 0             # batching.micro_batch_tokens of the batch (padding included): a larger one is split
    base: int = 0             # bytes held before the probe's batch (weights, optimizer state added): what does not grow

    @property
    def cost(self) -> float:
        """Seconds per token (per sample where tokens are unknown): what the comparison ranks."""
        return self.seconds / (self.tokens or self.micro)


@dataclass
class Choice:
    micro: int
    checkpointing: bool
    reason: str
    split_over: int | None = None  # micro-batches of more tokens than this run in halves (TrainCollator)
    tokens: int = 0                # the probed batch's size (micro_batch_tokens) that fitted
    peak: int = 0                  # the bytes that batch needed (optimizer state added); 0: not probed
    base: int = 0                  # of which held before it (Probe.base)
    budget: int = 0                # the bytes training may use (after MARGIN)

    def tokens_within_budget(self) -> int:
        """The tokens a batch may hold within the budget, the memory growing linearly with a batch's tokens
        from the probed one (base + tokens x its measured bytes per token); never fewer than were probed.
        Where the candidates stopped below what the card holds (BATCH_SIZE), this is more: GRPO's update
        passes are sized by it (run O2: the probe's 14.9k tokens took 99 GiB of 125 usable)."""
        if not (self.tokens and self.budget) or self.peak <= self.base:
            return self.tokens
        return max(self.tokens, int(self.tokens * (self.budget - self.base) / (self.peak - self.base)))


class DoesNotFit(SystemExit):
    """Nothing fits: the message names what to change."""


def choose_training_batch(candidates: list[int], probe, budget: int, checkpointing: bool | None = None,
                          worst_probe=None) -> Choice:
    """The fastest (micro-batch, checkpointing) whose probe fits `budget` bytes.

    candidates: micro-batch sizes, largest first; probe(micro, checkpointing) -> Probe, on a large
    batch of the run. worst_probe(micro, checkpointing) -> Probe on the worst batch of the data: run
    once for the choice; where that does not fit, Choice.split_over is the tokens the budget holds at the
    probed batch's bytes per token (Choice.tokens_within_budget; None:
    `probe` itself is the worst batch).
    checkpointing: None (auto) or the user's choice. Without checkpointing the largest fitting
    micro-batch is taken; with auto, checkpointing at a larger micro-batch is probed too (it
    recomputes the forward, ~1/3 more work, but a larger batch keeps the GPU busier) and wins where it
    measured faster per token by more than CHECKPOINTING_MARGIN (per token: the probed batches differ
    in tokens per sample; the margin: a probe's timing noise).
    """
    tried: list[Probe] = []

    def largest_fitting(with_checkpointing: bool, above: int = 0) -> Probe | None:
        for micro in candidates:
            if micro <= above:
                return None
            result = probe(micro, with_checkpointing)
            tried.append(result)
            if result.peak is not None and result.peak <= budget:
                return result
        return None

    plain = None if checkpointing else largest_fitting(False)
    recompute = None
    if checkpointing or (checkpointing is None and (plain is None or plain.micro < candidates[0])):
        recompute = largest_fitting(True, above=plain.micro if plain else 0)
    fitting = [p for p in (plain, recompute) if p is not None]
    if not fitting:
        smallest = min(tried, key=lambda p: p.peak or float("inf"), default=None)
        seen = (f"the smallest probe (micro-batch {smallest.micro}{', checkpointing' if smallest.checkpointing else ''}) "
                f"needs {gib(smallest.peak)}" if smallest and smallest.peak else "every probe ran out of memory")
        raise DoesNotFit(f"out of GPU memory: {seen} of the {gib(budget)} this GPU can give training; "
                         f"use --quantization 4bit (QLoRA), a shorter --max-length, smaller images "
                         f"(--image-max-pixels), or a GPU with more memory")
    clear_win = recompute is not None and (plain is None or recompute.cost < plain.cost * (1 - CHECKPOINTING_MARGIN))
    best = recompute if clear_win else plain
    # with what was held before each batch and the batch's size (run Y's Qwen3.5-2B probe said 12.8 GiB where
    # training peaked at 9.56: its batch of long samples held twice training's supervised tokens, whose logits
    # the probe's step then kept; the trainer's step, which it now runs, keeps none: fast/head.py)
    timings = ", ".join(f"micro-batch {p.micro}{' + checkpointing' if p.checkpointing else ''}: "
                        f"{gib(p.peak)} ({gib(p.base)} held before it, {p.size} tokens), "
                        f"{p.tokens / p.seconds / 1000:.1f}k tokens/s" for p in fitting)
    measured = dict(budget=budget, base=best.base)
    if worst_probe is None:
        return Choice(best.micro, best.checkpointing,
                      f"{gib(budget)} usable (after a {MARGIN:.0%} margin); worst-case batch probed: {timings}",
                      tokens=best.size, peak=best.peak, **measured)
    reason = f"{gib(budget)} usable (after a {MARGIN:.0%} margin); a {PERCENTILE:.0%}-percentile batch probed: {timings}"
    worst = worst_probe(best.micro, best.checkpointing)
    if worst.peak is not None and worst.peak <= budget:
        larger = max((best, worst), key=lambda p: p.size)
        return Choice(best.micro, best.checkpointing, f"{reason}; the longest samples fit too ({gib(worst.peak)})",
                      tokens=larger.size, peak=larger.peak, budget=budget, base=larger.base)
    needs = f"needs {gib(worst.peak)}" if worst.peak else "runs out of memory"
    choice = Choice(best.micro, best.checkpointing, "", tokens=best.size, peak=best.peak, **measured)
    # the split line: the tokens the budget holds at the probed batch's bytes per token, not the probed batch
    # itself (run P: 7 of 40 micro-batches over the probed 1367 tokens ran in halves at a 16 GiB cap, while
    # the hand setting ran them whole); a pass that still runs out of memory runs again in halves
    choice.split_over = choice.tokens_within_budget()
    choice.reason = (f"{reason}; the longest samples' batch {needs}: micro-batches over {choice.split_over} tokens "
                     f"run in two halves")
    return choice


def set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing on or off (the non-reentrant kind: works with packing and LoRA)."""
    owner = _input_grads_owner(model)
    if on:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # a frozen embedding's output must carry grad through the blocks. transformers 5.24/5.25 registers that
        # hook itself, and a second enable would orphan it (its handle overwritten, never removed): training
        # after a checkpointing probe kept grad flowing into the embeddings (tests/test_memory.py). Exactly one,
        # and only where a trainable block sits above it (_input_grads_owner).
        model.disable_input_require_grads()
        owner.disable_input_require_grads()
        owner.enable_input_require_grads()
    elif model.is_activation_checkpointing:
        model.activation_checkpointing_disable()
        model.disable_input_require_grads()
        owner.disable_input_require_grads()


def _input_grads_owner(model):
    """The module whose input embeddings must carry grad under checkpointing: the language model alone where the
    vision tower's blocks are frozen (LoRA on the language model, the default; a trained merger needs no grad from
    below it), else the whole model. transformers hooks every embedding, the tower's patch embedding too: the
    frozen tower then ran its backward, and its checkpointed blocks their forward again, every step."""
    from .modeling import mergers_of, vision_language_core, vision_tower_of
    core = vision_language_core(model)
    if core is None:
        return model
    mergers = {id(p) for _, merger in mergers_of(model) for p in merger.parameters()}
    if any(p.requires_grad and id(p) not in mergers for p in vision_tower_of(model)[1].parameters()):
        return model
    return core.language_model


def worst_case_samples(lengths: list[int], micro: int) -> list[int]:
    """Indices of the `micro` longest samples: the largest batch (tokens and image patches) the data can produce."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])[:micro]


def percentile_samples(lengths: list[int], micro: int, packed: bool, percentile: float = PERCENTILE,
                       draws: int = 2000, seed: int = 0) -> list[int]:
    """Indices of `micro` real samples whose batch holds the `percentile`-th quantile of the tokens
    (micro_batch_tokens) of the run's micro-batches, uniform random draws of `micro` samples as the
    shuffled DataLoader makes them, and at least the longest sample's (a single sample cannot be split).
    Of the windows of `micro` consecutive samples in length order, whose sizes grow with the window's
    start, the first that holds that many tokens."""
    from .batching import micro_batch_tokens

    micro = min(micro, len(lengths))
    if percentile >= 1:
        return worst_case_samples(lengths, micro)
    rng = random.Random(seed)
    picks = range(len(lengths))
    sizes = sorted(micro_batch_tokens([lengths[i] for i in rng.sample(picks, micro)], packed) for _ in range(draws))
    target = max(sizes[min(draws - 1, int(percentile * draws))], max(lengths))
    order = sorted(picks, key=lengths.__getitem__)
    lo, hi = 0, len(order) - micro  # the last window (the longest samples) holds at least the target
    while lo < hi:
        mid = (lo + hi) // 2
        if micro_batch_tokens([lengths[i] for i in order[mid:mid + micro]], packed) >= target:
            hi = mid
        else:
            lo = mid + 1
    return order[lo:lo + micro]


def training_step_probe(model, dataset, collator, step_loss, extra_bytes: int, percentile: float = PERCENTILE,
                        timed_passes: int = TIMED_PASSES, autocast_dtype: torch.dtype | None = None):
    """probe(micro, checkpointing) for choose_training_batch: one warm-up and `timed_passes` timed forward +
    backward passes (the fastest counts) of `step_loss(model, batch) -> (summed loss, count)` on a
    `percentile` batch of the run (percentile_samples; 1: the worst batch, the longest samples). The peak
    is the passes' highest (from the second on, the gradients are held too). autocast_dtype: the forward
    under torch.autocast in it, as the Trainer's (accelerate's) forward runs with bf16 / fp16 on: without it
    the fp32 LoRA weights and Qwen3.5's fp32 delta rule keep fp32 activations training does not (run X: the
    probe put Qwen3.5-2B's batch at 12.8 GiB, training peaked at 9.56)."""
    from .batching import micro_batch_tokens

    device = next(model.parameters()).device

    def probe(micro: int, checkpointing: bool) -> Probe:
        set_checkpointing(model, checkpointing)
        picked = percentile_samples(dataset.lengths, micro, collator.packed, percentile)
        batch = collator([dataset[i] for i in picked])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        release()
        base = torch.cuda.memory_allocated(device) + extra_bytes  # the weights (and this batch's inputs)
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        try:
            for _ in range(1 + timed_passes):  # the first pays for kernel selection and workspaces
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
                    loss, count = step_loss(model, dict(batch))
                (loss / max(count, 1)).backward()
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
                loss = None
            peak = torch.cuda.max_memory_allocated(device) + extra_bytes
        except torch.OutOfMemoryError:
            peak = None
        finally:
            model.zero_grad(set_to_none=True)
            loss = None
            release()
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        seconds = min(times[1:]) if len(times) > 1 else 0.0
        return Probe(micro, checkpointing, peak, seconds, tokens,
                     size=micro_batch_tokens([dataset.lengths[i] for i in picked], collator.packed), base=base)

    return probe


def fit_training_batch(model, dataset, collator, step_loss, candidates: list[int],
                       checkpointing: bool | None = None, processes: int = 1,
                       autocast_dtype: torch.dtype | None = None) -> Choice:
    """The micro-batch among `candidates` (largest first) and checkpointing (unless given) for this GPU;
    see the module docstring. processes > 1: the worst batch must fit (no pass is split). autocast_dtype:
    the training forward's (training_step_probe)."""
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = trainable * ADAM_STATE_BYTES
    budget = int(usable_bytes() * (1 - MARGIN))
    if processes > 1:
        probe = training_step_probe(model, dataset, collator, step_loss, extra, percentile=1.0,
                                    autocast_dtype=autocast_dtype)
        choice = choose_training_batch(candidates, probe, budget, checkpointing)
    else:
        probe = training_step_probe(model, dataset, collator, step_loss, extra, autocast_dtype=autocast_dtype)
        worst = training_step_probe(model, dataset, collator, step_loss, extra, percentile=1.0, timed_passes=1,
                                    autocast_dtype=autocast_dtype)  # its peak only
        choice = choose_training_batch(candidates, probe, budget, checkpointing, worst_probe=worst)
    set_checkpointing(model, choice.checkpointing)
    return choice


def grpo_images_per_pass(probed_tokens: int, share: int, generations: int, longest_sample: int,
                         max_new_tokens: int) -> int:
    """Images per GRPO update pass: a pass holds `generations` completions per image, each a prompt (at
    most the longest SFT sample) plus up to `max_new_tokens`; a pass may hold `probed_tokens` (the SFT
    probe's Choice.tokens_within_budget: a GRPO pass measured fewer bytes per token than SFT's batch,
    run O2). The largest divisor of this process's `share` of the images per step that stays within it
    (1 at least: the OOM path names the setting if even that fails)."""
    per_image = generations * (longest_sample + max_new_tokens)
    fits = max(1, probed_tokens // per_image)
    return next(m for m in divisors_descending(share) if m <= fits)


# ---- generation ----------------------------------------------------------------------------------
def choose_generation_rows(fixed_bytes: int, per_row_bytes: int, budget: int, largest: int) -> int:
    """The most rows (a multiple of 8 up to `largest`, or fewer below 8) whose memory model fits."""
    rows = max(0, (budget - fixed_bytes) // max(per_row_bytes, 1))
    rows = min(int(rows), largest)
    return rows if rows < 8 else rows - rows % 8


def balanced_rows(count: int, most: int) -> int:
    """Rows per generation batch for `count` images when `most` fit: as few batches as `most` allows, made
    even (a multiple of 8 above 8). A last batch of a few rows costs a whole decode loop (run Q, Qwen3.5-2B
    at 16 GiB: 15 batches of 136 rows and one of 8, where 16 of 128 fit). Where one batch holds them all,
    `most` itself (a batch of whole prefill chunks: the loader's chunks built before the probe are used)."""
    if count <= most or most < 1:
        return most
    batches = -(-count // most)
    rows = -(-count // batches)
    return min(most, -(-rows // 8) * 8) if rows > 8 else rows


def out_of_memory_message(setting: str, value: int, what: str) -> str:
    """One line for an out-of-memory that still happened: the setting to lower and a value that would fit."""
    flag = "--" + setting.lower().replace("_", "-")
    lower = max(1, value // 2)
    if value > 1:
        return f"out of GPU memory {what} at {setting}={value}: run again with {flag} {lower}"
    return (f"out of GPU memory {what} at {setting}=1: use --quantization 4bit (QLoRA), a shorter "
            f"--max-length or smaller images (--image-max-pixels)")
