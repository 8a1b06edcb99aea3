"""Packed rows through linear-attention layers (Qwen3.5's Gated DeltaNet): no state crosses a sample boundary.

A full-attention layer keeps packed samples apart with its block-diagonal mask (latexocr/fast/attention.py, or transformers' mask from the positions).
A Gated DeltaNet layer has no mask: a short causal convolution (4 tokens) and a recurrent state run
along the whole row, so without boundaries every sample would start from the previous sample's
state. transformers 5.24's layer forwards `cu_seq_lens_q` to its delta-rule kernel and any `seq_idx`
to its convolution kernel, but its reference PyTorch kernels (used when flash-linear-attention and
causal-conv1d are not installed, e.g. on a CPU) refuse boundaries ("can't keep packed sequences
apart"), and without them they would silently leak state. So, on a packed row (the collator's
boundaries in the kwargs, one row, no attention mask):

* with both kernel packages: the boundaries are handed to them (`cu_seq_lens_q` for the delta rule,
  `seq_idx` for the convolution), one call per layer;
* otherwise: the layer runs once per sample on its slice of the row. Each sample then starts from a
  zero state, exactly as in a padded batch; the layers around it still see the whole packed row.

Padded batches and generation (an attention mask, no boundaries) take the layer's own forward unchanged.
"""
from __future__ import annotations

import torch

from .batching import CU_SEQLENS_KEY

LINEAR_ATTENTION_CLASS_SUFFIX = "GatedDeltaNet"


def fast_kernels_available() -> bool:
    """flash-linear-attention and causal-conv1d importable (and a GPU): the kernels that take boundaries."""
    from transformers.utils.import_utils import is_causal_conv1d_available, is_flash_linear_attention_available
    return is_flash_linear_attention_available() and is_causal_conv1d_available()


def _segments_forward(forward, hidden_states, cu_seqlens, fast: bool, **kwargs):
    for key in ("cu_seq_lens_q", "seq_idx"):  # boundaries are given below, or not at all (one call per sample)
        kwargs.pop(key, None)
    if fast:
        cu = cu_seqlens.to(device=hidden_states.device)
        lengths = cu.diff()
        # seq_idx: the sample index of every position (causal-conv1d's packed-sequence input)
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device, dtype=torch.int32),
                                          lengths, output_size=hidden_states.shape[1])[None]
        return forward(hidden_states, cu_seq_lens_q=cu.long(), seq_idx=seq_idx, **kwargs)
    bounds = cu_seqlens.tolist()
    parts = [forward(hidden_states[:, start:end], **kwargs)
             for start, end in zip(bounds[:-1], bounds[1:]) if end > start]
    return torch.cat(parts, dim=1)


def keep_packed_samples_apart(model, fast: bool | None = None) -> int:
    """Make every linear-attention layer of `model` honour packed-row boundaries; returns how many.

    fast: use the kernels' own boundary inputs (default: when fast_kernels_available()), else one
    call per sample. Models without such layers (Qwen2/2.5/3-VL) are left as they are (returns 0).
    """
    fast = fast_kernels_available() if fast is None else fast
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith(LINEAR_ATTENTION_CLASS_SUFFIX):
            continue
        forward = getattr(module, "_unpacked_forward", module.forward)  # idempotent: wrap the original once

        def packed_forward(hidden_states, cache=None, attention_mask=None, _forward=forward, **kwargs):
            cu_seqlens = kwargs.get(CU_SEQLENS_KEY)
            if cu_seqlens is None or attention_mask is not None or hidden_states.shape[0] != 1:
                return _forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
            # Only the packed collator's rows carry the boundaries, and no one continues them from a
            # cache (a forward with use_cache on would otherwise hand this layer one and skip the split).
            return _segments_forward(_forward, hidden_states, cu_seqlens, fast, **kwargs)

        module._unpacked_forward = forward
        module.forward = packed_forward  # an instance attribute: nn.Module.__call__ finds it first
        count += 1
    return count


def has_linear_attention(model) -> bool:
    return any(type(m).__name__.endswith(LINEAR_ATTENTION_CLASS_SUFFIX) for m in model.modules())


def describe(model, fast: bool | None = None) -> str | None:
    """One log line on how packed rows pass this model's linear-attention layers, or None if it has none."""
    if not has_linear_attention(model):
        return None
    fast = fast_kernels_available() if fast is None else fast
    if fast:
        return ("linear-attention layers: packed samples kept apart by the flash-linear-attention and "
                "causal-conv1d kernels (per-sample boundaries)")
    return ("linear-attention layers: flash-linear-attention / causal-conv1d not installed, so each packed "
            "sample runs through them on its own (the reference PyTorch kernels cannot take sample "
            "boundaries); correct, but slower: install both for speed, or --no-packing to pad instead")
