"""The fast path (latexocr/fast/): the plain path's losses, its upstream hooks still in place. Tiny models, CPU."""
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from latexocr.batching import SampleEncoder, TrainCollator
from latexocr.fast.attention import (CU_SEQLENS_KEY, MAX_LENGTH_KEY, plain_text_attention, use_packed_text_attention,
                                     use_packed_vision_attention)
from latexocr.fast.trainer import fast_supervised_loss as supervised_loss
from latexocr.fast.vision import (PRECOMPUTED_KEYS, REAL_TOKENS_KEY, VISION_PADDING_KEY, PackedExtras,
                                  takes_precomputed_vision)
from latexocr.sample import sizing_for
from latexocr.training import supervised_loss as plain_supervised_loss


def fast_collator(encoder, pad_to_multiple_of=None, pad_patches_to_multiple_of=None):
    """TrainCollator with the fast path's keys, as fast/trainer.py plan sets it up for a Qwen2-VL model."""
    return TrainCollator(encoder, packed=True, pad_to_multiple_of=pad_to_multiple_of,
                         packed_extras=PackedExtras(pad_patches_to_multiple_of=pad_patches_to_multiple_of))


def test_packed_batch_gives_same_loss_as_padded(tiny_model_dir, formula_images):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    encoder = SampleEncoder(processor, sizing_for(processor))
    samples = formula_images[:5]
    padded = TrainCollator(encoder, packed=False)(samples)
    plain = TrainCollator(encoder, packed=True)(samples)  # the plain path's packed batch: no extra keys
    packed = fast_collator(encoder)(samples)
    assert packed["input_ids"].shape[1] == plain["input_ids"].shape[1] == int(padded["attention_mask"].sum())
    with torch.no_grad():
        reference = model(**padded).loss  # transformers' own loss on the padded batch
        loss_padded, n1 = plain_supervised_loss(model, dict(padded))
        loss_packed, n2 = plain_supervised_loss(model, dict(plain))
        # train.py's fast path: packed attention for text and vision (block-diagonal, per sample)
        assert use_packed_text_attention(model) and use_packed_vision_attention(model)
        loss_fast, n3 = supervised_loss(model, dict(packed))
        # a packed batch that does not bring the boundaries: derived from the positions instead
        bare = {k: v for k, v in packed.items() if k not in (CU_SEQLENS_KEY, MAX_LENGTH_KEY)}
        loss_derived, _ = supervised_loss(model, bare)
        # rows padded up to a multiple of 64 tokens (few shapes, for CUDA graphs): the padding is
        # one extra unsupervised segment, so the loss and its token count are unchanged
        bucketed = fast_collator(encoder, pad_to_multiple_of=64)(samples)
        length = bucketed["input_ids"].shape[1]
        assert length % 64 == 0 and length > packed["input_ids"].shape[1]
        assert bucketed[CU_SEQLENS_KEY].tolist()[:-1] == packed[CU_SEQLENS_KEY].tolist()
        assert bucketed[CU_SEQLENS_KEY][-1] == length and bucketed[MAX_LENGTH_KEY] >= packed[MAX_LENGTH_KEY]
        loss_bucketed, n4 = supervised_loss(model, dict(bucketed))
        # the vision tower's patches padded too (its CUDA graphs): one extra all-zero image whose
        # features are dropped, so the loss is unchanged
        both = fast_collator(encoder, pad_to_multiple_of=64, pad_patches_to_multiple_of=64)(samples)
        assert both["pixel_values"].shape[0] % 64 == 0 and both[VISION_PADDING_KEY] > 0
        assert torch.equal(both["pixel_values"][:len(packed["pixel_values"])], packed["pixel_values"])
        loss_both, n5 = supervised_loss(model, dict(both))
        with plain_text_attention(model):
            assert model.config.text_config._attn_implementation == "sdpa"
    assert n1 == n2 == n3 == n4 == n5
    assert torch.allclose(loss_fast, loss_bucketed, rtol=1e-4)
    assert torch.allclose(loss_fast, loss_both, rtol=1e-4)
    assert torch.allclose(reference, loss_padded / n1, atol=1e-5)
    assert torch.allclose(loss_padded, loss_packed, rtol=1e-4)
    assert torch.allclose(loss_padded, loss_fast, rtol=1e-4)
    assert torch.allclose(loss_fast, loss_derived, rtol=1e-4)
    # and it really is per-sample: shuffling the order of the samples in the row changes nothing
    with torch.no_grad():
        loss_reversed, _ = supervised_loss(model, dict(fast_collator(encoder)(samples[::-1])))
    assert torch.allclose(loss_fast, loss_reversed, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_precomputed_step_matches_model_forward(tiny_family_dirs, formula_images, family):
    """Packed batches of Qwen2-VL skip the model's own image path (latexocr/fast/vision.py: vision inputs,
    image-token and supervised positions precomputed by the collator, no GPU->CPU sync): same loss
    and same LoRA gradients as the model's own forward. Other families take their own forward,
    and refuse padded patches with a clear error."""
    from latexocr.modeling import add_lora
    processor = AutoProcessor.from_pretrained(tiny_family_dirs[family])
    encoder = SampleEncoder(processor, sizing_for(processor))
    batch = fast_collator(encoder)(formula_images[:4])
    assert set(PRECOMPUTED_KEYS) <= set(batch)

    def loss_and_grads(b):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(tiny_family_dirs[family], attn_implementation="sdpa")
        model = add_lora(model, 8, 16, 0.0)
        loss, n = supervised_loss(model, dict(b))
        (loss / n).backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad]
        return takes_precomputed_vision(model), loss.detach(), n, torch.cat(grads)

    fast, loss, n, grads = loss_and_grads(batch)
    assert fast == (family == "qwen2_vl")
    _, loss_own, n_own, grads_own = loss_and_grads({k: v for k, v in batch.items() if k not in PRECOMPUTED_KEYS})
    assert n == n_own
    assert torch.allclose(loss, loss_own, rtol=1e-5)
    assert torch.allclose(grads, grads_own, rtol=1e-4, atol=1e-7)
    if not fast:
        padded = fast_collator(encoder, pad_patches_to_multiple_of=64)(formula_images[:4])
        with pytest.raises(ValueError, match="only Qwen2-VL"):
            loss_and_grads(padded)


def test_compiled_blocks_trace_packed_attention_whole(tiny_model_dir, formula_images):
    """COMPILE_LAYERS: every block compiles as ONE graph (fullgraph=True raises on a graph break)
    with the packed text and vision attention inside, and gives eager's loss and gradients."""
    from latexocr.fast.compile import compile_decoder_layers
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    encoder = SampleEncoder(processor, sizing_for(processor))
    batches = [fast_collator(encoder)(formula_images[i:i + 3]) for i in (0, 3)]

    def loss_and_grads(compiled):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        assert use_packed_text_attention(model) and use_packed_vision_attention(model)
        if compiled:
            torch._dynamo.reset()
            assert compile_decoder_layers(model, backend="aot_eager", fullgraph=True) > 0
        losses = []
        for batch in batches:  # two batches of different lengths: no recompile error, same results
            loss, n = supervised_loss(model, dict(batch))
            (loss / n).backward()
            losses.append(loss.detach() / n)
        grads = torch.cat([p.grad.flatten() for p in model.model.language_model.parameters() if p.grad is not None])
        return torch.stack(losses), grads

    eager_losses, eager_grads = loss_and_grads(False)
    compiled_losses, compiled_grads = loss_and_grads(True)
    assert torch.allclose(eager_losses, compiled_losses, rtol=1e-4)
    assert torch.allclose(eager_grads, compiled_grads, rtol=1e-3, atol=1e-6)


def test_first_text_block_shares_the_others_compiled_graph(tiny_model_dir):
    """The first block's input (frozen embeddings) does not require grad, the others' do: dynamo guards on that,
    so every compiled block compiled twice. compile_decoder_layers makes the language model's input embeddings
    require grad in training: one graph for all text blocks, LoRA gradients as eager's; uncompile undoes it."""
    from torch._dynamo.utils import counters

    from latexocr.fast.compile import compile_decoder_layers, uncompile
    from latexocr.modeling import add_lora, vision_language_core

    def lora_grads(compiled):
        torch.manual_seed(0)
        model = add_lora(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), 8, 16, 0.0)
        text = vision_language_core(model).language_model
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            compile_decoder_layers(model, backend="aot_eager")
        for length in (40, 57):  # frozen inputs, as the embeddings give them
            embeds = torch.randn(2, length, text.config.hidden_size, generator=torch.Generator().manual_seed(length))
            text(inputs_embeds=embeds, attention_mask=torch.ones(2, length, dtype=torch.long),
                 use_cache=False).last_hidden_state.pow(2).mean().backward()
            assert not embeds.requires_grad and embeds.grad is None  # the caller's tensor is left alone
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1, counters["stats"]
            uncompile(model)
            assert not text._forward_pre_hooks
            torch._dynamo.reset()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    eager = lora_grads(False)
    assert torch.allclose(lora_grads(True), eager, rtol=1e-4, atol=1e-7)


def test_graphs_only_compile_records_the_blocks_own_kernels(tiny_model_dir, formula_images, monkeypatch):
    """compile_backend=cudagraphs: the language model's blocks go through dynamo's cudagraphs backend (their own
    eager kernels recorded as CUDA graphs, no kernel generation) and train as eager; the vision blocks stay
    eager. On the CPU the backend skips the recording (a counted skip) and runs the traced graphs."""
    import torch._inductor.compile_fx as inductor
    from torch._dynamo.utils import counters

    from latexocr.fast.compile import compile_decoder_layers, uncompile
    from latexocr.modeling import add_lora
    generated = []  # inductor's entry point, which both its backend and mode="reduce-overhead" call
    monkeypatch.setattr(inductor, "compile_fx", lambda *args, **kwargs: generated.append(1) or args[0])
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    encoder = SampleEncoder(processor, sizing_for(processor))
    batches = [fast_collator(encoder)(formula_images[i:i + 3]) for i in (0, 3)]

    def losses(graphs_only):
        torch.manual_seed(0)
        model = add_lora(AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="sdpa"),
                         8, 16, 0.0)
        if graphs_only:
            torch._dynamo.reset()
            counters.clear()
            assert compile_decoder_layers(model, cuda_graphs=True, kernels=False) == len(
                model.base_model.model.model.language_model.layers)
            assert all(block._compiled_call_impl is None for block in model.base_model.model.model.visual.blocks)
        try:
            out = []
            for batch in batches:
                loss, n = supervised_loss(model, dict(batch))
                (loss / n).backward()
                out.append(loss.detach() / n)
            return torch.stack(out)
        finally:
            uncompile(model)
            torch._dynamo.reset()

    eager = losses(False)
    assert torch.allclose(losses(True), eager, rtol=1e-4)
    assert not generated, "inductor generated kernels"
    assert counters["inductor"]["cudagraph_skips"] > 0, "the blocks did not go through the cudagraphs backend"


def test_compiled_blocks_take_no_float_scalars(tiny_model_dir, formula_images):
    """CUDA graphs can only replay a block whose inputs all live on the GPU. Python floats the blocks
    read (LoRA's scaling, norm eps) must be compiled in as constants, not passed as 0-d CPU tensors
    (torch 2.11 then skipped the LLM blocks' graphs, or segfaulted in their backward)."""
    from latexocr.modeling import add_lora
    from latexocr.fast.compile import compile_decoder_layers, uncompile
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    encoder = SampleEncoder(processor, sizing_for(processor))
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert use_packed_text_attention(model) and use_packed_vision_attention(model)
    model = add_lora(model, 8, 16, 0.05)
    inputs = []

    def recording_backend(graph_module, example_inputs):
        inputs.extend(example_inputs)
        return graph_module.forward

    torch._dynamo.reset()
    try:
        compile_decoder_layers(model, backend=recording_backend)
        loss, n = supervised_loss(model, dict(fast_collator(encoder)(formula_images[:3])))
        (loss / n).backward()
    finally:
        uncompile(model)
        torch._dynamo.reset()
    assert inputs, "no block was compiled"
    scalars = [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() == 0]
    assert not scalars, f"{len(scalars)} 0-d tensor inputs (floats lifted to tensors): {scalars[:3]}"


def test_lora_input_cast_switch_matches_peft(tiny_model_dir):
    """NoLoraInputCast switches off exactly the layers peft's own helper does, and restores them."""
    from peft.helpers import disable_input_dtype_casting
    from latexocr.modeling import add_lora
    from latexocr.fast.trainer import NoLoraInputCast
    model = add_lora(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), 8, 16, 0.0)
    flags = lambda: [getattr(m, "cast_input_dtype_enabled", None) for m in model.modules()]  # noqa: E731
    before = flags()
    with disable_input_dtype_casting(model):
        by_peft = flags()
    switch = NoLoraInputCast(model)
    assert len(switch.layers) == 7 * model.config.text_config.num_hidden_layers  # q k v o gate up down
    with switch():
        assert flags() == by_peft != before
    assert flags() == before
    with switch(active=False):  # without autocast the cast stays on
        assert flags() == before


def test_cuda_graphs_only_where_measured():
    from latexocr.fast.compile import should_use_cuda_graphs
    assert should_use_cuda_graphs(True, compiled=True, processes=1, accumulation=1, on_cuda=True)
    assert not should_use_cuda_graphs(False, compiled=True, processes=1, accumulation=1, on_cuda=True)
    assert not should_use_cuda_graphs(True, compiled=False, processes=1, accumulation=1, on_cuda=True)
    assert not should_use_cuda_graphs(True, compiled=True, processes=1, accumulation=1, on_cuda=False)
    # gradient accumulation: the next replay would reuse the memory of gradients not yet consumed
    assert not should_use_cuda_graphs(True, compiled=True, processes=1, accumulation=2, on_cuda=True)
    assert not should_use_cuda_graphs(True, compiled=True, processes=2, accumulation=1, on_cuda=True)


def test_compile_setting():
    from latexocr.fast.compile import COMPILE_FROM_STEPS, should_compile
    assert should_compile("on", 1) and not should_compile("off", 10**6)
    # auto: only on a CUDA GPU, and only for runs long enough to repay the compile
    assert should_compile("auto", COMPILE_FROM_STEPS) == torch.cuda.is_available()
    assert not should_compile("auto", COMPILE_FROM_STEPS - 1)
    assert not should_compile("auto", COMPILE_FROM_STEPS, measured_setup=False)  # DeepSpeed / checkpointing
    with pytest.raises(SystemExit, match="auto, on or off"):
        should_compile("yes", 10)


def test_trainer_counts_real_tokens_on_the_host(tmp_path, tiny_model_dir, formula_images):
    """Tokens seen (tokens/s in the logs) count the packed row without its CUDA-graph padding, from
    the batch's host-side count; the FLOP estimate is transformers' own."""
    from transformers import TrainingArguments
    from latexocr.fast.trainer import FastTrainer
    from latexocr.fast.vision import REAL_TOKENS_KEY
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    encoder = SampleEncoder(processor, sizing_for(processor))
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             include_num_input_tokens_seen="all")
    trainer = FastTrainer(model=model, args=args, processing_class=processor)
    plain = fast_collator(encoder)(formula_images[:3])
    padded = fast_collator(encoder, pad_to_multiple_of=64)(formula_images[:3])
    real = plain["input_ids"].shape[1]
    assert padded[REAL_TOKENS_KEY] == plain[REAL_TOKENS_KEY] == real < padded["input_ids"].shape[1]
    trainer._track_num_input_tokens(padded)
    assert trainer.state.num_input_tokens_seen == real
    assert trainer.floating_point_ops(padded) == 6 * padded["input_ids"].numel() * model.num_parameters(
        exclude_embeddings=True)


def test_cheap_train_and_zero_grad_keep_module_semantics(tiny_model_dir):
    """skip_redundant_module_walks (the Trainer's per-step train()/zero_grad()): eval() and train()
    still switch every module, zero_grad() clears every gradient there is (LoRA's)."""
    from latexocr.modeling import add_lora
    from latexocr.fast.trainer import skip_redundant_module_walks
    model = add_lora(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), 8, 16, 0.1)
    trainable = skip_redundant_module_walks(model)
    assert trainable and len(trainable) == sum(p.requires_grad for p in model.parameters())
    # peft's wrapper says training while the loaded base model is in eval mode: train() must switch it
    assert model.training and not model.base_model.model.training
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    assert model.train() is model and all(m.training for m in model.modules())
    for p in trainable:
        p.grad = torch.ones_like(p)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_graphs_only_where_capturable(tiny_family_dirs, family):
    """The vision tower is graphed only for Qwen2-VL with the packed (sync-free) vision attention,
    and only while it is frozen."""
    from latexocr.modeling import add_lora
    from latexocr.fast.vision import graph_vision_tower
    model = AutoModelForImageTextToText.from_pretrained(tiny_family_dirs[family], attn_implementation="sdpa")
    use_packed_vision_attention(model)
    assert graph_vision_tower(model) is None  # every parameter trainable
    model = add_lora(model, 8, 16, 0.0)       # the vision tower frozen, as in train.py
    assert (graph_vision_tower(model) is not None) == (family == "qwen2_vl")
    model.base_model.model.set_attn_implementation({"vision_config": "sdpa"})
    assert graph_vision_tower(model) is None  # transformers' sdpa vision attention syncs per image


# ---------------------------------------------------------------- upstream hooks (latexocr/fast/upstream.py)
def test_upstream_hooks_unchanged():
    """Every private method overridden, instance method patched and transformers source re-implemented
    by the fast path is as it was checked; a transformers/peft upgrade that changes one fails here,
    naming what to re-check, instead of leaving training silently slower or different."""
    from latexocr.fast.upstream import drift
    problems = drift()
    assert not problems, "\n".join(problems)


def test_upstream_drift_names_what_to_recheck(monkeypatch):
    from latexocr.fast import upstream
    key = ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel.forward")
    monkeypatch.setitem(upstream.SOURCES, key, (upstream.SOURCES[key][0], ("0" * 16,)))
    monkeypatch.setitem(upstream.SOURCES, ("transformers.vision_utils", "a_function_that_was_removed"), ("X", ("",)))
    monkeypatch.setitem(upstream.OVERRIDDEN, ("transformers.Trainer", "_clip_grad_norm"), ["self", "model", "old"])
    monkeypatch.setattr(upstream, "CALLED_BY_TRAINER", upstream.CALLED_BY_TRAINER + ("self._a_hook_never_called()",))
    monkeypatch.setitem(upstream.COMPILED, "pykatex", ("0.0.9", upstream.COMPILED["pykatex"][1]))
    problems = "\n".join(upstream.drift())
    assert "checked against transformers 5.24.0 / 5.25.0" in problems
    assert "Qwen2VLModel.forward changed" in problems and "re-check fast/vision.py supervised_step_loss" in problems
    assert "a_function_that_was_removed is gone" in problems
    assert "_clip_grad_norm now takes ['self', 'model']" in problems
    assert "no longer calls self._a_hook_never_called()" in problems
    assert "pykatex 0.1.1 is installed (checked: 0.0.9); re-check fast/katex.py" in problems


def test_upstream_drift_accepts_each_checked_version_and_nothing_else(monkeypatch):
    """A source passes with the text of any version checked (or absent where a checked version lacks
    it); any other text, or absence not listed, fails."""
    from latexocr.fast import upstream
    key = ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel.forward")
    added_later = ("transformers.vision_utils", "a_function_added_later")
    installed = upstream.source_hash(*key)
    monkeypatch.setattr(upstream, "SOURCES", {key: ("X", ("0" * 16, installed)), added_later: ("Y", (upstream.ABSENT, "1" * 16))})
    assert upstream.drift() == []
    monkeypatch.setattr(upstream, "SOURCES", {key: ("X", ("0" * 16, upstream.ABSENT)), added_later: ("Y", ("1" * 16,))})
    problems = "\n".join(upstream.drift())
    assert f"Qwen2VLModel.forward changed (source hash {installed}, checked {'0' * 16}, absent)" in problems
    assert "a_function_added_later is gone" in problems


def test_load_model_swaps_no_layer_for_a_hub_kernel(tiny_model_dir):
    """transformers 5.25 kernelizes a model at load by default (layers swapped for kernels downloaded
    from the Hub); load_model keeps the layers that docs/BENCHMARKS.md measured, on 5.24 and 5.25 alike."""
    from latexocr.modeling import load_model
    assert not load_model(str(tiny_model_dir), torch.float32).use_kernels


# ---------------------------------------------------------------- the plan, and training without the fast path
def test_train_py_without_the_fast_path_trains_the_same(tmp_path, tiny_model_dir):
    """$LATEXOCR_SPEED fast=off: plain transformers training, with the fast path's losses."""
    import subprocess
    import sys

    from helpers import ROOT as root, TINY, losses as _losses, make_dataset, script_env

    data = make_dataset(tmp_path, ["x ^ 2", "a + b = c", "\\pi", "y _ 1", "e ^ x", "1 / 2", "\\beta", "f ( x )"])
    common = ["--model-id", tiny_model_dir, "--train-json", data, "--val-json", data, "--max-steps", 3,
              "--batch-size", 4, "--micro-batch-size", 4, "--logging-steps", 1, "--save-steps", 1000,
              "--eval-samples", 2, *TINY]

    def train(out, speed=""):
        proc = subprocess.run([sys.executable, str(root / "train.py"), *map(str, common), "--output-dir", str(out)],
                              env=script_env(LATEXOCR_SPEED=speed), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    plain, fast = train(tmp_path / "plain", "fast=off"), train(tmp_path / "fast")
    assert "fast path: off" in plain
    assert "fast path: packed text attention; sync-free Qwen2-VL step" in fast
    assert (tmp_path / "plain" / "final" / "adapter_model.safetensors").exists()
    # CPU trains in fp32: the same numbers. A CUDA GPU trains in bf16, where packing (another summation
    # order) moves a loss by up to a few bf16 roundings: 6.590 vs 6.592 seen on an H200.
    tolerance = 5e-3 if torch.cuda.is_available() else 1e-4
    assert len(_losses(plain)) == 3 and _losses(fast) == pytest.approx(_losses(plain), rel=tolerance)


def _settings(**changes):
    import argparse
    import train
    return argparse.Namespace(**{**{k.lower(): v for k, v in train.SETTINGS.items()}, **changes})


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_plan_gives_each_family_only_what_it_uses(tiny_family_dirs, formula_images, family):
    """The collator emits the precomputed step's keys only for Qwen2-VL (others would throw them away)."""
    from latexocr.fast import SpeedChoices
    from latexocr.fast.trainer import plan
    from latexocr.modeling import add_lora
    processor = AutoProcessor.from_pretrained(tiny_family_dirs[family])
    model = add_lora(AutoModelForImageTextToText.from_pretrained(tiny_family_dirs[family], attn_implementation="sdpa"),
                     8, 16, 0.0)
    collator_options, trainer_options, summary = plan(model, _settings(), SpeedChoices(), processes=1,
                                                      accumulation=1, planned_steps=125)
    assert trainer_options == {"cuda_graphs": False, "vision_graphs": None, "group_by_length": False,
                               "sliced_head": True}
    assert "compiling" not in summary  # CPU: compile=auto stays eager
    assert "the loss's vocabulary projection in slices" in summary  # a LoRA model's frozen head (fast/head.py)
    # group_by_length: only for padded batches (packed rows carry no padding to save)
    for packing, grouped in (("off", True), ("on", False)):
        options = plan(model, _settings(), SpeedChoices(group_by_length=True, packing=packing), processes=1,
                       accumulation=1, planned_steps=125)
        assert options[1]["group_by_length"] is grouped and ("length-grouped batches" in options[2]) is grouped
    # padded batches carry the collator's M-RoPE positions (padded_positions, on by default); packed rows have theirs
    for packing, positions, given in (("off", True, True), ("off", False, False), ("on", True, False)):
        options = plan(model, _settings(), SpeedChoices(packing=packing, padded_positions=positions), processes=1,
                       accumulation=1, planned_steps=125)
        assert options[0].get("padded_positions", False) is given
        assert ("M-RoPE positions from the collator" in options[2]) is given
    batch = TrainCollator(SampleEncoder(processor, sizing_for(processor)), **collator_options)(formula_images[:3])
    assert CU_SEQLENS_KEY in batch
    step_keys = set(PRECOMPUTED_KEYS) - {REAL_TOKENS_KEY}  # the real token count serves every family
    assert (step_keys <= set(batch)) if family == "qwen2_vl" else not (step_keys & set(batch))
    with pytest.raises(SystemExit, match="auto, on or off"):
        plan(model, _settings(), SpeedChoices(compile="yes"), processes=1, accumulation=1, planned_steps=1)


def test_plan_records_graphs_only_where_cuda_graphs_apply(tiny_family_dirs, monkeypatch):
    """compile_backend=cudagraphs: where CUDA graphs apply (one GPU, no accumulation) the text blocks go to the
    cudagraphs backend and the line says so; elsewhere (several processes) the blocks compile with inductor."""
    from latexocr.fast import SpeedChoices, trainer
    from latexocr.fast.compile import uncompile
    from latexocr.modeling import add_lora, vision_language_core
    # CUDA graphs as on one GPU (this CPU has none); packing off: the vision tower's own graphs need a GPU
    monkeypatch.setattr(trainer, "should_use_cuda_graphs",
                        lambda enabled, compiled, processes, accumulation, **kw: enabled and compiled and processes == 1)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)
    model = add_lora(AutoModelForImageTextToText.from_pretrained(tiny_family_dirs["qwen2_5_vl"],
                                                                 attn_implementation="sdpa"), 8, 16, 0.0)
    core = vision_language_core(model)
    speed = SpeedChoices(compile="on", compile_backend="cudagraphs", packing="off")
    try:
        collator_options, trainer_options, summary = trainer.plan(model, _settings(), speed, processes=1,
                                                                  accumulation=1, planned_steps=10)
        assert "LLM blocks as CUDA graphs of their own kernels (no kernels generated)" in summary, summary
        assert trainer_options["cuda_graphs"] and collator_options["pad_to_multiple_of"] == speed.padded_graph_multiple
        assert all(layer._compiled_call_impl is not None for layer in core.language_model.layers)
        assert all(block._compiled_call_impl is None for block in core.visual.blocks)
        uncompile(model)
        _, trainer_options, summary = trainer.plan(model, _settings(), speed, processes=2, accumulation=1,
                                                   planned_steps=10)
        assert not trainer_options["cuda_graphs"] and "compiling" in summary and "own kernels" not in summary
        assert all(block._compiled_call_impl is not None for block in core.visual.blocks)
    finally:
        uncompile(model)
        torch._dynamo.reset()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])
def test_auto_compiles_qwen3_5_only_on_fla_and_from_longer_runs(tiny_family_dirs, monkeypatch, family):
    """compile=auto's rule (fast/trainer.py auto_compile_rule): Qwen3.5's compiled step was timed with fla's delta
    rule (run AC), not with transformers' reference one, and its longer compile repays itself later."""
    from latexocr.fast import linear_attention, trainer
    from latexocr.fast.compile import COMPILE_FROM_STEPS, COMPILE_FROM_STEPS_LINEAR_ATTENTION, should_compile
    # what plan() hands the rule for the family's model
    has_linear = linear_attention.has_linear_attention(AutoModelForImageTextToText.from_pretrained(
        tiny_family_dirs[family]))
    assert has_linear is (family == "qwen3_5")
    steps = COMPILE_FROM_STEPS_LINEAR_ATTENTION if family == "qwen3_5" else COMPILE_FROM_STEPS
    assert COMPILE_FROM_STEPS_LINEAR_ATTENTION > COMPILE_FROM_STEPS
    for path, measured in ((linear_attention.FLA_PADDED, True), (linear_attention.PADDED, family != "qwen3_5")):
        monkeypatch.setattr(trainer, "choose_path", lambda path=path: (path, "as the test says"))
        settings = _settings(gradient_checkpointing=False)  # as train.py resolves "auto" on a large card
        assert trainer.auto_compile_rule(settings, has_linear, vision_trains=False) == (measured, steps)
        assert trainer.auto_compile_rule(_settings(gradient_checkpointing=True), has_linear,
                                         vision_trains=False)[0] is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the rule as on a GPU
    assert should_compile("auto", steps, True, steps) and not should_compile("auto", steps - 1, True, steps)


def test_speed_choices_come_from_the_environment(monkeypatch):
    from latexocr.fast import SpeedChoices, speed_choices
    monkeypatch.delenv("LATEXOCR_SPEED", raising=False)
    assert speed_choices() == SpeedChoices()
    monkeypatch.setenv("LATEXOCR_SPEED", "packing=off, compile=on")
    assert speed_choices() == SpeedChoices(packing="off", compile="on")
    for wrong, message in (("pack=off", "'pack=off': the choices are fast"), ("packing=no", "on or off"),
                           ("compile=yes", "auto, on or off"), ("prefill_rule=fast", "tokens or chunked"),
                           ("compile_backend=eager", "inductor or cudagraphs"),
                           ("padded_graph_multiple=0", "a positive whole number"),
                           ("padded_graph_multiple=x", "a positive whole number")):
        with pytest.raises(SystemExit, match=message):
            speed_choices(wrong)
    assert speed_choices("prefill_rule=tokens").prefill_rule == "tokens"
    assert speed_choices("compile_backend=cudagraphs").compile_backend == "cudagraphs"
    assert speed_choices("pinned_batches=on").pinned_batches == "on"
    assert speed_choices("padded_graph_multiple=64").padded_graph_multiple == 64


def test_pinned_batches_auto_leaves_out_linear_attention_models(tiny_family_dirs, monkeypatch):
    """LATEXOCR_SPEED pinned_batches=auto: the loader's chunks page-locked for every family but Qwen3.5 (its
    linear-attention layers; slower pinned in docs/BENCHMARKS.md run X), decided from the config before the
    weights load (infer.py starts the loader then); on / off decide for all; never without a GPU."""
    from pathlib import Path

    from transformers import AutoConfig

    from latexocr import generation
    configs = {family: AutoConfig.from_pretrained(folder) for family, folder in tiny_family_dirs.items()}
    real = Path(__file__).resolve().parents[2] / "shared" / "qwen3_5-2b"
    if real.is_dir():  # the published Qwen3.5-2B config, not only the tiny one built from it
        configs["qwen3_5 (shared)"] = AutoConfig.from_pretrained(real)
    monkeypatch.delenv("LATEXOCR_SPEED", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert {f: generation.pinned_chunks(c) for f, c in configs.items()} == {f: not f.startswith("qwen3_5")
                                                                           for f in configs}
    for choice in ("on", "off"):
        monkeypatch.setenv("LATEXOCR_SPEED", f"pinned_batches={choice}")
        assert {generation.pinned_chunks(c) for c in configs.values()} == {choice == "on"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not generation.pinned_chunks(configs["qwen2_vl"])


def test_compile_cache_folder_is_ours_unless_the_user_chose_one(tmp_path, monkeypatch):
    """torch's compile caches go to a folder kept across runs (not torch's default under /tmp), unless
    $TORCHINDUCTOR_CACHE_DIR names another."""
    import os
    from latexocr.fast.compile import CompileCache
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache = CompileCache(folder=tmp_path)
    assert cache.folder == tmp_path / "inductor"
    cache.use()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    # torch writes its own default into the variable while the model loads: that is not the user's choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert CompileCache(folder=tmp_path).folder == tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert CompileCache(folder=tmp_path).folder == tmp_path / "mine"


# ---------------------------------------------------------------- GPU smoke test
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled blocks + CUDA graphs)")
def test_gpu_fast_path_loss_equals_plain_path(tmp_path, tiny_model_dir):
    """On a GPU the whole fast path (packed flash attention, sync-free step, compiled blocks, CUDA graphs
    of the LLM blocks and the vision tower) trains with the plain transformers path's losses (bf16)."""
    import subprocess
    import sys

    from helpers import LABELS, ROOT as root, TINY, losses as _losses, make_dataset, script_env

    data = make_dataset(tmp_path, LABELS)
    common = ["--model-id", tiny_model_dir, "--train-json", data, "--val-json", data, "--max-steps", 6,
              "--batch-size", 8, "--micro-batch-size", 8, "--logging-steps", 1, "--save-steps", 1000,
              "--eval-samples", 2, "--dtype", "bf16", *TINY]

    def train(out, speed):
        proc = subprocess.run([sys.executable, str(root / "train.py"), *map(str, common), "--output-dir", str(out)],
                              env=script_env(LATEXOCR_COMPILE_CACHE=str(tmp_path / "cache"), LATEXOCR_SPEED=speed),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    plain = train(tmp_path / "plain", "fast=off")
    fast = train(tmp_path / "fast", "compile=on")
    assert "LLM blocks and vision tower as CUDA graphs" in fast
    assert len(_losses(plain)) == 6 and _losses(fast) == pytest.approx(_losses(plain), rel=2e-2)
    graphs_only = train(tmp_path / "graphs_only", "compile=on,compile_backend=cudagraphs")
    assert "their own kernels" in graphs_only
    assert _losses(graphs_only) == pytest.approx(_losses(plain), rel=2e-2)


def test_every_bench_train_configuration_names_real_speed_choices():
    """bench/bench_train.py's configurations set LATEXOCR_SPEED choices by name: each must parse (a typo
    would otherwise surface as one line on a GPU machine, after the model's build)."""
    import sys
    from pathlib import Path

    from latexocr.fast import speed_choices
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_train import CONFIGS
    for name, (_, speed, _) in CONFIGS.items():
        if speed:
            speed_choices(speed)  # raises SystemExit with one line on an unknown name or value
    assert CONFIGS["qwen3_5_fla_varlen"][1] == "fla_varlen=on"
