"""Packed rows through linear-attention layers (Qwen3.5's Gated DeltaNet): no state crosses a sample boundary.

A full-attention layer keeps packed samples apart with its block-diagonal mask (attention.py, or
transformers' mask from the positions). A Gated DeltaNet layer has no mask: a short causal convolution
(4 tokens) and a recurrent state run along the whole row, so without boundaries every sample would
start from the previous sample's state. On a packed row (the collator's boundaries in the kwargs, one
row, no attention mask), one call of each layer per row, by the first path that runs here (choose_path,
named in train.py's log line):

* FLA_PADDED (flash-linear-attention runs here, causal-conv1d absent; the default there): the row's
  samples as a right-padded batch (as PADDED below) through the layer's own forward, which runs fla's
  chunked delta rule (transformers picked it) and PyTorch's convolution. flash-linear-attention refuses
  Hopper GPUs with Triton >= 3.4, < 3.7.1 unless tilelang is installed (wrong gradients, fla #640):
  fla_refusal reads that condition from fla itself, before any kernel runs.
* FLA (LATEXOCR_SPEED=fla_varlen=on): flash-linear-attention's Triton kernels, both given the row's
  boundaries (`cu_seqlens`): its causal convolution and its chunked delta rule, called by fla_forward
  below (the layer's own forward re-done for a packed row, as ms-swift / LLaMA-Factory / axolotl do:
  transformers' layer hands its convolution to causal-conv1d only). No padding work, yet on an H200
  (torch 2.11, Triton 3.6, tilelang) it trained Qwen3.5-2B at 32.8-37.9 samples/s against 42.7 for
  padded batches (docs/BENCHMARKS.md run O), so it is not the default.
* FLA_CAUSAL_CONV1D: fla's delta rule and causal-conv1d's convolution, through transformers' own
  forward (`cu_seq_lens_q` for the delta rule, `seq_idx` for the convolution).
* PADDED (no usable fla: a CPU, no package, or the refusal above): transformers' reference PyTorch
  kernels, which refuse boundaries ("can't keep packed sequences apart") and would silently leak state
  without them. The row's samples are gathered into a right-padded batch (samples x longest sample),
  the layer runs once on it and the real positions are gathered back into the row. Each sample starts
  from a zero state, as in a padded batch, and right padding cannot reach a real position (the
  convolution and the recurrence are causal); the layers around it still see the packed row. The
  indices come from the collator's boundaries and longest length, on the device, once per row.

Padded batches and generation (an attention mask, no boundaries) take the layer's own forward unchanged
(with fla importable, transformers already runs fla's kernels there, fused_recurrent_gated_delta_rule
in the one-token decode step included).
"""
from __future__ import annotations

import weakref

import torch

from ..batching import CU_SEQLENS_KEY, MAX_LENGTH_KEY

LINEAR_ATTENTION_CLASS_SUFFIX = "GatedDeltaNet"
FLA, FLA_CAUSAL_CONV1D, FLA_PADDED, PADDED = "fla", "fla+causal-conv1d", "fla-padded", "padded"  # choose_path's
# fla's causal-convolution kernels, where each version keeps them (0.6.0; its later layout)
FLA_CONV_KERNEL_MODULES = ("fla.modules.causal_conv1d.ops", "fla.modules.conv.triton.kernels")
# autotune keys of those kernels that do not grow with the row's length; any other (fla main's NB before
# fla #1154: the batch's total tokens / 1024) tunes again at every new packed length (fla #1147)
LENGTH_FREE_CONV_KEYS = {"D", "W"}


def _fla_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for name in ("fla-core", "flash-linear-attention"):
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return "?"


def fla_refusal() -> str | None:
    """Why flash-linear-attention's chunked delta rule would refuse to train here, or None if it runs.

    fla 0.6.0 raises in the backward pass (chunk_bwd_dqkwg) on a Hopper GPU with Triton >= 3.4.0,
    < 3.7.1 (wrong gradients there, fla #640), unless its tilelang backend takes that kernel (tilelang
    importable with an nvcc, FLA_TILELANG not 0, backend dispatch not disabled). The same condition,
    read from fla's own flags, before any kernel runs: a reason in the log, not a traceback mid-step."""
    import os
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except Exception as exc:  # noqa: BLE001 (fla or Triton that does not import: any error says so)
        return f"flash-linear-attention {_fla_version()} does not import ({type(exc).__name__}: {exc})"
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return None
    from fla.ops.common.backends.tilelang import CommonTileLangBackend
    if (CommonTileLangBackend.is_available() and CommonTileLangBackend().is_enabled()
            and os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") != "1"):
        return None
    import triton
    return (f"flash-linear-attention {_fla_version()} refuses to train on a Hopper GPU with Triton "
            f"{triton.__version__} (>= 3.4, < 3.7.1: wrong gradients, fla #640) without tilelang; "
            "`pip install tilelang` (and an nvcc) or Triton >= 3.7.1 enables it")


def choose_path(varlen: bool | None = None) -> tuple[str, str]:
    """(FLA | FLA_CAUSAL_CONV1D | FLA_PADDED | PADDED, why): the path packed rows take through the
    linear-attention layers. varlen: fla's own varlen kernels where they run (default: $LATEXOCR_SPEED fla_varlen)."""
    from transformers.utils.import_utils import is_causal_conv1d_available, is_flash_linear_attention_available
    if not is_flash_linear_attention_available():
        return PADDED, "flash-linear-attention not installed" + ("" if torch.cuda.is_available() else " / no GPU")
    if not fla_usable():
        return PADDED, "flash-linear-attention off ($LATEXOCR_SPEED fla=off)"
    if (refusal := fla_refusal()) is not None:
        return PADDED, refusal
    version = _fla_version()
    if is_causal_conv1d_available():
        return FLA_CAUSAL_CONV1D, f"fla {version} chunk + causal-conv1d, packed"
    if varlen is None:
        from .choices import speed_choices
        varlen = speed_choices().fla_varlen
    if not varlen:
        return FLA_PADDED, f"fla {version} chunk, right-padded samples (its varlen path measured slower)"
    bucketed = ", rows bucketed for its conv autotune (fla #1147)" if conv_tunes_per_length() else ""
    return FLA, f"fla {version} chunk + fla conv, packed{bucketed}"


def conv_tunes_per_length() -> bool:
    """fla's causal-convolution kernels tune again at each new total row length (fla #1147): an autotune
    key of theirs beyond the channels and width. fla 0.6.0's keys are ['D', 'W']: no."""
    import importlib
    for name in FLA_CONV_KERNEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        keys = {k for kernel in ("causal_conv1d_fwd_kernel", "causal_conv1d_bwd_kernel")
                for k in getattr(getattr(module, kernel, None), "keys", None) or ()}
        return bool(keys - LENGTH_FREE_CONV_KEYS)
    return False


def bucket_length(length: int) -> int:
    """The row length fla's convolution sees on a path that retunes per length: the next of a few fixed
    lengths, four per doubling (..., 1024, 1280, 1536, 1792, 2048, 2560, ...; at least 256): at most
    25 % more tokens, in the convolution only, and a handful of tunings for a whole run."""
    if length <= 256:
        return 256
    octave = 1 << (length - 1).bit_length() - 1  # the power of two below (or at) length
    step = octave // 4
    return -(-length // step) * step


class _FlaBoundaries:
    """The row's boundaries as fla takes them, built by the first linear-attention layer of a forward and
    reused by the others (and their backward): the same tensors let fla's own per-boundaries caches hit,
    and the host copy (cu_seqlens_cpu: fla's chunk indices then need no read back from the GPU) is made once."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, cu_seqlens, length, device, bucketed):
        if self.key is not None and self.key[0]() is cu_seqlens and self.key[1:] == (length, device, bucketed):
            return self.value
        cu_cpu = cu_seqlens.detach().to("cpu", torch.long)
        padded_length = bucket_length(length) if bucketed else length
        if padded_length > length:  # the filler: one more segment, so no state reaches a real sample
            cu_cpu = torch.cat([cu_cpu, torch.tensor([padded_length])])
        self.value = (cu_cpu.to(device), cu_cpu, padded_length)
        self.key = (weakref.ref(cu_seqlens), length, device, bucketed)
        return self.value


def fla_forward(layer, hidden_states, cu_seqlens, cu_seqlens_cpu, padded_length=None):
    """Qwen3_5GatedDeltaNet.forward on one packed row, no cache, no mask, through fla's kernels with the
    row's boundaries (transformers' layer hands `cu_seqlens` to fla's delta rule but its convolution only
    to causal-conv1d). The same arithmetic as that forward (checked: tests/test_qwen3_5.py; drift:
    upstream.py). padded_length: the convolution sees the row filled up to it (bucket_length)."""
    from fla.modules.causal_conv1d import causal_conv1d
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    _, length, _ = hidden_states.shape
    mixed_qkv = layer.in_proj_qkv(hidden_states)  # 1 x L x channels: fla's layout (transformers' is transposed)
    z = layer.in_proj_z(hidden_states).reshape(1, length, -1, layer.head_v_dim)
    b, a = layer.in_proj_b(hidden_states), layer.in_proj_a(hidden_states)
    if padded_length is not None and padded_length > length:
        mixed_qkv = torch.nn.functional.pad(mixed_qkv, (0, 0, 0, padded_length - length))
    mixed_qkv, _ = causal_conv1d(x=mixed_qkv, weight=layer.conv1d.weight.squeeze(1), bias=layer.conv1d.bias,
                                 activation=layer.activation, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    if mixed_qkv.shape[1] > length:  # drop the filler, and its segment from the delta rule's boundaries
        mixed_qkv, cu_seqlens, cu_seqlens_cpu = mixed_qkv[:, :length], cu_seqlens[:-1], cu_seqlens_cpu[:-1]
    query, key, value = torch.split(mixed_qkv, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    query = query.reshape(1, length, -1, layer.head_k_dim)
    key = key.reshape(1, length, -1, layer.head_k_dim)
    value = value.reshape(1, length, -1, layer.head_v_dim)
    beta = b.sigmoid()
    g = -layer.A_log.float().exp() * torch.nn.functional.softplus(a.float() + layer.dt_bias)  # fp32, as transformers
    out, _ = chunk_gated_delta_rule(query, key, value, g=g, beta=beta, use_qk_l2norm_in_kernel=True,
                                    cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    out = layer.norm(out.reshape(-1, layer.head_v_dim), z.reshape(-1, layer.head_v_dim))
    return layer.out_proj(out.reshape(1, length, -1))


def fla_usable() -> bool:
    """flash-linear-attention installed and not switched off ($LATEXOCR_SPEED fla=off: transformers' reference
    kernels, for bench/). Whether it may train on this GPU is fla_refusal's question."""
    from transformers.utils.import_utils import is_flash_linear_attention_available

    from .choices import speed_choices
    return is_flash_linear_attention_available() and speed_choices().fla


# transformers' Gated DeltaNet functions that Qwen3.5's linear-attention layers call by these module-level names
# (checked against transformers 5.24-5.25: fast/upstream.py): the chunked and the recurrent delta rule, fla's
# kernels where fla imports, else the reference PyTorch rules.
DELTA_RULES = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
_EAGER_OF = "_latexocr_eager_of"  # on a rule delta_rules_run_eagerly wrapped: the rule it runs


def use_reference_delta_rule(recurrent: bool = False) -> None:
    """Where fla imports but refuses to train (fla_refusal), transformers has already taken fla's chunked
    delta rule for every Qwen3.5 layer (chosen when its module loaded), so the first backward pass would
    raise. Its reference PyTorch rule (the function transformers wrapped) takes that place, process-wide
    (also where fla is switched off: fla_usable). recurrent: the one-token rule of a decode step too.
    A rule that delta_rules_run_eagerly wrapped stays wrapped (its reference then runs eagerly)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    for name in DELTA_RULES if recurrent else DELTA_RULES[:1]:  # the chunked rule; with recurrent, the step's too
        current = getattr(q35, name)
        inner = getattr(current, _EAGER_OF, None)
        reference = getattr(inner if inner is not None else current, "__wrapped__", None)
        if reference is not None and getattr(reference, "__module__", None) == q35.__name__:
            # the reference ignores cu_seqlens: PADDED gives none
            setattr(q35, name, _eager(reference) if inner is not None else reference)


def _eager(rule):
    def delta_rule(*args, **kwargs):  # a plain function: the rule may be an nn.Module (the kernels package's
        return rule(*args, **kwargs)  # hub wrapper), whose disabled form would forward attributes to it
    eager = torch.compiler.disable(delta_rule, recursive=True)
    setattr(eager, _EAGER_OF, rule)
    return eager


def delta_rules_run_eagerly(model) -> None:
    """Before a model's blocks are compiled (fast/compile.py): DELTA_RULES run eagerly, process-wide, between the
    compiled parts of a block. Neither gains from tracing: fla's are Triton kernels already, and inductor cannot
    lower the reference chunked rule's padding to whole chunks with dynamic shapes (a TypeError deep inside
    inductor on the first step). Idempotent; models without linear attention are left alone."""
    if not has_linear_attention(model):
        return
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    for name in DELTA_RULES:
        rule = getattr(q35, name)
        if getattr(rule, _EAGER_OF, None) is None:
            setattr(q35, name, _eager(rule))


CONVOLUTION = "causal_conv1d_fn"  # transformers' whole-sequence causal convolution (5.24-5.25), by its module-level name
_SHIFTED = "_latexocr_shifted_of"  # on shifted_causal_conv1d's stand-in: the function it replaced


def shifted_causal_conv1d(hidden_states, weight, bias=None, activation=None, **kwargs):
    """transformers' causal_conv1d_fn (its PyTorch form: a depthwise F.conv1d padded by width - 1 on the left)
    written as `width` shifted multiply-adds in fp32: one fused kernel forward and backward under torch.compile.
    The convolution's backward has no symbolic form: compiled, a block recompiled for every new sequence length
    ("Eq(s + 3, 43)" guards from the backward's compile) until dynamo's recompile limit (8) left it eager.
    hidden_states (batch, channels, length), weight (channels, width)."""
    from transformers.activations import ACT2FN
    width, length = weight.shape[-1], hidden_states.shape[-1]
    padded = torch.nn.functional.pad(hidden_states.float(), (width - 1, 0))
    taps = weight.float()
    out = padded[:, :, :length] * taps[:, :1]
    for j in range(1, width):
        out = out + padded[:, :, j:j + length] * taps[:, j:j + 1]
    if bias is not None:
        out = out + bias.float()[:, None]
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


def convolution_traces_dynamically(model) -> bool:
    """Before a model's blocks are compiled (fast/compile.py): transformers' PyTorch causal convolution
    (CONVOLUTION, taken where causal-conv1d is absent) becomes shifted_causal_conv1d, process-wide. Idempotent;
    returns whether it is in place (False: no linear attention, or causal-conv1d's kernel runs there)."""
    if not has_linear_attention(model):
        return False
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    from transformers.utils.import_utils import is_causal_conv1d_available
    current = getattr(q35, CONVOLUTION)
    if getattr(current, _SHIFTED, None) is not None:
        return True
    if is_causal_conv1d_available():
        return False

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        return shifted_causal_conv1d(hidden_states, weight, bias, activation, **kwargs)
    setattr(causal_conv1d_fn, _SHIFTED, current)
    setattr(q35, CONVOLUTION, causal_conv1d_fn)
    return True


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


def avoid_refused_kernels(model) -> str | None:
    """The path choose_path() picks for a model with linear attention (None without); where fla imports but
    refuses to train, the reference delta rule takes its place (use_reference_delta_rule): with packing
    or without, the first backward pass would raise otherwise."""
    if not has_linear_attention(model):
        return None
    from transformers.utils.import_utils import is_flash_linear_attention_available
    path, _ = choose_path()
    if path == PADDED and is_flash_linear_attention_available():
        use_reference_delta_rule()
    return path


def keep_packed_samples_apart(model, path: str | None = None) -> int:
    """Make every linear-attention layer of `model` honour packed-row boundaries; returns how many.

    path: FLA, FLA_CAUSAL_CONV1D, FLA_PADDED or PADDED (default: choose_path()). Models without such layers
    (Qwen2/2.5/3-VL) are left as they are (returns 0).
    """
    if not has_linear_attention(model):
        return 0
    if path is None:
        path = avoid_refused_kernels(model)
    bucketed = path == FLA and conv_tunes_per_length()
    indices, boundaries = _IndicesOfLastRow(), _FlaBoundaries()
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith(LINEAR_ATTENTION_CLASS_SUFFIX):
            continue
        forward = getattr(module, "_unpacked_forward", module.forward)  # idempotent: wrap the original once

        def packed_forward(hidden_states, cache=None, attention_mask=None, _forward=forward, _layer=module, **kwargs):
            cu_seqlens = kwargs.get(CU_SEQLENS_KEY)
            if cu_seqlens is None or attention_mask is not None or hidden_states.shape[0] != 1:
                return _forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
            # Only the packed collator's rows carry the boundaries, and no one continues them from a
            # cache (a forward with use_cache on would otherwise hand this layer one and skip the split).
            for key in ("cu_seq_lens_q", "seq_idx"):  # boundaries are given below, or not at all (padded batch)
                kwargs.pop(key, None)
            if path == FLA:
                cu, cu_cpu, padded_length = boundaries(cu_seqlens, hidden_states.shape[1], hidden_states.device,
                                                       bucketed)
                return fla_forward(_layer, hidden_states, cu, cu_cpu, padded_length)
            if path == FLA_CAUSAL_CONV1D:
                return _one_call_with_boundaries(_forward, hidden_states, cu_seqlens, **kwargs)
            return _one_call_padded(_forward, hidden_states, cu_seqlens, kwargs.get(MAX_LENGTH_KEY), indices,
                                    **kwargs)

        module._unpacked_forward = forward
        module.forward = packed_forward  # an instance attribute: nn.Module.__call__ finds it first
        count += 1
    return count


def resolve_packing(speed, model):
    """(speed with packing "on" or "off", a log line or ""): packing=auto decided for `model`. Packed rows
    pay only where every layer takes them as they are; where a model's linear-attention layers would pad
    the packed samples again (PADDED, FLA_PADDED), padded batches trained faster on an H200 (Qwen3.5-2B,
    docs/BENCHMARKS.md runs K and S: 43.6 against 37.8 samples/s without fla, 47.4 against 43.5 with it)
    and the memory probe sizes them as what they are (rows x the longest sample)."""
    from dataclasses import replace
    if speed.packing != "auto":
        return speed, ""
    if not has_linear_attention(model):
        return replace(speed, packing="on"), ""
    path, why = choose_path()
    if path in (FLA, FLA_CAUSAL_CONV1D):
        return replace(speed, packing="on"), ""
    return replace(speed, packing="off"), (f"packing off (LATEXOCR_SPEED packing=auto): the linear-attention layers "
                                           f"would pad packed samples again ({why}); padded batches train faster")


def has_linear_attention(model) -> bool:
    return any(type(m).__name__.endswith(LINEAR_ATTENTION_CLASS_SUFFIX) for m in model.modules())


def config_has_linear_attention(config) -> bool:
    """has_linear_attention from a model's config, before its weights load: Qwen3.5's text config names each
    layer's kind in layer_types (transformers 5.24, 5.25)."""
    text = getattr(config, "text_config", None) or config
    return "linear_attention" in (getattr(text, "layer_types", None) or ())


def describe_padded(model) -> str | None:
    """One log line on the kernels right-padded batches (packing off) take through this model's linear-attention
    layers (transformers' own forward), or None if it has none."""
    if not has_linear_attention(model):
        return None
    from transformers.utils.import_utils import is_causal_conv1d_available
    path, why = choose_path()
    if path == PADDED:
        return f"linear-attention layers: padded batches on transformers' reference PyTorch kernels ({why})"
    conv = "causal-conv1d's convolution" if is_causal_conv1d_available() else "torch's depthwise convolution"
    # said here because the first steps otherwise look stuck: run AA's first Qwen3.5-2B run took 180 s of wall
    # against 48-54 s for each later one on the same machine
    return (f"linear-attention layers: padded batches through fla {_fla_version()}'s chunked delta rule and {conv} "
            f"(the first run on a machine compiles fla's Triton kernels, ~2 min; Triton's cache keeps them)")


def describe(model, path: str | None = None, why: str | None = None) -> str | None:
    """One log line on how packed rows pass this model's linear-attention layers, or None if it has none."""
    if not has_linear_attention(model):
        return None
    if path is None:
        path, why = choose_path()
    if path == FLA:
        return (f"linear-attention layers: {why}: flash-linear-attention's convolution and chunked delta rule "
                "keep packed samples apart (per-sample boundaries, one call per layer)")
    if path == FLA_CAUSAL_CONV1D:
        return (f"linear-attention layers: {why}: the flash-linear-attention and causal-conv1d kernels keep "
                "packed samples apart (per-sample boundaries, one call per layer)")
    if path == FLA_PADDED:
        return (f"linear-attention layers: {why}: each packed row's samples pass fla's kernels as one "
                "right-padded batch (one call per layer, zero state at each sample's start)")
    return (f"linear-attention layers: {why}, so transformers' reference PyTorch kernels run them, which take "
            "no sample boundaries: each packed row's samples pass as one right-padded batch (one call per "
            "layer, zero state at each sample's start); install flash-linear-attention (requirements.txt, its optional line) "
            "for its faster kernels")
