"""Packed rows through linear-attention layers (Qwen3.5's Gated DeltaNet): no state crosses a sample boundary.

A full-attention layer keeps packed samples apart with its block-diagonal mask (latexocr/fast/attention.py, or transformers' mask from the positions).
A Gated DeltaNet layer has no mask: a short causal convolution (4 tokens) and a recurrent state run
along the whole row, so without boundaries every sample would start from the previous sample's
state. transformers 5.24's and 5.25's layer forwards `cu_seq_lens_q` to its delta-rule kernel and any `seq_idx`
to its convolution kernel, but its reference PyTorch kernels (used when flash-linear-attention and
causal-conv1d are not installed: on a CPU, and on a GPU where they do not build) refuse them ("can't
keep packed sequences apart"), and without them they would silently leak state. So, on a packed row (the collator's boundaries in the kwargs, one row,
no attention mask), one call of the layer per row either way:

* with both kernel packages: the boundaries are handed to them (`cu_seq_lens_q` for the delta rule,
  `seq_idx` for the convolution);
* otherwise: the row's samples are gathered into a right-padded batch (samples x longest sample),
  the layer runs once on it and the real positions are gathered back into the row. Each sample
  starts from a zero state, as in a padded batch, and right padding cannot reach a real position
  (the convolution and the recurrence are causal); the layers around it still see the packed row.
  The indices come from the collator's boundaries and longest length, on the device, once per row:
  no host sync.

Padded batches and generation (an attention mask, no boundaries) take the layer's own forward unchanged.
"""
from __future__ import annotations

import weakref

import torch

from .batching import CU_SEQLENS_KEY, MAX_LENGTH_KEY

LINEAR_ATTENTION_CLASS_SUFFIX = "GatedDeltaNet"


def fast_kernels_available() -> bool:
    """flash-linear-attention and causal-conv1d importable (and a GPU): the kernels that take boundaries."""
    from transformers.utils.import_utils import is_causal_conv1d_available, is_flash_linear_attention_available
    return is_flash_linear_attention_available() and is_causal_conv1d_available()


def padding_indices(cu_seqlens: torch.Tensor, max_length: int, row_length: int):
    """Indices between a packed row (row_length positions) and its right-padded batch (samples x max_length).

    Returns (to_padded, to_row): row positions for each padded slot (padding slots repeat position 0:
    any real value does, nothing reads them), and the padded slot of each row position. Shapes come
    from host ints only, so nothing is read back from the device."""
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu.diff()
    offsets = torch.arange(max_length, device=cu.device)
    to_padded = torch.where(offsets < lengths[:, None], starts[:, None] + offsets, 0).flatten()
    sample = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths, output_size=row_length)
    to_row = sample * max_length + torch.arange(row_length, device=cu.device) - starts[sample]
    return to_padded, to_row


class _IndicesOfLastRow:
    """padding_indices of the batch in flight, built by its first linear-attention layer and reused by
    the others (the same boundaries tensor reaches every layer of one forward, and its recomputation)."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, cu_seqlens, max_length, row_length, device):
        """(longest sample, to_padded, to_row) of this row."""
        if self.key is not None:
            ref, *rest = self.key
            if ref() is cu_seqlens and rest == [max_length, row_length, device]:
                return self.value
        key = (weakref.ref(cu_seqlens), max_length, row_length, device)
        if max_length is None or (max_length >= row_length and len(cu_seqlens) > 2):
            # no longest length, or the row length as a bound (the collator's pad_to_multiple_of): a
            # batch that wide would cost samples x row; the true longest is read back, once per row
            max_length = int(cu_seqlens.diff().max())
        self.value = (max_length, *padding_indices(cu_seqlens.to(device), max_length, row_length))
        self.key = key
        return self.value


def _one_call_with_boundaries(forward, hidden_states, cu_seqlens, **kwargs):
    """The kernels' own packed-sequence inputs: cu_seqlens for the delta rule, seq_idx for the convolution."""
    cu = cu_seqlens.to(device=hidden_states.device)
    lengths = cu.diff()
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device, dtype=torch.int32),
                                      lengths, output_size=hidden_states.shape[1])[None]
    return forward(hidden_states, cu_seq_lens_q=cu.long(), seq_idx=seq_idx, **kwargs)


def _one_call_padded(forward, hidden_states, cu_seqlens, max_length, indices, **kwargs):
    """The row's samples as a right-padded batch through the layer's own forward, then back into the row."""
    _, row_length, width = hidden_states.shape
    max_length, to_padded, to_row = indices(cu_seqlens, max_length, row_length, hidden_states.device)
    padded = hidden_states[0].index_select(0, to_padded).view(len(cu_seqlens) - 1, max_length, width)
    out = forward(padded, **kwargs)
    return out.reshape(-1, out.shape[-1]).index_select(0, to_row)[None]


def keep_packed_samples_apart(model, fast: bool | None = None) -> int:
    """Make every linear-attention layer of `model` honour packed-row boundaries; returns how many.

    fast: use the kernels' own boundary inputs (default: when fast_kernels_available()), else the
    right-padded batch. Models without such layers (Qwen2/2.5/3-VL) are left as they are (returns 0).
    """
    fast = fast_kernels_available() if fast is None else fast
    indices = _IndicesOfLastRow()
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
            for key in ("cu_seq_lens_q", "seq_idx"):  # boundaries are given below, or not at all (padded batch)
                kwargs.pop(key, None)
            if fast:
                return _one_call_with_boundaries(_forward, hidden_states, cu_seqlens, **kwargs)
            return _one_call_padded(_forward, hidden_states, cu_seqlens, kwargs.get(MAX_LENGTH_KEY), indices,
                                    **kwargs)

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
                "causal-conv1d kernels (per-sample boundaries, one call per layer)")
    return ("linear-attention layers: flash-linear-attention / causal-conv1d not installed, so transformers' "
            "reference PyTorch kernels run them, which take no sample boundaries: each packed row's samples "
            "pass as one right-padded batch (one call per layer, zero state at each sample's start); "
            "install both kernels to skip the padding")
