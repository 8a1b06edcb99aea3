"""How latexocr/fast/kernels.py's delta rule is best cut into programs, timed on a GPU (issue 31).

    python bench/bench_kernels.py                       # Qwen3.5-2B's shapes (16 key and value heads of 128)
    python bench/bench_kernels.py --heads-v 32          # Qwen3.5-4B's grouped value heads

For a prefill (one chunk of --rows prompts of --tokens tokens, from a zero state) and a decode step (--step-rows
rows, one token, the state updated in place), each launch of `delta_rule` (state columns per program, warps,
pipelined loads; for the prefill also the chunked form: tokens per chunk, tf32 precision) is timed with CUDA events
(median of --repeat), its output checked against the default launch's (a decode step's kernels on a GPU also inside
a CUDA graph, `graph_ms`: the decoder runs them in one, without the launch cost the eager time includes; their
launches are ranked by it), and beside them transformers' torch forms: the chunked rule the prefill kernel
replaces, and the decode step's one-token rule. Prints one JSON line per timing, then the fastest launch of each and the
defaults (STEP_LAUNCH, PREFILL_LAUNCH) for comparison; then the rotary embedding's kernel (kernels.rotary)
and the MLP activations' (gated_silu, quick_gelu) beside transformers' torch forms at Qwen2-VL-2B's shapes
(vision tower, a prefill chunk, a decode step), with whether the rotary outputs are bit-equal, and the decode
step's attention (decode_attention, each way its program may be cut) beside transformers' sdpa attention, and the
vision towers' patch embedding as a matrix product beside its Conv3d; writes them to $OUT/bench_kernels.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


TORCH_FORM = "torch form (transformers)"  # side_by_side's row for the function a kernel stands in for


def timed(fn, repeat: int) -> float:
    """Median milliseconds of fn() over `repeat` runs, after one warm-up (the Triton compile); CUDA events
    on a GPU, the wall clock under Triton's CPU interpreter (the test's smoke run)."""
    import time
    import torch
    fn()
    times = []
    for _ in range(repeat):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def in_graph(fn, repeat: int, calls: int = 10) -> float | None:
    """Median milliseconds of one fn() inside a CUDA graph of `calls` of them, replayed `repeat` times: the
    kernels' own time without the host's launch (a decode step's kernels run in one graph, where the launch
    that timed() includes is not paid). None on a CPU, or where fn cannot be captured."""
    import torch
    if not torch.cuda.is_available():
        return None
    from latexocr.fast.compile import record_graph, warm_up_off_capture  # as the decoder records its step
    try:
        warm_up_off_capture(fn)  # compiles and allocates off the capture
        graph, _ = record_graph(lambda: [fn() for _ in range(calls)], None)
        graph.replay()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 -- a form that syncs or allocates on the host: no graph time
        return None
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def graph_ms(fn, repeat: int) -> dict:
    """{"graph_ms": ...} for a report row, or {} where in_graph gives none."""
    ms = in_graph(fn, repeat)
    return {} if ms is None else {"graph_ms": round(ms, 4)}


def inputs(rows: int, tokens: int, heads_k: int, heads_v: int, dk: int, dv: int, device):
    """q, k, v as the layer makes them (views of one bf16 projection), g, beta."""
    import torch
    mixed = torch.randn(rows, tokens, 2 * heads_k * dk + heads_v * dv, device=device, dtype=torch.bfloat16)
    q, k, v = torch.split(mixed, [heads_k * dk, heads_k * dk, heads_v * dv], dim=-1)
    q, k = q.reshape(rows, tokens, heads_k, dk), k.reshape(rows, tokens, heads_k, dk)
    v = v.reshape(rows, tokens, heads_v, dv)
    g = -torch.rand(rows, tokens, heads_v, device=device) * 0.1
    beta = torch.rand(rows, tokens, heads_v, device=device, dtype=torch.bfloat16)
    return q, k, v, g, beta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128, help="prompts in one prefill chunk (PREFILL_CHUNK_ROWS)")
    ap.add_argument("--tokens", type=int, default=160, help="the chunk's prompt width (Qwen3.5-2B's largest: 159)")
    ap.add_argument("--step-rows", type=int, default=512, help="rows of a decode step (infer.py's batch)")
    ap.add_argument("--heads-k", type=int, default=16)
    ap.add_argument("--heads-v", type=int, default=16)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--rotary-patches", type=int, default=20480,
                    help="vision patches of one prefill chunk (Qwen2-VL-2B, 128 full_val images: ~20k)")
    ap.add_argument("--rotary-tokens", type=int, default=90, help="prompt width of a Qwen2-VL-2B prefill chunk")
    ap.add_argument("--attention-slots", type=int, default=192,
                    help="cache slots of a decode step (infer.py's 64 new tokens after a Qwen2-VL-2B prompt: 192)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_kernels.json")
    a = ap.parse_args()

    import torch
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    from latexocr.fast import kernels
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: TRITON_INTERPRET=1 only
    if not kernels.usable(torch.zeros(1, device=device)):
        raise SystemExit("bench_kernels: needs a CUDA GPU with Triton (or TRITON_INTERPRET=1, to check the script)")
    torch.manual_seed(0)
    shape = (a.heads_k, a.heads_v, a.dk, a.dv)
    results = []

    def report(**row):
        results.append(row)
        print(json.dumps(row), flush=True)

    # the prefill: one chunk from a zero state, the final state kept
    q, k, v, g, beta = inputs(a.rows, a.tokens, *shape, device)
    final = torch.empty(a.rows, a.heads_v, a.dk, a.dv, device=device)
    reference = kernels.delta_rule(q, k, v, g, beta, None, True, state_out=final).float()
    with torch.no_grad():
        report(what="prefill", path="torch chunked rule (transformers)", ms=round(timed(
            lambda: q35.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=None,
                                                     output_final_state=True, use_qk_l2norm_in_kernel=True), a.repeat), 3))
    # token by token (state columns, warps, loads in flight), then the chunked form (chunk_rule_kernel: `chunk`
    # tokens at a time as matrix products, in tf32 with an error correction (tf32x3, ~fp32) or plain tf32)
    launches = [{"block_v": block_v, "warps": warps, "stages": stages}
                for block_v, warps, stages in itertools.product((16, 32, 64, 128), (2, 4, 8), (1, 2, 3))]
    launches += [{"chunk": chunk, "block_v": block_v, "warps": warps, "stages": 1, "precision": precision}
                 for chunk, block_v, warps, precision in itertools.product((16, 32, 64), (32, 64), (4, 8),
                                                                           ("tf32x3", "tf32"))]
    for launch in launches:
        if launch["block_v"] > a.dv:
            continue
        try:
            run = lambda: kernels.delta_rule(q, k, v, g, beta, None, True, state_out=final, launch=launch)  # noqa: E731
            ms = timed(run, a.repeat)
            error = ((run().float() - reference).abs().max() / reference.abs().max()).item()
        except Exception as exc:  # a launch the compiler refuses (too many registers ...): said, skipped
            report(what="prefill", launch=launch, error=f"{type(exc).__name__}: {str(exc)[:120]}")
            continue
        report(what="prefill", launch=launch, ms=round(ms, 3), max_relative_error=error)

    # the decode step: one token, the state updated in place
    q, k, v, g, beta = inputs(a.step_rows, 1, *shape, device)
    state = torch.randn(a.step_rows, a.heads_v, a.dk, a.dv, device=device)
    with torch.no_grad():
        report(what="step", path="torch one-token rule (transformers)", ms=round(timed(
            lambda: q35.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state,
                                                         output_final_state=True, use_qk_l2norm_in_kernel=True), a.repeat), 3))
    gib = 2 * state.numel() * 4 / 2**30  # one read and one write of the fp32 state
    for block_v, warps in itertools.product((16, 32, 64), (2, 4, 8)):
        launch = {"block_v": block_v, "warps": warps, "stages": 1}
        try:
            step = lambda: kernels.delta_rule(q, k, v, g, beta, state, True, launch=launch)  # noqa: E731
            ms = timed(step, a.repeat)
        except Exception as exc:
            report(what="step", launch=launch, error=f"{type(exc).__name__}: {str(exc)[:120]}")
            continue
        report(what="step", launch=launch, ms=round(ms, 3), tb_per_s=round(gib * 2**30 / 1e12 / (ms / 1e3), 2),
               **graph_ms(step, a.repeat))

    def side_by_side(what: str, torch_form, kernel, **check) -> None:
        """One row each for transformers' torch form and our kernel; `check` goes into the kernel's row."""
        with torch.no_grad():
            report(what=what, path=TORCH_FORM, ms=round(timed(torch_form, a.repeat), 4), **graph_ms(torch_form, a.repeat))
            report(what=what, path="kernel", ms=round(timed(kernel, a.repeat), 4), **check, **graph_ms(kernel, a.repeat))

    # the rotary embedding (kernels.rotary) against transformers' torch forms, at Qwen2-VL-2B's shapes: the vision
    # tower's (one prefill chunk's patches, 16 heads of 80, fp32 arithmetic), the text layers' in a prefill chunk
    # (--rows prompts of --rotary-tokens, 12 query and 2 key heads of 128) and in a decode step (--step-rows rows)
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q2
    for what, batch, tokens, heads_q, heads_k, dim in (("rotary vision", None, a.rotary_patches, 16, 16, 80),
                                                        ("rotary prefill", a.rows, a.rotary_tokens, 12, 2, 128),
                                                        ("rotary step", a.step_rows, 1, 12, 2, 128)):
        if batch is None:  # q and k as the tower splits them from one projection
            qkv = torch.randn(tokens, 3 * heads_q * dim, device=device, dtype=torch.bfloat16)
            q_, k_, _ = qkv.reshape(tokens, 3, heads_q, dim).permute(1, 0, 2, 3).unbind(0)
            angle = torch.randn(tokens, dim // 2, device=device)
            cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
            torch_form = lambda: q2.apply_rotary_pos_emb_vision(q_, k_, cos, sin)  # noqa: E731
            kernel = lambda: kernels.rotary(q_, k_, cos, sin, 1, True)  # noqa: E731
        else:  # the text attention's transposed views, cos in the model's dtype
            q_ = torch.randn(batch, tokens, heads_q, dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
            k_ = torch.randn(batch, tokens, heads_k, dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
            angle = torch.randn(batch, tokens, dim // 2, device=device)
            cos, sin = (f(torch.cat([angle, angle], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
            torch_form = lambda: q2.apply_rotary_pos_emb(q_, k_, cos, sin)  # noqa: E731
            kernel = lambda: kernels.rotary(q_, k_, cos, sin, 1, False)  # noqa: E731
        with torch.no_grad():
            same = all(torch.equal(x, y) for x, y in zip(torch_form(), kernel()))
        side_by_side(what, torch_form, kernel, bit_equal=same)

    # the MLPs' activations (kernels.gated_silu, quick_gelu) against transformers' activation modules, at
    # Qwen2-VL-2B's shapes: the text MLP of a prefill chunk (--rows x --rotary-tokens tokens, 8,960 columns) and of a
    # decode step (--step-rows rows), the vision MLP of a prefill chunk (--rotary-patches patches, 5,120 columns)
    from transformers.activations import QuickGELUActivation, SiLUActivation
    silu, quick = SiLUActivation(), QuickGELUActivation()
    for what, tokens, width in (("silu * up prefill", a.rows * a.rotary_tokens, 8960),
                                ("silu * up step", a.step_rows, 8960), ("quick gelu vision", a.rotary_patches, 5120)):
        gate, up = (torch.randn(tokens, width, device=device, dtype=torch.bfloat16) for _ in range(2))
        if what.startswith("quick"):
            torch_form, kernel = (lambda: quick(gate)), (lambda: kernels.quick_gelu(gate))
        else:
            torch_form, kernel = (lambda: silu(gate) * up), (lambda: kernels.gated_silu(gate, up))
        with torch.no_grad():
            expected = torch_form().float()
            error = ((kernel().float() - expected).abs().max() / expected.abs().max()).item()
        side_by_side(what, torch_form, kernel, max_relative_error=error)

    # the vision towers' patch embedding as one matrix product (fast/standins.py _matmul_patch_embed_forward) against
    # the Conv3d it is (cuDNN's convolution), one prefill chunk's --rotary-patches patches: Qwen2-VL-2B's (14-pixel
    # patches, 1,280 wide) and Qwen3.5-2B's (16-pixel, 1,024)
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    from latexocr.fast.standins import _matmul_patch_embed_forward
    for what, size, width in (("patch embedding", 14, 1280), ("patch embedding, 16-pixel patches", 16, 1024)):
        embed = PatchEmbed(patch_size=size, temporal_patch_size=2, in_channels=3, embed_dim=width)
        embed = embed.to(device=device, dtype=torch.bfloat16)
        patches = torch.randn(a.rotary_patches, 3 * 2 * size * size, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            expected = embed(patches).float()
            error = ((_matmul_patch_embed_forward(embed, patches).float() - expected).abs().max()
                     / expected.abs().max()).item()
        side_by_side(what, lambda: embed(patches), lambda: _matmul_patch_embed_forward(embed, patches),
                     max_relative_error=error)

    # the decode step's attention (kernels.decode_attention) against transformers' sdpa attention (SDPA's
    # memory-efficient kernel over the query heads packed per key head), --step-rows rows against --attention-slots
    # cache slots (each row's first 8 masked, as a left-padded prompt's, and the last quarter, not yet written), at
    # Qwen2-VL-2B's shapes (12 query and 2 key heads of 128) and Qwen3.5-2B's full-attention layers' (8 and 2 of
    # 256); then each way a program may be cut (slots per block, warps)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    for what, heads_q, heads_k, dim in (("attention step", 12, 2, 128), ("attention step, head dim 256", 8, 2, 256)):
        module = types.SimpleNamespace(num_key_value_groups=heads_q // heads_k)
        q_ = torch.randn(a.step_rows, 1, heads_q, dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
        k_, v_ = (torch.randn(a.step_rows, heads_k, a.attention_slots, dim, device=device, dtype=torch.bfloat16)
                  for _ in range(2))
        bias = torch.zeros(a.step_rows, a.attention_slots, device=device, dtype=torch.bfloat16)
        bias[:, :min(8, a.attention_slots - 1)] = float("-inf")
        bias[:, max(1, a.attention_slots * 3 // 4):] = float("-inf")
        torch_form = lambda: sdpa_attention_forward(module, q_, k_, v_, bias[:, None, None, :], scaling=dim ** -0.5)[0]  # noqa: E731
        with torch.no_grad():
            expected = torch_form().float()
            error = ((kernels.decode_attention(q_, k_, v_, bias, dim ** -0.5).float() - expected).abs().max()
                     / expected.abs().max()).item()
        side_by_side(what, torch_form, lambda: kernels.decode_attention(q_, k_, v_, bias, dim ** -0.5),
                     max_relative_error=error, mib_read=round(2 * k_.numel() * 2 / 2**20, 1))
        # as the static decoder calls it: its write slot given, the slots after it (the last quarter here) not read
        upto = torch.tensor([max(1, a.attention_slots * 3 // 4) - 1], device=device)
        with torch.no_grad():
            same = torch.equal(kernels.decode_attention(q_, k_, v_, bias, dim ** -0.5, attend_upto=upto),
                               kernels.decode_attention(q_, k_, v_, bias, dim ** -0.5))
        to_write_slot = lambda: kernels.decode_attention(q_, k_, v_, bias, dim ** -0.5, attend_upto=upto)  # noqa: E731
        report(what=what, path="kernel, to the write slot", same_as_kernel=same,
               ms=round(timed(to_write_slot, a.repeat), 4), **graph_ms(to_write_slot, a.repeat))
        for block_n, warps in itertools.product((16, 32, 64, 128), (2, 4, 8)):
            launch = {"block_n": block_n, "warps": warps}
            if kernels.decode_attention(q_, k_, v_, bias, dim ** -0.5, launch=launch) is None:  # refused (shared memory)
                report(what=what, launch=launch, error="the kernel did not run with these settings")
                continue
            cut = lambda: kernels.decode_attention(q_, k_, v_, bias, dim ** -0.5, launch=launch)  # noqa: E731
            report(what=what, launch=launch, ms=round(timed(cut, a.repeat), 4), **graph_ms(cut, a.repeat))

    def fastest_key(rows):
        """Rank launches by their time inside a CUDA graph where every one has it (as a decode step runs
        them), else by the eager time."""
        return (lambda r: r["graph_ms"]) if all("graph_ms" in r for r in rows) else (lambda r: r["ms"])

    summary = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton's interpreter)",
               "torch": torch.__version__, "shape": {k: v for k, v in vars(a).items() if k != "out"}}
    for what, default in (("prefill", kernels.PREFILL_LAUNCH), ("step", kernels.STEP_LAUNCH)):
        timed_launches = [r for r in results if r["what"] == what and "launch" in r and "ms" in r]
        best = min(timed_launches, key=fastest_key(timed_launches))
        mine = next((r for r in timed_launches if r["launch"] == default), None)
        summary[what] = {"fastest": best, "default": mine,
                         "torch": next(r["ms"] for r in results if r["what"] == what and "path" in r)}
    for what in dict.fromkeys(r["what"] for r in results if r.get("path") == "kernel"):  # side_by_side's rows
        paths = {r["path"]: r for r in results if r["what"] == what and "path" in r}
        summary[what] = {"torch": paths[TORCH_FORM]["ms"], "kernel": paths["kernel"]["ms"],
                         **{k: v for k, v in paths["kernel"].items() if k not in ("what", "path", "ms")}}
        if "graph_ms" in paths[TORCH_FORM]:
            summary[what]["torch_graph_ms"] = paths[TORCH_FORM]["graph_ms"]
        if "kernel, to the write slot" in paths:  # the attention's, as the static decoder calls it
            summary[what]["kernel, to the write slot"] = paths["kernel, to the write slot"]["ms"]
        timed_launches = [r for r in results if r["what"] == what and "launch" in r and "ms" in r]
        if timed_launches:  # the attention's: the fastest way to cut it
            summary[what]["fastest"] = min(timed_launches, key=fastest_key(timed_launches))
    print(json.dumps(summary, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": summary, "results": results}, indent=1))


if __name__ == "__main__":
    main()
