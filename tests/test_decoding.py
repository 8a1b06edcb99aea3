"""latexocr/fast/decoding.py: the static-cache loop gives generate's greedy results. CPU, tiny models, fp32."""
from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import latexocr.fast.decoding as decoding
import latexocr.fast.standins as standins
import latexocr.generation as generation
from latexocr.batching import SampleEncoder, generation_batch
from latexocr.generation import predict, prompt_positions
from latexocr.images import load_image
from latexocr.sample import sizing_for

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]  # qwen3_5: linear-attention layers too
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def family_dirs(tiny_family_dirs, tmp_path_factory):
    """conftest's three tiny families and a tiny Qwen3.5 (three Gated DeltaNet layers, one full attention)."""
    from latexocr.testing import build_tiny_model
    return {**tiny_family_dirs, "qwen3_5": build_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_5"), "qwen3_5")}


def load(folder):
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(folder)
    return model.eval(), SampleEncoder(processor, sizing_for(processor))


def stop_at_different_lengths(model, encoder, paths, **kw) -> list[dict]:
    """A random tiny model never says <|im_end|>: give it the output weights of a character that the
    one-at-a-time outputs contain at different places (x1.5, so it wins where that character would),
    until rows stop at different lengths and some run to the cap. Returns generate's results then."""
    texts = [r["prediction"] for r in predict(model, encoder, paths, batch_size=1, engine="generate", **kw)]
    candidates = [c for c in string.ascii_letters + string.digits + string.punctuation
                  if 0 < sum(c in t for t in texts) < len(texts)]
    candidates.sort(key=lambda c: -len({t.index(c) for t in texts if c in t}))
    weight = model.get_output_embeddings().weight
    original = weight[encoder.end_of_turn_id].clone()
    for ch in candidates[:6]:
        with torch.no_grad():
            weight[encoder.end_of_turn_id] = 1.5 * weight[encoder.tokenizer.convert_tokens_to_ids(ch)]
        reference = predict(model, encoder, paths, batch_size=1, engine="generate", **kw)
        if len({len(r["prediction"]) for r in reference}) >= 2 and {r["truncated"] for r in reference} == {True, False}:
            return reference
        with torch.no_grad():
            weight[encoder.end_of_turn_id] = original
    pytest.fail(f"no character makes the rows stop at different lengths: {texts}")


def every_loop_path(monkeypatch) -> None:
    """Small prefill chunks, frequent stop checks, compaction down to 1 row: every path of the loop."""
    monkeypatch.setattr(generation, "PREFILL_CHUNK_ROWS", 3)
    monkeypatch.setattr(decoding, "STOP_CHECK_EVERY", 2)
    monkeypatch.setattr(decoding, "MIN_BUCKET", 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_loop_equals_one_at_a_time_generate(family_dirs, formula_images, family, monkeypatch):
    model, encoder = load(family_dirs[family])
    paths = [p for p, _ in formula_images[:10]]
    kw = dict(max_new_tokens=NEW_TOKENS, num_workers=0, progress=False)
    reference = stop_at_different_lengths(model, encoder, paths, **kw)
    every_loop_path(monkeypatch)
    static = predict(model, encoder, paths, batch_size=10, engine="static", **kw)
    assert static == reference
    monkeypatch.setenv("LATEXOCR_SPEED", "compaction=off")  # the speed switch changes no text
    assert predict(model, encoder, paths, batch_size=10, engine="static", **kw) == reference
    assert len({r["prediction"] for r in reference}) > 1
    assert decoding.static_decode_supported(model)  # engine="auto" takes the loop


def test_transformers_static_cache_generate_gives_the_loops_texts(family_dirs, formula_images):
    """transformers' own static-cache generate, the decoder that would replace the loop (issue 32,
    bench/bench_decoder.py), gives infer.py's greedy texts: one left-padded batch, M-RoPE, rows
    stopping at different lengths."""
    model, encoder = load(family_dirs["qwen2_vl"])
    paths = [p for p, _ in formula_images[:10]]
    reference = stop_at_different_lengths(model, encoder, paths, max_new_tokens=NEW_TOKENS, num_workers=0,
                                          progress=False)  # = the loop's texts (the test above)
    batch = generation_batch(encoder, [load_image(p, encoder.sizing) for p in paths])
    tok = encoder.tokenizer
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
                         eos_token_id=[encoder.end_of_turn_id, tok.eos_token_id], pad_token_id=tok.pad_token_id,
                         temperature=None, top_p=None, top_k=None)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [t.strip() for t in texts] == [r["prediction"] for r in reference]


def test_left_padding_leaves_the_linear_attention_state_alone(family_dirs, formula_images):
    """A left-padded Qwen3.5 prompt leaves the Gated DeltaNet layers the state its unpadded prompt
    leaves (the model zeroes padded positions before them), so the static loop may copy it as is."""
    model, encoder = load(family_dirs["qwen3_5"])
    batch = generation_batch(encoder, [load_image(p, encoder.sizing) for p, _ in formula_images[:3]])
    assert batch["attention_mask"].min() == 0  # left padding present
    with torch.no_grad():
        padded = model(**batch, use_cache=True).cache
        for row in range(3):
            keep = batch["attention_mask"][row].bool()
            alone = {"input_ids": batch["input_ids"][row:row + 1, keep], "mm_token_type_ids": batch["mm_token_type_ids"][row:row + 1, keep],
                     "image_grid_thw": batch["image_grid_thw"][row:row + 1], "attention_mask": batch["attention_mask"][row:row + 1, keep]}
            patches = batch["image_grid_thw"].prod(-1).tolist()
            start = sum(patches[:row])
            alone["pixel_values"] = batch["pixel_values"][start:start + patches[row]]
            cache = model(**alone, use_cache=True).cache
            for layer, mine in zip(cache.layers[:3], padded.layers[:3]):
                assert torch.allclose(mine.conv_states[0][row], layer.conv_states[0][0], atol=1e-5)
                assert torch.allclose(mine.recurrent_states[0][row], layer.recurrent_states[0][0], atol=1e-5)


def test_min_new_tokens_is_honoured(tiny_family_dirs, formula_images):
    model, encoder = load(tiny_family_dirs["qwen2_vl"])
    paths = [p for p, _ in formula_images[:4]]
    with torch.no_grad():  # <|im_end|> would win at once
        model.get_output_embeddings().weight[encoder.end_of_turn_id] *= 0
        model.get_output_embeddings().bias = None
        model.get_output_embeddings().weight[encoder.end_of_turn_id] += 100 * model.get_output_embeddings().weight.abs().max()
    kw = dict(max_new_tokens=6, num_workers=0, progress=False, min_new_tokens=4)
    reference = predict(model, encoder, paths, batch_size=4, engine="generate", **kw)
    static = predict(model, encoder, paths, batch_size=4, engine="static", **kw)
    assert static == reference


def test_unsupported_settings_use_generate(tiny_family_dirs):
    model, encoder = load(tiny_family_dirs["qwen2_vl"])
    assert decoding.static_decode_supported(model)
    assert decoding.static_decode_supported(model, {"min_new_tokens": 4})
    assert not decoding.static_decode_supported(model, {"num_beams": 2})
    model.generation_config.repetition_penalty = 1.05
    assert not decoding.static_decode_supported(model)
    model.generation_config.repetition_penalty = 1.0
    model.set_attn_implementation({"text_config": "eager"})
    assert not decoding.static_decode_supported(model)
    with pytest.raises(ValueError, match="engine='generate'"):
        predict(model, encoder, [], engine="static")


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_positions_match_the_model(family_dirs, formula_images, family):
    model, encoder = load(family_dirs[family])
    batch = generation_batch(encoder, [load_image(p, encoder.sizing) for p, _ in formula_images[:5]])
    assert batch["attention_mask"].min() == 0  # left padding present
    rope, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                         image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    ours = prompt_positions(batch["attention_mask"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                            encoder.processor.image_processor.merge_size)
    real = batch["attention_mask"].bool()
    assert torch.equal(ours[1:][:, real], rope[:, real])
    assert torch.equal(ours[0][real], (batch["attention_mask"].cumsum(-1) - 1)[real])


@pytest.mark.parametrize("family", FAMILIES)
def test_pixels_cast_in_the_workers_change_nothing(family_dirs, formula_images, family):
    """infer.py's loader workers cast the pixel values to the vision tower's dtype (generation.vision_dtype):
    half the bytes to move in bf16. Every family's forward makes that same cast first, so a bf16 model's
    logits are bit-identical either way; and predict's rows are what they were. Fails when a family's
    forward starts treating pixel values otherwise (e.g. normalising in fp32 before the cast)."""
    model = AutoModelForImageTextToText.from_pretrained(family_dirs[family], dtype=torch.bfloat16,
                                                        attn_implementation="sdpa").eval()
    encoder = load(family_dirs[family])[1]
    assert generation.vision_dtype(model) == torch.bfloat16
    batch = generation_batch(encoder, [load_image(p, encoder.sizing) for p, _ in formula_images[:3]])
    assert batch["pixel_values"].dtype == torch.float32  # what the processor gives
    with torch.no_grad():
        plain = model(**batch).logits
        cast = model(**{**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}).logits
    assert torch.equal(plain, cast)
    collate = generation._Collate(encoder, 2, with_positions=True, pixel_dtype=generation.vision_dtype(model))
    _, _, chunks = collate([(i, load_image(p, encoder.sizing), None) for i, (p, _) in enumerate(formula_images[:3])])
    assert [c["pixel_values"].dtype for c in chunks] == [torch.bfloat16] * 2


@pytest.mark.parametrize("heads_k", [4, 2])  # 2: grouped value heads (Qwen3.5 has 16 key heads, 16 or 32 value heads)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_delta_rule_is_the_reference_step_with_the_state_updated_in_place(heads_k, dtype, monkeypatch):
    """standins.one_token_delta_rule against transformers' reference one-token rule (what runs without
    flash-linear-attention): the same output and new state (fp32 state; regrouped sums, hence 1e-5),
    the state written into the buffer it was given; anything but one token goes to the reference."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35

    torch.manual_seed(0)
    rows, heads_v, dk, dv = 3, 4, 16, 8
    query, key = (torch.randn(rows, 1, heads_k, dk).to(dtype) for _ in range(2))
    value = torch.randn(rows, 1, heads_v, dv).to(dtype)
    g = -torch.rand(rows, 1, heads_v)  # log decay, fp32 as the layer makes it
    beta = torch.rand(rows, 1, heads_v).to(dtype)
    state = torch.randn(rows, heads_v, dk, dv)
    kw = dict(g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    expected_out, expected_state = q35.torch_recurrent_gated_delta_rule(query, key, value, initial_state=state.clone(), **kw)
    # what _standing_in records while a decode step runs: the function one_token_delta_rule falls back to
    monkeypatch.setitem(standins._REPLACED, (q35, "torch_recurrent_gated_delta_rule"), q35.torch_recurrent_gated_delta_rule)
    buffer = state.clone()
    out, new_state = standins.one_token_delta_rule(query, key, value, initial_state=buffer, **kw)
    assert new_state is buffer and out.dtype == dtype and out.shape == expected_out.shape
    assert torch.allclose(new_state, expected_state, rtol=1e-5, atol=1e-5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # the output is rounded to the inputs' dtype
    assert torch.allclose(out.float(), expected_out.float(), rtol=tolerance, atol=tolerance)
    two = [torch.cat([x, x], dim=1) for x in (query, key, value, g, beta)]  # two tokens: the reference's
    out2, _ = standins.one_token_delta_rule(*two[:3], g=two[3], beta=two[4], initial_state=state.clone(),
                                            output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref2, _ = q35.torch_recurrent_gated_delta_rule(*two[:3], g=two[3], beta=two[4], initial_state=state.clone(),
                                                   output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert torch.equal(out2, ref2)


def test_the_decoder_takes_the_one_token_delta_rule_for_qwen3_5_only(family_dirs, formula_images, monkeypatch):
    from latexocr.modeling import vision_language_core
    model, encoder = load(family_dirs["qwen3_5"])
    assert standins.uses_one_token_delta_rule(vision_language_core(model))  # no fla on this machine
    assert not standins.uses_one_token_delta_rule(vision_language_core(load(family_dirs["qwen2_vl"])[0]))
    monkeypatch.setenv("LATEXOCR_SPEED", "delta_step=off")
    assert not standins.uses_one_token_delta_rule(vision_language_core(model))
    from transformers.utils import import_utils
    monkeypatch.setattr(import_utils, "is_flash_linear_attention_available", lambda: True)
    monkeypatch.setenv("LATEXOCR_SPEED", "fla=on")  # fla installed: transformers takes its fused kernel
    assert not standins.uses_one_token_delta_rule(vision_language_core(model))
    monkeypatch.setenv("LATEXOCR_SPEED", "fla=off")  # switched off (bench/: the fallback in the same run): ours
    assert standins.uses_one_token_delta_rule(vision_language_core(model))
    monkeypatch.undo()
    calls = []
    rule = standins.one_token_delta_rule
    monkeypatch.setattr(standins, "one_token_delta_rule", lambda *a, **k: calls.append(1) or rule(*a, **k))
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    before = q35.torch_recurrent_gated_delta_rule
    paths = [p for p, _ in formula_images[:3]]
    predict(model, encoder, paths, batch_size=3, engine="static", max_new_tokens=4, num_workers=0, progress=False)
    assert len(calls) == 3 * 3  # 3 decode steps (the prefill makes the first token) x 3 linear-attention layers
    assert q35.torch_recurrent_gated_delta_rule is before  # restored after each step


def test_the_row_memory_model_counts_no_update_temporaries_where_the_state_is_updated_in_place(family_dirs,
                                                                                              monkeypatch):
    """infer.py's BATCH_SIZE=auto sizes rows by decoding.bytes_per_row: with one_token_delta_rule (no fla)
    the one-token update makes no state-sized temporaries, so each row costs 4 layers' states less."""
    model, _ = load(family_dirs["qwen3_5"])
    text = model.config.text_config
    state = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim * 4  # fp32
    in_place = decoding.bytes_per_row(model, 256)
    monkeypatch.setenv("LATEXOCR_SPEED", "delta_step=off")
    assert decoding.bytes_per_row(model, 256) - in_place == 4 * state


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])  # full attention; linear attention beside it
def test_compiled_decode_step_gives_the_same_texts(family_dirs, formula_images, family, monkeypatch):
    """LATEXOCR_SPEED=decode_compile=on: the step through torch.compile (one compile with dynamic shapes for
    every batch the compaction makes, inside predict's force_eager stance) gives the eager step's texts.
    Not the default until measured on a GPU; the CPU proves the compiled graph is the same computation."""
    model, encoder = load(family_dirs[family])
    paths = [p for p, _ in formula_images[:10]]
    kw = dict(max_new_tokens=NEW_TOKENS, num_workers=0, progress=False, batch_size=10, engine="static")
    reference = stop_at_different_lengths(model, encoder, paths, **{k: kw[k] for k in ("max_new_tokens", "num_workers", "progress")})
    every_loop_path(monkeypatch)  # several batch shapes through one compiled step
    monkeypatch.setenv("LATEXOCR_SPEED", "decode_compile=on")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert predict(model, encoder, paths, **kw) == reference
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    assert not torch._dynamo.utils.counters["graph_break"]  # the whole step is one graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled step recorded as a CUDA graph)")
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])
def test_gpu_compiled_decode_step_in_cuda_graphs_gives_the_same_texts(family_dirs, formula_images, family, monkeypatch):
    """On a GPU the compiled step is what the CUDA graphs record (warm-up and compile off the capture, then
    one graph per batch shape): the same texts as the eager step's graphs, fp32."""
    model, encoder = load(family_dirs[family])
    model = model.cuda()
    paths = [p for p, _ in formula_images[:10]]
    kw = dict(max_new_tokens=NEW_TOKENS, num_workers=0, progress=False, batch_size=10, engine="static")
    monkeypatch.setattr(decoding, "MIN_BUCKET", 1)  # compaction's smaller batches: more graphs of the one compile
    eager = predict(model, encoder, paths, **kw)
    monkeypatch.setenv("LATEXOCR_SPEED", "decode_compile=on")
    torch._dynamo.reset()
    assert predict(model, encoder, paths, **kw) == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (copies to the CPU that are not waited for)")
def test_gpu_batches_land_after_the_next_one_starts(family_dirs, formula_images, monkeypatch):
    """On a GPU predict lands a batch (its tokens copied to page-locked memory behind its last steps) once the next
    batch is under way: the texts of each batch read as soon as it is decoded, every row handed over once."""
    model, encoder = load(family_dirs["qwen2_vl"])
    model = model.cuda()
    paths = [p for p, _ in formula_images[:10]]
    kw = dict(max_new_tokens=NEW_TOKENS, num_workers=0, progress=False, engine="static", batch_size=3)
    handed = []
    landed_later = predict(model, encoder, paths, on_batch=lambda done, rows: handed.append(sorted(done)), **kw)
    generate = decoding.StaticDecoder.generate  # the reference: each batch's copies waited for in generate
    monkeypatch.setattr(decoding.StaticDecoder, "generate",
                        lambda self, chunks, wait=True: decoding.Arriving(*generate(self, chunks, wait=True)))
    assert landed_later == predict(model, encoder, paths, **kw)
    assert sorted(i for batch in handed for i in batch) == list(range(10)) and [len(b) for b in handed] == [3, 3, 3, 1]


def test_the_kernels_lookup_stays_out_of_a_compile_trace(monkeypatch):
    """decode_compile=on traces the decode step through the kernels' launches, each of which looks the built
    kernels up: the lookup must read what the eager warm-up built, not run the builder inside the trace (run Z,
    GPU: a functools.lru_cache made dynamo trace into Triton's import and the kernels' definitions, break the
    trace there, and the resumed frame's symbolic num_warps could not launch). Runs on the CPU with a stand-in
    Triton whose build breaks any trace it runs in."""
    import sys
    import types

    from latexocr.fast import kernels
    built = []

    def build():
        torch._dynamo.graph_break()  # what defining Triton kernels does to a trace
        built.append(1)
        return ("the kernels",)
    monkeypatch.setattr(kernels, "_build", build)
    monkeypatch.setattr(kernels, "_BUILT", [])
    with monkeypatch.context() as importable:  # only here: torch.compile looks for a real Triton
        importable.setitem(sys.modules, "triton", types.ModuleType("triton"))
        importable.setitem(sys.modules, "triton.language", types.ModuleType("triton.language"))
        assert kernels._triton() == ("the kernels",)  # the eager warm-up builds them

    @torch.compile(backend="eager", fullgraph=True)  # fullgraph: a break in the trace is an error
    def step(x):
        return x + len(kernels._triton())
    torch._dynamo.reset()
    assert step(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert built == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vision_towers_inputs_come_from_the_loader(family_dirs, formula_images, family, monkeypatch):
    """LATEXOCR_SPEED vision_inputs (on): the loader's workers compute each chunk's vision patch positions and
    attention boundaries (batching.vision_inputs) and the static decoder's prefill hands them to the tower, so
    transformers' own functions never run for its chunks (on a GPU: ~1,400 small kernels and two syncs a chunk
    of 128); the texts are generate's, and with vision_inputs=off the tower computes them (the same texts)."""
    import sys

    import transformers.vision_utils as vision_utils
    model, encoder = load(family_dirs[family])
    paths = [p for p, _ in formula_images[:5]]
    kw = dict(max_new_tokens=4, num_workers=0, progress=False)
    reference = predict(model, encoder, paths, batch_size=1, engine="generate", **kw)
    module = sys.modules[type(model.model).__module__]
    calls = []

    def counted(*args, **kwargs):
        if sys._getframe(1).f_code.co_name != "vision_inputs":  # the tower's call, not the loader's
            calls.append(1)
        return original(*args, **kwargs)
    original = vision_utils.get_vision_position_ids
    monkeypatch.setattr(vision_utils, "get_vision_position_ids", counted)  # the same object in both: swapped
    monkeypatch.setattr(module, "get_vision_position_ids", counted)
    monkeypatch.setattr(generation, "PREFILL_CHUNK_ROWS", 2)  # chunks of 2, 2 and 1 images
    assert predict(model, encoder, paths, batch_size=5, engine="static", **kw) == reference
    assert not calls, "the tower computed positions the loader had given"
    monkeypatch.setenv("LATEXOCR_SPEED", "vision_inputs=off")
    assert predict(model, encoder, paths, batch_size=5, engine="static", **kw) == reference
    assert len(calls) == 3  # one a chunk


@pytest.mark.parametrize("family", FAMILIES)
def test_joined_query_key_value_projections_give_the_same_texts(family_dirs, formula_images, family, monkeypatch):
    """LATEXOCR_SPEED fused_qkv (on by default): each text attention's three projections as one
    product in the static decoder's prefill and step; the key and value parts are handed over to their own
    projections' calls (none computes its own product), the texts are generate's (fp32), and afterwards the
    projections are plain again (no forward left on the instances, no stash left over)."""
    from torch import nn
    model, encoder = load(family_dirs[family])
    paths = [p for p, _ in formula_images[:10]]
    kw = dict(max_new_tokens=NEW_TOKENS, num_workers=0, progress=False)
    reference = stop_at_different_lengths(model, encoder, paths, **kw)
    every_loop_path(monkeypatch)
    attentions = standins._qkv_projections(model.model)
    layers = model.config.text_config.layer_types if family == "qwen3_5" else None
    assert len(attentions) == (layers.count("full_attention") if layers else model.config.text_config.num_hidden_layers)
    own_products = []
    linear = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: own_products.append(self) or linear(self, x))
    monkeypatch.setenv("LATEXOCR_SPEED", "fused_qkv=on")
    assert predict(model, encoder, paths, batch_size=10, engine="static", **kw) == reference
    projections = {id(p) for _, group in attentions for p in group}
    assert not [m for m in own_products if id(m) in projections]  # q, k and v: all from the joined product
    assert all("forward" not in vars(p) for _, group in attentions for p in group) and not standins._QKV_STASH
    assert not any(name.startswith("_latexocr") for a, _ in attentions for name in vars(a))  # nothing kept on the model


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "latex_ocr" / "full_val").is_dir(),
                    reason="../shared/latex_ocr/full_val (real images) is absent")
def test_bench_prefill_host_ops_counts_what_the_loader_takes_over(tmp_path):
    """bench/prefill_host_ops.py (8 images here, not a chunk of 128: the CPU's time): with vision_inputs on, the
    tower's input functions dispatch nothing in the prefill and the loader does that work; off, the reverse."""
    import json
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / "prefill_host_ops.py"), "--images", "8"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    on, off = report["vision_inputs=on"], report["vision_inputs=off"]
    assert on["ops per prefill chunk in the tower's input functions"] == 0 < off["ops per prefill chunk in the tower's input functions"]
    assert on["ops per prefill chunk in the loader (CPU, the workers)"] > 0 == off["ops per prefill chunk in the loader (CPU, the workers)"]
    assert on["ops per prefill chunk"] < off["ops per prefill chunk"] and on["ops per decode step"] == off["ops per decode step"] > 0


def test_rows_cut_from_a_chunk_are_the_chunk_of_those_images(tiny_model_dir, formula_images):
    """generation.chunk_rows (BATCH_SIZE=auto cutting the loader's chunks into batches of another size): rows
    a:b of a left-padded chunk, with their patches and positions, equal the chunk built from those images
    alone, the columns that are padding for all of them dropped."""
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    encoder = SampleEncoder(processor, sizing_for(processor))
    paths = [p for p, _ in formula_images[:6]]
    items = [(i, load_image(p, encoder.sizing), None) for i, p in enumerate(paths)]
    collate = generation._Collate(encoder, None, with_positions=True)
    (_, _, (whole,)) = collate(items)
    widths = whole["attention_mask"].sum(1).tolist()
    assert len(set(widths)) > 2  # rows of different lengths: some columns are padding for a subset only
    for start, stop in [(0, 6), (1, 4), (4, 6), (2, 3)]:
        (_, _, (alone,)) = collate(items[start:stop])
        cut = generation.chunk_rows(whole, start, stop)
        assert cut.keys() == alone.keys()
        for key in alone:
            same = torch.equal(cut[key], alone[key]) if torch.is_tensor(alone[key]) else cut[key] == alone[key]
            assert same, (start, stop, key)
    assert "vision_cu_seqlens" in whole  # the vision tower's inputs cut with the rows too (vision_inputs)


def test_a_card_that_cannot_prefill_a_whole_chunk_prefills_in_pieces(family_dirs, formula_images, monkeypatch):
    """BATCH_SIZE=auto on a small card (run R: Qwen3.5-4B at 16 GiB, QLoRA Qwen3.5-2B at 8 GiB ran out of
    memory prefilling the 128 largest images at once; Qwen3-VL-4B got 56 rows beside its prefill): the probe
    tries half the chunk, a quarter ..., smaller pieces where they let many more rows fit, and the engine
    prefills every chunk in pieces of those rows; the texts are unchanged."""
    model, encoder = load(family_dirs["qwen2_vl"])
    paths = [p for p, _ in formula_images[:10]]
    items = [(i, load_image(p, encoder.sizing), None) for i, p in enumerate(paths[:8])]
    (_, _, (chunk,)) = generation._Collate(encoder, None, with_positions=True)(items)
    tried = []

    def prefill(piece, most=3):  # a card that holds 3 rows of a prefill
        tried.append(piece["input_ids"].shape[0])
        if tried[-1] > most:
            raise torch.OutOfMemoryError("simulated")
        return 123

    fitted, peak = generation.largest_fitting_prefill(chunk, prefill)
    assert tried == [8, 4, 2] and peak == 123
    assert all(torch.equal(fitted[k], v) if torch.is_tensor(v) else fitted[k] == v
               for k, v in generation.chunk_rows(chunk, 0, 2).items())
    tried.clear()
    assert generation.largest_fitting_prefill(chunk, lambda piece: prefill(piece, most=0)) == (None, 0)
    assert tried == [8, 4, 2, 1]  # not even one image: fit_rows stops with its one line

    # where the prefill's own memory keeps the batch small, its pieces are halved while that lets >= 1.25x
    # the rows fit, each half measured: here 100 bytes a prefill row, 10 a decoded row, a budget of 1,000
    tried.clear()
    piece, used, rows = generation.pieces_for_more_rows(chunk, 800, 20, 10, 1000, lambda p: prefill(p, 8) and
                                                        100 * p["input_ids"].shape[0], smallest=1)
    assert tried == [4, 2] and piece["input_ids"].shape[0] == 2 and (used, rows) == (200, 80)  # 1 row: 90 < 100
    tried.clear()
    assert generation.pieces_for_more_rows(chunk, 800, 20, 10, 1000, prefill, smallest=8)[2] == 20 and not tried
    # not one row beside the fitted piece's prefill (fit_rows then allows pieces of one image): halved until
    # rows fit, then on while that buys 1.25x the rows: a budget of 350, 100 bytes a prefill row
    tried.clear()
    piece, used, rows = generation.pieces_for_more_rows(chunk, 800, 0, 10, 350, lambda p: prefill(p, 8) and
                                                        100 * p["input_ids"].shape[0], smallest=1)
    assert tried == [4, 2, 1] and piece["input_ids"].shape[0] == 1 and (used, rows) == (100, 24)

    kw = dict(max_new_tokens=NEW_TOKENS, num_workers=0, progress=False)
    reference = predict(model, encoder, paths, batch_size=1, engine="generate", **kw)
    monkeypatch.setattr(generation, "fit_rows", lambda *a, **k: generation.Fit(10, "monkeypatched", 3))
    prefilled = []
    plain = decoding.StaticDecoder._prefill

    def spy(self, chunks, rows):
        prefilled.append([c["input_ids"].shape[0] for c in chunks])
        return plain(self, chunks, rows)

    monkeypatch.setattr(decoding.StaticDecoder, "_prefill", spy)
    assert predict(model, encoder, paths, batch_size=None, engine="static", **kw) == reference
    assert prefilled == [[3, 3, 3, 1]]  # one batch of 10 rows, its chunk prefilled 3 rows at a time


def _flop_floor():
    import importlib
    import sys
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("flop_floor")


def test_flop_floor_counts_each_part_of_an_image():
    """bench/flop_floor.py (issue 32's floor): the FLOPs of one image by part, counted by hand for a small shape."""
    floor = _flop_floor()
    weights = {"per_patch": 10, "per_merged": 5, "per_token": 7, "head": 11}
    # 1 vision layer of width 2; 1 full-attention LLM layer of width 3; no Gated DeltaNet layers
    flops = floor.image_flops(patches=4, merged=1, prompt=3, new_tokens=2, weights=weights, shape=(1, 2, 1, 3, 0, 0))
    assert flops == {"vision": 2 * (10 * 4 + 5 * 1) + 4 * 4 * 4 * 2,       # linears per patch / merged token; q.k, p.v
                     "prefill": 2 * 7 * 3 + 4 * (3 * 4 // 2) * 3,          # linears per token; causal attention
                     "decode": 2 * 7 * 1 + 4 * 3 * (3 + 1),                # one token fed back, over 4 positions
                     "lm head": 2 * 11 * 2}                                # once per generated token


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "qwen2vl-2b").is_dir(),
                    reason="../shared/qwen2vl-2b (the real config) is absent")
def test_flop_floor_misses_no_weight_of_the_real_model():
    """Every weight of Qwen2-VL-2B's published architecture is in a counted matrix product, except the embedding
    table (a lookup) and the norms' and biases' few vectors: a renamed part in transformers shows here."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    floor = _flop_floor()
    config = AutoConfig.from_pretrained(Path(__file__).resolve().parents[2] / "shared" / "qwen2vl-2b")
    parts = floor.weights_by_part(config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # the head is tied to the embedding: counted once here
    embedding = model.get_input_embeddings().weight.numel()
    counted = parts["per_patch"] + parts["per_merged"] + parts["per_token"] + embedding
    assert parts["head"] == embedding and 0 <= total - counted < 0.002 * total, (total, counted)
    assert 2.2e9 < total < 2.22e9  # Qwen2-VL-2B: 2.21 B parameters


def test_greedy_pick_with_min_new_tokens_bars_stops_in_the_models_own_logits():
    """The static decoder's greedy choice with min_new_tokens: the stop tokens barred in the bf16 logits
    themselves (no fp32 copy of 512 rows x the vocabulary a step) picks what the fp32 copy picks: before
    min_new_tokens never a stop token, after it the plain argmax, finished rows padded."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    rows, vocab, stops = 64, 1000, [7, 11]
    logits = torch.randn(rows, vocab).to(torch.bfloat16)
    logits[: rows // 2, 7] = 50  # a stop token wins these rows unless barred
    logits[rows // 2:, 11] = logits[rows // 2:].max(-1).values  # ties with the row's best
    finished = torch.zeros(rows, dtype=torch.bool)
    finished[-3:] = True
    decoder = SimpleNamespace(temperature=0.0, min_new=4, stop_ids=torch.tensor(stops), pad_id=0)
    for step, barred in ((2, True), (4, False)):
        want = logits.float()
        if barred:
            want[:, stops] = float("-inf")
        want = torch.where(finished, 0, want.argmax(-1))
        got = decoding.StaticDecoder._pick(decoder, logits.clone(), torch.tensor([step]), finished)
        assert torch.equal(got, want), step
        assert not barred or not torch.isin(got[:-3], torch.tensor(stops)).any()


def test_joined_projections_follow_a_fused_optimizer_step(tiny_model_dir, formula_images, monkeypatch):
    """fused_qkv after TUNE=full trains between evaluations: torch's fused AdamW (the Trainer's default) writes the
    weights in place without a new version count, and the next decoding uses the new weights (each decoder joins
    them afresh): its texts are those of the same weights decoded without the joined projections."""
    model, encoder = load(tiny_model_dir)
    paths = [p for p, _ in formula_images[:4]]
    kw = dict(max_new_tokens=NEW_TOKENS, num_workers=0, progress=False, batch_size=4, engine="static")
    monkeypatch.setenv("LATEXOCR_SPEED", "fused_qkv=on")
    before = predict(model, encoder, paths, **kw)
    weights = [p for _, group in standins._qkv_projections(model.model) for q in group for p in q.parameters()]
    optimizer = torch.optim.AdamW(weights, lr=0.05, fused=True)
    for p in weights:
        p.grad = torch.randn_like(p)
    versions = [p._version for p in weights]
    optimizer.step()
    assert [p._version for p in weights] == versions  # why a version-keyed copy would have missed the step
    after = predict(model, encoder, paths, **kw)
    monkeypatch.setenv("LATEXOCR_SPEED", "fused_qkv=off")
    assert after == predict(model, encoder, paths, **kw) != before
