"""Packed attention for the vision tower and the language model, each measured in docs/BENCHMARKS.md."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
# looked up once, at import: compiled blocks see a plain function (a custom op with its own backward)
from torch.nn.attention.varlen import varlen_attn

from ..modeling import unwrap
from .choices import SpeedChoices, speed_choices

# transformers sends a vision tower to one variable-length attention call per layer when the
# implementation's name contains "flash"; any other name loops over the images of a batch
# (16 images x 32 layers = 512 small attention calls per step). This implementation takes the
# varlen call and runs it as ONE call: PyTorch's flash varlen kernel on GPU, else one
# scaled_dot_product_attention with a block-diagonal mask, so no image attends to another.
PACKED_VISION_ATTENTION = "sdpa_packed_flash_varlen"
MAX_MASKED_TOKENS = 8192  # above this many patches a dense mask costs too much: loop per image


def _varlen_flash(query, key, value, cu, max_len: int, scale, causal: bool):
    """PyTorch's own variable-length flash attention (torch >= 2.11, CUDA) on (1, heads, T, dim) inputs."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, dim)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat the key/value heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    cu = cu.to(device=q.device, dtype=torch.int32)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0) if causal else (-1, -1))
    return out[None]  # (1, T, heads, dim)


def _varlen_available(t) -> bool:
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def _block_mask(bounds, n: int, device, causal: bool):
    """(1, 1, n, n) boolean mask letting each position see only its own segment [bounds[i], bounds[i+1])."""
    segment = torch.searchsorted(bounds[1:], torch.arange(n, device=device), right=True)
    mask = segment[:, None] == segment[None, :]
    if causal:
        idx = torch.arange(n, device=device)
        mask &= idx[:, None] >= idx[None, :]
    return mask[None, None]


def _packed_sdpa(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
                 is_causal=False, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    # query/key/value: (1, heads, patches, head_dim); cu_seq_lens_q: image boundaries [0, n1, n1+n2, ...]
    n = query.shape[2]
    bounds = cu_seq_lens_q.to(query.device)
    if _varlen_available(query) and not (module.training and dropout):
        max_len = int(max_length_q) if max_length_q is not None else int(bounds.diff().max())
        return _varlen_flash(query, key, value, bounds, max_len, scaling, causal=False), None
    if n <= MAX_MASKED_TOKENS:
        mask = _block_mask(bounds, n, query.device, causal=False)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             dropout_p=dropout if module.training else 0.0)
    else:
        lengths = bounds.diff().tolist()
        parts = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
        out = torch.cat([F.scaled_dot_product_attention(q, k, v, scale=scaling) for q, k, v in parts], dim=2)
    return out.transpose(1, 2).contiguous(), None


# The same for the language model on packed batches (one row, positions restarting at 0 for each
# sample): transformers' sdpa path builds a dense block-diagonal mask over the whole row and the
# memory-efficient kernel then computes every masked-out score too (16 samples: 16x the work).
# Flash varlen attention skips them. Generation (left padding, KV cache) switches back to sdpa.
PACKED_TEXT_ATTENTION = "sdpa_packed_flash_causal"
# The packed collator computes the sample boundaries on the CPU and passes them to the model under
# its own names (latexocr/batching.py; not transformers' cu_seq_lens_q: the vision tower receives the
# same kwargs and has its own); the attention then needs no GPU->CPU sync and compiled blocks trace it whole.
from ..batching import CU_SEQLENS_KEY, MAX_LENGTH_KEY  # noqa: E402


@torch.compiler.disable  # data-dependent (nonzero, .max()): only when the batch did not bring boundaries
def _sample_boundaries(position_ids):
    """cu_seqlens [0, l1, l1+l2, ..., L] and the longest sample of a packed row, from its positions."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])])
    return cu, int(cu.diff().max())


def _packed_causal(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
                   position_ids=None, **kwargs):
    cu, max_len = kwargs.pop(CU_SEQLENS_KEY, None), kwargs.pop(MAX_LENGTH_KEY, None)
    if attention_mask is not None or query.shape[0] != 1 or (cu is None and position_ids is None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if cu is None:
        cu, max_len = _sample_boundaries(position_ids)
    if _varlen_available(query) and not (module.training and dropout):
        return _varlen_flash(query, key, value, cu, max_len, scaling, causal=True), None
    # CPU / fallback: the same block-diagonal causal attention through a dense mask
    mask = _block_mask(cu.to(query.device), query.shape[2], query.device, causal=True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _text_config(model):
    return getattr(getattr(unwrap(model), "config", None), "text_config", None)


def set_attention(model, sub_config: str, name: str) -> bool:
    """Make the model's `sub_config` part (text_config, vision_config) use the registered attention `name`.

    Written on the sub-config itself: the language model's and the vision tower's modules hold that very
    config object and read its implementation at every call (checked for the four families with
    transformers 5.24 and 5.25). Not through set_attn_implementation: from 5.25 on it also preloads
    flash-attention kernels for any name containing "flash", and fails on one that is not a hub kernel,
    while our names need "flash" in them (see PACKED_VISION_ATTENTION)."""
    config = getattr(getattr(unwrap(model), "config", None), sub_config, None)
    if config is None:
        return False
    config._attn_implementation = name  # the config's setter (also sets any nested sub-config)
    return True


def _route_attention(model, sub_config: str, name: str, function) -> bool:
    """Register `function` as attention `name` and make the model's `sub_config` part use it."""
    from transformers import AttentionInterface

    if getattr(getattr(unwrap(model), "config", None), sub_config, None) is None:
        return False
    AttentionInterface.register(name, function)
    return set_attention(model, sub_config, name)


def use_packed_text_attention(model) -> bool:
    """Route the language model's attention through `_packed_causal` (packed training batches)."""
    return _route_attention(model, "text_config", PACKED_TEXT_ATTENTION, _packed_causal)


def use_packed_vision_attention(model) -> bool:
    """Route the vision tower's attention through `_packed_sdpa`. False if the model has no vision config."""
    return _route_attention(model, "vision_config", PACKED_VISION_ATTENTION, _packed_sdpa)


@contextlib.contextmanager
def plain_text_attention(model):
    """Inside, the language model uses plain sdpa (generation: left padding + KV cache)."""
    config = _text_config(model)
    if config is None or config._attn_implementation != PACKED_TEXT_ATTENTION:
        yield
        return
    set_attention(model, "text_config", "sdpa")
    try:
        yield
    finally:
        set_attention(model, "text_config", PACKED_TEXT_ATTENTION)


def prepare_model(model, speed: SpeedChoices | None = None):
    """What the fast path does to a loaded model, in training and inference alike: the process-wide
    CUDA settings of configure_cuda(), and with sdpa the vision tower's attention over all images of
    a batch in one call. speed: the choices (default: speed_choices())."""
    speed = speed or speed_choices()
    if not speed.fast:
        return model
    configure_cuda()
    if speed.packed_vision_attention and speed.attention == "sdpa":
        use_packed_vision_attention(model)
    return model


def configure_cuda() -> None:
    """Process-wide: cuDNN's SDPA kernel off, TF32 matmuls on. cuDNN's attention builds a new plan for every new sequence length; packed batches change
    length every step, so that cost recurs (measured on an H100: 914-972 -> 300-353 ms per
    16-sample step, docs/BENCHMARKS.md). Flash / memory-efficient SDPA kernels need no plan.
    TF32 speeds any fp32 matmul that is left."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
