"""A packed training step without GPU->CPU syncs: the image features computed before the language model.

transformers' Qwen2-VL forward derives the vision tower's patch positions and attention boundaries
from `image_grid_thw` with per-image loops on the GPU and `.tolist()` / `.item()` syncs, splits the
features per image (another `.tolist()`), checks the image-token count (another sync) and scatters
the features by a boolean mask; a boolean `logits_to_keep` and label mask add two more. Each sync
empties the GPU's queue while the host is the slower side (docs/BENCHMARKS.md). The packed collator
knows all of it on the CPU already, so it passes (keys declared in latexocr/batching.py):

* the vision tower's inputs, which transformers' `vision_utils` pops from the kwargs instead of
  computing them: patch positions, attention boundaries, the longest image;
* the row positions of the image tokens, where the features are copied;
* the row positions whose next token is supervised, and those tokens.

`supervised_step_loss` then runs the step without a sync; `VisionGraphs` replays the whole vision
tower (frozen, forward only) as one CUDA graph per padded patch count.
Only the Qwen2-VL architecture takes this path (`takes_precomputed_vision`); Qwen2.5-VL (window
attention) and Qwen3-VL (deepstack features) use the model's own forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..batching import (CU_SEQLENS_KEY, IMAGE_POSITIONS_KEY, MAX_LENGTH_KEY, PRECOMPUTED_KEYS,  # noqa: F401
                        REAL_TOKENS_KEY, SUPERVISED_POSITIONS_KEY, SUPERVISED_TARGETS_KEY, VISION_CU_SEQLENS_KEY,
                        VISION_MAX_LENGTH_KEY, VISION_PADDING_KEY, VISION_POSITIONS_KEY, sample_boundaries,
                        vision_inputs)
from ..modeling import vision_language_core
from ..training import summed_cross_entropy
from .attention import PACKED_VISION_ATTENTION
from .compile import record_graph, warm_up_off_capture


def precompute_packed(input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor,
                      grid_thw: torch.Tensor, merge_size: int, image_token_id: int, real_tokens: int,
                      pad_patches_to_multiple_of: int | None = None, ignore_index: int = -100) -> dict:
    """The precomputed step's keys (latexocr/batching.py) for one packed row (CPU tensors), and
    `pixel_values` padded if asked.

    pad_patches_to_multiple_of adds 4..N all-zero patches as one extra image segment (its own
    attention block, never scattered into the text), so that few distinct patch counts occur
    (one CUDA graph each), and sets the longest-image bound to the total (one value per count).
    """
    given = vision_inputs(grid_thw, merge_size)
    positions, cu_seqlens, max_seqlen = (given[k] for k in (VISION_POSITIONS_KEY, VISION_CU_SEQLENS_KEY,
                                                            VISION_MAX_LENGTH_KEY))
    fill = 0
    image_positions = (input_ids[0] == image_token_id).nonzero().flatten()
    if len(image_positions) * merge_size**2 != pixel_values.shape[0]:
        raise ValueError(f"{len(image_positions)} image tokens in the row but {pixel_values.shape[0]} patches "
                         f"(expected {merge_size**2} patches per token)")
    if pad_patches_to_multiple_of:
        step = pad_patches_to_multiple_of
        group = merge_size**2  # the merger folds groups of merge x merge patches: keep them whole
        if step % group:
            raise ValueError(f"pad_patches_to_multiple_of must be a multiple of {group}")
        fill = step - pixel_values.shape[0] % step
        pixel_values = F.pad(pixel_values, (0, 0, 0, fill))
        positions = F.pad(positions, (0, 0, 0, fill))
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + fill])
        max_seqlen = pixel_values.shape[0]
    targets = labels[0, 1:]
    supervised = (targets != ignore_index).nonzero().flatten()
    return {
        "pixel_values": pixel_values,
        VISION_POSITIONS_KEY: positions,
        VISION_CU_SEQLENS_KEY: cu_seqlens.to(torch.int32),
        VISION_MAX_LENGTH_KEY: max_seqlen,
        IMAGE_POSITIONS_KEY: image_positions,
        SUPERVISED_POSITIONS_KEY: supervised,
        SUPERVISED_TARGETS_KEY: targets[supervised],
        VISION_PADDING_KEY: fill,
        REAL_TOKENS_KEY: real_tokens,
    }


def takes_precomputed_vision(model) -> bool:
    """Qwen2-VL only: its vision tower takes the precomputed inputs and returns one feature per token."""
    core = vision_language_core(model)
    return core is not None and getattr(core.config, "model_type", "") == "qwen2_vl"


def graph_vision_tower(model) -> "VisionGraphs | None":
    """VisionGraphs for the model's vision tower, or None where it cannot be captured: another
    architecture, a vision attention other than latexocr/fast/attention.py's packed one (transformers'
    per-image sdpa loop reads the boundaries back to the CPU, which a capture cannot do), or a
    tower that is being trained (a graph records no backward)."""
    if not takes_precomputed_vision(model):
        return None
    core = vision_language_core(model)
    if (core.config.vision_config._attn_implementation != PACKED_VISION_ATTENTION
            or any(p.requires_grad for p in core.visual.parameters())):
        return None
    return VisionGraphs(core.visual)


class VisionGraphs:
    """The whole vision tower replayed as one CUDA graph per input shape.

    The tower is frozen and runs forward only, so a plain torch.cuda.CUDAGraph serves: the first
    batch of a new padded patch count runs twice on a side stream (compiling the blocks, if they
    are compiled, outside the capture), is captured, and every later batch of that count
    copies its inputs into the graph's buffers and replays it with one launch instead of several per
    block. All graphs share one memory pool: only one runs at a time, and its output is consumed
    (copied into the text embeddings) before the next replay.
    """

    def __init__(self, visual):
        if any(p.requires_grad for p in visual.parameters()):
            raise ValueError("VisionGraphs needs a frozen vision tower (it records no backward)")
        self.visual = visual
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def _run(self, pixel_values, grid_thw, positions, cu_seqlens, max_seqlen):
        return self.visual(pixel_values, grid_thw=grid_thw, position_ids=positions, cu_seqlens=cu_seqlens,
                           max_seqlen=max_seqlen).pooler_output

    def __call__(self, pixel_values, grid_thw, positions, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        key = (tuple(pixel_values.shape), pixel_values.dtype, tuple(cu_seqlens.shape), max_seqlen,
               torch.is_autocast_enabled("cuda"))
        if key not in self.graphs:
            self.graphs[key] = self._capture(pixel_values, grid_thw, positions, cu_seqlens, max_seqlen)
        inputs, graph, output = self.graphs[key]
        for static, new in zip(inputs, (pixel_values, positions, cu_seqlens)):
            static.copy_(new, non_blocking=True)
        graph.replay()
        return output

    @torch.no_grad()
    def _capture(self, pixel_values, grid_thw, positions, cu_seqlens, max_seqlen):
        inputs = tuple(t.clone() for t in (pixel_values, positions, cu_seqlens))
        def run():
            return self._run(inputs[0], grid_thw, *inputs[1:], max_seqlen)

        warm_up_off_capture(run, times=2)  # compiled blocks compile and autotune here
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, output = record_graph(run, self.pool)
        return inputs, graph, output


def supervised_step_loss(model, batch: dict, vision_graphs: VisionGraphs | None = None,
                         loss_of=summed_cross_entropy) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the supervised tokens of a packed batch with the keys of precompute_packed, and
    their count (a host int): the same value as the model's own forward (tests/test_fast.py).
    Re-implements Qwen2VLModel.forward's image path, checked against transformers 5.24.0 and 5.25.0
    (latexocr/fast/upstream.py SOURCES)."""
    core = vision_language_core(model)
    pixel_values = batch["pixel_values"].type(core.visual.dtype)
    args = (pixel_values, batch["image_grid_thw"], batch[VISION_POSITIONS_KEY], batch[VISION_CU_SEQLENS_KEY],
            batch[VISION_MAX_LENGTH_KEY])
    if vision_graphs is not None and pixel_values.is_cuda:
        features = vision_graphs(*args)
    else:
        features = core.visual(args[0], grid_thw=args[1], position_ids=args[2], cu_seqlens=args[3],
                               max_seqlen=args[4]).pooler_output
    image_positions = batch[IMAGE_POSITIONS_KEY]
    embeds = core.get_input_embeddings()(batch["input_ids"])
    # features of the padding patches (if any) come last and are dropped
    embeds = embeds.index_copy(1, image_positions, features[None, :image_positions.shape[0]].to(embeds.dtype))
    text_attention = {k: batch[k] for k in (CU_SEQLENS_KEY, MAX_LENGTH_KEY) if k in batch}  # latexocr/fast/attention.py
    logits = model(inputs_embeds=embeds, position_ids=batch["position_ids"], use_cache=False,
                   logits_to_keep=batch[SUPERVISED_POSITIONS_KEY], **text_attention).logits
    return loss_of(logits[0], batch[SUPERVISED_TARGETS_KEY])  # the logits, or fast/head.py's hidden states


@dataclass
class PackedExtras:
    """What the fast path adds to a packed batch (TrainCollator's packed_extras), computed on the CPU in
    the DataLoader workers: the sample boundaries for the packed text attention, the real token
    count, and for a Qwen2-VL model the precomputed step's keys (other families would only
    throw them away)."""

    text_attention: bool = True
    precomputed_vision: bool = True
    pad_patches_to_multiple_of: int | None = None

    def __call__(self, batch: dict, lengths: list[int], max_length: int, real_tokens: int, encoder) -> dict:
        extras = {REAL_TOKENS_KEY: real_tokens}
        if self.text_attention:
            extras.update(sample_boundaries(batch, lengths, max_length, real_tokens, encoder))
        if self.precomputed_vision:
            extras.update(precompute_packed(batch["input_ids"], batch["labels"], batch["pixel_values"],
                                            batch["image_grid_thw"], encoder.processor.image_processor.merge_size,
                                            encoder.image_token_id, real_tokens, self.pad_patches_to_multiple_of))
        return extras
