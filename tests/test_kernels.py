"""latexocr/fast/kernels.py: Qwen3.5's inference kernels against the transformers functions they stand
in for. Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors; it is read when the
kernels are first built, so each check runs in a child process with it set. On a GPU: the compiled kernels."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton", reason="Triton is not installed: the decode kernels never run here")

CHECK_KERNELS = '''
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
from latexocr.fast import kernels

device = "cuda" if torch.cuda.is_available() and "{device}" == "cuda" else "cpu"
assert kernels.usable(torch.zeros(1, device=device))
torch.manual_seed(0)
reference_rule = q35.torch_recurrent_gated_delta_rule
reference_conv = q35.causal_conv1d_update
reference_conv_fn = q35.causal_conv1d_fn
worst = {{}}
exact = {{}}
for heads_k in (4, 2):  # 2: grouped value heads, as Qwen3.5-4B's 16 key heads under 32 value heads
    for dtype in (torch.float32, torch.bfloat16):
        rows, heads_v, dk, dv = 3, 4, 16, 64  # dv: two of the kernel's 32-column blocks
        # q, k, v as the layer makes them: views of one projection split along its last dimension
        mixed = torch.randn(rows, 1, 2 * heads_k * dk + heads_v * dv, device=device).to(dtype)
        query, key, value = torch.split(mixed, [heads_k * dk, heads_k * dk, heads_v * dv], dim=-1)
        query, key = query.reshape(rows, 1, heads_k, dk), key.reshape(rows, 1, heads_k, dk)
        value = value.reshape(rows, 1, heads_v, dv)
        g = -torch.rand(rows, 1, heads_v, device=device)
        beta = torch.rand(rows, 1, heads_v, device=device).to(dtype)
        state = torch.randn(rows, heads_v, dk, dv, device=device)
        want_out, want_state = reference_rule(query, key, value, g=g, beta=beta, initial_state=state.clone(),
                                              output_final_state=True, use_qk_l2norm_in_kernel=True)
        buffer = state.clone()
        out = kernels.delta_rule_step(query, key, value, g, beta, buffer, True)
        assert out.shape == want_out.shape and out.dtype == dtype, (out.shape, want_out.shape)
        worst[("state", heads_k, str(dtype))] = (buffer - want_state).abs().max().item()
        worst[("out", heads_k, str(dtype))] = ((out.float() - want_out.float()).abs().max()
                                               / want_out.float().abs().max()).item()
        # the prefill: several tokens (not a multiple of the reference's chunks of 4, nor of the chunked
        # kernel's 16: two chunks, the second short), from zeros or a given state, against the chunked rule
        tokens = 21
        mixed = torch.randn(rows, tokens, 2 * heads_k * dk + heads_v * dv, device=device).to(dtype)
        q_t, k_t, v_t = torch.split(mixed, [heads_k * dk, heads_k * dk, heads_v * dv], dim=-1)
        q_t, k_t = q_t.reshape(rows, tokens, heads_k, dk), k_t.reshape(rows, tokens, heads_k, dk)
        v_t = v_t.reshape(rows, tokens, heads_v, dv)
        g_t = -torch.rand(rows, tokens, heads_v, device=device) * 0.1
        beta_t = torch.rand(rows, tokens, heads_v, device=device).to(dtype)
        # each way a program may be cut (bench/bench_kernels.py's choices): the same arithmetic
        launches = ({{}}, {{"block_v": 64, "warps": 8, "stages": 2}}, {{"block_v": 16, "warps": 2, "stages": 3}},
                    {{"chunk": 16, "block_v": 32, "warps": 4}})  # the chunked form: 16 tokens at a time
        cases = [(None, launches[0]), (state, launches[0]), (None, launches[3]), (state, launches[3])]
        if heads_k == 2 and dtype == torch.float32:  # once: Triton's interpreter is slow
            cases += [(None, launches[1]), (state, launches[2])]
        for start, launch in cases:
            want_out, want_state = q35.torch_chunk_gated_delta_rule(
                q_t, k_t, v_t, g=g_t, beta=beta_t, chunk_size=4, initial_state=start, output_final_state=True,
                use_qk_l2norm_in_kernel=True)
            final = torch.empty_like(state)
            out = kernels.delta_rule(q_t, k_t, v_t, g_t, beta_t, start, True, state_out=final, launch=launch)
            key_ = ("prefill", start is None, str(dtype), str(launch))
            worst[key_] = ((out.float() - want_out.float()).abs().max() / want_out.float().abs().max()).item()
            worst[("prefill state", start is None, str(dtype), str(launch))] = ((final - want_state).abs().max()
                                                                  / want_state.abs().max()).item()
        # the convolution update: x strided as the layer's transpose makes it, with and without a bias
        channels, taps = 300, 4  # not a multiple of the kernel's block of channels
        x = torch.randn(rows, 1, channels, device=device).to(dtype).transpose(1, 2)
        weight = torch.randn(channels, taps, device=device).to(dtype)
        for bias in (None, torch.randn(channels, device=device).to(dtype)):
            conv = torch.randn(rows, channels, taps, device=device).to(dtype)
            expected = reference_conv(x, mine := conv.clone(), weight, bias, "silu")
            got = kernels.conv_update(x, conv, weight, bias, "silu")
            assert torch.equal(conv, mine), "the state shifted as the reference shifts it"
            worst[("conv", bias is None, str(dtype))] = ((got.float() - expected.float()).abs().max()
                                                         / expected.float().abs().max()).item()
        # the prefill's convolution: x as the layer hands it (its projection transposed: channels x tokens
        # with the channels adjacent), 21 tokens (not a multiple of the kernel's 16), with and without a bias
        tokens = 21
        x = torch.randn(rows, tokens, channels, device=device).to(dtype).transpose(1, 2)
        for bias in (None, torch.randn(channels, device=device).to(dtype)):
            expected = reference_conv_fn(x, weight, bias, activation="silu")
            got = kernels.causal_conv(x, weight, bias, "silu")
            assert got.shape == expected.shape and got.dtype == dtype
            assert got.transpose(1, 2).is_contiguous(), "token-major: the split q, k, v need no copy"
            worst[("prefill conv", bias is None, str(dtype))] = ((got.float() - expected.float()).abs().max()
                                                                 / expected.float().abs().max()).item()
        # the RMSNorms: the text models' classes themselves, a width that is not a power of two, rows strided
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRMSNorm
        for norm, form in ((Qwen2VLRMSNorm(96, eps=1e-6), "plain"), (q35.Qwen3_5RMSNorm(96, eps=1e-6), "offset"),
                           (q35.Qwen3_5RMSNormGated(96, eps=1e-6), "gated")):
            norm = norm.to(device=device, dtype=dtype)
            with torch.no_grad():
                norm.weight.normal_()
            x = torch.randn(rows, 7, 2 * 96, device=device).to(dtype)[..., :96]
            gate = torch.randn(rows, 7, 96, device=device).to(dtype)
            with torch.no_grad():
                expected = norm(x, gate) if form == "gated" else norm(x)
                eps = norm.eps if form == "offset" else norm.variance_epsilon
                got = kernels.rms_norm(x, norm.weight, eps, form == "offset", gate if form == "gated" else None)
            assert got.shape == expected.shape and got.dtype == expected.dtype, (got.dtype, expected.dtype)
            worst[("rms norm", form, str(dtype))] = ((got.float() - expected.float()).abs().max()
                                                     / expected.float().abs().max()).item()
        # the rotary embedding: the text layers' (grouped key heads, q and k as the attention's transposed
        # views, cos shared by the batch or not, heads on axis 1 or 2; Qwen3.5's partial rotary) and the vision
        # towers' (q and k views of one qkv projection, a head dim that is not a power of two), cos in q's dtype
        # or fp32. Bit for bit the torch form's on a GPU (no fused multiply-add) and in the interpreter's fp32;
        # its bf16 rounding is not the GPU's (it rounds half up), so a unit in the last place there
        from transformers.models.qwen2_vl import modeling_qwen2_vl as q2
        batch, tokens, heads_q, heads_kv, dim = 3, 5, 6, 2, 24
        q = torch.randn(batch, tokens, heads_q * dim, device=device).to(dtype).view(batch, tokens, heads_q, dim)
        k = torch.randn(batch, tokens, heads_kv * dim, device=device).to(dtype).view(batch, tokens, heads_kv, dim)
        angle = torch.randn(batch, tokens, dim // 2, device=device)
        for cos_dtype in (dtype, torch.float32):
            cos, sin = (f(torch.cat([angle, angle], -1)).to(cos_dtype) for f in (torch.cos, torch.sin))
            cases = [("text", q2.apply_rotary_pos_emb, cos, sin, 1), ("text, one cos", q2.apply_rotary_pos_emb, cos[:1], sin[:1], 1),
                     ("text, heads on axis 2", q2.apply_rotary_pos_emb, cos, sin, 2),
                     ("partial", q35.apply_rotary_pos_emb, cos[..., :4].repeat(1, 1, 2), sin[..., :4].repeat(1, 1, 2), 1)]
            for what, reference, c, s_, axis in cases:
                q_, k_ = (q, k) if axis == 2 else (q.transpose(1, 2), k.transpose(1, 2))
                expected = reference(q_, k_, c, s_, unsqueeze_dim=axis)
                got = kernels.rotary(q_, k_, c, s_, axis, False)
                for e, g in zip(expected, got):
                    assert e.shape == g.shape and e.dtype == g.dtype, (what, e.shape, g.shape, e.dtype, g.dtype)
                    key_ = ("rotary " + what, str(g.dtype), str(dtype))
                    exact[key_] = exact.get(key_, True) and torch.equal(e, g)
                    worst[("rotary " + what, None, str(dtype), str(cos_dtype))] = ((e.float() - g.float()).abs().max()
                                                                              / e.float().abs().max()).item()
        seq, heads, dim = 37, 4, 20
        qkv = torch.randn(seq, 3 * heads * dim, device=device).to(dtype).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3)
        angle = torch.randn(seq, dim // 2, device=device)
        cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
        expected = q2.apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
        got = kernels.rotary(qkv[0], qkv[1], cos, sin, 1, True)
        for e, g in zip(expected, got):
            assert e.shape == g.shape and e.dtype == g.dtype, (e.shape, g.shape, e.dtype, g.dtype)
            exact[("rotary vision", str(g.dtype))] = exact.get(("rotary vision", str(g.dtype)), True) and torch.equal(e, g)
            worst[("rotary vision", None, str(dtype))] = ((e.float() - g.float()).abs().max() / e.float().abs().max()).item()
        # the MLPs' activations: transformers' activation modules themselves (SiLU then the product; QuickGELU),
        # a size that is not a multiple of the kernel's block
        from transformers.activations import QuickGELUActivation, SiLUActivation
        gate, up = torch.randn(rows, 7, 300, device=device).to(dtype), torch.randn(rows, 7, 300, device=device).to(dtype)
        for what, expected, got in (("silu * up", SiLUActivation()(gate) * up, kernels.gated_silu(gate, up)),
                                    ("quick gelu", QuickGELUActivation()(gate), kernels.quick_gelu(gate))):
            assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.dtype, expected.dtype)
            worst[(what, None, str(dtype))] = ((got.float() - expected.float()).abs().max()
                                               / expected.float().abs().max()).item()
        # the decode step's attention: one query token a row (6 query heads per key head, as the attention's
        # transposed view), the cache's slots (not a multiple of the blocks: 70), each row's key mask of 0 / -inf
        # (its own left padding, the slots not yet written), or one mask for the batch; against transformers'
        # sdpa attention (SDPA over the query heads packed per key head)
        import types
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        for heads_q, heads_kv, dim in ((12, 2, 32), (4, 4, 16)):
            module = types.SimpleNamespace(num_key_value_groups=heads_q // heads_kv)
            q = torch.randn(rows, 1, heads_q * dim, device=device).to(dtype).view(rows, 1, heads_q, dim).transpose(1, 2)
            k, v = (torch.randn(rows, heads_kv, 70, dim, device=device).to(dtype) for _ in range(2))
            bias = torch.full((rows, 70), float("-inf"), device=device, dtype=dtype)
            for r in range(rows):
                bias[r, 3 * r:60] = 0.0
            for what, mask, launch in (("attention", bias, None), ("attention, blocks of 16", bias, {{"block_n": 16}}),
                                       ("attention, one mask", bias[:1], None)):
                expected = sdpa_attention_forward(module, q, k, v, mask[:, None, None, :], scaling=0.3)[0]
                got = kernels.decode_attention(q, k, v, mask, 0.3, launch=launch)
                assert got.shape == expected.shape and got.dtype == expected.dtype and got.is_contiguous(), what
                worst[(what, heads_q, str(dtype))] = ((got.float() - expected.float()).abs().max()
                                                      / expected.float().abs().max()).item()
                # the static decoder's step passes its write slot (59 here: every later slot is masked in every
                # row): the blocks after it are not read, and the result is the same to the bit
                upto = torch.tensor([59], device=device)
                assert torch.equal(kernels.decode_attention(q, k, v, mask, 0.3, launch=launch, attend_upto=upto), got), what
            # ... and they are indeed not read: a slot after it left open changes the full result, not the cut one
            opened = bias.clone()
            opened[:, 65] = 0.0
            cut = kernels.decode_attention(q, k, v, opened, 0.3, attend_upto=torch.tensor([59], device=device))
            assert torch.equal(cut, kernels.decode_attention(q, k, v, bias, 0.3))
            assert not torch.equal(kernels.decode_attention(q, k, v, opened, 0.3), cut)
print("WORST", worst)
inexact = [what for what, same in exact.items() if not same and (device == "cuda" or "float32" in what[1])]
assert not inexact, ("the rotary kernel differs from the torch form", inexact)
for (what, _, dtype, *_), err in worst.items():
    # relative to the largest value (the state: absolute). fp32: the same sums in another order; bf16: a
    # few units in the last place (the reference rounds the convolution and then its SiLU in bf16, the
    # kernel only its result; bf16 has 8 bits of mantissa: 2**-8 = 0.004)
    assert err < (2e-5 if "float32" in dtype else 2e-2), (what, dtype, err)
print("OK")
'''


def run_child(code: str, *args: str, **env) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **env}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_decode_kernels_compute_the_reference_step():
    """delta_rule_step: transformers' one-token recurrent rule (output and new state, the state updated in
    the buffer given) for shared and grouped key heads, fp32 and bf16, q/k/v strided as the layer splits
    them; delta_rule over a prompt: the chunked rule (from zeros and from a state); conv_update:
    causal_conv1d_update (output and the shifted state, bias or none, strided input)."""
    assert "OK" in run_child(CHECK_KERNELS.format(device="cpu"), TRITON_INTERPRET="1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled Triton kernels")
def test_gpu_decode_kernels_compute_the_reference_step():
    assert "OK" in run_child(CHECK_KERNELS.format(device="cuda"))


DECODE_WITH_KERNELS = '''
import json, sys
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from latexocr.batching import SampleEncoder
from latexocr.fast import kernels, standins
from latexocr.generation import predict
from latexocr.modeling import vision_language_core
from latexocr.sample import sizing_for
from transformers.models.qwen3_5 import modeling_qwen3_5 as q35

folder, paths = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
processor = AutoProcessor.from_pretrained(folder)
encoder = SampleEncoder(processor, sizing_for(processor))
assert standins.uses_kernel_conv_update(vision_language_core(model))
assert standins.norm_classes(model) == {q35.Qwen3_5RMSNorm: "offset", q35.Qwen3_5RMSNormGated: "gated"}
calls = {"delta": 0, "conv": 0, "prefill": 0, "chunked": 0, "prefill conv": 0, "norm": 0}
rule, update, prefill_conv, norm = kernels.delta_rule, kernels.conv_update, kernels.causal_conv, kernels.rms_norm
def counted_norm(*a, **k):
    out = norm(*a, **k); calls["norm"] += out is not None; return out
kernels.rms_norm = counted_norm
def counted_rule(query, *a, **k):
    out = rule(query, *a, **k); calls["delta" if query.shape[1] == 1 else "prefill"] += out is not None
    calls["chunked"] += out is not None and k.get("launch") is kernels.CHUNK_LAUNCH; return out
def counted_update(*a, **k):
    out = update(*a, **k); calls["conv"] += out is not None; return out
def counted_prefill_conv(*a, **k):
    out = prefill_conv(*a, **k); calls["prefill conv"] += out is not None; return out
kernels.delta_rule, kernels.conv_update, kernels.causal_conv = counted_rule, counted_update, counted_prefill_conv
kw = dict(max_new_tokens=5, num_workers=0, progress=False)
reference = predict(model, encoder, paths, batch_size=1, engine="generate", **kw)
static = predict(model, encoder, paths, batch_size=len(paths), engine="static", **kw)
assert static == reference, (static, reference)
assert all(calls.values()), calls
import os
assert calls["chunked"] == calls["prefill"], "the default prefill_rule: chunk_rule_kernel's matrix products"
os.environ["LATEXOCR_SPEED"] = "prefill_rule=tokens"  # each prompt token by token
before = dict(calls)
assert predict(model, encoder, paths, batch_size=len(paths), engine="static", **kw) == reference
assert calls["prefill"] > before["prefill"] and calls["chunked"] == before["chunked"], "the token-by-token kernel ran"
del os.environ["LATEXOCR_SPEED"]
torch_norm = q35.Qwen3_5RMSNorm.forward
with standins.prefill_as_decoded(model):  # BATCH_SIZE=auto's memory probe prefills as the decoder does
    assert q35.torch_chunk_gated_delta_rule.func is standins.prefill_delta_rule  # with the chunked rule's launch
    assert q35.causal_conv1d_fn is standins.prefill_conv
    assert q35.Qwen3_5RMSNorm.forward is not torch_norm
assert q35.torch_chunk_gated_delta_rule is not standins.prefill_delta_rule
assert q35.causal_conv1d_fn is not standins.prefill_conv
assert q35.Qwen3_5RMSNorm.forward is torch_norm
os.environ["LATEXOCR_SPEED"] = "decode_kernels=off,prefill_kernel=off,norm_kernel=off"  # the torch forms: no kernel
with standins.prefill_as_decoded(model):
    assert q35.torch_chunk_gated_delta_rule is not standins.prefill_delta_rule
    assert q35.causal_conv1d_fn is not standins.prefill_conv
    assert q35.Qwen3_5RMSNorm.forward is torch_norm
before = dict(calls)
assert predict(model, encoder, paths, batch_size=len(paths), engine="static", **kw) == reference
assert calls == before, (calls, before)
print("OK", calls)
'''


def test_the_static_decoder_with_the_kernels_gives_generates_texts(formula_images, tmp_path):
    """The decoder's prefill and decode step with the kernels in them (Triton's interpreter on the CPU,
    fp32): the same greedy texts as one-at-a-time generate (which runs the reference functions), and every
    kernel did run (the prefill's rule, the step's rule, the convolution update); with LATEXOCR_SPEED's
    decode_kernels=off,prefill_kernel=off none runs and the texts are the same."""
    import json

    from latexocr.testing import build_tiny_model
    folder = build_tiny_model(tmp_path / "tiny_qwen3_5", "qwen3_5")
    paths = [str(p) for p, _ in formula_images[:2]]  # two prompt lengths: left padding in the prefill
    assert "OK" in run_child(DECODE_WITH_KERNELS, str(folder), json.dumps(paths), TRITON_INTERPRET="1")


GPU_DECODE = '''
import json, os, sys
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from latexocr.batching import SampleEncoder
from latexocr.generation import predict
from latexocr.sample import sizing_for

folder, paths = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
model = model.cuda().eval()
processor = AutoProcessor.from_pretrained(folder)
encoder = SampleEncoder(processor, sizing_for(processor))
kw = dict(max_new_tokens=16, num_workers=0, progress=False, batch_size=len(paths), engine="static")
with_kernels = predict(model, encoder, paths, **kw)
os.environ["LATEXOCR_SPEED"] = ("decode_kernels=off,prefill_kernel=off,norm_kernel=off,rotary_kernel=off,activation_kernel=off,"
                                 "attention_kernel=off,patch_matmul=off")
assert predict(model, encoder, paths, **kw) == with_kernels
os.environ["LATEXOCR_SPEED"] = "pinned_batches=on"  # the chunks from page-locked memory, copied without a wait
assert predict(model, encoder, paths, **{**kw, "num_workers": 2}) == with_kernels
os.environ["LATEXOCR_SPEED"] = "fused_qkv=on"  # q, k and v from one product, recorded in the step's graphs too
assert predict(model, encoder, paths, **kw) == with_kernels
del os.environ["LATEXOCR_SPEED"]
from latexocr.timing import Stopwatch
clock = Stopwatch()  # BATCH_SIZE=auto: the memory probe on the card, its parts timed for infer.py --profile
assert predict(model, encoder, paths, **{**kw, "batch_size": None}, stopwatch=clock) == with_kernels
assert {"release", f"prefill of the {len(paths)} largest"} <= set(clock.parts["memory probe"]), clock.parts
assert "time, memory probe: release " in clock.lines(), clock.lines()
print("OK")
'''


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels in the CUDA graphs")
def test_gpu_the_decoder_with_the_kernels_gives_the_torch_forms_texts(formula_images, tmp_path):
    """On a GPU the step's kernels are recorded in its CUDA graphs: the same texts (fp32) as the torch forms."""
    import json

    from latexocr.testing import build_tiny_model
    folder = build_tiny_model(tmp_path / "tiny_qwen3_5", "qwen3_5")
    paths = [str(p) for p, _ in formula_images[:10]]
    assert "OK" in run_child(GPU_DECODE, str(folder), json.dumps(paths))


def test_bench_kernels_times_every_launch_and_checks_it(tmp_path):
    """bench/bench_kernels.py (which decides STEP_LAUNCH and PREFILL_LAUNCH on a GPU), run through Triton's
    interpreter at tiny shapes (a GPU's would take minutes there): every launch of the grid timed and its
    output equal to the default launch's, the torch forms timed beside them, the summary written."""
    import json
    out = tmp_path / "bench_kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kernels.py"), "--rows", "2", "--tokens", "3",
                           "--step-rows", "2", "--heads-k", "1", "--heads-v", "2", "--dk", "16", "--dv", "32",
                           "--rotary-patches", "8", "--rotary-tokens", "3", "--attention-slots", "20", "--repeat", "1",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    prefill = [r for r in report["results"] if r["what"] == "prefill" and "launch" in r]
    token_by_token = [r for r in prefill if "chunk" not in r["launch"]]
    assert len(token_by_token) == 2 * 3 * 3  # blocks of 16 and 32 columns x warps x stages
    # the chunked form: 16, 32 and 64 tokens x one block of 32 columns x warps x precisions (the interpreter
    # computes tf32 in fp32: no error here; on a GPU the report shows tf32's)
    assert len(prefill) - len(token_by_token) == 3 * 1 * 2 * 2
    assert all(r["max_relative_error"] < 1e-5 for r in prefill), [r for r in prefill if "error" in r]
    assert report["summary"]["prefill"]["fastest"]["launch"] in [r["launch"] for r in prefill]
    assert report["summary"]["step"]["torch"] > 0 and report["summary"]["prefill"]["torch"] > 0
    # the rotary and activation kernels timed beside their torch forms (the rotary results are bit-equal in
    # bf16 on a GPU, which the kernels' GPU test asserts; the interpreter rounds bf16 half up, so not here)
    assert all(report["summary"][what]["kernel"] > 0 for what in ("rotary vision", "rotary prefill", "rotary step",
                                                                  "silu * up prefill", "silu * up step", "quick gelu vision"))
    assert all(report["summary"][what]["max_relative_error"] < 2e-2 for what in ("silu * up step", "quick gelu vision"))
    assert all(report["summary"][what]["max_relative_error"] < 2e-2 and report["summary"][what]["kernel"] > 0
               for what in ("patch embedding", "patch embedding, 16-pixel patches"))
    # the decode step's attention beside SDPA, at both head dims, and each way to cut its program timed
    for what in ("attention step", "attention step, head dim 256"):
        assert report["summary"][what]["kernel"] > 0 and report["summary"][what]["max_relative_error"] < 2e-2
        assert len([r for r in report["results"] if r["what"] == what and "launch" in r]) == 4 * 3
        # ... and as the static decoder calls it, to its write slot: the same result, timed
        (upto,) = [r for r in report["results"] if r["what"] == what and r.get("path") == "kernel, to the write slot"]
        assert upto["same_as_kernel"] and report["summary"][what]["kernel, to the write slot"] > 0


NORMS_EVERY_FAMILY = '''
import json, sys
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from latexocr.batching import SampleEncoder
from latexocr.fast import kernels, standins
from latexocr.generation import predict
from latexocr.sample import sizing_for

folders, paths = json.loads(sys.argv[1]), json.loads(sys.argv[2])
calls = {"norm": 0, "text rotary": 0, "vision rotary": 0, "silu * up": 0, "quick gelu": 0, "attention": 0,
         "attention to the write slot": 0, "patch matmul": 0}
patch_matmul = standins._matmul_patch_embed_forward
def counted_patch_matmul(*a):
    calls["patch matmul"] += 1; return patch_matmul(*a)
standins._matmul_patch_embed_forward = counted_patch_matmul
norm, rotary, gated_silu, quick_gelu = kernels.rms_norm, kernels.rotary, kernels.gated_silu, kernels.quick_gelu
attention = kernels.decode_attention
def counted_attention(*a, **k):
    out = attention(*a, **k); calls["attention"] += out is not None
    calls["attention to the write slot"] += out is not None and k.get("attend_upto") is not None; return out
kernels.decode_attention = counted_attention
def counted_norm(*a, **k):
    out = norm(*a, **k); calls["norm"] += out is not None; return out
def counted_gated_silu(*a):
    out = gated_silu(*a); calls["silu * up"] += out is not None; return out
def counted_quick_gelu(*a):
    out = quick_gelu(*a); calls["quick gelu"] += out is not None; return out
kernels.gated_silu, kernels.quick_gelu = counted_gated_silu, counted_quick_gelu
def counted_rotary(q, k, cos, sin, head_axis, in_fp32):
    out = rotary(q, k, cos, sin, head_axis, in_fp32)
    calls["vision rotary" if in_fp32 else "text rotary"] += out is not None
    return out
kernels.rms_norm, kernels.rotary = counted_norm, counted_rotary
for family, folder in folders.items():
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(folder)
    encoder = SampleEncoder(processor, sizing_for(processor))
    forms = standins.norm_classes(model)
    assert sorted(forms.values()) == (["gated", "offset"] if family == "qwen3_5" else ["plain"]), (family, forms)
    rotaries = standins.rotary_functions(model)
    assert sorted((f, form) for (_, f), form in rotaries.items()) == [
        ("apply_rotary_pos_emb", "text"), ("apply_rotary_pos_emb_vision", "vision")], (family, rotaries)
    # the text MLPs gated (SiLU); the vision MLP: Qwen2-VL's QuickGELU, Qwen2.5-VL's gated, the others' GELU (one
    # torch kernel already: left alone)
    vision = {"qwen2_vl": ["quick"], "qwen2_5_vl": ["gated"]}.get(family, [])
    assert sorted(standins.mlp_classes(model).values()) == sorted(["gated"] + vision), (family, standins.mlp_classes(model))
    # the vision tower's patch embedding as one product: the class's own forward's values
    (embed_class,) = standins.patch_embed_classes(model)
    embed = next(m for m in model.modules() if type(m) is embed_class)
    patches = torch.randn(37, embed.proj.weight[0].numel())
    with torch.no_grad():
        expected, got = embed(patches), patch_matmul(embed, patches)
    assert got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5), family
    kw = dict(max_new_tokens=4, num_workers=0, progress=False)
    reference = predict(model, encoder, paths, batch_size=1, engine="generate", **kw)
    before = dict(calls)
    assert predict(model, encoder, paths, batch_size=len(paths), engine="static", **kw) == reference, family
    ran = [what for what in calls if calls[what] > before[what]]
    assert sorted(ran) == sorted(["norm", "text rotary", "vision rotary", "silu * up", "attention", "patch matmul",
                                  "attention to the write slot"]
                                 + (["quick gelu"] if family == "qwen2_vl" else [])), (family, calls, before)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    with standins.prefill_as_decoded(model):  # the swaps in place while it runs, restored after
        module, function = next(iter(rotaries))
        assert getattr(module, function) is not standins._REPLACED[module, function]
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is standins._kernel_sdpa
    assert (module, function) not in standins._REPLACED
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
import os
os.environ["LATEXOCR_SPEED"] = ("rotary_kernel=off,norm_kernel=off,activation_kernel=off,attention_kernel=off,"
                                 "patch_matmul=off")  # the torch forms: no kernel
before = dict(calls)
assert predict(model, encoder, paths, batch_size=len(paths), engine="static", **kw) == reference
assert calls == before, (calls, before)
print("OK")
'''


def test_the_norm_rotary_activation_and_attention_kernels_give_generates_texts_in_every_family(tiny_family_dirs,
                                                                                                 formula_images):
    """LATEXOCR_SPEED norm_kernel, rotary_kernel, activation_kernel and attention_kernel (on by default): each
    family's text RMSNorm class is found by its forward's source (Qwen3.5's offset form apart), its rotary
    functions (text and vision tower) and MLP classes by theirs, and the static decoder with kernels.rms_norm,
    kernels.rotary, the activation kernels and kernels.decode_attention (through transformers' sdpa entry) in
    its prefill and step, and the vision tower's patch embedding as one product (LATEXOCR_SPEED patch_matmul: the
    class's own values), (Triton's interpreter, fp32) gives one-at-a-time generate's greedy texts; every
    family's layers call them (a family whose attention stopped calling the module's function, or looking up
    the sdpa entry, would count none); all off, none runs."""
    import json
    folders = {family: str(folder) for family, folder in tiny_family_dirs.items()}
    paths = [str(p) for p, _ in formula_images[:2]]
    assert "OK" in run_child(NORMS_EVERY_FAMILY, json.dumps(folders), json.dumps(paths), TRITON_INTERPRET="1")


def test_a_kernel_this_machine_refuses_falls_back_with_one_line(capsys):
    """A Triton version or GPU that refuses a kernel's compile: one warning line, the caller's torch form
    (False), and no second attempt for those settings; other settings are still tried."""
    from latexocr.fast import kernels
    calls = []

    class Refused:
        __name__ = "refused_kernel"

        def __getitem__(self, grid):
            def run(*args, **settings):
                calls.append(settings)
                raise RuntimeError("PassManager::run failed\nmore detail")
            return run

    kernel = Refused()
    assert kernels._launch(kernel, (1,), 0, BLOCK=16) is False
    assert kernels._launch(kernel, (1,), 0, BLOCK=16) is False and len(calls) == 1
    err = capsys.readouterr().err
    assert err.count("refused_kernel did not run here (RuntimeError: PassManager::run failed)") == 1
    assert kernels._launch(kernel, (1,), 0, BLOCK=32) is False and len(calls) == 2


def test_the_chunked_rule_multiplies_in_plain_fp32_where_a_gpu_has_no_tf32(monkeypatch):
    """The chunked prefill rule (the default) asks tl.dot for tf32 products; a GPU before Ampere (a T4 or V100:
    the small cards of issue 28) has none, so there it asks for plain fp32 products. fp32 inputs keep tf32x3
    (~fp32) where tf32 exists."""
    import types

    from latexocr.fast import kernels
    launch = kernels.CHUNK_LAUNCH
    for tf32, dtype, expected in ((True, torch.bfloat16, "tf32"), (True, torch.float32, "tf32x3"),
                                  (False, torch.float16, "ieee"), (False, torch.float32, "ieee")):
        monkeypatch.setattr(kernels, "_has_tf32", lambda tensor, tf32=tf32: tf32)
        assert kernels._chunk_precision(types.SimpleNamespace(is_cuda=True, dtype=dtype), launch) == expected
    cpu = torch.zeros(1, dtype=torch.float32)  # Triton's interpreter on the CPU: as before
    assert kernels._chunk_precision(cpu, launch) == "tf32x3"


FRONT_END = '''
import json
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton._C.libtriton import ir
from latexocr.fast import kernels

# each kernel's compile-time settings as its launches pass them (Qwen2-VL-2B's and Qwen3.5-2B's shapes)
SETTINGS = {
    "delta_rule_kernel": dict(DK=128, DV=128, BV=64, L2NORM=True, HAS_INIT=True, STAGES=1),
    "conv_update_kernel": dict(WIDTH=4, TAPS=4, HAS_BIAS=False, SILU=True, BLOCK=256),
    "causal_conv_kernel": dict(TAPS=4, HAS_BIAS=False, SILU=True, BLOCK_T=16, BLOCK_C=64),
    "rms_norm_kernel": dict(OFFSET=True, GATE=True, BLOCK=2048),
    "chunk_rule_kernel": dict(DK=128, DV=128, BV=64, C=16, SQUARINGS=3, L2NORM=True, HAS_INIT=True, PRECISION="tf32"),
    "rotary_kernel": dict(DIM=128, ROT=128, BLOCK_D=64, BLOCK_H=16, ROUND=True),
    "activation_kernel": dict(QUICK_GELU=False, BLOCK=1024),
    "decode_attention_kernel": dict(D=128, G=16, BLOCK_N=64, PRECISION="tf32", UPTO=True),
}
FLOATS = ("scale", "eps")  # the kernels' float arguments; every other plain argument is an integer
FP32_STATE = {"delta_rule_kernel", "chunk_rule_kernel"}  # their state buffers are fp32; other tensors bf16
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
options = backend.parse_options({"num_warps": 4})
report = {}
for kernel in kernels._build():
    name = kernel.fn.__name__
    assert set(kernel.arg_names) >= set(SETTINGS[name]), (name, kernel.arg_names)
    for float_type in ("fp32", "fp64"):  # fp32: Triton's own launch; fp64: Inductor's, inside torch.compile
        signature = {a: "constexpr" if a in SETTINGS[name]
                     else "*fp32" if a in ("init_ptr", "state_ptr") and name in FP32_STATE
                     else "*bf16" if a.endswith("_ptr") else float_type if a in FLOATS else "i32"
                     for a in kernel.arg_names}
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        try:
            ASTSource(kernel, signature, SETTINGS[name]).make_ir(
                target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
            report[f"{name} {float_type}"] = "ok"
        except Exception as exc:
            report[f"{name} {float_type}"] = str(exc).strip().splitlines()[-1][:200]
print(json.dumps(report))
'''


def test_every_kernel_compiles_with_the_float_arguments_torch_compile_passes():
    """Each kernel's front end (Python to Triton IR, for an H100; no GPU needed) accepts its float arguments
    (scale, eps) typed fp64 as well as fp32: inside torch.compile (the decode step's decode_compile=on), Inductor
    types a Python float argument fp64, and a kernel that multiplies it into an fp32 tile fed to tl.dot stopped
    the compile (run AA's GPU test: 'Both operands must be same dtype. Got fp64 and fp32'). Fails without the
    kernels' fp32 casts. Reads Triton's compiler internals (3.6 on the GPU machine, 3.8 here): a Triton whose
    internals moved fails here, loudly, rather than on a GPU."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiled kernels, not the interpreter
    proc = subprocess.run([sys.executable, "-c", FRONT_END], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 16 and all(v == "ok" for v in report.values()), report
