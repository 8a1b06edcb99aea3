"""The training loss's vocabulary projection in slices of tokens, its gradient taken as it goes (issue 28).

The loss needs each supervised token's logits over the whole vocabulary, in fp32
(training.summed_cross_entropy): the head's bf16 output, its fp32 copy, the log-softmax the backward keeps,
and in the backward two more of that size. At Qwen3.5's 248,320 entries that is ~1 MB a token for each fp32
copy, so a micro-batch of 16 with ~1,130 supervised tokens spends ~3.2 GiB on it, and a batch of long samples
(~2,600 supervised tokens: the memory probe's) twice that: the gap between the probe's estimate and training's
peak in runs X-Y (12.8 against 9.56 GiB).

`head_loss` computes the same sum `SLICE_BYTES` of fp32 logits at a time, and each slice's gradient with
respect to the hidden states at once (softmax minus the one-hot target, times the head's weight: what the
backward of the head and the cross-entropy would compute), so that no slice outlives its loop iteration: the
peak is one slice. The backward then only scales the kept gradient (a [tokens, hidden] tensor). No product is
computed twice. Liger-Kernel's fused linear cross-entropy does the same, in Triton. Under bf16 autocast the
kept gradient is rounded to bf16 before the backward's scale (1 / the step's token count) instead of after:
other roundings, as close to the exact gradient as the one-piece head's; the same values in fp32
(tests/test_head.py). Used where the head is a plain frozen `nn.Linear` (LoRA and QLoRA training: the head
is neither adapted nor quantized, modeling.py); otherwise (TUNE=full trains the tied embedding) the model's own head and the plain loss.

`head_logprobs` is the same for GRPO's per-token log-probabilities (latexocr/grpo.py), whose gradient
depends on what the loss makes of each one: its backward computes each slice's logits again (one more
product of the head over the completion tokens) instead of keeping them.

`hidden_states_out` makes the model's forward return the hidden states its head would project: for the
call, the head is an `nn.Identity` (each family's ForConditionalGeneration.forward applies `self.lm_head`
last, to the kept positions: upstream.SOURCES).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

SLICE_BYTES = 256 * 2**20  # fp32 log-probabilities a slice: ~270 tokens of Qwen3.5's vocabulary, ~440 of Qwen2-VL's


def _head_owner(model):
    """The module whose `lm_head` is a plain, frozen nn.Linear (peft and DDP wrap it), or None (a head that
    trains, a quantized or LoRA-adapted one, one DeepSpeed ZeRO-3 or FSDP shards)."""
    for module in model.modules():
        head = module._modules.get("lm_head")  # its own child: peft's wrappers forward attribute reads to it
        if head is not None:
            return module if type(head) is torch.nn.Linear and _whole_and_frozen(head) else None
    return None


def _whole_and_frozen(head: torch.nn.Linear) -> bool:
    """Whether the head's weight trains nowhere and is all here, as plain tensors: not a weight DeepSpeed ZeRO-3
    partitions (`ds_id`) or FSDP shards (an empty or flattened stand-in, a DTensor), which their wrappers
    gather only inside the head's own forward, the one call the sliced loss replaces."""
    for p in head.parameters():
        if p.requires_grad or hasattr(p, "ds_id") or type(p.data) is not torch.Tensor:
            return False
    return tuple(head.weight.shape) == (head.out_features, head.in_features) and head.weight.numel() > 0


def head_can_be_sliced(model) -> bool:
    """Whether hidden_states_out below takes the model's head (train.py's summary line names the path)."""
    return _head_owner(model) is not None


@contextlib.contextmanager
def hidden_states_out(model, active: bool = True):
    """While open, `model(...).logits` are the hidden states the head would project (at `logits_to_keep`),
    and this yields the head (an nn.Linear); yields None (and changes nothing) where the head is not a
    plain frozen nn.Linear, or not `active`."""
    owner = _head_owner(model) if active else None
    if owner is None:
        yield None
        return
    head = owner.lm_head
    owner.lm_head = torch.nn.Identity()
    try:
        yield head
    finally:
        owner.lm_head = head


def _rows(head: torch.nn.Linear, slice_bytes: int | None) -> int:
    """Tokens a slice: `slice_bytes` (default SLICE_BYTES) of fp32 log-probabilities over the head's vocabulary."""
    return max(1, (slice_bytes or SLICE_BYTES) // (4 * head.out_features))


def _in_compute_dtype(hidden, weight, bias):
    """The head's weight and bias in the dtype its forward computes in: autocast's where it is on (as
    autocast casts them each call), else the hidden states'."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return weight.to(dtype), None if bias is None else bias.to(dtype)


class _SlicedHeadLoss(torch.autograd.Function):
    """sum over rows of cross_entropy(float(hidden @ weight.T + bias), targets), a slice of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        weight, bias = _in_compute_dtype(hidden, weight, bias)  # cast once, not once a slice
        for start in range(0, hidden.shape[0], rows):
            part, wanted = hidden[start:start + rows], targets[start:start + rows]
            logits = F.linear(part, weight, bias)  # the logits the model's head gives (bf16 under autocast)
            log_probs = _slice_logprobs(logits, 1.0)
            del logits  # from here one slice holds its fp32 log-probabilities, then their gradient in place
            total += F.nll_loss(log_probs, wanted, reduction="sum")
            # d(sum)/d(logits) = softmax - one-hot, cast to the logits' dtype as autograd's cast back gives it
            g = log_probs.exp_()
            g[torch.arange(wanted.shape[0], device=g.device), wanted] -= 1
            grad[start:start + rows] = g.to(weight.dtype) @ weight
            del log_probs, g
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors  # scaled in fp32, as autograd scales the fp32 logits' gradient
        return (grad.float() * grad_total).to(grad.dtype), None, None, None, None


def head_loss(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
              slice_bytes: int | None = None) -> tuple[torch.Tensor, int]:
    """training.summed_cross_entropy(head(hidden), targets) without the logits of more than one slice
    alive: (the summed loss, the target count). hidden: [tokens, hidden size] (or any shape whose last
    dimension is the hidden size). slice_bytes: of fp32 logits a slice, default SLICE_BYTES."""
    hidden, rows = hidden.reshape(-1, hidden.shape[-1]), _rows(head, slice_bytes)
    if targets.numel() == 0:
        return hidden.sum() * 0.0, 0  # a batch without supervised tokens: zero, still tied to the graph
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _SlicedHeadLoss.apply(hidden, head.weight, head.bias, targets, rows), targets.numel()
    total = sum(F.nll_loss(_slice_logprobs(head(hidden[i:i + rows]), 1.0), targets[i:i + rows], reduction="sum")
                for i in range(0, hidden.shape[0], rows))  # no gradient wanted: the slices alone
    return total, targets.numel()


def _slice_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(float(logits) / temperature), with one fp32 copy where the temperature is 1."""
    if temperature == 1.0:
        return torch.log_softmax(logits, -1, dtype=torch.float32)
    return torch.log_softmax(logits.float().div_(temperature), -1)


class _SlicedLogprobs(torch.autograd.Function):
    """log_softmax(float(hidden @ weight.T + bias) / temperature)[row, target], a slice of rows at a time;
    the backward computes each slice's logits again, under the autocast the forward ran in."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int, temperature: float):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        compute_weight, compute_bias = _in_compute_dtype(hidden, weight, bias)
        for start in range(0, hidden.shape[0], rows):
            log_probs = _slice_logprobs(F.linear(hidden[start:start + rows], compute_weight, compute_bias), temperature)
            out[start:start + rows] = log_probs.gather(1, targets[start:start + rows, None]).squeeze(1)
            del log_probs
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.rows, ctx.temperature = rows, temperature
        ctx.save_for_backward(hidden, weight, bias, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        grad = torch.empty_like(hidden)
        scale = grad_out.float() / ctx.temperature
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            weight, bias = _in_compute_dtype(hidden, weight, bias)
            for start in range(0, hidden.shape[0], ctx.rows):
                logits = F.linear(hidden[start:start + ctx.rows], weight, bias)
                g = _slice_logprobs(logits, ctx.temperature).exp_()  # the slice's softmax
                del logits
                # d log p[target] / d logits = (one-hot - softmax) / temperature, times each row's grad_out
                part = scale[start:start + ctx.rows]
                g.mul_(-part[:, None])
                g[torch.arange(part.shape[0], device=g.device), targets[start:start + ctx.rows]] += part
                grad[start:start + ctx.rows] = g.to(weight.dtype) @ weight
                del g
        return grad, None, None, None, None, None


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
                  slice_bytes: int | None = None) -> torch.Tensor:
    """log_softmax(float(head(hidden)) / temperature) at each row's target, fp32, without the logits of more
    than one slice alive (in the backward too). hidden: [tokens, hidden size]."""
    hidden, rows = hidden.reshape(-1, hidden.shape[-1]), _rows(head, slice_bytes)
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _SlicedLogprobs.apply(hidden, head.weight, head.bias, targets, rows, float(temperature))
    return torch.cat([_slice_logprobs(head(hidden[i:i + rows]), temperature).gather(1, targets[i:i + rows, None])
                      .squeeze(1) for i in range(0, hidden.shape[0], rows)] or [hidden.new_zeros(0, dtype=torch.float32)])
