"""Qwen3.5 (Gated DeltaNet + full-attention hybrid) through the same code: CPU, a tiny offline model.

The tiny model has both layer kinds (three linear-attention layers, one full-attention layer), a
vision tower with patch 16, Qwen3VLProcessor, its own tokenizer class and a chat template with the
thinking mode. Packed rows are the risk specific to this family: a linear-attention layer carries a
convolution and a recurrent state along the row, so these tests check per-sample equality with
padded batches and with each sample alone, and that the check fails without the fix.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoProcessor

from latexocr.batching import IGNORE_INDEX, SampleEncoder, TrainCollator, mrope_positions, sample_boundaries  # what the trainer plan adds for Qwen3.5
from latexocr.fast import linear_attention as la
from latexocr.fast.linear_attention import keep_packed_samples_apart
from latexocr.sample import sizing_for
from latexocr.fast.attention import CU_SEQLENS_KEY, use_packed_text_attention, use_packed_vision_attention
from latexocr.fast.vision import PRECOMPUTED_KEYS

from helpers import (LABELS, TINY, losses, make_dataset, printed_metrics, read_csv, run_main, run_script, script_env,
                     trainer_state)

GDN_PROJECTIONS = {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from latexocr.testing import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_5"), "qwen3_5")


@pytest.fixture(scope="module")
def encoder(model_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    return SampleEncoder(processor, sizing_for(processor))


def load(model_dir, packed: bool = True, path: str | None = None):
    """The model as train.py sets it up for packed batches (or untouched, packed=False); path: the way
    packed rows take through the linear-attention layers (default: choose_path's)."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa")
    if packed:
        use_packed_text_attention(model)
        use_packed_vision_attention(model)
        assert keep_packed_samples_apart(model, path=path) == 3  # the three linear-attention layers
    return model.eval()


def forward_logits(model, batch) -> torch.Tensor:
    """Logits of every position of a batch (rows x length x vocab), as training computes them."""
    inputs = {k: v for k, v in batch.items() if k not in PRECOMPUTED_KEYS and k != "labels"}
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def per_sample_losses(model, batch) -> list[float]:
    """Summed cross-entropy of each sample's supervised tokens (packed: split by the row's boundaries)."""
    logits, labels = forward_logits(model, batch), batch["labels"]
    if CU_SEQLENS_KEY in batch:
        bounds = batch[CU_SEQLENS_KEY].tolist()
        rows = [(logits[0, s:e], labels[0, s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
    else:
        rows = list(zip(logits, labels))
    losses = []
    for lg, lb in rows:
        keep = lb[1:] != IGNORE_INDEX
        losses.append(float(F.cross_entropy(lg[:-1][keep].float(), lb[1:][keep], reduction="sum")))
    return losses


def samples(formula_images, n):
    return formula_images[:n]


# ------------------------------------------------------------------------- the model and its template
def test_tiny_model_has_both_layer_kinds_vision_processor_and_template(model_dir, encoder):
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration"
    assert model.config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    assert GDN_PROJECTIONS | {"q_proj", "k_proj", "v_proj", "o_proj", "conv1d"} <= names
    assert hasattr(model.model, "visual")
    processor = encoder.processor
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen3_5Tokenizer"
    assert encoder.sizing.factor == 32  # patch 16 x merge 2
    # the template's thinking mode, as Qwen3.5's own: on by default, an empty closed block when off
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "read"}]}]
    on = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    off = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert not on.startswith("<|im_start|>system")  # no default system turn
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_thinking_is_off_in_the_prompt_and_never_supervised(encoder, formula_images):
    """The prompt (training and generation alike) ends with the template's empty <think></think>
    block; the model learns only the formula and <|im_end|> after it."""
    assert encoder.prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tok = encoder.tokenizer
    think_ids = {tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
    batch = TrainCollator(encoder, packed=False)(samples(formula_images, 4))
    for row, (_, label) in zip(batch["labels"], samples(formula_images, 4)):
        supervised = row[row != IGNORE_INDEX].tolist()
        assert tok.decode(supervised) == label + "<|im_end|>"
        assert not think_ids & set(supervised)
    # the prompt does hold the (closed) block, unsupervised
    ids = batch["input_ids"][0].tolist()
    assert all(t in ids for t in think_ids)


def test_lora_covers_both_layer_kinds_and_not_the_vision_tower(model_dir):
    from latexocr.modeling import add_lora
    model = add_lora(AutoModelForImageTextToText.from_pretrained(model_dir), 8, 16, 0.0)
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert all("language_model" in n for n in wrapped)
    by_layer = {}
    for name in wrapped:
        layer = int(name.split("layers.")[1].split(".")[0])
        by_layer.setdefault(layer, set()).add(name.split(".")[-1])
    mlp = {"gate_proj", "up_proj", "down_proj"}
    for layer in (0, 1, 2):  # Gated DeltaNet layers: all five projections
        assert by_layer[layer] == GDN_PROJECTIONS | mlp
    assert by_layer[3] == {"q_proj", "k_proj", "v_proj", "o_proj"} | mlp


# ------------------------------------------------------------------------------------ packing
def test_positions_of_packed_rows_equal_the_models_rope_index(model_dir, encoder, formula_images):
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    batch = samples(formula_images, 3)
    packed = TrainCollator(encoder, packed=True, packed_extras=sample_boundaries)(batch)
    bounds = packed[CU_SEQLENS_KEY].tolist()
    for i, sample in enumerate(batch):
        alone = TrainCollator(encoder, packed=False)([sample])
        expected, _ = model.model.get_rope_index(alone["input_ids"], mm_token_type_ids=alone["mm_token_type_ids"],
                                                 image_grid_thw=alone["image_grid_thw"])
        start, end = bounds[i], bounds[i + 1]
        assert torch.equal(packed["position_ids"][1:, 0, start:end], expected[:, 0])
        assert torch.equal(packed["position_ids"][0, 0, start:end], torch.arange(end - start))
        assert torch.equal(mrope_positions(alone["mm_token_type_ids"][0].tolist(), alone["image_grid_thw"][0],
                                           encoder.processor.image_processor.merge_size), expected[:, 0])


def test_packed_loss_equals_padded_loss_per_sample(model_dir, encoder, formula_images, monkeypatch):
    """The default path without the kernels (CPU; a GPU without causal-conv1d): one call of each
    linear-attention layer per packed row, on the row's samples as one right-padded batch."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    from latexocr.training import supervised_loss
    batch = samples(formula_images, 5)
    padded = TrainCollator(encoder, packed=False)(batch)
    packed = TrainCollator(encoder, packed=True, packed_extras=sample_boundaries)(batch)
    plain = load(model_dir, packed=False)
    reference = per_sample_losses(plain, padded)  # the model's own forward, right padding
    model = load(model_dir)
    rule, batch_sizes = q35.torch_chunk_gated_delta_rule, []
    monkeypatch.setattr(q35, "torch_chunk_gated_delta_rule",
                        lambda q, *a, **kw: batch_sizes.append(q.shape[0]) or rule(q, *a, **kw))
    assert per_sample_losses(model, packed) == pytest.approx(reference, abs=1e-4, rel=1e-5)
    assert batch_sizes == [5, 5, 5]  # one call per layer, all five samples in it
    # a row filled up to a multiple (CUDA-graph shapes: the longest-sample bound is then the row length)
    filled = TrainCollator(encoder, packed=True, pad_to_multiple_of=64, packed_extras=sample_boundaries)(batch)
    assert per_sample_losses(model, filled)[:5] == pytest.approx(reference, abs=1e-4, rel=1e-5)
    monkeypatch.undo()
    # and train.py's loss on the packed batch is their sum
    with torch.no_grad():
        loss, n = supervised_loss(model, dict(packed))
    assert n == int((padded["labels"] != IGNORE_INDEX).sum())
    assert math.isclose(float(loss), sum(reference), rel_tol=1e-5)


def test_a_packed_row_leaks_no_state_between_samples(model_dir, encoder, formula_images):
    """Sample B after sample A in one row gives exactly what B gives alone: every position's
    logits, not only the supervised ones. Without keep_packed_samples_apart it does not."""
    a, b = samples(formula_images, 2)
    row = TrainCollator(encoder, packed=True, packed_extras=sample_boundaries)([a, b])
    alone = TrainCollator(encoder, packed=True, packed_extras=sample_boundaries)([b])
    n = alone["input_ids"].shape[1]
    model = load(model_dir)
    assert per_sample_losses(model, row)[1] == pytest.approx(per_sample_losses(model, alone)[0], abs=1e-4)
    assert torch.allclose(forward_logits(model, row)[0, -n:], forward_logits(model, alone)[0], atol=1e-4)

    leaky = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    use_packed_text_attention(leaky)  # full attention kept apart, linear attention not
    difference = (forward_logits(leaky, row)[0, -n:] - forward_logits(leaky, alone)[0]).abs().max()
    assert difference > 1e-2, "the leak this guards against did not show: the test would prove nothing"


def _rule_per_sample(reference):
    """A stand-in for a varlen chunked delta rule: `reference` (transformers' PyTorch rule) run on each
    sample of the packed row alone (cu_seqlens), the outputs joined again."""
    def rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
        bounds = cu_seqlens.tolist()
        parts = [reference(*(t[:, s:e] for t in (q, k, v, g, beta)), use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0]
                 for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts, dim=1), None
    return rule


def test_boundaries_reach_the_fast_kernels(model_dir, encoder, formula_images, monkeypatch):
    """With flash-linear-attention + causal-conv1d (GPU, the FLA_CAUSAL_CONV1D path), the row goes through each layer in one call
    and the kernels get the boundaries: `cu_seqlens` for the delta rule, `seq_idx` for the
    convolution. Stand-ins with those kernels' signatures (reference math per segment) check the
    wiring on the CPU."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    reference_conv, reference_rule = q35.causal_conv1d_fn, q35.torch_chunk_gated_delta_rule
    seen = {"conv": [], "rule": []}

    def conv(x, weight, bias=None, seq_idx=None, activation=None, **kwargs):
        seen["conv"].append(seq_idx)
        parts = [reference_conv(x[:, :, seq_idx[0] == i], weight, bias, activation=activation)
                 for i in range(int(seq_idx.max()) + 1)]
        return torch.cat(parts, dim=2)

    each_sample = _rule_per_sample(reference_rule)

    def rule(*args, cu_seqlens=None, **kwargs):
        seen["rule"].append(cu_seqlens)
        return each_sample(*args, cu_seqlens=cu_seqlens, **kwargs)

    monkeypatch.setattr(q35, "causal_conv1d_fn", conv)
    monkeypatch.setattr(q35, "torch_chunk_gated_delta_rule", rule)
    batch = samples(formula_images, 3)
    packed = TrainCollator(encoder, packed=True, packed_extras=sample_boundaries)(batch)
    losses = per_sample_losses(load(model_dir, path=la.FLA_CAUSAL_CONV1D), packed)
    assert len(seen["conv"]) == len(seen["rule"]) == 3  # one call per layer, not per sample
    assert seen["rule"][0].tolist() == packed[CU_SEQLENS_KEY].tolist()
    lengths = packed[CU_SEQLENS_KEY].diff().tolist()
    assert seen["conv"][0][0].tolist() == sum(([i] * n for i, n in enumerate(lengths)), [])
    monkeypatch.undo()
    reference = per_sample_losses(load(model_dir, packed=False), TrainCollator(encoder, packed=False)(batch))
    assert losses == pytest.approx(reference, abs=1e-4, rel=1e-5)


# --------------------------------------------------- the path packed rows take (fast/linear_attention.py)
def _available(monkeypatch, fla: bool, conv: bool = False, refusal: str | None = None):
    """The libraries choose_path looks for, as on a machine that has them (or not)."""
    from transformers.utils import import_utils
    monkeypatch.setattr(import_utils, "is_flash_linear_attention_available", lambda: fla)
    monkeypatch.setattr(import_utils, "is_causal_conv1d_available", lambda: conv)
    monkeypatch.setattr(la, "fla_refusal", lambda: refusal)
    monkeypatch.setattr(la, "_fla_version", lambda: "0.6.0")
    monkeypatch.setattr(la, "conv_tunes_per_length", lambda: False)


def test_path_and_log_line_follow_what_is_installed(model_dir, monkeypatch):
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    swapped = []
    monkeypatch.setattr(la, "use_reference_delta_rule", lambda: swapped.append(True))

    _available(monkeypatch, fla=False)  # a CPU, or no package: today's padded batch
    assert la.choose_path()[0] == la.PADDED
    assert "flash-linear-attention not installed" in la.describe(model)
    assert "right-padded batch" in la.describe(model)
    # what train.py logs for padded batches (packing off): the kernels transformers' own forward runs
    assert la.describe_padded(model).startswith("linear-attention layers: padded batches on transformers' reference "
                                                "PyTorch kernels (flash-linear-attention not installed")
    keep_packed_samples_apart(model)
    assert not swapped and model.model.language_model.layers[0].linear_attn.forward.__name__ == "packed_forward"

    refusal = "flash-linear-attention 0.6.0 refuses to train on a Hopper GPU with Triton 3.6.0 (...)"
    _available(monkeypatch, fla=True, refusal=refusal)  # installed, refusing: padded, and the reference rule
    assert la.choose_path() == (la.PADDED, refusal)
    assert refusal in la.describe(model) and "right-padded batch" in la.describe(model)
    assert la.describe_padded(model).endswith(f"reference PyTorch kernels ({refusal})")
    keep_packed_samples_apart(model)
    assert swapped == [True]  # else transformers' fla chunk rule would raise in the first backward
    la.avoid_refused_kernels(model)  # what train.py calls without packing (--no-packing): the same guard
    assert swapped == [True, True]

    _available(monkeypatch, fla=True)  # fla runs: its chunk rule on right-padded samples (run O: its varlen path was slower)
    assert la.choose_path() == (la.FLA_PADDED, "fla 0.6.0 chunk, right-padded samples (its varlen path measured slower)")
    assert "pass fla's kernels as one right-padded batch" in la.describe(model)
    assert la.describe_padded(model).startswith("linear-attention layers: padded batches through fla 0.6.0's chunked "
                                                "delta rule and torch's depthwise convolution (the first run")
    keep_packed_samples_apart(model)
    assert swapped == [True, True]  # fla's rule stays (it runs here)
    monkeypatch.setenv("LATEXOCR_SPEED", "fla_varlen=on")  # fla's varlen kernels, where a bench asks for them
    assert la.choose_path() == (la.FLA, "fla 0.6.0 chunk + fla conv, packed")
    assert la.describe(model).startswith("linear-attention layers: fla 0.6.0 chunk + fla conv, packed:")
    monkeypatch.setattr(la, "conv_tunes_per_length", lambda: True)
    assert "bucketed" in la.choose_path()[1]
    monkeypatch.delenv("LATEXOCR_SPEED")
    _available(monkeypatch, fla=True, conv=True)
    assert la.choose_path() == (la.FLA_CAUSAL_CONV1D, "fla 0.6.0 chunk + causal-conv1d, packed")
    assert la.describe_padded(model).split(' (the first run')[0].endswith("chunked delta rule and causal-conv1d's convolution")
    monkeypatch.setenv("LATEXOCR_SPEED", "fla=off")  # bench/: the reference kernels where fla runs, in the same run
    assert la.choose_path() == (la.PADDED, "flash-linear-attention off ($LATEXOCR_SPEED fla=off)")
    la.avoid_refused_kernels(model)
    assert swapped == [True, True, True]


def test_packing_auto_is_off_where_the_linear_attention_layers_would_pad_packed_rows(model_dir, tiny_model_dir,
                                                                                      monkeypatch):
    """LATEXOCR_SPEED packing=auto: padded batches where the Gated DeltaNet layers would pad the packed
    samples again (they trained faster there: runs K and S), packed where fla or causal-conv1d keeps them
    apart in one packed row; a choice given stays; a model without such layers packs."""
    from latexocr.fast import SpeedChoices, resolve_packing
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    for fla, conv, varlen, packed in ((False, False, "off", False), (True, False, "off", False),
                                      (True, False, "on", True), (True, True, "off", True)):
        _available(monkeypatch, fla=fla, conv=conv)
        monkeypatch.setenv("LATEXOCR_SPEED", f"fla_varlen={varlen}")
        speed, note = resolve_packing(SpeedChoices(), model)
        assert speed.packed is packed and speed.packing == ("on" if packed else "off")
        assert ("packing off" in note) is (not packed) and (not note or "would pad packed samples again" in note)
        assert resolve_packing(SpeedChoices(packing="on"), model) == (SpeedChoices(packing="on"), "")
    qwen2_vl = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert resolve_packing(SpeedChoices(), qwen2_vl)[0].packing == "on"


def _fake_fla(monkeypatch, hopper: bool, triton: str, tilelang: bool):
    """fla's own flags (fla.utils) and tilelang backend as fla 0.6.0 sets them on such a machine."""
    import sys
    import types
    from packaging.version import Version
    utils = types.ModuleType("fla.utils")
    utils.IS_NVIDIA_HOPPER = hopper
    utils.TRITON_ABOVE_3_4_0, utils.TRITON_ABOVE_3_7_1 = Version(triton) >= Version("3.4.0"), Version(triton) >= Version("3.7.1")
    backend = types.ModuleType("fla.ops.common.backends.tilelang")
    backend.CommonTileLangBackend = type("CommonTileLangBackend", (), {
        "is_available": classmethod(lambda cls: tilelang), "is_enabled": lambda self: True})
    for name, module in {"fla": types.ModuleType("fla"), "fla.utils": utils, "fla.ops": types.ModuleType("fla.ops"),
                         "fla.ops.common": types.ModuleType("fla.ops.common"),
                         "fla.ops.common.backends": types.ModuleType("fla.ops.common.backends"),
                         "fla.ops.common.backends.tilelang": backend,
                         "triton": types.SimpleNamespace(__version__=triton)}.items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("hopper, triton, tilelang, refused", [
    (True, "3.6.0", False, True),    # the H200 with torch 2.11's Triton: fla raises in the backward pass
    (True, "3.6.0", True, False),    # ... unless tilelang takes that kernel
    (True, "3.7.1", False, False),   # a fixed Triton
    (False, "3.6.0", False, False),  # not Hopper
])
def test_fla_refusal_is_read_from_fla_before_any_kernel_runs(monkeypatch, hopper, triton, tilelang, refused):
    _fake_fla(monkeypatch, hopper, triton, tilelang)
    reason = la.fla_refusal()
    assert (reason is not None) == refused
    if refused:
        assert "Triton 3.6.0" in reason and "tilelang" in reason


def test_bucketed_lengths_are_few_and_cover_the_row():
    assert [la.bucket_length(n) for n in (1, 256, 257, 1000, 1024, 1025, 2243, 4097)] == [
        256, 256, 320, 1024, 1024, 1280, 2560, 5120]
    lengths = {la.bucket_length(n) for n in range(1, 8193)}
    assert len(lengths) == 21  # 256, then four per doubling up to 8192
    assert all(la.bucket_length(n) >= n and la.bucket_length(n) <= max(256, 1.25 * n) for n in range(1, 8193))


def test_conv_bucketing_only_where_fla_tunes_per_length(monkeypatch):
    import sys
    import types
    kernels = types.ModuleType("fla.modules.causal_conv1d.ops")
    kernels.causal_conv1d_fwd_kernel = types.SimpleNamespace(keys=["D", "W"])  # fla 0.6.0
    kernels.causal_conv1d_bwd_kernel = types.SimpleNamespace(keys=["D", "W"])
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d.ops", kernels)
    assert not la.conv_tunes_per_length()
    kernels.causal_conv1d_fwd_kernel.keys = ["D", "W", "NB"]  # fla main before #1154 (fla #1147)
    assert la.conv_tunes_per_length()


def _install_stand_in_fla(monkeypatch, seen):
    """fla's conv and chunk rule with their signatures, computed per segment with transformers' reference
    kernels: the FLA path's own arithmetic (fla_forward) checked on the CPU."""
    import sys
    import types
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35

    def causal_conv1d(x, weight, bias=None, activation=None, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
        seen["conv"].append((x.shape[1], cu_seqlens_cpu.tolist()))
        bounds = cu_seqlens.tolist()
        parts = [q35.causal_conv1d_fn(x[:, s:e].transpose(1, 2), weight, bias, activation=activation).transpose(1, 2)
                 for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts, dim=1), None

    each_sample = _rule_per_sample(q35.torch_chunk_gated_delta_rule)

    def chunk_gated_delta_rule(*args, cu_seqlens_cpu=None, **kwargs):
        seen["rule"].append(cu_seqlens_cpu.tolist())
        return each_sample(*args, **kwargs)

    conv = types.ModuleType("fla.modules.causal_conv1d")
    conv.causal_conv1d = causal_conv1d
    rule = types.ModuleType("fla.ops.gated_delta_rule")
    rule.chunk_gated_delta_rule = chunk_gated_delta_rule
    for name in ("fla", "fla.modules", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d", conv)
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", rule)


@pytest.mark.parametrize("bucketed", [False, True])
def test_fla_path_keeps_samples_apart_with_the_layers_own_arithmetic(model_dir, encoder, formula_images,
                                                                      monkeypatch, bucketed):
    """The FLA path (fla_forward: fla's conv and chunk rule, each given the boundaries, one call per layer)
    gives each sample's padded-batch loss; with bucketing the conv sees a longer row, the rule does not."""
    seen = {"conv": [], "rule": []}
    _install_stand_in_fla(monkeypatch, seen)
    monkeypatch.setattr(la, "conv_tunes_per_length", lambda: bucketed)
    batch = samples(formula_images, 4)
    packed = TrainCollator(encoder, packed=True, packed_extras=sample_boundaries)(batch)
    losses = per_sample_losses(load(model_dir, path=la.FLA), packed)
    bounds, length = packed[CU_SEQLENS_KEY].tolist(), packed["input_ids"].shape[1]
    assert seen["rule"] == [bounds] * 3  # one call per layer, not per sample
    padded_length = la.bucket_length(length) if bucketed else length
    assert seen["conv"] == [(padded_length, bounds + [padded_length] if bucketed else bounds)] * 3
    monkeypatch.undo()
    reference = per_sample_losses(load(model_dir, packed=False), TrainCollator(encoder, packed=False)(batch))
    assert losses == pytest.approx(reference, abs=1e-4, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with flash-linear-attention")
@pytest.mark.parametrize("varlen", [False, True], ids=["default", "fla_varlen"])
def test_gpu_fla_path_packed_losses_and_gradients_equal_each_sample_alone(model_dir, encoder, formula_images, varlen):
    """On a GPU where fla runs (flash-linear-attention; tilelang too on Hopper with Triton < 3.7.1), an fla
    path is the one chosen (the default FLA_PADDED, or FLA with fla_varlen), and a packed row's per-sample
    losses and gradients equal each sample's alone.

    fp32 model: packed and alone run the same fla kernels on the same per-sample chunks (fla's varlen
    chunks start at each sample's start), so they differ only by summation order (fp32: ~1e-6), hence
    1e-4 relative. Against transformers' reference PyTorch kernels (padded batch, fp32) fla's dots run in
    TF32 (~1e-3 relative per product, measured 0.15-0.55 % on a whole layer), hence 2e-2 there: a
    wiring error (a state across samples, a wrong gate) moves the loss by far more."""
    path, why = la.choose_path(varlen=varlen)
    if path == la.PADDED:
        pytest.skip(f"the fla path does not run here: {why}")
    assert path in (la.FLA, la.FLA_CAUSAL_CONV1D, la.FLA_PADDED) and why.startswith("fla ")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False

    def loaded():
        model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa").to(device)
        use_packed_text_attention(model)
        assert keep_packed_samples_apart(model, path=path) == 3
        return model.train()

    def loss_and_grads(model, batch):
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()
                  if k not in PRECOMPUTED_KEYS and k != "labels"}
        logits = model(**inputs, use_cache=False).logits.float()
        labels = batch["labels"].to(device)
        bounds = batch[CU_SEQLENS_KEY].tolist()
        losses = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            keep = labels[0, s + 1:e] != IGNORE_INDEX
            losses.append(F.cross_entropy(logits[0, s:e - 1][keep], labels[0, s + 1:e][keep], reduction="sum"))
        model.zero_grad()
        torch.stack(losses).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return [float(x) for x in losses], grads

    batch = samples(formula_images, 4)
    model = loaded()
    fla_calls = []
    forward = la.fla_forward
    la.fla_forward = lambda *a, **kw: fla_calls.append(1) or forward(*a, **kw)
    try:
        packed_losses, packed_grads = loss_and_grads(model, TrainCollator(encoder, packed=True,
                                                                          packed_extras=sample_boundaries)(batch))
        alone = [loss_and_grads(model, TrainCollator(encoder, packed=True, packed_extras=sample_boundaries)([s]))
                 for s in batch]
    finally:
        la.fla_forward = forward
    assert (len(fla_calls) > 0) == (path == la.FLA)  # the path said is the path taken
    assert packed_losses == pytest.approx([losses[0] for losses, _ in alone], rel=1e-4)
    linear = [n for n in packed_grads if "linear_attn" in n]
    assert len(linear) >= 3 * 5
    for name, grad in packed_grads.items():
        expected = sum(grads[name] for _, grads in alone)
        assert float((grad - expected).norm()) <= 1e-4 * float(expected.norm()) + 1e-7, name
    # and the same numbers as transformers' reference kernels on a padded batch (TF32 inside fla)
    reference = per_sample_losses(load(model_dir, packed=False), TrainCollator(encoder, packed=False)(batch))
    assert packed_losses == pytest.approx(reference, rel=2e-2)


# ------------------------------------------------------------------ train.py -> infer.py -> merge
@pytest.fixture(scope="module")
def overfit(tmp_path_factory, model_dir):
    work = tmp_path_factory.mktemp("overfit_qwen3_5")
    data = make_dataset(work, LABELS)
    out = work / "out"
    proc = run_main("train.py", "--model-id", model_dir, "--train-json", data, "--val-json", data,
                      "--output-dir", out, "--max-steps", 60, "--batch-size", 16, "--micro-batch-size", 16,
                      "--learning-rate", 6e-3, "--lora-alpha", 64, "--save-steps", 60, "--logging-steps", 20,
                      *TINY)
    return work, data, out, proc


def test_overfit_then_infer_reproduces_every_label(overfit, model_dir):
    from safetensors import safe_open
    work, data, out, train = overfit
    assert "train: 16 samples" in train.stdout and "no samples skipped" in train.stdout
    # the run's log says how its batches pass the linear-attention layers: padded on a CPU (packing=auto),
    # on the reference kernels (the line bench/bench_train.py reports as the path that ran)
    assert "packing off (LATEXOCR_SPEED packing=auto): the linear-attention layers would pad" in train.stdout
    assert ("linear-attention layers: padded batches on transformers' reference PyTorch kernels "
            "(flash-linear-attention not installed / no GPU)") in train.stdout
    assert "[eval @ step 60] exact_match 1," in train.stdout, train.stdout[-3000:]
    assert trainer_state(out / "checkpoint-60")["global_step"] == 60
    with safe_open(out / "final" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert all("language_model" in k for k in keys)
    assert {k.split(".")[-3] for k in keys if "lora_A" in k} >= GDN_PROJECTIONS | {"q_proj", "o_proj", "down_proj"}
    # the processor saved with the adapter keeps Qwen3.5's template (with its thinking switch)
    saved = AutoProcessor.from_pretrained(out / "final")
    assert "enable_thinking" in saved.chat_template

    # infer.py, a new process, reproduces every label, with no <think> block in the text
    preds = work / "preds.csv"
    proc = run_main("infer.py", data, "--model-id", model_dir, "--model-source", "local", "--output-dir", out,
                      "--output", preds, "--num-workers", "0", "--max-new-tokens", "12")
    metrics = printed_metrics(proc.stdout)
    assert metrics["exact_match"] == 1.0 and metrics["errors"] == 0 and metrics["n"] == 16
    assert [r["prediction"] for r in read_csv(preds)] == LABELS

    # (the merged export: tests/test_modes.py's chain, Qwen3.5 included)


def test_resume_continues_a_qwen3_5_run(overfit, model_dir):
    work, data, out, _ = overfit
    proc = run_main("train.py", "--model-id", model_dir, "--train-json", data, "--val-json", data,
                      "--output-dir", out, "--max-steps", 62, "--batch-size", 16, "--micro-batch-size", 16,
                      "--learning-rate", 6e-3, "--lora-alpha", 64, "--save-steps", 62, "--logging-steps", 1,
                      "--eval-samples", 2, "--resume", *TINY)
    assert trainer_state(out / "checkpoint-62")["global_step"] == 62
    # continued from checkpoint-60's adapter: two steps from scratch would read none of them
    assert "[eval @ step 62] exact_match 1," in proc.stdout, proc.stdout[-3000:]


def test_compiled_blocks_train_qwen3_5_as_eager(tmp_path, model_dir):
    """LATEXOCR_SPEED=compile=on compiles Qwen3.5's blocks around the delta rule, which runs eagerly between their
    compiled parts (fast/compile.py DELTA_RULES): the reference chunked rule crashed inductor on the first step
    (a TypeError about its padding to whole chunks). The losses equal eager training's."""
    data = make_dataset(tmp_path, LABELS[:8])
    common = ["--model-id", model_dir, "--train-json", data, "--val-json", data, "--max-steps", 3,
              "--batch-size", 4, "--micro-batch-size", 4, "--logging-steps", 1, "--save-steps", 1000, *TINY]
    eager = run_main("train.py", *common, "--output-dir", tmp_path / "eager")  # auto: no GPU -> eager
    # a process of its own: compiling changes process-wide state (dynamo's config, the delta rules)
    compiled = run_script("train.py", *common, "--output-dir", tmp_path / "compiled",
                          env=script_env(LATEXOCR_SPEED="compile=on"), timeout=3600)
    assert "compiling" not in eager.stdout and "compiling" in compiled.stdout
    assert len(losses(eager.stdout)) == 3
    assert losses(compiled.stdout) == pytest.approx(losses(eager.stdout), rel=1e-3)
    assert "[eval @ step 3] exact_match" in compiled.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shifted_convolution_is_transformers_convolution(dtype):
    """Compiled blocks take shifted_causal_conv1d for transformers' PyTorch causal convolution: the same
    values and gradients (bf16: one rounding of the fp32 sum; F.conv1d on a CPU rounds bf16 products)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    reference = getattr(q35.causal_conv1d_fn, la._SHIFTED, q35.causal_conv1d_fn)
    torch.manual_seed(0)
    x = torch.randn(3, 24, 37, dtype=dtype, requires_grad=True)
    weight = torch.randn(24, 4, dtype=dtype, requires_grad=True)
    bias = torch.randn(24, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 24, 37, dtype=dtype)
    results = []
    for conv in (reference, la.shifted_causal_conv1d):
        out = conv(x, weight, bias, activation="silu")
        results.append((out, *torch.autograd.grad(out, (x, weight, bias), grad)))
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for ours, theirs in zip(results[1], results[0]):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, **tolerance)
    # and without bias or activation, as causal_conv1d_fn may be called
    torch.testing.assert_close(la.shifted_causal_conv1d(x.detach(), weight.detach()),
                               reference(x.detach(), weight.detach()), **tolerance)


def test_compiled_qwen3_5_blocks_do_not_recompile_for_each_length():
    """A compiled run meets a new padded length at almost every step. Qwen3.5's blocks compiled once per new
    length (the causal convolution's backward specialised it) until dynamo's limit of 8 recompiles left them
    eager; with shifted_causal_conv1d in its place, new lengths reuse the graphs. bench/compile_lengths.py runs
    the compiled blocks (LoRA, forward and backward) at ten lengths, a process of its own."""
    import json
    proc = run_script("bench/compile_lengths.py", "--families", "qwen3_5", timeout=1800)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["lengths"][:4] == [40, 57, 33, 71]
    after = report["graphs_after_each"]
    # 57 and 33 reuse 40's graphs (transformers' convolution: new ones for each); 71 passes the reference rule's
    # chunk of 64 (its output's strides change: one more compile); the six lengths after it add none
    assert after[0] > 0 and after[1] == after[2] == after[0] and after[-1] == after[3], after


def test_reference_rule_taken_under_the_eager_wrapper(monkeypatch, model_dir):
    """Where fla refuses to train, use_reference_delta_rule swaps in transformers' reference rule; after
    compile's delta_rules_run_eagerly it swaps it in under the eager wrapper, which a compiled block needs."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    before = {name: getattr(q35, name) for name in la.DELTA_RULES}
    for name in la.DELTA_RULES:  # restored after the test: both functions change process-wide
        monkeypatch.setattr(q35, name, before[name])
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    la.delta_rules_run_eagerly(model)
    la.delta_rules_run_eagerly(model)  # idempotent: one wrapper
    la.use_reference_delta_rule(recurrent=True)
    for name in la.DELTA_RULES:
        inner = getattr(getattr(q35, name), la._EAGER_OF)
        assert getattr(inner, la._EAGER_OF, None) is None  # one wrapper
        # the reference itself where transformers wraps it in a function (5.24); the kernels package's hub
        # wrapper (an nn.Module, where that package is installed) has no reference to take
        wrapped = getattr(before[name], "__wrapped__", None)
        assert inner is (wrapped if wrapped is not None and wrapped.__module__ == q35.__name__ else before[name]), name
