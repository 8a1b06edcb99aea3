"""What the static decoder stands in for inside the model while its prefill and decode step run.

The decoder (decoding.py) runs the model's own forward; these are the pieces of it that run differently meanwhile,
each set by _standing_in for the prefill or the step and restored after, each falling back to what it replaced
where it does not apply:

* Qwen3.5's module-level functions (the one-token delta rule and convolution update of the step, the prefill's
  delta rule and convolution): each layer's state read and written once, in place, on a GPU by fast/kernels.py;
* kernel_swaps, on a GPU with Triton: the RMSNorm, MLP and patch-embedding forwards, the rotary functions and
  the decode step's attention (up to the step's write slot), each recognised by its source's hash;
* vision_input_swaps: the vision tower's grid-only inputs, given by the loader with each prefill chunk;
* qkv_swaps (LATEXOCR_SPEED fused_qkv): the text attention's three projections as one product.

Each form relied on is in fast/upstream.py's drift check. A reader of the decoding loop can ignore this file.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from ..modeling import unwrap, vision_language_core
from . import kernels
from .choices import speed_choices
from .linear_attention import config_has_linear_attention, fla_usable


def one_token_delta_rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
                         use_qk_l2norm_in_kernel=False, **kwargs):
    """transformers' torch_recurrent_gated_delta_rule (5.24, 5.25: the reference PyTorch kernel of Qwen3.5's
    one-token decode step, used where flash-linear-attention is not installed) for one token, with the
    layer's fp32 state (rows x heads x dk x dv: 512 MiB per layer at 512 rows for Qwen3.5-2B) read once
    and updated once, in place, instead of passing through about ten state-sized reads and writes (counted
    from its code; run L: 38 % of a decode step was that work). The same arithmetic, regrouped with the
    decay g as a per-head scalar:

        k.S1 = e^g (k.S0)     delta = beta (v - k.S1)     S2 = e^g S0 + k (x) delta
        q.S2 = e^g (q.S0) + (q.k) delta

    so one batched matmul reads S0 for k.S0 and q.S0, and S2 is written in place (mul_, then a rank-1
    baddbmm_). Anything else (several tokens, no state to update) goes to the function it stands in for."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35

    if (query.shape[1] != 1 or initial_state is None or not output_final_state
            or initial_state.dtype != torch.float32 or not initial_state.is_contiguous()
            or kwargs.get("cu_seqlens") is not None):
        return _replaced("torch_recurrent_gated_delta_rule")(
            query, key, value, g=g, beta=beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
    if _KERNELS[0]:  # one kernel: the state read and written once, in place
        out = kernels.delta_rule_step(query, key, value, g, beta, initial_state, use_qk_l2norm_in_kernel)
        if out is not None:
            return out, initial_state
    heads_k, heads_v = key.shape[2], value.shape[2]
    q, k = query[:, 0].float(), key[:, 0].float()  # rows x heads x dk
    if heads_k != heads_v:  # grouped value heads, as the reference repeats them
        q = q.repeat_interleave(heads_v // heads_k, dim=1)
        k = k.repeat_interleave(heads_v // heads_k, dim=1)
    if use_qk_l2norm_in_kernel:
        q, k = q35.l2norm(q, dim=-1, eps=1e-6), q35.l2norm(k, dim=-1, eps=1e-6)
    q = q / (q.shape[-1] ** 0.5)
    v, b, decay = value[:, 0].float(), beta[:, 0].float().unsqueeze(-1), g[:, 0].float().exp().unsqueeze(-1)
    state = initial_state
    k_state, q_state = torch.matmul(torch.stack((k, q), dim=2), state).unbind(2)  # rows x heads x dv each
    delta = (v - decay * k_state) * b
    out = decay * q_state + (q * k).sum(-1, keepdim=True) * delta
    rows, heads, dk, dv = state.shape
    flat = state.view(rows * heads, dk, dv)
    flat.mul_(decay.reshape(-1, 1, 1)).baddbmm_(k.reshape(-1, dk, 1), delta.reshape(-1, 1, dv))
    return out[:, None].to(query.dtype), state


def one_token_conv_update(hidden_states, conv_state, weight, bias=None, activation=None):
    """transformers' causal_conv1d_update (5.24, 5.25: the PyTorch fallback of Qwen3.5's one-token
    convolution where causal-conv1d is not installed) as one Triton kernel (fast/kernels.py conv_update)
    where it runs; anything else goes to the function it stands in for."""
    if _KERNELS[0]:
        out = kernels.conv_update(hidden_states, conv_state, weight, bias, activation)
        if out is not None:
            return out
    return _replaced("causal_conv1d_update")(hidden_states, conv_state, weight, bias, activation)


def prefill_delta_rule(query, key, value, g, beta, chunk_size: int = 64, initial_state=None,
                       output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False, launch=None,
                       **kwargs):
    """transformers' torch_chunk_gated_delta_rule (5.24, 5.25: the prefill's rule where flash-linear-attention
    is absent) as one Triton kernel (fast/kernels.py delta_rule) where it runs: each row's prompt token by
    token with the state tile kept on chip, read and written once. The chunked form does the same sums
    regrouped in fp32 through many state- and prompt-sized temporaries (docs/BENCHMARKS.md run T:
    Qwen3.5-2B's prefill 5.7 s of 15.1 s for 2,048 images). Anything else (a gradient, packed boundaries)
    goes to the function it stands in for. launch: the kernel's (_prefill_functions: kernels.CHUNK_LAUNCH
    for LATEXOCR_SPEED prefill_rule=chunked; None: PREFILL_LAUNCH)."""
    if _KERNELS[0] and kwargs.get("cu_seqlens") is None:
        rows, _, _, dk = query.shape
        final = torch.empty(rows, value.shape[2], dk, value.shape[3], dtype=torch.float32, device=query.device)
        out = kernels.delta_rule(query, key, value, g, beta, initial_state, use_qk_l2norm_in_kernel, state_out=final,
                                 launch=launch)
        if out is not None:
            return out, final if output_final_state else None
    return _replaced("torch_chunk_gated_delta_rule")(query, key, value, g=g, beta=beta, chunk_size=chunk_size,
                                   initial_state=initial_state, output_final_state=output_final_state,
                                   use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)


def prefill_conv(hidden_states, weight, bias=None, activation=None, **kwargs):
    """transformers' causal_conv1d_fn (5.24, 5.25: the prefill's depthwise causal convolution where
    causal-conv1d is not installed) as one Triton kernel (fast/kernels.py causal_conv) where it runs; its
    output comes token-major, so the q, k and v the layer splits from it need no copy before
    prefill_delta_rule's kernel. Anything else (packed boundaries in kwargs, a gradient) goes to the function
    it stands in for; other kwargs (use_cache) the reference ignores too."""
    if _KERNELS[0] and all(kwargs.get(boundary) is None for boundary in ("seq_idx", "cu_seqlens", "cu_seq_lens_q")):
        out = kernels.causal_conv(hidden_states, weight, bias, activation)
        if out is not None:
            return out
    return _replaced("causal_conv1d_fn")(hidden_states, weight, bias, activation=activation, **kwargs)


def _prefill_functions(delta_rule: bool, conv: bool = False, swaps: list | None = None):
    """While the decoder's prefill runs, Qwen3.5's module-level chunked rule is prefill_delta_rule through
    its kernel (delta_rule), its convolution without a cache prefill_conv through its kernel (conv), and
    the `swaps` (kernel_swaps: RMSNorms, MLPs, rotary functions) are set; restored after. All off: nothing
    changes. LATEXOCR_SPEED prefill_rule is read here, once per prefill, not in each layer's call."""
    rule = prefill_delta_rule
    if delta_rule and speed_choices().prefill_rule == "chunked":
        rule = functools.partial(prefill_delta_rule, launch=kernels.CHUNK_LAUNCH)
    return _standing_in({"torch_chunk_gated_delta_rule": rule if delta_rule else None,
                         "causal_conv1d_fn": prefill_conv if conv else None}, swaps, delta_rule or conv)


# The RMSNorm forwards kernels.rms_norm computes, by their source's hash (fast/upstream.py source_hash; the
# same in transformers 5.24 and 5.25): Qwen2VLRMSNorm, Qwen2_5_VLRMSNorm and Qwen3VLTextRMSNorm share one
# text ("plain": the weight times the normalised x in x's dtype); Qwen3_5RMSNorm ("offset": times 1 + weight
# in fp32); Qwen3_5RMSNormGated ("gated": plain, times silu(gate) in fp32). A class whose forward hashes
# otherwise keeps its own (and the drift check names it).
NORM_FORMS = {"0d702ef8d7d8a129": "plain", "6bc29e6eecca35b2": "offset", "cc5787a1b20e963f": "gated"}


def norm_classes(model) -> dict:
    """{RMSNorm class in the model: its form (NORM_FORMS)} for the classes whose forward kernels.rms_norm
    computes; the vision towers' too where they share the class (Qwen2.5-VL)."""
    from .upstream import forward_hash
    found, seen = {}, set()
    for module in model.modules():
        cls = type(module)
        if cls in seen or not cls.__name__.endswith(("RMSNorm", "RMSNormGated")):
            continue
        seen.add(cls)
        form = NORM_FORMS.get(forward_hash(cls))
        if form is not None:
            found[cls] = form
    return found


# The rotary embedding functions kernels.rotary computes, by their source's hash (the same in transformers 5.24
# and 5.25), each with rotate_half's (ROTATE_HALF) beside it in its module: apply_rotary_pos_emb of Qwen2-VL,
# Qwen2.5-VL and Qwen3-VL ("text": in the dtype q * cos has) and of Qwen3.5 (also "text": the rotary dim is
# cos's last, the rest passed through, which the kernel does for both); apply_rotary_pos_emb_vision of all four
# ("vision": in fp32, the result in q's dtype). A function whose source hashes otherwise keeps its own.
ROTARY_FORMS = {"dcce26b5d7674297": "text", "358cf3e549acf8ba": "text", "e174399e546c23a4": "vision"}
ROTATE_HALF = "c3e95bb5f330fa3c"


def _layer_modules(model) -> list:
    """The Python modules the model's layers come from (where transformers' modeling code looks up the module-level
    functions the stand-ins replace), in name order."""
    import sys
    names = sorted({type(m).__module__ for m in model.modules()})
    return [sys.modules[name] for name in names if name in sys.modules]


def rotary_functions(model) -> dict:
    """{(model module, function name): its form (ROTARY_FORMS)} for the rotary functions of the modules the
    model's layers come from that kernels.rotary computes."""
    from .upstream import source_hash
    found = {}
    for module in _layer_modules(model):
        name = module.__name__
        if not name.startswith("transformers.models.") or source_hash(name, "rotate_half") != ROTATE_HALF:
            continue
        for function in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision"):
            form = ROTARY_FORMS.get(source_hash(name, function)) if hasattr(module, function) else None
            if form is not None:
                found[module, function] = form
    return found


def _kernel_rotary(module, function: str, form: str):
    """The function `module.function` of that form (ROTARY_FORMS) is while _standing_in runs."""
    if form == "vision":
        def apply_vision(q, k, cos, sin):
            out = kernels.rotary(q, k, cos, sin, 1, True)
            return _REPLACED[module, function](q, k, cos, sin) if out is None else out
        return apply_vision

    def apply(q, k, cos, sin, unsqueeze_dim=1):
        out = kernels.rotary(q, k, cos, sin, unsqueeze_dim, False) if q.dim() == 4 else None
        return _REPLACED[module, function](q, k, cos, sin, unsqueeze_dim) if out is None else out
    return apply


# The MLP forwards kernels.gated_silu and kernels.quick_gelu stand in for, by their source's hash (the same in
# transformers 5.24 and 5.25), with the activation module each needs (its forward's hash, transformers.activations):
# the text MLPs of all four families and Qwen2.5-VL's vision MLP ("gated": act_fn(gate_proj(x)) * up_proj(x),
# act_fn SiLUActivation) and Qwen2-VL's vision MLP ("quick": fc2(act(fc1(x))), act QuickGELUActivation).
MLP_FORMS = {"3997a4458faa14a5": "gated", "4e40d65545624eb0": "gated", "3c21c8c99fed5bb7": "quick"}
ACTIVATION_FORMS = {"gated": ("act_fn", "SiLUActivation", "252dabf3436933c3"),
                    "quick": ("act", "QuickGELUActivation", "db567a68bddd0ec8")}


def mlp_classes(model) -> dict:
    """{MLP class in the model: its form (MLP_FORMS)} for the classes whose every instance's activation is the
    one its form's kernel computes (ACTIVATION_FORMS)."""
    from .upstream import forward_hash
    found, refused = {}, set()
    for module in model.modules():
        cls = type(module)
        if cls in refused or not cls.__name__.upper().endswith("MLP"):
            continue
        form = MLP_FORMS.get(forward_hash(cls))
        attribute, name, digest = ACTIVATION_FORMS.get(form, (None, None, None))
        act = type(getattr(module, attribute, None)) if attribute else None
        if form is None or act.__name__ != name or forward_hash(act) != digest:
            refused.add(cls)
            found.pop(cls, None)
            continue
        found[cls] = form
    return found


def _kernel_mlp_forward(form: str):
    """The forward an MLP class of that form (MLP_FORMS) has while _standing_in runs: its projections, and the
    activation between them in one kernel (the torch form where the kernel does not apply)."""
    if form == "quick":
        def quick_forward(self, x):
            hidden = self.fc1(x)
            out = kernels.quick_gelu(hidden)
            return self.fc2(self.act(hidden) if out is None else out)
        return quick_forward

    def gated_forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        out = kernels.gated_silu(gate, up)
        return self.down_proj(self.act_fn(gate) * up if out is None else out)
    return gated_forward


# transformers' sdpa attention function (integrations/sdpa_attention.py, the same text in 5.24 and 5.25), which every
# family's text attention looks up by name in AttentionInterface's mapping at each call; a decode step's call
# through it packs the query heads per key head (pack_gqa) and runs SDPA's memory-efficient kernel.
SDPA_FORM = "a2825ebbe8e42494"


class _Items:
    """A dict's items as attributes, so that _standing_in sets and restores one as it does a module's function."""

    def __init__(self, mapping: dict):
        object.__setattr__(self, "_mapping", mapping)

    def __getattr__(self, name):
        try:
            return self._mapping[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self._mapping[name] = value


@functools.lru_cache(maxsize=1)
def _attention_functions() -> _Items:
    """transformers' attention functions by name, shared by every AttentionInterface (its class-level mapping)."""
    from transformers.modeling_utils import AttentionInterface
    return _Items(AttentionInterface._global_mapping)


def attention_swaps(core) -> list:
    """[(owner, "sdpa", stand-in)]: while the static decoder runs, its text attention's sdpa function answers a
    decode step's call through kernels.decode_attention (_kernel_sdpa); [] where the function is not the one
    checked (SDPA_FORM) or the text layers do not look it up by that name."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from .upstream import source_hash
    if (core.config.text_config._attn_implementation != "sdpa" or "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
            or source_hash("transformers.integrations.sdpa_attention", "sdpa_attention_forward") != SDPA_FORM):
        return []
    return [(_attention_functions(), "sdpa", _kernel_sdpa)]


def _kernel_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa_attention_forward while the static decoder runs: a decode step's call (one query token
    a row, the step's key mask of 0 / -inf as (rows, 1, 1, slots)) through kernels.decode_attention, which returns
    what that function returns; any other call (a prefill, a vision tower) through the function itself."""
    if (query.shape[2] == 1 and attention_mask is not None and attention_mask.dim() == 4
            and attention_mask.shape[1] == attention_mask.shape[2] == 1 and attention_mask.is_floating_point()
            and not dropout and kwargs.get("position_bias") is None and kwargs.get("softcap") is None):
        out = kernels.decode_attention(query, key, value, attention_mask[:, 0, 0, :], scaling,
                                       attend_upto=_ATTEND_UPTO[0])
        if out is not None:
            return out, None
    return _REPLACED[_attention_functions(), "sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, is_causal=is_causal, **kwargs)


# The text attention's query, key and value projections as one product (LATEXOCR_SPEED fused_qkv). Every family's
# attention forward calls q_proj, k_proj and v_proj on the same hidden states, one after the other; at a decode
# step's 512 rows the key and value products (256 columns each in Qwen2-VL-2B) fill a few of the card's SMs, so
# three launches cost about what the one product of their joined weights does. While the static decoder runs, the
# query projection's forward computes the joined product and leaves the key and value parts to the other two,
# which hand them over for that same input tensor (for any other input: their own product).
_QKV_STASH = {}  # projection module -> (its input, its part of the joined product), until it is called


class _ModuleForward:
    """A module's `forward` as _standing_in sets and restores an attribute: a stand-in is set on the instance
    itself; restoring the class's own (bound) forward removes the instance's, so nothing stays behind."""

    def __init__(self, module):
        object.__setattr__(self, "_module", module)

    def __getattr__(self, name):
        return getattr(self._module, name)

    def __setattr__(self, name, value):
        module = self._module
        if getattr(value, "__self__", None) is module and getattr(value, "__func__", None) is getattr(type(module), name):
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = value


def _qkv_projections(core) -> list:
    """(attention module, [q_proj, k_proj, v_proj]) for each text attention whose three projections are plain
    nn.Linear layers (not peft's: an adapter's layers are merged first, or left alone) of one input width, dtype
    and device, each with a bias or none."""
    from torch import nn
    found = []
    for module in core.language_model.modules():
        projections = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if (all(type(p) is nn.Linear for p in projections)
                and len({(p.in_features, p.weight.dtype, p.weight.device, p.bias is None) for p in projections}) == 1):
            found.append((module, projections))
    return found


def _joined_qkv(projections):
    """The joined weight and bias of the three projections, and their widths: a new copy at each call. Each
    StaticDecoder makes its own (qkv_swaps), which lives as long as it does: the weights cannot change while one
    decodes, and may between two (TUNE=full trains between train.py's evaluations, and GRPO between its
    generations; torch's fused AdamW, the Trainer's default, writes them in place without a new version count,
    torch 2.11-2.14, so a copy kept on the module could not tell)."""
    with torch.no_grad():
        weight = torch.cat([p.weight for p in projections])
        bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections])
    return weight, bias, [p.out_features for p in projections]


def qkv_swaps(core) -> list:
    """(owner, "forward", stand-in) for each text attention's three projections (_qkv_projections) where
    LATEXOCR_SPEED fused_qkv is on; any device. Their joined weights are built here (the caller's decoder holds
    them through its stand-ins), before anything is probed."""
    if core is None or not speed_choices().fused_qkv:
        return []
    swaps = []
    for attention, (q, k, v) in _qkv_projections(core):
        weight, bias, widths = _joined_qkv((q, k, v))
        swaps += [(_ModuleForward(q), "forward", _joined_query_forward(k, v, weight, bias, widths)),
                  (_ModuleForward(k), "forward", _handed_over_forward(k)),
                  (_ModuleForward(v), "forward", _handed_over_forward(v))]
    return swaps


def _joined_query_forward(k, v, weight, bias, widths):
    def forward(x):
        query, key, value = torch.nn.functional.linear(x, weight, bias).split(widths, -1)
        _QKV_STASH[k], _QKV_STASH[v] = (x, key), (x, value)
        return query
    return forward


def _handed_over_forward(projection):
    def forward(x):
        handed = _QKV_STASH.pop(projection, None)
        if handed is not None and handed[0] is x:
            return handed[1]
        return type(projection).forward(projection, x)  # its own product
    return forward


# The vision towers' patch embedding (PatchEmbed.forward, the same text in all four families, transformers 5.24
# and 5.25): a Conv3d whose kernel is its stride, over inputs of exactly one kernel each, so one matrix product
# of the flattened patches with the flattened weight. cuDNN runs it as an implicit-GEMM convolution: 5.8 ms a
# prefill chunk of 128 images in run V's profile (Qwen3.5-2B, H200), where the product's arithmetic (~20k x 1,536
# x 1,024) is ~0.1 ms; vLLM made the same change for these towers.
PATCH_EMBED_FORM = "7bb723b89b6761a2"


def patch_embed_classes(model) -> list:
    """The patch-embedding classes in the model whose forward is PATCH_EMBED_FORM and whose every instance's
    convolution is one product (kernel = stride, no padding or dilation, one group)."""
    from .upstream import forward_hash
    found, refused = [], set()
    for module in model.modules():
        cls = type(module)
        if cls in refused or not cls.__name__.endswith("PatchEmbed"):
            continue
        conv = getattr(module, "proj", None)
        if (forward_hash(cls) != PATCH_EMBED_FORM or not isinstance(conv, torch.nn.Conv3d)
                or conv.kernel_size != conv.stride or any(conv.padding) or set(conv.dilation) != {1}
                or conv.groups != 1):
            refused.add(cls)
            found = [c for c in found if c is not cls]
        elif cls not in found:
            found.append(cls)
    return found


def _matmul_patch_embed_forward(self, hidden_states):
    """PatchEmbed.forward as the product it is (patch_embed_classes): (patches, channels x frames x size x size)
    times the weight flattened in the same order, plus the bias; (patches, embedding) in the weight's dtype."""
    weight = self.proj.weight
    patches = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return torch.nn.functional.linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias)


# The vision tower's inputs that depend on its images' grids alone (transformers' vision_utils functions, which
# every family's tower calls by these module-level names): given by the loader with each prefill chunk
# (batching.vision_inputs, the same functions on the CPU), instead of the tower's loop over the images (~11
# small GPU kernels each) and its two GPU->CPU syncs. Set while a chunk's prefill runs (given_vision).
VISION_FUNCTIONS = ("get_vision_position_ids", "get_vision_attention_seqlens")
_GIVEN = [None]  # (grid_thw, positions, cu_seqlens, max_seqlen) of the chunk being prefilled


def vision_input_swaps(core) -> list:
    """(modeling module, function, stand-in) for VISION_FUNCTIONS in the modules the model's layers come from,
    where each is still transformers' own (LATEXOCR_SPEED vision_inputs); any device."""
    from transformers import vision_utils
    if not speed_choices().vision_inputs:
        return []
    return [(module, function, _given_vision_function(module, function)) for module in _layer_modules(core)
            for function in VISION_FUNCTIONS if getattr(module, function, None) is getattr(vision_utils, function)]


def _given_vision_function(module, function: str):
    """The stand-in for `module.function`: the chunk's given values where the tower asks for its grid's (the same
    tensor), as the function would compute them; otherwise the function itself."""
    def positions(grid_thw, spatial_merge_size, include_temporal=False, kwargs=None):
        given = _GIVEN[0]
        if (given is None or grid_thw is not given[0] or include_temporal
                or kwargs is not None and kwargs.get("position_ids") is not None):
            return _REPLACED[module, function](grid_thw, spatial_merge_size, include_temporal, kwargs)
        return given[1]

    def seqlens(grid_thw, config, merge_temporal=False, kwargs=None):
        from transformers.utils.generic import is_flash_attention_requested
        given, asked = _GIVEN[0], kwargs or {}
        if (given is None or grid_thw is not given[0] or merge_temporal
                or asked.get("cu_seqlens") is not None or asked.get("max_seqlen") is not None):
            return _REPLACED[module, function](grid_thw, config, merge_temporal, kwargs)
        return given[2], given[3] if is_flash_attention_requested(config) else None  # as get_max_seqlen answers
    return positions if function == "get_vision_position_ids" else seqlens


@contextlib.contextmanager
def given_vision(chunk):
    """Yields the chunk's model inputs (without batching.vision_inputs' keys) and, while the model runs on
    them, gives those values to the vision tower (vision_input_swaps' stand-ins, where set)."""
    from ..batching import VISION_CU_SEQLENS_KEY, VISION_MAX_LENGTH_KEY, VISION_POSITIONS_KEY
    keys = (VISION_POSITIONS_KEY, VISION_CU_SEQLENS_KEY, VISION_MAX_LENGTH_KEY)
    inputs = {k: v for k, v in chunk.items() if k not in keys}
    if all(k in chunk for k in keys) and chunk.get("image_grid_thw") is not None:
        _GIVEN[0] = (chunk["image_grid_thw"], *(chunk[k] for k in keys))
    try:
        yield inputs
    finally:
        _GIVEN[0] = None


def _kernel_norm_forward(form: str):
    """The forward an RMSNorm class of that form (NORM_FORMS) has while _standing_in runs."""
    if form == "gated":
        def forward(self, hidden_states, gate):
            out = kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon, False, gate)
            return _REPLACED[type(self), "forward"](self, hidden_states, gate) if out is None else out
        return forward
    offset = form == "offset"

    def forward(self, hidden_states):
        out = kernels.rms_norm(hidden_states, self.weight, self.eps if offset else self.variance_epsilon, offset)
        return _REPLACED[type(self), "forward"](self, hidden_states) if out is None else out
    return forward


@contextlib.contextmanager
def _standing_in(functions: dict, swaps: list | None, use_kernels: bool):
    """While a prefill or a decode step runs: each Qwen3.5 module-level function named in `functions` is
    the stand-in given (None: left alone), each (owner, attribute, stand-in) of `swaps` (kernel_swaps: the
    RMSNorm, MLP and patch-embedding forwards, the rotary functions, the sdpa attention function;
    vision_input_swaps) is set, and the Qwen3.5 stand-ins take fast/kernels.py's kernels where `use_kernels`;
    the originals are kept in _REPLACED for the stand-ins' fallbacks and restored after."""
    swaps = list(swaps or [])
    if any(functions.values()):
        from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
        swaps += [(q35, name, new) for name, new in functions.items() if new is not None]
    for owner, name, new in swaps:
        _REPLACED[owner, name] = getattr(owner, name)
        setattr(owner, name, new)
    _KERNELS[0] = use_kernels
    try:
        yield
    finally:
        for owner, name, _ in swaps:
            setattr(owner, name, _REPLACED.pop((owner, name)))
        _KERNELS[0] = False
        _QKV_STASH.clear()


def _replaced(name: str):
    """The Qwen3.5 module-level function a stand-in replaced while _standing_in runs."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    return _REPLACED[q35, name]


def uses_prefill_kernel(core) -> bool:
    """Qwen3.5 without fla (one_token_delta_rule's case), on a GPU with Triton, the kernel not switched off."""
    return (uses_one_token_delta_rule(core) and speed_choices().prefill_kernel
            and kernels.usable(core.get_input_embeddings().weight))


def uses_prefill_conv(core) -> bool:
    """Qwen3.5 without causal-conv1d (uses_kernel_conv_update's case, fla or not: transformers takes no
    convolution of fla's), on a GPU with Triton, the prefill's kernels not switched off."""
    return (uses_kernel_conv_update(core) and speed_choices().prefill_kernel
            and kernels.usable(core.get_input_embeddings().weight))


def kernel_swaps(core) -> list:
    """(owner, attribute, stand-in) for what a kernel computes in the static decoder's prefill and step,
    every family, on a GPU with Triton: each RMSNorm class's forward (norm_classes; LATEXOCR_SPEED
    norm_kernel), each MLP's activation (mlp_classes; activation_kernel), each rotary embedding function
    (rotary_functions; rotary_kernel) and the decode step's attention (attention_swaps; attention_kernel);
    and the vision tower's patch embedding as one matrix product (patch_embed_classes; patch_matmul). None on
    the CPU."""
    speed = speed_choices()
    if not kernels.usable(core.get_input_embeddings().weight):
        return []
    swaps = [(cls, "forward", _matmul_patch_embed_forward) for cls in patch_embed_classes(core) if speed.patch_matmul]
    swaps += [(cls, "forward", _kernel_norm_forward(form)) for cls, form in norm_classes(core).items()
              if speed.norm_kernel]
    swaps += [(cls, "forward", _kernel_mlp_forward(form)) for cls, form in mlp_classes(core).items()
              if speed.activation_kernel]
    swaps += attention_swaps(core) if speed.attention_kernel else []
    return swaps + [(module, function, _kernel_rotary(module, function, form))
                    for (module, function), form in rotary_functions(core).items() if speed.rotary_kernel]


def decoder_swaps(core) -> list:
    """Everything the static decoder stands in for while its prefill and step run: kernel_swaps (on a GPU),
    vision_input_swaps and qkv_swaps (any device)."""
    return kernel_swaps(core) + vision_input_swaps(core) + qkv_swaps(core)


def prefill_as_decoded(model):
    """A context in which the model's prefill runs as the static decoder's does (on a GPU: kernel_swaps'
    kernels; Qwen3.5: prefill_delta_rule's kernel without fla, prefill_conv's without causal-conv1d): what
    BATCH_SIZE=auto's memory probe measures is what then runs."""
    core = vision_language_core(unwrap(model))
    return _prefill_functions(uses_prefill_kernel(core), uses_prefill_conv(core), decoder_swaps(core))


# (module or class, attribute) -> what _standing_in replaced there (prefill_delta_rule, prefill_conv,
# one_token_delta_rule, one_token_conv_update, the RMSNorm and MLP forwards, the rotary functions and _kernel_sdpa
# fall back to it)
_REPLACED = {}
# whether those two take fast/kernels.py's kernels: decided by the decoder once (a compiled step reads a flag)
_KERNELS = [False]
# while a decode step runs: its write slot (a 1-element device tensor), the last cache slot any row may attend,
# so the step's attention kernel reads no block of the slots still to be written (_kernel_sdpa)
_ATTEND_UPTO = [None]


def _one_token_functions(delta_rule: bool, conv_update: bool, use_kernels: bool = False, swaps: list | None = None):
    """While the decode step runs (eagerly, or while its CUDA graph is recorded), Qwen3.5's module-level
    one-token rule is one_token_delta_rule (delta_rule) and its convolution update one_token_conv_update
    (conv_update), each through its Triton kernel where `use_kernels`, and the `swaps` (kernel_swaps:
    RMSNorms, MLPs, rotary functions, attention) are set; restored after. All off: nothing changes."""
    return _standing_in({"torch_recurrent_gated_delta_rule": one_token_delta_rule if delta_rule else None,
                         "causal_conv1d_update": one_token_conv_update if conv_update else None}, swaps, use_kernels)


def uses_kernel_conv_update(core) -> bool:
    """Qwen3.5 (linear-attention layers) without causal-conv1d, whose CUDA kernel transformers takes for the
    one-token convolution where it is installed."""
    import importlib.util
    return config_has_linear_attention(core.config) and importlib.util.find_spec("causal_conv1d") is None


def uses_one_token_delta_rule(core) -> bool:
    """Qwen3.5 (linear-attention layers) without flash-linear-attention, whose fused recurrent kernel
    transformers takes for the one-token step where it is installed, and not switched off."""
    return config_has_linear_attention(core.config) and speed_choices().delta_step and not fla_usable()
