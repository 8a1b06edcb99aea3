"""Triton kernels for inference: Qwen3.5's, where the field's kernels are not installed (issue 31), and every
family's RMSNorm, rotary embedding and MLP activation (`rms_norm`, `rotary`, `gated_silu` / `quick_gelu`: one
kernel each where the torch forms launch ~7, ~10 and 2-3, which a decode step is bound by; issue 32), and the
decode step's attention (`decode_attention`: each row's keys and values read once, where SDPA's kernel for
long queries wastes its tiles on one token; issue 32).

Without flash-linear-attention and causal-conv1d, each Gated DeltaNet layer runs transformers' PyTorch
fallbacks (checked against transformers 5.24.0 and 5.25.0; latexocr/fast/upstream.py hashes them):

- the decode step's recurrent delta rule: standins.one_token_delta_rule already regroups it into one
  batched matmul and one in-place update. That still reads the layer's fp32 state (512 MiB at 512 rows for
  Qwen3.5-2B) three times and writes it twice; docs/BENCHMARKS.md run T: ~11.5 of a 27.8 ms step;
- the decode step's convolution update `causal_conv1d_update`: a concatenation, a copy into the state, a
  grouped `conv1d` and a SiLU, ~2.6 ms a step (run T);
- the prefill's chunked delta rule `torch_chunk_gated_delta_rule`: fp32 temporaries of the prompt's size
  per chunk of 64 tokens; run T: Qwen3.5-2B's prefill took 5.7 of 15.1 s for 2,048 images;
- the prefill's convolution `causal_conv1d_fn`: a copy of the transposed input, a depthwise conv1d (run U:
  1.1 ms a layer for 128 prompts) and a SiLU over a strided slice, whose channels-major output then makes
  the delta rule copy q, k and v.

`delta_rule` (a prompt token by token, or one token: `delta_rule_step`; or a prompt in chunks of tokens as
matrix products, `launch=CHUNK_LAUNCH`), `conv_update` and `causal_conv` (its output token-major) do the
same arithmetic in one kernel each. The first keeps each (row, head) state tile on chip over the tokens, so it
reads the state once and writes it once (in place for the step). The second shifts the convolution window
and applies the taps and the SiLU in one pass. The step's kernels launch inside its CUDA graph (their
Triton compile happens in the warm-up step before the capture). Neither has a backward: training keeps
the torch rules (or fla's).

`usable(tensor)`: on a CUDA tensor with Triton importable, or under TRITON_INTERPRET=1: Triton's interpreter
runs the same kernels on CPU tensors, which is how tests/test_kernels.py checks them against the
transformers functions they stand in for.
"""
from __future__ import annotations

import functools
import os
import sys

import torch


_BUILT: list = []  # [the kernels, or None without Triton], filled by the first _triton() call


def _triton():
    """The kernels (built once), or None where Triton is not importable. Cached in a plain list, not
    functools.lru_cache: torch.compile traces through an lru_cache wrapper into the import below and breaks
    its trace there, and the resumed frame then passes the kernels' launch settings in as symbolic inputs,
    which a Triton launch cannot take (run Z's GPU test of decode_compile=on, torch 2.11). The decode step's
    eager warm-up builds them before any trace."""
    if not _BUILT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:  # not installed (CPU-only or non-Linux torch), or broken
            _BUILT.append(None)
        else:
            _BUILT.append(_build())
    return _BUILT[0]


def usable(tensor: torch.Tensor) -> bool:
    """Whether the kernels can run on `tensor`'s device: CUDA with Triton, or Triton's CPU interpreter."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (tensor.is_cuda or (interpreted and tensor.device.type == "cpu")) and _triton() is not None


_REFUSED: set = set()  # (kernel, compile-time settings) this machine's Triton or GPU refused: torch forms instead


def _launch(kernel, grid, *args, **settings) -> bool:
    """kernel[grid](*args, **settings); False, with one line the first time, where it cannot run here (a
    Triton version or GPU that refuses the compile): the caller's torch form runs instead of a traceback.
    A decode step's kernels first run in its warm-up step, outside the CUDA graph's capture. Inside a
    torch.compile trace (the decode step with decode_compile=on) the launch goes straight into the graph: the
    lookup below breaks the trace, and the resumed frame takes `settings` as inputs, which dynamo turns symbolic
    once two kernels' values differ; a symbolic num_warps cannot launch (run Y's GPU test, torch 2.11)."""
    if torch.compiler.is_compiling():
        kernel[grid](*args, **settings)
        return True
    key = (getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", str(kernel)),
           tuple(sorted(settings.items())))
    if key in _REFUSED:
        return False
    try:
        kernel[grid](*args, **settings)
        return True
    except Exception as exc:  # noqa: BLE001 -- a speed path: the torch form is always there
        _REFUSED.add(key)
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        print(f"warning: latexocr's Triton kernel {key[0]} did not run here ({type(exc).__name__}: {reason}); "
              f"its torch form runs instead", file=sys.stderr, flush=True)
        return False


def _has_tf32(tensor: torch.Tensor) -> bool:
    """Whether tl.dot can multiply in tf32 on tensor's device (Ampere and later; not Triton's interpreter)."""
    return tensor.is_cuda and torch.cuda.get_device_capability(tensor.device) >= (8, 0)


def _chunk_precision(query: torch.Tensor, launch: dict) -> str:
    """tl.dot's precision in the chunked rule: the launch's (tf32 by default) for half-precision inputs, tf32x3
    (~fp32) for fp32 ones; plain fp32 products ("ieee") on a GPU without tf32 (before Ampere: T4, V100), said
    here rather than left to how a Triton version treats a tf32 request there (a refused compile would send
    the prefill to the torch rule). Not run on such a card here."""
    if query.is_cuda and not _has_tf32(query):
        return "ieee"
    return "tf32x3" if query.dtype == torch.float32 else launch.get("precision", "tf32x3")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def delta_rule_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, init_ptr, state_ptr, out_ptr,
                          q_row, q_tok, k_row, k_tok, v_row, v_tok, g_row, g_tok, b_row, b_tok, tokens,
                          heads_v, group, scale, eps, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                          L2NORM: tl.constexpr, HAS_INIT: tl.constexpr, STAGES: tl.constexpr):
        # float arguments as fp32: torch.compile's Inductor types a Python float fp64 (run AA's decode test)
        scale = tl.cast(scale, tl.float32)
        eps = tl.cast(eps, tl.float32)
        # one program: one (row, value head) and BV of its DV state columns, over all `tokens` tokens in
        # order. Column j of the new state and of the output depend on column j of the old state only, so
        # the columns split without any exchange; the state tile stays in registers between tokens.
        row_head = tl.program_id(0)  # rows x heads on the grid's first axis: the others stop at 65,535
        block = tl.program_id(1)
        row = row_head // heads_v
        head = row_head % heads_v
        key_head = head // group  # grouped value heads share a key head, as the reference's repeat_interleave
        dk = tl.arange(0, DK)
        dv = block * BV + tl.arange(0, BV)
        tile = row_head.to(tl.int64) * DK * DV + dk[:, None] * DV + dv[None, :]
        if HAS_INIT:
            state = tl.load(init_ptr + tile)  # DK x BV, fp32: read once
        else:
            state = tl.zeros((DK, BV), dtype=tl.float32)
        # STAGES > 1: the next tokens' q, k, v loads issued while this token's arithmetic runs (a prefill
        # program waits on memory and on its reductions far more than it computes)
        for t in tl.range(0, tokens, num_stages=STAGES):
            q = tl.load(q_ptr + row * q_row + t * q_tok + key_head * DK + dk).to(tl.float32)
            k = tl.load(k_ptr + row * k_row + t * k_tok + key_head * DK + dk).to(tl.float32)
            if L2NORM:  # transformers' l2norm: x * rsqrt(sum(x^2) + eps)
                q = q / tl.sqrt(tl.sum(q * q, 0) + eps)
                k = k / tl.sqrt(tl.sum(k * k, 0) + eps)
            q = q * scale
            v = tl.load(v_ptr + row * v_row + t * v_tok + head * DV + dv).to(tl.float32)
            decay = tl.exp(tl.load(g_ptr + row * g_row + t * g_tok + head).to(tl.float32))
            beta = tl.load(beta_ptr + row * b_row + t * b_tok + head).to(tl.float32)
            # S1 = e^g S0;  delta = beta (v - k.S1);  S2 = S1 + k (x) delta;  out = q.S2
            state = state * decay
            delta = (v - tl.sum(k[:, None] * state, 0)) * beta
            state = state + k[:, None] * delta[None, :]
            out = tl.sum(q[:, None] * state, 0)
            tl.store(out_ptr + ((row * tokens + t) * heads_v + head) * DV + dv, out.to(out_ptr.dtype.element_ty))
        tl.store(state_ptr + tile, state)  # written once (in place where state_ptr is init_ptr)

    @triton.jit
    def conv_update_kernel(x_ptr, state_ptr, weight_ptr, bias_ptr, out_ptr, x_row, x_channel, channels,
                           WIDTH: tl.constexpr, TAPS: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                           BLOCK: tl.constexpr):
        # one program: BLOCK channels of one row. The window is the state's last TAPS-1 columns then x; the
        # state shifts left by one and takes x (what torch.cat + copy_ + conv1d + silu compute).
        row = tl.program_id(1)
        channel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = channel < channels
        x = tl.load(x_ptr + row * x_row + channel * x_channel, mask=inside, other=0.0)
        at = state_ptr + (row.to(tl.int64) * channels + channel) * WIDTH
        # the window in the weight's dtype, as the reference casts it before its conv1d
        acc = tl.load(weight_ptr + channel * TAPS + (TAPS - 1), mask=inside, other=0.0).to(tl.float32) * \
            x.to(weight_ptr.dtype.element_ty).to(tl.float32)
        for tap in tl.static_range(TAPS - 1):
            column = tl.load(at + (WIDTH - TAPS + 1 + tap), mask=inside, other=0.0)
            column = column.to(weight_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.load(weight_ptr + channel * TAPS + tap, mask=inside, other=0.0).to(tl.float32) * column
        if HAS_BIAS:
            acc += tl.load(bias_ptr + channel, mask=inside, other=0.0).to(tl.float32)
        for i in tl.static_range(WIDTH - 1):  # left to right: each column read before it is overwritten
            tl.store(at + i, tl.load(at + i + 1, mask=inside, other=0.0), mask=inside)
        tl.store(at + (WIDTH - 1), x.to(state_ptr.dtype.element_ty), mask=inside)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(out_ptr + row * channels + channel, acc.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def causal_conv_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, x_row, x_channel, x_token, tokens, channels,
                           TAPS: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        # one program: BLOCK_T tokens x BLOCK_C channels of one row. out[t] = sum over taps of
        # w[tap] x[t - TAPS + 1 + tap] (zeros before the first token: conv1d's left padding), + bias, SiLU;
        # written token-major (rows x tokens x channels), the layout the layer turns it back into
        channel = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        token = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        row = tl.program_id(2).to(tl.int64)
        inside = channel < channels
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for tap in tl.static_range(TAPS):
            source = token - (TAPS - 1) + tap
            present = (source >= 0) & (source < tokens)
            x = tl.load(x_ptr + row * x_row + source[:, None] * x_token + channel[None, :] * x_channel,
                        mask=present[:, None] & inside[None, :], other=0.0)
            w = tl.load(weight_ptr + channel * TAPS + tap, mask=inside, other=0.0).to(tl.float32)
            # x in the weight's dtype, as the reference casts it before its conv1d
            acc += x.to(weight_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + channel, mask=inside, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(out_ptr + (row * tokens + token[:, None]) * channels + channel[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=(token < tokens)[:, None] & inside[None, :])

    @triton.jit
    def rms_norm_kernel(x_ptr, weight_ptr, gate_ptr, out_ptr, x_row, gate_row, width, eps, OFFSET: tl.constexpr,
                        GATE: tl.constexpr, BLOCK: tl.constexpr):
        # float arguments as fp32: torch.compile's Inductor types a Python float fp64 (run AA's decode test)
        eps = tl.cast(eps, tl.float32)
        # one program: one row. Plain form (OFFSET False): w * (x / rms(x) rounded to x's dtype), the product
        # rounded once more; OFFSET (Qwen3.5): (x / rms(x)) * (1 + w) in fp32, rounded once; GATE (Qwen3.5's
        # gated norm): the plain form's result times silu(gate) in fp32, rounded once more
        row = tl.program_id(0).to(tl.int64)
        column = tl.arange(0, BLOCK)
        inside = column < width
        x = tl.load(x_ptr + row * x_row + column, mask=inside, other=0.0)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / width + eps)
        w = tl.load(weight_ptr + column, mask=inside, other=0.0).to(tl.float32)
        if OFFSET:
            y = x32 * rstd * (1.0 + w)
        else:
            y = (x32 * rstd).to(x.dtype).to(tl.float32) * w
        if GATE:
            g = tl.load(gate_ptr + row * gate_row + column, mask=inside, other=0.0).to(tl.float32)
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32) * (g * tl.sigmoid(g))
        tl.store(out_ptr + row * width + column, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def chunk_rule_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, init_ptr, state_ptr, out_ptr,
                          q_row, q_tok, k_row, k_tok, v_row, v_tok, g_row, g_tok, b_row, b_tok, tokens,
                          heads_v, group, scale, eps, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                          C: tl.constexpr, SQUARINGS: tl.constexpr, L2NORM: tl.constexpr, HAS_INIT: tl.constexpr,
                          PRECISION: tl.constexpr):
        # float arguments as fp32: torch.compile's Inductor types a Python float fp64 (run AA's decode test)
        scale = tl.cast(scale, tl.float32)
        eps = tl.cast(eps, tl.float32)
        # delta_rule_kernel's arithmetic C tokens at a time, as matrix products (the chunked form of
        # transformers' torch_chunk_gated_delta_rule, which runs these same sums through fp32 temporaries in
        # memory). Per chunk, with G the decays' running sum inside it and A the strictly lower
        # beta_i k_i.k_j e^(G_i - G_j): T = (I + A)^-1 is (I - A)(I + A^2)(I + A^4)...(I + A^(C/2)) (A is
        # nilpotent: A^C = 0), so the triangular solve is matrix products too; then
        #   new values  V' = T (beta V) - T (beta e^G K) S
        #   outputs     O  = (e^G Q) S + [lower incl. (Q K^T e^(G_i - G_j))] V'
        #   state       S  = e^(G_last) S + (e^(G_last - G) K)^T V'
        row_head = tl.program_id(0)
        block = tl.program_id(1)
        row = row_head // heads_v
        head = row_head % heads_v
        key_head = head // group
        dk = tl.arange(0, DK)
        dv = block * BV + tl.arange(0, BV)
        c = tl.arange(0, C)
        tile = row_head.to(tl.int64) * DK * DV + dk[:, None] * DV + dv[None, :]
        if HAS_INIT:
            state = tl.load(init_ptr + tile)
        else:
            state = tl.zeros((DK, BV), dtype=tl.float32)
        strictly_lower = c[:, None] > c[None, :]
        lower = c[:, None] >= c[None, :]
        eye = tl.where(c[:, None] == c[None, :], 1.0, 0.0)
        for start in range(0, tokens, C):
            t = start + c
            inside = t < tokens  # a last, shorter chunk: zeros past the end change neither output nor state
            q = tl.load(q_ptr + row * q_row + t[:, None] * q_tok + key_head * DK + dk[None, :],
                        mask=inside[:, None], other=0.0).to(tl.float32)
            k = tl.load(k_ptr + row * k_row + t[:, None] * k_tok + key_head * DK + dk[None, :],
                        mask=inside[:, None], other=0.0).to(tl.float32)
            if L2NORM:
                q = q / tl.sqrt(tl.sum(q * q, 1) + eps)[:, None]
                k = k / tl.sqrt(tl.sum(k * k, 1) + eps)[:, None]
            q = q * scale
            v = tl.load(v_ptr + row * v_row + t[:, None] * v_tok + head * DV + dv[None, :],
                        mask=inside[:, None], other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * g_row + t * g_tok + head, mask=inside, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + row * b_row + t * b_tok + head, mask=inside, other=0.0).to(tl.float32)
            G = tl.cumsum(g, 0)
            # e^(G_i - G_j) where i >= j only (above the diagonal it could overflow, and is not used)
            decay = tl.exp(tl.where(lower, G[:, None] - G[None, :], 0.0))
            k_beta = k * beta[:, None]
            a = tl.where(strictly_lower, tl.dot(k_beta, tl.trans(k), input_precision=PRECISION) * decay, 0.0)
            inverse = eye - a
            power = a
            for _ in tl.static_range(SQUARINGS):
                power = tl.dot(power, power, input_precision=PRECISION)
                inverse = tl.dot(inverse, eye + power, input_precision=PRECISION)
            growth = tl.exp(G)
            w = tl.dot(inverse, k_beta * growth[:, None], input_precision=PRECISION)
            new_v = tl.dot(inverse, v * beta[:, None], input_precision=PRECISION) - \
                tl.dot(w, state, input_precision=PRECISION)
            scores = tl.where(lower, tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay, 0.0)
            out = tl.dot(q * growth[:, None], state, input_precision=PRECISION) + \
                tl.dot(scores, new_v, input_precision=PRECISION)
            tl.store(out_ptr + ((row * tokens + t[:, None]) * heads_v + head) * DV + dv[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=inside[:, None])
            last = tl.sum(tl.where(c == C - 1, G, 0.0), 0)  # past the end g is 0: the last token's sum
            state = state * tl.exp(last) + tl.dot(tl.trans(k * tl.exp(last - G)[:, None]), new_v,
                                                  input_precision=PRECISION)
        tl.store(state_ptr + tile, state)

    @triton.jit
    def rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, length, heads_q, heads_k,
                      q_b, q_h, q_l, k_b, k_h, k_l, qo_b, qo_h, qo_l, ko_b, ko_h, ko_l, c_b, c_l,
                      DIM: tl.constexpr, ROT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                      ROUND: tl.constexpr):
        # one program: one token (batch row b, position l), all its query and key heads; cos and sin read once
        token = tl.program_id(0).to(tl.int64)
        b = token // length
        pos = token % length
        d = tl.arange(0, BLOCK_D)
        rot = d < ROT
        first = d < ROT // 2
        partner = tl.where(first, d + ROT // 2, d - ROT // 2)
        sign = tl.where(first, -1.0, 1.0)
        c = tl.load(cos_ptr + b * c_b + pos * c_l + d, mask=rot, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * c_b + pos * c_l + d, mask=rot, other=0.0).to(tl.float32)
        # the first ROT columns rotated, x*cos + rotate_half(x)*sin with rotate_half(x)[j] = -x[j + ROT/2]
        # (j < ROT/2), x[j - ROT/2] (after); the other columns as they are
        for part in tl.static_range(2):  # the query heads, then the key heads
            if part == 0:
                x_ptr, o_ptr, x_head, o_head, heads = q_ptr, qo_ptr, q_h, qo_h, heads_q
                x_at, o_at = b * q_b + pos * q_l, b * qo_b + pos * qo_l
            else:
                x_ptr, o_ptr, x_head, o_head, heads = k_ptr, ko_ptr, k_h, ko_h, heads_k
                x_at, o_at = b * k_b + pos * k_l, b * ko_b + pos * ko_l
            for h0 in range(0, heads, BLOCK_H):
                h = h0 + tl.arange(0, BLOCK_H)
                inside = (h < heads)[:, None] & (d < DIM)[None, :]
                x = tl.load(x_ptr + x_at + h[:, None] * x_head + d[None, :], mask=inside, other=0.0).to(tl.float32)
                other = tl.load(x_ptr + x_at + h[:, None] * x_head + partner[None, :], mask=inside & rot[None, :],
                                other=0.0).to(tl.float32)
                a = x * c[None, :]
                r = (other * sign[None, :]) * s[None, :]
                if ROUND:  # each product rounded to the output's dtype before the sum, as the torch form's
                    a = a.to(o_ptr.dtype.element_ty).to(tl.float32)
                    r = r.to(o_ptr.dtype.element_ty).to(tl.float32)
                y = tl.where(rot[None, :], a + r, x)
                tl.store(o_ptr + o_at + h[:, None] * o_head + d[None, :], y.to(o_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def activation_kernel(x_ptr, y_ptr, out_ptr, n, QUICK_GELU: tl.constexpr, BLOCK: tl.constexpr):
        # elementwise over contiguous tensors, each intermediate rounded to x's dtype where the torch form's is:
        # silu(x) * y (the gated MLPs: act_fn(gate_proj(x)) * up_proj(x); torch's silu is x / (1 + e^-x) in
        # fp32), or x * sigmoid(1.702 x) (Qwen2-VL's vision MLP, three torch kernels)
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        x = tl.load(x_ptr + i, mask=inside, other=0.0)
        x32 = x.to(tl.float32)
        if QUICK_GELU:
            t = (x32 * 1.702).to(x.dtype).to(tl.float32)
            y = x32 * (1.0 / (1.0 + tl.exp(-t))).to(x.dtype).to(tl.float32)
        else:
            a = (x32 / (1.0 + tl.exp(-x32))).to(x.dtype).to(tl.float32)
            y = a * tl.load(y_ptr + i, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def decode_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, upto_ptr, slots, group, scale,
                                q_b, q_h, k_b, k_h, k_s, v_b, v_h, v_s, bias_b, o_b, o_h,
                                D: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                                UPTO: tl.constexpr):
        # float arguments as fp32: torch.compile's Inductor types a Python float fp64 (run AA's decode test)
        scale = tl.cast(scale, tl.float32)
        # one program: one row's one key head and the `group` query heads that share it (G: group rounded up to
        # tl.dot's 16), its keys and values read once, BLOCK_N slots at a time, softmax kept online (the running
        # maximum, the sum of exponentials, the weighted values). The products in fp32 from fp32 copies: in tf32
        # (PRECISION) a bf16 value is exact, and Triton's interpreter multiplies bf16 tiles wrongly. UPTO: the
        # slots after the one upto_ptr holds (read at run time: a CUDA graph replays it at a moving slot) are
        # masked in every row, so their blocks are not read (a block of masked slots changes no sum)
        if UPTO:
            slots = tl.minimum(tl.load(upto_ptr).to(tl.int32) + 1, slots)
        b = tl.program_id(0).to(tl.int64)
        head_k = tl.program_id(1)
        g = tl.arange(0, G)
        d = tl.arange(0, D)
        heads = head_k * group + g
        real = g < group
        q = tl.load(q_ptr + b * q_b + heads[:, None] * q_h + d[None, :], mask=real[:, None], other=0.0).to(tl.float32)
        best = tl.full((G,), -1.0e30, tl.float32)  # finite: a block of masked slots gives exp(-inf) = 0, not a NaN
        total = tl.zeros((G,), tl.float32)
        acc = tl.zeros((G, D), tl.float32)
        for start in range(0, slots, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            inside = n < slots
            k = tl.load(k_ptr + b * k_b + head_k * k_h + n[:, None] * k_s + d[None, :], mask=inside[:, None],
                        other=0.0).to(tl.float32)
            bias = tl.load(bias_ptr + b * bias_b + n, mask=inside, other=float("-inf")).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias[None, :]
            new_best = tl.maximum(best, tl.max(s, 1))
            p = tl.exp(s - new_best[:, None])
            shrink = tl.exp(best - new_best)
            total = total * shrink + tl.sum(p, 1)
            v = tl.load(v_ptr + b * v_b + head_k * v_h + n[:, None] * v_s + d[None, :], mask=inside[:, None],
                        other=0.0).to(tl.float32)
            acc = acc * shrink[:, None] + tl.dot(p, v, input_precision=PRECISION)
            best = new_best
        out = acc / total[:, None]
        tl.store(out_ptr + b * o_b + heads[:, None] * o_h + d[None, :], out.to(out_ptr.dtype.element_ty), mask=real[:, None])

    return (delta_rule_kernel, conv_update_kernel, causal_conv_kernel, rms_norm_kernel, chunk_rule_kernel, rotary_kernel,
            activation_kernel, decode_attention_kernel)


# How a program of delta_rule_kernel is cut, the fastest of bench/bench_kernels.py's grid on an H200 (run V,
# Qwen3.5-2B's shapes, torch 2.11 / Triton 3.6). A decode step (one token, 512 rows) reads and writes each state
# tile once and is bound by memory bandwidth: 64 state columns a program, 0.368 ms against 0.420 for 32.
# A prefill (128 prompts of 160 tokens) walks its tokens in order and waits on each token's reductions:
# narrow programs (16 columns, 2 warps) with three loads in flight, 4.53 ms against 5.39 for the step's cut
# (torch's chunked rule: 9.4).
STEP_LAUNCH = {"block_v": 64, "warps": 4, "stages": 1}
PREFILL_LAUNCH = {"block_v": 16, "warps": 2, "stages": 3}
# The prefill's chunked form (chunk_rule_kernel; LATEXOCR_SPEED prefill_rule=chunked): tokens per chunk, state
# columns a program keeps, warps, and tl.dot's precision (tf32x3: three tf32 products, ~fp32; fp32 inputs always
# get it). The fastest of bench/bench_kernels.py's grid on an H200 (run W, Qwen3.5-2B's shapes, 128 prompts x 160
# tokens): 16 tokens, 64 columns, 4 warps, tf32: 0.98 ms (tf32x3: 2.84) against 4.43 for the token-by-token
# kernel and 9.31 for torch's chunked rule; 64 tokens a chunk needs more shared memory than the card has in tf32x3.
CHUNK_LAUNCH = {"chunk": 16, "block_v": 64, "warps": 4, "stages": 1, "precision": "tf32"}


def delta_rule(query, key, value, g, beta, initial_state, use_qk_l2norm: bool,
               state_out: torch.Tensor | None = None, launch: dict | None = None) -> torch.Tensor | None:
    """The gated delta rule over all tokens, in order, for every row (the arguments as transformers'
    rules take them: query/key rows x tokens x key heads x dk, value rows x tokens x value heads x dv, g
    and beta rows x tokens x value heads; initial_state rows x value heads x dk x dv, fp32, contiguous, or
    None: zeros), the final state written to `state_out` (default: initial_state, in place). Returns the
    output (rows x tokens x value heads x dv, in the query's dtype), or None where the kernel does not
    apply (then the caller's torch form runs). launch: block_v (state columns a program keeps), warps and
    stages (see STEP_LAUNCH); default STEP_LAUNCH for one token, PREFILL_LAUNCH for more."""
    rows, tokens, heads_k, dk = query.shape
    heads_v, dv = value.shape[2], value.shape[3]
    state_out = initial_state if state_out is None else state_out
    if (not _power_of_two(dk) or not _power_of_two(dv) or heads_v % heads_k or tokens < 1 or state_out is None
            or any(s is not None and (s.dtype != torch.float32 or not s.is_contiguous()
                                      or tuple(s.shape) != (rows, heads_v, dk, dv)) for s in (initial_state, state_out))
            or torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, g, beta))):
        return None  # the kernel has no backward: training keeps the torch rules
    q, k, v = (t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous() for t in (query, key, value))
    g, beta = (t if t.stride(-1) == 1 else t.contiguous() for t in (g, beta))
    out = torch.empty(rows, tokens, heads_v, dv, dtype=query.dtype, device=query.device)
    launch = {**(STEP_LAUNCH if tokens == 1 else PREFILL_LAUNCH), **(launch or {})}
    block = min(dv, launch["block_v"])
    chunk = launch.get("chunk", 0) if tokens > 1 else 0
    if chunk and (not _power_of_two(chunk) or chunk < 16 or dk < 16 or block < 16):
        return None  # tl.dot takes tiles of 16 and more
    arguments = (q, k, v, g, beta, state_out if initial_state is None else initial_state, state_out, out,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
                 g.stride(1), beta.stride(0), beta.stride(1), tokens, heads_v, heads_v // heads_k, dk ** -0.5, 1e-6)
    common = dict(DK=dk, DV=dv, BV=block, L2NORM=bool(use_qk_l2norm), HAS_INIT=initial_state is not None,
                  num_warps=launch["warps"])
    if chunk:  # the chunked form: matrix products over `chunk` tokens at a time (chunk_rule_kernel)
        ran = _launch(_triton()[4], (rows * heads_v, dv // block), *arguments, C=chunk,
                      SQUARINGS=chunk.bit_length() - 2, PRECISION=_chunk_precision(query, launch), **common)
    else:
        ran = _launch(_triton()[0], (rows * heads_v, dv // block), *arguments, STAGES=launch["stages"], **common)
    return out if ran else None


def delta_rule_step(query, key, value, g, beta, state, use_qk_l2norm: bool) -> torch.Tensor | None:
    """One token (the decode step): `delta_rule` with the state updated in place."""
    if query.shape[1] != 1:
        return None
    return delta_rule(query, key, value, g, beta, state, use_qk_l2norm)


def conv_update(hidden_states, conv_state, weight, bias=None, activation=None) -> torch.Tensor | None:
    """transformers' causal_conv1d_update for one token (hidden_states rows x channels x 1, any strides;
    conv_state rows x channels x width, contiguous; weight channels x taps; activation None or silu): the
    state shifted in place and the output (rows x channels x 1, in hidden_states' dtype), or None where
    the kernel does not apply."""
    rows, channels, length = hidden_states.shape
    width, taps = conv_state.shape[-1], weight.shape[-1]
    if (length != 1 or activation not in (None, "silu", "swish") or not conv_state.is_contiguous()
            or taps > width + 1 or tuple(conv_state.shape[:2]) != (rows, channels) or weight.dim() != 2):
        return None
    weight = weight.contiguous()
    out = torch.empty(rows, channels, 1, dtype=hidden_states.dtype, device=hidden_states.device)
    block = 256
    conv_update_kernel = _triton()[1]
    ran = _launch(conv_update_kernel, (-(-channels // block), rows),
                  hidden_states, conv_state, weight, weight if bias is None else bias, out,
                  hidden_states.stride(0), hidden_states.stride(1), channels,
                  WIDTH=width, TAPS=taps, HAS_BIAS=bias is not None, SILU=activation is not None, BLOCK=block)
    return out if ran else None


def causal_conv(hidden_states, weight, bias=None, activation=None) -> torch.Tensor | None:
    """transformers' causal_conv1d_fn without a cache (the prefill's depthwise causal convolution:
    hidden_states rows x channels x tokens, any strides; weight channels x taps; activation None or silu):
    the output, rows x channels x tokens in hidden_states' dtype, as a view of a token-major buffer (so the
    layer's transpose back gives q, k and v contiguous rows: delta_rule then copies nothing), or None where
    the kernel does not apply. One pass, where the reference copies the transposed input, convolves, and
    applies the SiLU to a strided slice (docs/BENCHMARKS.md run U: 1.1 ms a layer for 128 prompts)."""
    rows, channels, tokens = hidden_states.shape
    if (activation not in (None, "silu", "swish") or weight.dim() != 2 or weight.shape[0] != channels or tokens < 1
            or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden_states, weight, bias))):
        return None  # no backward: training keeps the torch convolution (or fla's)
    weight = weight.contiguous()
    out = torch.empty(rows, tokens, channels, dtype=hidden_states.dtype, device=hidden_states.device)
    block_t, block_c = 16, 128
    causal_conv_kernel = _triton()[2]
    ran = _launch(causal_conv_kernel, (-(-channels // block_c), -(-tokens // block_t), rows),
                  hidden_states, weight, weight if bias is None else bias, out,
                  hidden_states.stride(0), hidden_states.stride(1), hidden_states.stride(2), tokens, channels,
                  TAPS=weight.shape[1], HAS_BIAS=bias is not None, SILU=activation is not None,
                  BLOCK_T=block_t, BLOCK_C=block_c)
    return out.transpose(1, 2) if ran else None


def rms_norm(hidden_states, weight, eps: float, offset: bool, gate=None) -> torch.Tensor | None:
    """The models' RMSNorm in one kernel, where the torch form is ~7 kernels over an fp32 copy (a decode
    step at 512 rows holds ~57 of them for Qwen2-VL-2B). offset False: Qwen2-VL's, Qwen2.5-VL's and
    Qwen3-VL's form (`weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`); True: Qwen3.5's (`(x * rsqrt(...) *
    (1 + weight.float())).type_as(x)`); a gate (Qwen3.5's gated norm, offset False): that form times
    `silu(gate.float())`, in x's dtype. None where the kernel does not apply (a gradient, a row wider than
    one block's 16,384 columns, a weight or gate of another shape)."""
    width = hidden_states.shape[-1]
    if (weight.dim() != 1 or weight.shape[0] != width or width > 16384 or hidden_states.numel() == 0
            or gate is not None and (offset or gate.shape != hidden_states.shape)
            or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden_states, weight, gate))):
        return None  # no backward: training keeps the torch form
    x = hidden_states.reshape(-1, width)
    if x.stride(-1) != 1:
        x = x.contiguous()
    g = x if gate is None else gate.reshape(-1, width)
    if g.stride(-1) != 1:
        g = g.contiguous()
    plain = torch.promote_types(weight.dtype, hidden_states.dtype)
    dtype = hidden_states.dtype if offset or gate is not None else plain
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    block = 1 << (width - 1).bit_length()
    rms_norm_kernel = _triton()[3]
    ran = _launch(rms_norm_kernel, (x.shape[0],), x, weight, g, out, x.stride(0), g.stride(0), width, eps,
                  OFFSET=offset, GATE=gate is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out.view(*hidden_states.shape[:-1], width) if ran else None


def rotary(q, k, cos, sin, head_axis: int, in_fp32: bool):
    """The rotary embedding of the models' attention in one kernel for q and k together, where the torch
    form is ~10 kernels (rotate_half's slices, negation and concatenation, two products and a sum, for
    each; a decode step of Qwen2-VL-2B holds 280 of them), and the vision towers' form also makes fp32
    copies of q and k, a round trip through memory per step over a prefill chunk's ~20k patches.

    q, k: 4-D (batch, heads, tokens, dim) with heads on `head_axis` 1, or (batch, tokens, heads, dim) with
    2; or 3-D (tokens, heads, dim), the vision towers'. cos, sin: (batch, tokens, rotary dim) or (tokens,
    rotary dim), the rotary dim at most dim (Qwen3.5's text layers rotate the first quarter and pass the
    rest). in_fp32 False: transformers' apply_rotary_pos_emb (each product and the sum rounded to the
    dtype q * cos has); True: its apply_rotary_pos_emb_vision (fp32 arithmetic, the result in q's dtype).
    Bit for bit the torch form's (no fused multiply-add). (q, k) or None where the kernel does not apply
    (a gradient, other shapes)."""
    if q.dim() == 3 and cos.dim() == 2:  # the vision towers': one image sequence, heads on axis 1
        q, k, cos, sin = q.unsqueeze(0), k.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0)
        head_axis, squeeze = 2, True
    else:
        squeeze = False
    if (q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or head_axis not in (1, 2) or q.dtype != k.dtype
            or cos.shape != sin.shape or cos.dtype != sin.dtype or q.stride(-1) != 1 or k.stride(-1) != 1
            or q.shape[-1] != k.shape[-1] or cos.shape[-1] > q.shape[-1] or cos.shape[-1] % 2
            or torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin))):
        return None  # no backward: training keeps the torch form
    if head_axis == 2:  # (batch, tokens, heads, dim) -> (batch, heads, tokens, dim): views
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    batch, heads_q, tokens, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != tokens or cos.shape[1] != tokens or cos.shape[0] not in (1, batch):
        return None
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    dtype = q.dtype if in_fp32 else torch.promote_types(q.dtype, cos.dtype)
    # written token-major (batch, tokens, heads, dim), viewed as the caller's layout
    q_out = torch.empty(batch, tokens, heads_q, dim, dtype=dtype, device=q.device).transpose(1, 2)
    k_out = torch.empty(batch, tokens, k.shape[1], dim, dtype=dtype, device=q.device).transpose(1, 2)
    block_d = 1 << (dim - 1).bit_length()
    block_h = max(1, min(1 << (max(heads_q, k.shape[1]) - 1).bit_length(), max(1, 4096 // block_d)))
    rotary_kernel = _triton()[5]
    ran = _launch(rotary_kernel, (batch * tokens,), q, k, cos, sin, q_out, k_out, tokens, heads_q, k.shape[1],
                  q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
                  cos.stride(0), cos.stride(1), DIM=dim, ROT=cos.shape[-1], BLOCK_D=block_d, BLOCK_H=block_h,
                  ROUND=not in_fp32, enable_fp_fusion=False)
    if not ran:
        return None
    if head_axis == 2:
        q_out, k_out = q_out.transpose(1, 2), k_out.transpose(1, 2)
    if squeeze:
        q_out, k_out = q_out.squeeze(0), k_out.squeeze(0)
    return q_out, k_out


def _activation(x, y, quick_gelu: bool) -> torch.Tensor | None:
    """activation_kernel over x (and y): a new tensor in the dtype the torch form's result has, or None."""
    if (not x.is_contiguous() or x.numel() == 0 or y is not None and (not y.is_contiguous() or y.shape != x.shape)
            or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y))):
        return None  # no backward: training keeps the torch form
    dtype = x.dtype if y is None else torch.promote_types(x.dtype, y.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    block = 1024
    ran = _launch(_triton()[6], (-(-x.numel() // block),), x, x if y is None else y, out, x.numel(),
                  QUICK_GELU=quick_gelu, BLOCK=block)
    return out if ran else None


def gated_silu(gate, up) -> torch.Tensor | None:
    """silu(gate) * up in one kernel, as the models' gated MLPs compute it between their projections
    (`act_fn(gate_proj(x)) * up_proj(x)`: the SiLU rounded to gate's dtype, then the product; two torch
    kernels and a round trip of the activation through memory). None where the kernel does not apply."""
    return _activation(gate, up, False)


def quick_gelu(x) -> torch.Tensor | None:
    """x * sigmoid(1.702 x) in one kernel (transformers' QuickGELUActivation, Qwen2-VL's vision MLP: three
    torch kernels, each intermediate rounded to x's dtype as here). None where the kernel does not apply."""
    return _activation(x, None, True)


# How a program of decode_attention_kernel is cut: slots per block and warps. The fastest of bench/bench_kernels.py's
# grid on an H200 at both 2B models' decode shapes (run W, 512 rows x 192 slots, launch overhead included): 16 slots,
# 2 warps, 0.079 ms (head dim 128; SDPA 0.129) and 0.109 ms (head dim 256; SDPA 0.197); 64 slots, 4 warps: 0.118.
ATTENTION_LAUNCH = {"block_n": 16, "warps": 2}


def decode_attention(query, key, value, bias, scale: float | None, launch: dict | None = None,
                     attend_upto: torch.Tensor | None = None) -> torch.Tensor | None:
    """A decode step's attention in one kernel: each row's one query token against its cache slots, the key
    mask added as given (0 where a slot may be attended, -inf elsewhere). torch's SDPA, which transformers'
    sdpa attention calls with the query heads packed per key head (pack_gqa), runs it through its
    memory-efficient kernel, whose tiles of 64 queries hold 2-8 here: 69 us a layer for Qwen2-VL-2B at 512 rows
    (run V's profile), where reading the layer's keys and values takes ~15 us at the card's bandwidth.

    query: (batch, heads, 1, dim); key, value: (batch, key heads, slots, dim), heads a multiple of key heads;
    bias: (batch or 1, slots). attend_upto: a 1-element integer tensor on the query's device, the last slot any
    row's bias leaves open (the static decoder's write slot): the slots after it are not read, which changes
    nothing but the bytes read (their bias is -inf in every row). The result as transformers' sdpa attention
    returns it: (batch, 1, heads, dim), contiguous, in query's dtype. The same sums as SDPA's in another order
    (not bit for bit). None where the kernel does not apply (a gradient, other shapes, a head dim that is not a
    power of two from 16 to 256)."""
    if (query.dim() != 4 or key.dim() != 4 or value.shape != key.shape or query.shape[2] != 1 or bias.dim() != 2
            or query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3] or query.shape[1] % key.shape[1]
            or bias.shape[0] not in (1, query.shape[0]) or bias.shape[1] != key.shape[2] or not bias.is_floating_point()
            or not _power_of_two(query.shape[3]) or not 16 <= query.shape[3] <= 256
            or query.shape[1] // key.shape[1] > 64 or key.shape[2] == 0 or not (query.dtype == key.dtype == value.dtype)
            or any(t.stride(-1) != 1 for t in (query, key, value, bias))
            or torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        return None  # no backward: training keeps the torch form
    batch, heads, _, dim = query.shape
    group = heads // key.shape[1]
    launch = {**ATTENTION_LAUNCH, **(launch or {})}
    out = torch.empty(batch, 1, heads, dim, dtype=query.dtype, device=query.device)
    upto = attend_upto is not None and attend_upto.numel() == 1 and attend_upto.device == query.device
    ran = _launch(_triton()[7], (batch, key.shape[1]), query, key, value, bias, out, attend_upto if upto else bias,
                  key.shape[2], group,
                  dim ** -0.5 if scale is None else scale, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
                  key.stride(2), value.stride(0), value.stride(1), value.stride(2),
                  bias.stride(0) if bias.shape[0] == batch else 0, out.stride(0), out.stride(2), D=dim,
                  G=max(16, 1 << (group - 1).bit_length()), BLOCK_N=launch["block_n"],
                  PRECISION="tf32" if query.dtype != torch.float32 and _has_tf32(query) else "ieee", UPTO=upto,
                  num_warps=launch["warps"])
    return out if ran else None
