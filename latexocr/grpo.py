"""GRPO after fine-tuning (train.py --method grpo): rollouts, rewards, group advantages, the clipped objective.

Why on the project's own trainer, not TRL's GRPOTrainer. TRL's trainer (read at trl/trainer/grpo_trainer.py)
owns the pieces this project has already made exact and fast, and makes them differently:
- the prompt: TRL renders a dataset's "prompt" column with its own chat-template code and sizes images
  with the processor's defaults; here the prompt and sizing are the sample definition saved with the
  adapter (latexocr/sample.py), which infer.py and SFT read too;
- the batches: TRL scores completions in padded rows (prompts left-, completions right-padded); SFT here
  packs samples into one row with
  per-sample M-RoPE positions (latexocr/batching.py TrainCollator), which the update below reuses as is;
- generation: TRL calls `generate` (or a vLLM server, a second copy of the weights); here rollouts go
  through the static-cache decoder of infer.py (latexocr/fast/decoding.py), extended with sampling;
- the loop: TRL brings its own Trainer subclass, with its own checkpoints, logging and a reference model
  copy unless peft is detected; the SFT run's loop, checkpoints, --resume, SwanLab and callbacks here are
  transformers' Trainer through training.OcrTrainer.
Building on TRL would have meant overriding most of it (dataset format, prompt, collation, generation,
rewards' signature) and adding a dependency. So GrpoTrainer is an OcrTrainer with two hooks:

1. `get_batch_samples` (transformers' public hook that fetches the micro-batches of one optimizer step):
   NUM_GENERATIONS completions per image (temperature / top-p) are sampled for all the step's
   micro-batches of (image, label) pairs together, in as few decoder calls as memory allows (the rows
   per call fitted once, at the first rollout, as infer.py fits BATCH_SIZE=auto): the update passes are
   sized by what a backward pass holds (train.py: a few images each), while the decoder costs about the
   same per token at 16 rows as at hundreds, so one call per micro-batch would multiply the rollout
   time by the accumulation steps. Each micro-batch's completions are then rewarded
   (latexocr/rewards.py) and turned into its update batch: prompt + completion through SFT's own
   TrainCollator (the completion's sampled token ids are the "answer", supervised exactly as sampled)
   with each completion token's group-normalised advantage (a group, one image's completions, lies
   within one micro-batch).
   transformers then counts the step's supervised tokens, i.e. its completion tokens: the loss is
   normalised per token over the whole optimizer step (DAPO), accumulation and processes included,
   by OcrTrainer.compute_loss as for SFT.
2. `step_loss`: per-token log-probabilities of the completion from the model's own forward (logits only
   at completion positions, as SFT's loss), the clipped-ratio objective, and optionally the k3 KL to the
   reference, which is the same model with the adapter switched off (peft's disable_adapter): no
   second model in memory. The reference is the base model, not the SFT adapter GRPO starts from (the
   common LoRA choice: the only one that costs no second adapter).

Each rollout feeds STEPS_PER_ROLLOUT optimizer steps (TRL's num_iterations, GRPO's mu). With 1, the
default, the "old" log-probabilities are the current ones detached: the ratio is 1, the clip never binds
(clip_fraction 0) and the gradient is exactly the policy gradient -A * grad log p. With more, the
rollout's log-probabilities are taken once, without gradients, when it is made; the later steps move
the policy away from them and CLIP_EPSILON bounds how far one token's probability ratio may go. The
rollout cost (generation: most of a step) is then paid once per STEPS_PER_ROLLOUT steps; the prompts
are not read again for those steps, so an epoch reads 1 / STEPS_PER_ROLLOUT of the training set
(MAX_STEPS is the natural way to size a GRPO run).
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from .batching import IGNORE_INDEX, SampleEncoder, TrainCollator, sample_boundaries
from .fast import StaticDecoder, static_decode_supported
from .generation import PREFILL_CHUNK_ROWS, _Collate, _size_order, fit_rows, prefill_pieces
from .images import load_image
from .memory import ADAM_STATE_BYTES, release
from .modeling import is_full_model, peft_wrapping, trainable_in_fp32
from .rewards import Rewards
from .sample import END_OF_TURN
from .fast import plain_text_attention
from .fast.head import head_logprobs, hidden_states_out
from .training import OcrTrainer, supervised_logits

ADVANTAGES_KEY = "completion_advantages"  # one advantage per supervised (completion) token of an update batch
OLD_LOGPROBS_KEY = "completion_old_logprobs"  # with STEPS_PER_ROLLOUT > 1: their log-probabilities at rollout
# the model config's ids of tokens that stand for (or frame) an image: never part of a completion
PLACEHOLDERS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
GRPO_SUFFIX = "-grpo"                     # GRPO writes to OUTPUT_DIR + this, next to the SFT run it starts from


# ---- the pure parts: advantages and the objective -------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), groups = consecutive `group_size` rewards
    (the completions of one image). A group whose rewards are all equal gets advantage 0 everywhere:
    it says nothing about which completion is better, and contributes no gradient."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


def grpo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    epsilon: float = 0.2, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0):
    """Per-token loss of the clipped objective, -min(ratio A, clip(ratio, 1-eps, 1+eps) A) + beta KL,
    with ratio = exp(logprobs - old_logprobs) and the k3 estimate of KL(policy || reference),
    exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased). Returns (loss per token, clipped: where the
    clip took the gradient away, kl per token or None). Summed over the step's tokens and divided by
    their count (OcrTrainer.compute_loss), this is DAPO's token-level normalisation."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    kl = None
    if ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, clipped, kl


def completion_logprobs(model, batch: dict, temperature: float = 1.0, sliced_head: bool = True) -> torch.Tensor:
    """log p(token) of every supervised token of a training batch (in row order), under the model's
    distribution at `temperature` (the one the rollout sampled from); logits only where a label is
    supervised, as SFT's loss computes them, and with `sliced_head` a slice of tokens at a time
    (fast/head.py: a pass of completions holds no [tokens x vocabulary] tensor). `batch` keeps its labels."""
    with hidden_states_out(model, active=sliced_head) as head:
        out, targets = supervised_logits(model, dict(batch))
        if head is not None:
            return head_logprobs(out, head, targets, temperature)
    return torch.log_softmax(out.float() / temperature, -1).gather(1, targets[:, None]).squeeze(1)


# ---- settings --------------------------------------------------------------------------------------
@dataclasses.dataclass
class GrpoSettings:
    """train.py's reinforcement settings, checked (one line each on a wrong value)."""

    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    kl_beta: float = 0.0
    clip_epsilon: float = 0.2
    steps_per_rollout: int = 1
    max_new_tokens: int = 256
    rewards: Rewards | None = None

    def __post_init__(self):
        if self.num_generations < 2:
            raise SystemExit(f"NUM_GENERATIONS={self.num_generations}: GRPO compares completions of one image, "
                             f"it needs at least 2")
        if not self.temperature > 0:
            raise SystemExit(f"TEMPERATURE={self.temperature}: rollouts sample, the temperature must be > 0")
        if not 0 < self.top_p <= 1:
            raise SystemExit(f"TOP_P={self.top_p}: must be in (0, 1]")
        if self.kl_beta < 0 or not 0 < self.clip_epsilon < 1 or self.steps_per_rollout < 1:
            raise SystemExit(f"KL_BETA={self.kl_beta}, CLIP_EPSILON={self.clip_epsilon}, STEPS_PER_ROLLOUT="
                             f"{self.steps_per_rollout}: KL_BETA >= 0, 0 < CLIP_EPSILON < 1, STEPS_PER_ROLLOUT >= 1")


def setup_grpo(args, labels: list[str]) -> GrpoSettings:
    """Check train.py's GRPO settings before any model loads and point the run at its own folder:
    args.init_adapter becomes the adapter to start from (default OUTPUT_DIR/final) and args.output_dir
    OUTPUT_DIR-grpo. `labels`: a few training labels, to call a user reward once."""
    rewards = Rewards(args.reward_weights)  # a bad reward stops first: no folder needed
    rewards.check(labels[:4])
    init = Path(args.init_adapter or Path(args.output_dir) / "final")
    out = Path(str(args.output_dir).rstrip("/\\") + GRPO_SUFFIX)  # next to the SFT run's folder
    if not (init / "adapter_config.json").is_file():
        what = "a full model (TUNE=full), not an adapter" if is_full_model(init) else "no adapter_config.json"
        raise SystemExit(f"INIT_ADAPTER {init}: {what}; GRPO starts from a LoRA adapter (train.py's "
                         f"OUTPUT_DIR/final): train one first, or pass --init-adapter")
    if out.resolve() == init.resolve() or out.resolve() in init.resolve().parents:
        raise SystemExit(f"INIT_ADAPTER {init} is inside GRPO's output folder {out}, which would overwrite it: "
                         f"start from another adapter or choose another OUTPUT_DIR")
    if args.tune != "lora" or args.quantization != "none":
        print(f"note: METHOD=grpo trains the adapter {init} as it was saved; TUNE and QUANTIZATION are ignored")
    args.init_adapter, args.output_dir = str(init), str(out)
    return GrpoSettings(args.num_generations, args.temperature, args.top_p, args.kl_beta, args.clip_epsilon,
                        args.steps_per_rollout, args.max_new_tokens, rewards)


def load_trainable_adapter(model, folder: str):
    """The model with the adapter of `folder` loaded trainable (its own LoRA config: rank, targets,
    modules_to_save), its trainable weights in fp32 as setup_training_mode keeps them."""
    from peft import PeftModel

    with peft_wrapping():
        return trainable_in_fp32(PeftModel.from_pretrained(model, folder, is_trainable=True))


def build_grpo_trainer(model, encoder: SampleEncoder, settings: GrpoSettings, packing: bool,
                       sliced_head: bool = True, **trainer_kwargs) -> tuple["GrpoTrainer", str]:
    """train.py's Trainer for METHOD=grpo and a one-line summary: GrpoTrainer on plain transformers (the
    fast path's compiled blocks and precomputed vision step are SFT's) with SFT's TrainCollator for the
    update batches; packed rows carry their sample boundaries, which linear attention needs. sliced_head:
    the log-probabilities' vocabulary projection a slice at a time (completion_logprobs)."""
    collator = TrainCollator(encoder, packed=packing, packed_extras=sample_boundaries if packing else None)
    trainer = GrpoTrainer(model=model, data_collator=collator, grpo=settings, sliced_head=sliced_head,
                          **trainer_kwargs)
    return trainer, (f"GRPO: {settings.num_generations} completions per image at temperature "
                     f"{settings.temperature}, top-p {settings.top_p}; rewards {settings.rewards.weights}")


# ---- rollouts --------------------------------------------------------------------------------------
class CompletionEncoder(SampleEncoder):
    """The run's SampleEncoder whose answers are token ids: a sampled completion is supervised exactly
    as it was sampled (re-tokenising its text could split it differently), with no end token added (a
    completion that stopped ends with it already; a truncated one has none)."""

    def __init__(self, encoder: SampleEncoder):  # the same prompt, sizing and processor
        self.__dict__.update(encoder.__dict__)

    def answer_ids(self, answer) -> list[int]:
        return list(answer)


@dataclasses.dataclass
class RolloutCollator:
    """A micro-batch of (image_path, label) pairs as rollout prompts, built in the DataLoader workers:
    each readable image `repeats` times in a row, encoded by infer.py's own prompt batching
    (generation._Collate: left-padded chunks of similar sizes with their positions for the static
    decoder, or one batch for `generate`)."""

    encoder: SampleEncoder
    repeats: int
    static: bool  # chunks with positions for the static decoder, else one batch for generate

    def __call__(self, samples) -> dict:
        pairs, images = [], []
        for path, label in samples:
            try:
                images.append(load_image(path, self.encoder.sizing))
            except OSError as exc:
                print(f"warning: skipped sample, {exc}", flush=True)
                continue
            pairs.append((path, label))
        if not pairs:
            raise RuntimeError("every image of a batch failed to load; see the warnings above")
        items = [(k, image, None) for k, image in enumerate(im for im in images for _ in range(self.repeats))]
        collate = _Collate(self.encoder, PREFILL_CHUNK_ROWS if self.static else None, with_positions=self.static)
        _, _, chunks = collate(items)
        return {"pairs": pairs, "prompts": chunks}


def split_completions(tokens: torch.Tensor, stopped: torch.Tensor, stop_ids: list[int],
                      placeholder_ids: set[int] = frozenset()) -> tuple[list[list[int]], list[bool]]:
    """(each row's completion, whether it was truncated) from the decoder's rows x max_new_tokens
    (padded after the stop): the tokens up to and including the first stop token, or all of them.
    A row that samples an image/video placeholder token ends just before it, as truncated: fed back
    with the prompt, the placeholder would ask the model for an image that is not there."""
    completions, truncated = [], []
    for row, done in zip(tokens.tolist(), stopped.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row)) if done else len(row)
        cut = next((i for i, t in enumerate(row[:end]) if t in placeholder_ids), None)
        completions.append(row[:end] if cut is None else row[:cut])
        truncated.append(not done or cut is not None)
    return completions, truncated


def group_chunks(chunks: list[dict], rows: int) -> list[list[dict]]:
    """Consecutive prompt chunks, in order, in groups of at most `rows` rows (one decoder call each);
    a chunk of more rows than that makes a group alone."""
    groups, size = [], 0
    for chunk in chunks:
        n = chunk["input_ids"].shape[0]
        if not groups or size + n > rows:
            groups.append([])
            size = 0
        groups[-1].append(chunk)
        size += n
    return groups


class GrpoTrainer(OcrTrainer):
    """OcrTrainer whose micro-batches are rollouts and whose loss is GRPO's (see the module docstring).

    data_collator: SFT's TrainCollator of the run (packing, sizing, prompt); it builds the update batches,
    while the DataLoader gets a RolloutCollator with the same encoder.
    """

    def __init__(self, *args, grpo: GrpoSettings, data_collator: TrainCollator, sliced_head: bool = True, **kwargs):
        self.grpo, self.sliced_head = grpo, sliced_head
        encoder = data_collator.encoder
        self.update_collator = dataclasses.replace(data_collator, encoder=CompletionEncoder(encoder))
        # the static decoder where it applies (latexocr/fast/decoding.py), else transformers' generate
        self.static = static_decode_supported(kwargs["model"])
        super().__init__(*args, data_collator=RolloutCollator(encoder, grpo.num_generations, self.static), **kwargs)
        tok = self.text_tokenizer = encoder.tokenizer
        self.stop_ids = [tok.convert_tokens_to_ids(END_OF_TURN)] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        config = self._policy().config
        self.placeholder_ids = {getattr(config, name, None) for name in PLACEHOLDERS} - {None}
        self.rollout_rows = None  # rows per decoder call, fitted at the first rollout (the model is on its device)
        self.prefill_rows = PREFILL_CHUNK_ROWS  # rows per prefill call: fewer where that fit found them too many
        self.rollout_stats = defaultdict(list)  # the rewards etc. of the rollout the current step trains on
        self.reused, self.reuse_left = None, 0  # the last rollout's update batches, and steps it still feeds
        self.metrics = defaultdict(list)  # per rollout / update, averaged into the next log line
        self.step_seconds = {"rollout": 0.0, "reward": 0.0}  # of the optimizer step being rolled out

    # ---- rollout ----
    def _policy(self):
        return self.accelerator.unwrap_model(self.model)

    @torch.no_grad()
    def sample(self, batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens: rows x max_new_tokens, stopped: rows) of each micro-batch of prompts, sampled by the
        current policy (eval mode: no dropout). The static decoder takes the prompt chunks of all the
        batches in as few calls as `rollout_rows` allows (its rows come back in chunk order, split here
        by batch); `generate` takes one batch per call."""
        model = self._policy()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            # as generation.predict: plain attention for the KV-cache path, compiled blocks run eagerly
            with plain_text_attention(model), torch.compiler.set_stance("force_eager"):
                if not self.static:
                    return [self._generate(model, batch["prompts"][0].to(device)) for batch in batches]
                if self.rollout_rows is None:
                    self.rollout_rows = self._fit_rollout_rows(model, batches)
                # a new decoder each step: its cache and CUDA graphs, sized for rollout_rows, would
                # otherwise hold memory through the update passes, which were sized without it
                decoder = StaticDecoder(model, self.stop_ids, self.text_tokenizer.pad_token_id, self.grpo.max_new_tokens,
                                        temperature=self.grpo.temperature, top_p=self.grpo.top_p)
                chunks = prefill_pieces([chunk for batch in batches for chunk in batch["prompts"]], self.prefill_rows)
                sampled = [decoder.generate([c.to(device) for c in group])
                           for group in group_chunks(chunks, self.rollout_rows)]
                del decoder
                release()  # the graphs' private pool: the update passes cannot reuse it until given back
        finally:
            model.train(was_training)
        tokens, stopped = torch.cat([t for t, _ in sampled]), torch.cat([s for _, s in sampled])
        rows = [sum(c["input_ids"].shape[0] for c in batch["prompts"]) for batch in batches]
        return list(zip(tokens.split(rows), stopped.split(rows)))

    def _generate(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """sample() through transformers' generate, for models the static decoder does not take."""
        out = model.generate(**batch, do_sample=True, temperature=self.grpo.temperature, top_p=self.grpo.top_p,
                             top_k=0, max_new_tokens=self.grpo.max_new_tokens, eos_token_id=self.stop_ids,
                             pad_token_id=self.text_tokenizer.pad_token_id, use_cache=True)
        tokens = out[:, batch["input_ids"].shape[1]:].cpu()
        tokens = F.pad(tokens, (0, self.grpo.max_new_tokens - tokens.shape[1]), value=self.text_tokenizer.pad_token_id)
        return tokens, torch.isin(tokens, torch.tensor(self.stop_ids)).any(1)

    def _fit_rollout_rows(self, model, batches: list[dict]) -> int:
        """Rows per decoder call: infer.py's memory model (generation.fit_rows, capped at its maximum
        rows) probed on this step's largest images, each NUM_GENERATIONS times up to one prefill chunk
        as the rollout prompts hold them, beside AdamW's moments that the first step has not allocated
        yet. Said in one line."""
        paths = [path for batch in batches for path, _ in batch["pairs"]]
        chunk_rows = max(c["input_ids"].shape[0] for batch in batches for c in batch["prompts"])
        largest = [paths[i] for i in reversed(_size_order(paths)) for _ in range(self.grpo.num_generations)]
        optimizer_state = ADAM_STATE_BYTES * sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows, why, self.prefill_rows = fit_rows(model, self.data_collator.encoder, largest[:chunk_rows],
                                                self.grpo.max_new_tokens, static=True,
                                                batch_setting="MICRO_BATCH_SIZE", reserved_bytes=optimizer_state)
        if self.is_world_process_zero():
            chunks = [chunk for batch in batches for chunk in batch["prompts"]]
            print(f"GRPO rollouts: up to {rows} completions per decoder call, a step's "
                  f"{sum(c['input_ids'].shape[0] for c in chunks)} in {len(group_chunks(chunks, rows))} "
                  f"({why})", flush=True)
        return rows

    def build_update(self, batch: dict, tokens: torch.Tensor, stopped: torch.Tensor) -> dict:
        """One micro-batch's sampled rows -> its update batch: prompt + completion of every sample, packed
        as SFT packs, with ADVANTAGES_KEY. Records the step's reward metrics and seconds."""
        g = self.grpo.num_generations
        pairs = [pair for pair in batch["pairs"] for _ in range(g)]
        start = time.perf_counter()
        completions, truncated = split_completions(tokens, stopped, self.stop_ids, self.placeholder_ids)
        texts = [t.strip() for t in self.text_tokenizer.batch_decode(completions, skip_special_tokens=True)]
        rolled = time.perf_counter()
        total, parts = self.grpo.rewards(texts, [label for _, label in pairs], truncated)
        rewards = torch.tensor(total, dtype=torch.float32)
        advantages = group_advantages(rewards, g)
        self.record(rewards, parts, completions, truncated)
        self.step_seconds["rollout"] += rolled - start
        self.step_seconds["reward"] += time.perf_counter() - rolled
        update = self.update_collator([(path, ids) for (path, _), ids in zip(pairs, completions)])
        lengths = torch.tensor([len(ids) for ids in completions])
        if int((update["labels"] != IGNORE_INDEX).sum()) != int(lengths.sum()):  # an image failed to load again
            raise RuntimeError("an image of the rollout could not be read for the update; see the warning above")
        update[ADVANTAGES_KEY] = advantages.repeat_interleave(lengths)
        return update

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # the prompts of one optimizer step, rolled out; transformers then counts their completion
        # tokens (the update batches' supervised labels) for the step's token-level normalisation
        if self.reuse_left > 0:  # STEPS_PER_ROLLOUT > 1: this rollout feeds another step
            self.reuse_left -= 1
            self.log_step(dict.fromkeys(self.step_seconds, 0.0))
            return self.reused
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.step_seconds = dict.fromkeys(self.step_seconds, 0.0)
        self.rollout_stats = defaultdict(list)
        start = time.perf_counter()
        sampled = self.sample(batches)  # the whole step's completions at once
        self.step_seconds["rollout"] += time.perf_counter() - start
        updates = [self.build_update(batch, tokens, stopped) for batch, (tokens, stopped) in zip(batches, sampled)]
        self.log_step(self.step_seconds)
        if self.grpo.steps_per_rollout > 1:
            for update in updates:
                update[OLD_LOGPROBS_KEY] = self.rollout_logprobs(update)
        self.reused = super().get_batch_samples(iter(updates), len(updates), device)
        self.reuse_left = self.grpo.steps_per_rollout - 1
        return self.reused

    @torch.no_grad()
    def rollout_logprobs(self, update: dict) -> torch.Tensor:
        """The log-probabilities of an update batch's completions under the policy that sampled them
        (in training mode, as the steps that compare against them compute theirs)."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in update.items() if k != ADVANTAGES_KEY}
        return completion_logprobs(self.model, batch, self.grpo.temperature, self.sliced_head).cpu()

    # ---- update ----
    def step_loss(self, model, inputs: dict) -> tuple[torch.Tensor, int]:
        advantages = inputs.pop(ADVANTAGES_KEY)
        old = inputs.pop(OLD_LOGPROBS_KEY, None)
        logprobs = completion_logprobs(model, inputs, self.grpo.temperature, self.sliced_head)
        reference = None
        if self.grpo.kl_beta > 0:
            with torch.no_grad(), self._policy().disable_adapter():
                reference = completion_logprobs(model, inputs, self.grpo.temperature, self.sliced_head)
        old = logprobs.detach() if old is None else old.to(logprobs.dtype)
        loss, clipped, kl = grpo_token_loss(logprobs, old, advantages.to(logprobs.dtype),
                                            self.grpo.clip_epsilon, reference, self.grpo.kl_beta)
        self.metrics["clip_fraction"].append(clipped.float().mean().item())
        if kl is not None:
            self.metrics["kl"].append(kl.mean().item())
        return loss.sum(), loss.numel()

    # ---- logging ----
    def log_step(self, seconds: dict) -> None:
        """What the next log line reports of this optimizer step: its rollout's statistics (the same
        rollout for STEPS_PER_ROLLOUT steps) and the seconds it spent rolling out and rewarding."""
        for name, values in self.rollout_stats.items():
            self.metrics[name] += values
        for name, value in seconds.items():
            self.metrics[f"{name}_seconds"].append(value)

    def record(self, rewards: torch.Tensor, parts: dict, completions: list, truncated: list) -> None:
        groups = rewards.view(-1, self.grpo.num_generations)
        std = groups.std(1)
        m = self.rollout_stats
        m["reward"].append(rewards.mean().item())
        for name, values in parts.items():
            m[f"reward_{name}"].append(sum(values) / len(values))
        m["reward_std"].append(std.mean().item())
        m["zero_std_groups"].append((std == 0).float().mean().item())
        m["completion_length"].append(sum(map(len, completions)) / len(completions))
        m["truncated_rate"].append(sum(truncated) / len(truncated))

    def log(self, logs: dict, start_time=None) -> None:
        # the step's rollout metrics join transformers' loss line (and so SwanLab's train/* charts)
        if "loss" in logs and self.metrics:
            logs.update({name: round(sum(values) / len(values), 4) for name, values in self.metrics.items()})
            self.metrics.clear()
        super().log(logs, start_time)
