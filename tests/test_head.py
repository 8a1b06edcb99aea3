"""fast/head.py: the training loss's vocabulary projection a slice of tokens at a time. The same loss and
gradients as the model's own head followed by training.summed_cross_entropy, and no token's logits kept for
the backward (the memory it saves on a small card). Tiny models, CPU, fp32."""
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from latexocr.batching import SampleEncoder, TrainCollator
from latexocr.fast import head as head_module
from latexocr.fast.head import head_logprobs, head_loss, hidden_states_out
from latexocr.fast.trainer import fast_supervised_loss, probe_step_loss
from latexocr.fast.vision import PackedExtras
from latexocr.modeling import add_lora
from latexocr.sample import sizing_for
from latexocr.training import summed_cross_entropy


@pytest.mark.parametrize("bias", [False, True])
def test_head_loss_equals_the_plain_loss_in_value_and_gradient(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    targets = torch.randint(0, 50, (37,))
    hidden = torch.randn(37, 16, requires_grad=True)
    want, n = summed_cross_entropy(head(hidden), targets)
    (want * 0.25).backward()  # the Trainer divides by the step's token count: the backward gets a scale
    want_grad, hidden.grad = hidden.grad.clone(), None
    got, m = head_loss(hidden, head, targets, slice_bytes=4 * 50 * 8)  # 8 rows a slice: 5 slices, the last of 5
    (got * 0.25).backward()
    assert n == m == 37
    assert torch.allclose(got, want, rtol=1e-6)
    assert torch.allclose(hidden.grad, want_grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the same sum, no gradient taken
        assert torch.allclose(head_loss(hidden, head, targets, slice_bytes=4 * 50 * 8)[0], want, rtol=1e-6)
    empty, count = head_loss(hidden[:0], head, targets[:0])  # a batch without supervised tokens
    assert count == 0 and float(empty.detach()) == 0.0 and empty.requires_grad


def _lora_model(folder):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa")
    return add_lora(model, 8, 16, 0.0)


@pytest.mark.parametrize("family, packed", [("qwen2_vl", True), ("qwen2_vl", False), ("qwen3_5", False)])
def test_training_step_with_sliced_head_matches_the_model_head(tiny_family_dirs, formula_images, monkeypatch,
                                                              family, packed):
    """The fast path's step (Qwen2-VL's packed sync-free step, and the model's own forward on padded batches)
    gives the same loss and LoRA gradients with the head sliced as with the model's head, keeps no
    [supervised tokens x vocabulary] tensor for the backward (the plain one keeps one), and puts the head back."""
    processor = AutoProcessor.from_pretrained(tiny_family_dirs[family])
    encoder = SampleEncoder(processor, sizing_for(processor))
    extras = PackedExtras() if packed else None
    batch = TrainCollator(encoder, packed=packed, packed_extras=extras)(formula_images[:4])
    vocab = AutoModelForImageTextToText.from_pretrained(tiny_family_dirs[family]).config.text_config.vocab_size
    monkeypatch.setattr(head_module, "SLICE_BYTES", 4 * vocab * 7)  # 7 tokens a slice: several slices here

    def step(sliced: bool):
        model = _lora_model(tiny_family_dirs[family])
        head = model.get_output_embeddings()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss, n = fast_supervised_loss(model, dict(batch), sliced_head=sliced)
        (loss / n).backward()
        assert model.get_output_embeddings() is head  # put back
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return loss.detach(), n, grads, [s for s in saved if s and s[-1] == vocab and len(s) > 1 and s[0] > 1]

    loss, n, grads, kept = step(sliced=True)
    loss_own, n_own, grads_own, kept_own = step(sliced=False)
    assert n == n_own and n > 7
    assert torch.allclose(loss, loss_own, rtol=1e-5)
    assert torch.allclose(grads, grads_own, rtol=1e-4, atol=1e-7)
    assert kept_own and not kept, (kept_own, kept)


def test_head_is_left_alone_where_it_trains_and_put_back_after_an_error(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    head = model.get_output_embeddings()
    with pytest.raises(KeyError):
        with hidden_states_out(model) as sliced:
            assert sliced is head and isinstance(model.get_output_embeddings(), torch.nn.Identity)
            raise KeyError("labels")
    assert model.get_output_embeddings() is head
    head.weight.ds_id = 7  # DeepSpeed ZeRO-3 partitions it: gathered only in the head's own forward
    with hidden_states_out(model) as sliced:
        assert sliced is None and model.get_output_embeddings() is head
    del head.weight.ds_id
    whole = head.weight.data
    head.weight.data = whole.new_empty(0)  # FSDP's stand-in outside the head's forward: no rows to slice
    with hidden_states_out(model) as sliced:
        assert sliced is None and model.get_output_embeddings() is head
    head.weight.data = whole
    head.weight.requires_grad_(True)  # TUNE=full trains the (tied) head: the model's own head and loss
    with hidden_states_out(model) as sliced:
        assert sliced is None and model.get_output_embeddings() is head


def test_memory_probe_runs_the_trainers_step(tiny_model_dir, formula_images):
    """train.py's MICRO_BATCH_SIZE=auto probe measures the step the trainer will run: the fast path's
    (sliced head) unless $LATEXOCR_SPEED fast=off; the same loss either way."""
    from latexocr.fast.choices import SpeedChoices
    from latexocr.training import supervised_loss
    model = _lora_model(tiny_model_dir)
    assert probe_step_loss(model, SpeedChoices(fast=False), autocast=False) is supervised_loss
    step = probe_step_loss(model, SpeedChoices(), autocast=False)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    batch = TrainCollator(SampleEncoder(processor, sizing_for(processor)), packed=True)(formula_images[:3])
    with torch.no_grad():
        loss, n = step(model, dict(batch))
        want, m = supervised_loss(model, dict(batch))
    assert n == m and torch.allclose(loss, want, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_logprobs_equal_the_plain_ones_in_value_and_gradient(temperature):
    """GRPO's per-token log-probabilities: the same values and, for any weighting of them (the clipped
    objective's), the same gradient; the backward computes each slice's logits again."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50).requires_grad_(False)
    targets = torch.randint(0, 50, (37,))
    weights = torch.randn(37)
    hidden = torch.randn(37, 16, requires_grad=True)
    want = torch.log_softmax(head(hidden).float() / temperature, -1).gather(1, targets[:, None]).squeeze(1)
    (want * weights).sum().backward()
    want_grad, hidden.grad = hidden.grad.clone(), None
    got = head_logprobs(hidden, head, targets, temperature, slice_bytes=4 * 50 * 8)
    (got * weights).sum().backward()
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(hidden.grad, want_grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(head_logprobs(hidden, head, targets, temperature, slice_bytes=4 * 50 * 8), want,
                              rtol=1e-6, atol=1e-6)


def test_grpo_logprobs_with_sliced_head_match_the_model_head(tiny_family_dirs, formula_images, monkeypatch):
    from latexocr.grpo import completion_logprobs
    processor = AutoProcessor.from_pretrained(tiny_family_dirs["qwen3_5"])
    batch = TrainCollator(SampleEncoder(processor, sizing_for(processor)), packed=False)(formula_images[:3])
    vocab = AutoModelForImageTextToText.from_pretrained(tiny_family_dirs["qwen3_5"]).config.text_config.vocab_size
    monkeypatch.setattr(head_module, "SLICE_BYTES", 4 * vocab * 5)

    def logprobs(sliced: bool):
        model = _lora_model(tiny_family_dirs["qwen3_5"])
        out = completion_logprobs(model, batch, 0.8, sliced_head=sliced)
        (out * torch.linspace(-1, 1, out.shape[0])).sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    (values, grads), (values_own, grads_own) = logprobs(True), logprobs(False)
    assert values.shape[0] > 5 and torch.allclose(values, values_own, rtol=1e-5, atol=1e-6)
    # fp32 sums in another order: ~1e-6 of the largest gradient (3.5 here)
    assert torch.allclose(grads, grads_own, rtol=1e-4, atol=1e-6 * float(grads_own.abs().max()))


def test_under_bf16_autocast_the_sliced_head_is_as_accurate_as_the_one_piece_head():
    """As training runs (bf16 weights, bf16 autocast): the same loss, and a gradient as close to the exact
    (fp32) one as the one-piece head's. The sliced head rounds the hidden states' gradient to bf16 before the
    backward's scale (1 / the step's token count) instead of after: other roundings, not larger ones."""
    torch.manual_seed(0)
    vocab, width, tokens = 5000, 64, 300
    head = torch.nn.Linear(width, vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    leaf = torch.randn(tokens, width, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    exact = leaf.detach().float().requires_grad_(True)
    loss, count = summed_cross_entropy(torch.nn.functional.linear(exact, head.weight.float()), targets)
    (loss / count).backward()
    results = []
    for sliced in (False, True):
        leaf.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = leaf * 1.0
            loss, count = (head_loss(hidden, head, targets, slice_bytes=4 * vocab * 64) if sliced
                           else summed_cross_entropy(head(hidden), targets))
        (loss / count).backward()
        results.append((loss.detach(), (leaf.grad.float() - exact.grad).abs()))
    (loss_own, error_own), (loss, error) = results
    assert torch.equal(loss, loss_own)
    assert float(error.mean()) <= 1.1 * float(error_own.mean())  # measured: 0.90x
    assert float(error.max()) <= 2 * float(error_own.max())  # measured: 1.35x
