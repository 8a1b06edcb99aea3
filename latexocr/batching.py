"""Turning samples into model inputs: training batches (padded or packed) and generation batches.

Everything here runs in DataLoader workers: images are opened, resized and turned into
patches only when a batch is built, so the dataset itself holds nothing but paths and labels.

A training sample is `prompt (system, user, image) + answer + <|im_end|>`; only the answer
and the closing <|im_end|> are supervised (labels of every other token are -100), so the
model learns to stop after the formula.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# The sample encoder lives with the rest of the sample definition; re-exported here.
from .images import load_image
from .sample import END_OF_TURN, IGNORE_INDEX, SampleEncoder  # noqa: F401

# Opt-in trace for tests: with this set to a folder, every training batch's image paths are
# appended (one JSON list per line) to FOLDER/rank{RANK}-pid{pid}.jsonl.
TRACE_ENV = "LATEXOCR_TRACE_BATCHES"

# ---- the keys a packed batch carries beyond the model's own inputs: all of them, in one place ----
# Added by TrainCollator's packed_extras (sample_boundaries below, or the fast path's
# latexocr/fast/vision.py PackedExtras), computed on the CPU in the DataLoader workers.
# The sample boundaries of a packed row, passed to the model as attention kwargs and read by the layers
# that keep samples apart by them: the fast path's packed text attention (latexocr/fast/attention.py
# _packed_causal) and, always, linear attention (latexocr/fast/linear_attention.py: Qwen3.5 has no mask to do it).
CU_SEQLENS_KEY = "packed_cu_seqlens"               # int32 [0, l1, l1+l2, ..., L]: where each sample starts
MAX_LENGTH_KEY = "packed_max_length"               # int: tokens of the longest sample (a bound)
# The sync-free Qwen2-VL step's inputs (latexocr/fast/vision.py precompute_packed adds them,
# fast/trainer.py fast_supervised_loss pops them, vision.py supervised_step_loss reads them). The first three
# (vision_inputs below) also travel with the static decoder's prefill chunks, every family (generation.py's
# collate adds them, fast/standins.py given_vision hands them to the vision tower).
VISION_POSITIONS_KEY = "vision_position_ids"       # (patches, 2) row/column of every patch
VISION_CU_SEQLENS_KEY = "vision_cu_seqlens"        # int32 image boundaries [0, p1, p1+p2, ...]
VISION_MAX_LENGTH_KEY = "vision_max_seqlen"        # int: patches of the longest image (a bound)
IMAGE_POSITIONS_KEY = "image_token_positions"      # long: where the image tokens sit in the row
SUPERVISED_POSITIONS_KEY = "supervised_positions"  # long: positions whose next token is supervised
SUPERVISED_TARGETS_KEY = "supervised_targets"      # long: those next tokens
VISION_PADDING_KEY = "vision_padding"              # int: all-zero patches appended to pixel_values
# Every packed batch of the fast path: read on the host by FastTrainer._track_num_input_tokens.
REAL_TOKENS_KEY = "real_tokens"                    # int: tokens of the row without its padding
PRECOMPUTED_KEYS = (VISION_POSITIONS_KEY, VISION_CU_SEQLENS_KEY, VISION_MAX_LENGTH_KEY, IMAGE_POSITIONS_KEY,
                    SUPERVISED_POSITIONS_KEY, SUPERVISED_TARGETS_KEY, VISION_PADDING_KEY, REAL_TOKENS_KEY)
# A micro-batch over the split size (TrainCollator split_over, latexocr/memory.py) comes as its parts,
# each a whole batch, run one after the other by training.OcrTrainer.training_step; each batch may carry
# its (image path, label) samples, so that a pass that runs out of memory can be rebuilt in halves.
PARTS_KEY = "micro_batch_parts"
SAMPLES_KEY = "samples"


def micro_batch_tokens(lengths: list[int], packed: bool) -> int:
    """The tokens a micro-batch of samples of these lengths puts through the model: their sum when packed,
    rows x the longest when padded. What its activation memory grows with (latexocr/memory.py)."""
    return sum(lengths) if packed else len(lengths) * max(lengths, default=0)


def sample_boundaries(batch: dict, lengths: list[int], max_length: int, real_tokens: int, encoder) -> dict:
    """A TrainCollator packed_extras: the boundaries above (int32 [0, l1, l1+l2, ...]) and the longest sample."""
    return {CU_SEQLENS_KEY: torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32),
            MAX_LENGTH_KEY: max_length}


def _trace_batch(samples) -> None:
    folder = os.environ.get(TRACE_ENV)
    if folder:
        name = f"rank{os.environ.get('RANK', '0')}-pid{os.getpid()}.jsonl"
        with open(os.path.join(folder, name), "a", encoding="utf-8") as f:
            f.write(json.dumps([str(path) for path, _ in samples]) + "\n")


def mrope_positions(mm_token_type_ids: list[int], grid_thw, merge_size: int) -> torch.Tensor:
    """3 x L multimodal RoPE positions of one sample with one image (Qwen2/2.5/3-VL rule).

    Text tokens advance all three axes together; the image's merged patches take
    (t, row, col) offsets from the position where the image starts, and text after the
    image resumes at start + max(rows, cols). Equal to the model's own `get_rope_index`
    (checked in tests), computed here on the CPU so packed batches need no model call.
    """
    types = torch.tensor(mm_token_type_ids)
    length = len(mm_token_type_ids)
    pos = torch.empty(3, length, dtype=torch.long)
    image_idx = (types == 1).nonzero().flatten()
    if len(image_idx) == 0:
        pos[:] = torch.arange(length)
        return pos
    start, end = int(image_idx[0]), int(image_idx[-1]) + 1
    t, h, w = (int(x) for x in grid_thw)
    rows, cols = h // merge_size, w // merge_size
    assert end - start == t * rows * cols, "image tokens do not match image_grid_thw"
    pos[:, :start] = torch.arange(start)
    tt = torch.arange(t).view(-1, 1, 1).expand(t, rows, cols).flatten()
    hh = torch.arange(rows).view(1, -1, 1).expand(t, rows, cols).flatten()
    ww = torch.arange(cols).view(1, 1, -1).expand(t, rows, cols).flatten()
    pos[0, start:end] = start + tt
    pos[1, start:end] = start + hh
    pos[2, start:end] = start + ww
    resume = start + max(t, rows, cols)
    pos[:, end:] = torch.arange(length - end) + resume
    return pos


@dataclass
class TrainCollator:
    """Builds a training batch from (image_path, answer) pairs.

    packed=True concatenates the samples into one row with no padding ("padding-free"):
    per-sample positions restart at 0 (row 0 of the 4 x 1 x L position ids, from which
    transformers builds a block-diagonal causal mask) and per-sample M-RoPE positions
    (rows 1-3). packed=False right-pads to the longest sample, as the tutorial does.
    pad_to_multiple_of rounds the row length up (packed: with an extra all-padding sample), so
    that few distinct shapes occur (CUDA graphs record one graph per shape). packed_extras
    (from the fast path's plan, latexocr/fast/) adds keys to packed batches: called with the
    batch, the samples' lengths (padding segment included), the longest-sample bound, the real
    token count and the encoder; returns the keys to add.
    Samples whose image cannot be read are dropped from the batch with a warning (OcrDataset
    already dropped and counted those whose header cannot be read).
    split_over: a micro-batch of more tokens than this (micro_batch_tokens) comes as two halves (again
    split while over), under PARTS_KEY: the rare batch larger than the one the memory probe measured.
    keep_samples: every batch also carries its samples (SAMPLES_KEY), to be rebuilt in halves after an
    out-of-memory. Both for the one-process SFT step (training.OcrTrainer.training_step), set by train.py.
    padded_positions (from the fast path's plan): padded batches also carry the 3 x rows x length M-RoPE
    position ids the model's get_rope_index would compute (padding 0, as it leaves them), built here on the CPU:
    the model's loop over the samples asks the GPU for ~7 values each (bench/count_syncs.py).
    """

    encoder: SampleEncoder
    packed: bool = True
    pad_to_multiple_of: int | None = None
    packed_extras: Callable | None = None
    split_over: int | None = None
    keep_samples: bool = False
    padded_positions: bool = False

    def __call__(self, samples) -> dict:
        _trace_batch(samples)
        encoded, kept = [], []
        for sample in samples:
            image_path, answer = sample
            try:
                image = load_image(image_path, self.encoder.sizing)
            except OSError as exc:  # includes FileNotFoundError
                print(f"warning: skipped sample, {exc}", flush=True)
                continue
            encoded.append(self.encoder.encode_train(image, answer))
            kept.append(tuple(sample))
        if not encoded:
            raise RuntimeError("every image of a batch failed to load; see the warnings above")
        return self._collate(encoded, kept)

    def _collate(self, encoded: list[dict], samples: list[tuple]) -> dict:
        if (self.split_over is not None and len(encoded) > 1
                and micro_batch_tokens([len(e["input_ids"]) for e in encoded], self.packed) > self.split_over):
            half = len(encoded) // 2
            parts = [self._collate(encoded[:half], samples[:half]), self._collate(encoded[half:], samples[half:])]
            parts = [p for part in parts for p in part.get(PARTS_KEY, [part])]  # flat: one pass each
            return split_batch(parts)
        batch = {
            "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
            "image_grid_thw": torch.cat([e["image_grid_thw"] for e in encoded]),
        }
        if self.packed:
            merge = self.encoder.processor.image_processor.merge_size
            batch["input_ids"] = torch.tensor([sum((e["input_ids"] for e in encoded), [])])
            batch["labels"] = torch.tensor([sum((e["labels"] for e in encoded), [])])
            batch["mm_token_type_ids"] = torch.tensor([sum((e["mm_token_type_ids"] for e in encoded), [])])
            rope_pos = [mrope_positions(e["mm_token_type_ids"], e["image_grid_thw"][0], merge) for e in encoded]
            lengths = [len(e["input_ids"]) for e in encoded]
            max_length, real_tokens = max(lengths), sum(lengths)
            if self.pad_to_multiple_of:
                # Few distinct shapes (CUDA graphs record one graph per shape, ~6 s each on an H100): the
                # row is filled up to the next multiple of N with one extra unsupervised "sample" of 1..N
                # padding tokens (its own attention segment, so it touches no other sample; always
                # present, so the number of segments stays the same), and the longest-sample bound
                # handed to the attention is the row length (a valid bound, and one value per shape).
                fill = self.pad_to_multiple_of - real_tokens % self.pad_to_multiple_of
                pad_id = self.encoder.tokenizer.pad_token_id
                batch["input_ids"] = F.pad(batch["input_ids"], (0, fill), value=pad_id)
                batch["labels"] = F.pad(batch["labels"], (0, fill), value=IGNORE_INDEX)
                batch["mm_token_type_ids"] = F.pad(batch["mm_token_type_ids"], (0, fill), value=0)
                rope_pos.append(torch.arange(fill).expand(3, fill))
                lengths.append(fill)
                max_length = sum(lengths)
            text_pos = torch.cat([torch.arange(n) for n in lengths])
            batch["position_ids"] = torch.cat([text_pos[None], torch.cat(rope_pos, dim=1)])[:, None, :]  # 4 x 1 x L
            if self.packed_extras is not None:
                batch.update(self.packed_extras(batch, lengths, max_length, real_tokens, self.encoder))
        else:
            length = max(len(e["input_ids"]) for e in encoded)
            if self.pad_to_multiple_of:
                length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
            pad_id = self.encoder.tokenizer.pad_token_id

            def pad(key, value):
                return torch.tensor([e[key] + [value] * (length - len(e[key])) for e in encoded])

            batch["input_ids"] = pad("input_ids", pad_id)
            batch["labels"] = pad("labels", IGNORE_INDEX)
            batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
            batch["attention_mask"] = torch.tensor(
                [[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in encoded])
            if self.padded_positions:
                merge = self.encoder.processor.image_processor.merge_size
                positions = torch.zeros(3, len(encoded), length, dtype=torch.long)
                for row, e in enumerate(encoded):
                    positions[:, row, :len(e["input_ids"])] = mrope_positions(e["mm_token_type_ids"],
                                                                              e["image_grid_thw"][0], merge)
                batch["position_ids"] = positions  # 3 rows, as get_rope_index returns them (no text row)
        if self.keep_samples:
            batch[SAMPLES_KEY] = samples
        return batch


def split_batch(parts: list[dict]) -> dict:
    """One micro-batch made of `parts` (whole batches, each one forward + backward pass). Beside them, what
    the Trainer reads from a batch before the step: the labels (it counts the step's supervised tokens,
    the loss's denominator, from them: the parts' together count the same), the input ids and mask
    (tokens seen) and the real token count (the fast path's), each the parts' flattened into one row."""
    batch = {PARTS_KEY: parts}
    for key in ("labels", "input_ids", "attention_mask"):
        if key in parts[0]:
            batch[key] = torch.cat([p[key].flatten() for p in parts])[None]
    if REAL_TOKENS_KEY in parts[0]:
        batch[REAL_TOKENS_KEY] = sum(p[REAL_TOKENS_KEY] for p in parts)
    return batch


def generation_batch(encoder: SampleEncoder, images) -> dict:
    """A left-padded batch of prompts for `generate` (new tokens then line up at the right end)."""
    return encoder.processor(text=[encoder.prompt_text] * len(images), images=list(images),
                             return_tensors="pt", padding=True, padding_side="left")


def vision_inputs(grid_thw: torch.Tensor, merge_size: int) -> dict:
    """The vision tower's inputs that depend on the images' grids alone, computed on the CPU (in the DataLoader
    workers) by the functions the tower calls (transformers' vision_utils), so the same values: the patch
    positions (the tower loops over the images, ~11 small GPU kernels each: ~1,400 a chunk of 128) and the
    attention boundaries and longest image (two GPU->CPU syncs). The static decoder's prefill hands them to the
    tower (fast/standins.py given_vision), as the sync-free packed training step does (fast/vision.py
    precompute_packed)."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids
    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    return {VISION_POSITIONS_KEY: get_vision_position_ids(grid_thw, merge_size), VISION_CU_SEQLENS_KEY: cu_seqlens,
            VISION_MAX_LENGTH_KEY: int(cu_seqlens.diff().max())}
