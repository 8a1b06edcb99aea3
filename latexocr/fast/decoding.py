"""Greedy decoding with a static cache and a CUDA-graph decode step (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5).

transformers' `generate` does host work every token (logits processors, stopping criteria with a
GPU->CPU sync, growing caches and masks, one launch per kernel), so at batch 512 one step costs about
what it costs at batch 128 (docs/BENCHMARKS.md). This loop around the
model's own forward does the same greedy search with:

* prefill per chunk of similar-sized images (the batch comes sorted by image area), each chunk
  padded only to its own longest prompt and run by the model's own forward (vision tower, M-RoPE);
  its KV cache is copied, right-aligned, into one static cache so every row's prompt ends at slot P;
  a linear-attention layer's cache (Qwen3.5's Gated DeltaNet: the last 4 convolution inputs and the
  recurrent state) has no length, so it is copied as is into a fixed buffer per layer. Left padding
  cannot enter that state: the model's own forward zeroes padded positions before the layer
  (`apply_mask_to_padding_states`), as in generate's prefill;
* a decode step that reads and writes only fixed buffers: the next token, its M-RoPE position
  (text tokens advance all three axes alike: last prompt position + 1 + t, as generate does; taken
  from the prompt's positions, not from `rope_deltas`, which count from a row's unpadded length), the
  cache slot, the key mask, the linear-attention states (updated in place by transformers' own
  one-token path; its recurrent rule, where flash-linear-attention is absent, by one_token_delta_rule,
  and its convolution update, where causal-conv1d is absent, by one_token_conv_update, both in
  fast/standins.py: on a GPU each a Triton kernel of fast/kernels.py), the stop flags and the token history.
  On CUDA it is captured once per (rows, cache length) as a CUDA graph and replayed: one launch per token,
  no host work;
* a stop check every STOP_CHECK_EVERY tokens (the only GPU->CPU sync), where the batch is also
  compacted to the next smaller bucket once at most half of its rows are still running.

While the prefill and the step run, fast/standins.py's stand-ins replace parts of the model's forward (the
kernels, the vision tower's inputs from the loader, Qwen3.5's state updates); this file is the loop around it.

Greedy results equal one-at-a-time generate's in fp32 (tests/test_decoding.py: four families, rows
stopping at different lengths; tests/test_infer.py with a trained adapter). Models with other
layers (sliding-window attention) and non-greedy settings use `generate` (`static_decode_supported`).

Sampling (`temperature` > 0, optional `top_p`) exists for GRPO's rollouts (latexocr/grpo.py); greedy
stays the default of every caller. It draws without a host sync, so the step still replays as a graph:
the Gumbel-max form of categorical sampling (argmax of probabilities / Exp(1) noise) on the
temperature-scaled, nucleus-truncated distribution.
"""
from __future__ import annotations

import math

import torch

from ..modeling import unwrap, vision_language_core
from . import kernels
from .choices import speed_choices
from .compile import record_graph, warm_up_off_capture
from .standins import (_ATTEND_UPTO, _one_token_functions, _prefill_functions, decoder_swaps, given_vision,
                       uses_kernel_conv_update, uses_one_token_delta_rule, uses_prefill_conv, uses_prefill_kernel)

SUPPORTED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"  # config.layer_types the loop handles
STOP_CHECK_EVERY = 8      # tokens between stop checks (one GPU->CPU sync each)
CACHE_LENGTH_MULTIPLE = 64  # cache lengths are rounded up so few graph shapes occur
MIN_BUCKET = 8            # compaction never goes below this many rows
# generate() options the loop implements; any other one sends predict() to generate.
SUPPORTED_OPTIONS = {"min_new_tokens"}


def static_decode_supported(model, options: dict | None = None) -> bool:
    """True where this loop computes exactly what greedy `generate` computes: a Qwen2/2.5/3-VL or
    Qwen3.5 model whose text layers are full attention (one KV pair per layer) or Qwen3.5's linear
    attention (a conv and a recurrent state), sdpa attention, and no generate() option the loop does
    not implement (repetition penalty etc. in the generation config)."""
    core = vision_language_core(model)
    if core is None or getattr(core.config, "model_type", "") not in SUPPORTED_FAMILIES:
        return False
    text = core.config.text_config
    if any(t not in (ATTENTION, LINEAR_ATTENTION) for t in _layer_types(text)):
        return False
    if getattr(text, "use_sliding_window", False) or text._attn_implementation != "sdpa":
        return False
    if set(options or {}) - SUPPORTED_OPTIONS:
        return False
    gen = getattr(unwrap(model), "generation_config", None)
    return gen is None or ((gen.repetition_penalty in (None, 1.0)) and not gen.no_repeat_ngram_size
                           and not gen.bad_words_ids and not gen.suppress_tokens and not gen.begin_suppress_tokens
                           and not gen.sequence_bias)


def _layer_types(text_config) -> list[str]:
    return getattr(text_config, "layer_types", None) or [ATTENTION] * text_config.num_hidden_layers


def _layer_states(cache, types: list[str]):
    """Per layer of a transformers cache returned by a prefill forward: (keys, values) of a
    full-attention layer, (conv state, recurrent state) of a linear-attention layer."""
    return [(layer.keys, layer.values) if kind == ATTENTION else (layer.conv_states[0], layer.recurrent_states[0])
            for kind, layer in zip(types, cache.layers)]


def _row_shapes(text_config):
    """(layer types, key/value shape per row and slot: heads x dim, linear-attention conv state per row:
    channels x kernel, recurrent state per row: heads x dk x dv); the latter two None without such layers."""
    types = _layer_types(text_config)[: text_config.num_hidden_layers]
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    conv = recurrent = None
    if LINEAR_ATTENTION in types:  # Qwen3.5's Gated DeltaNet: its conv input width and state
        t = text_config
        keys, values = t.linear_num_key_heads * t.linear_key_head_dim, t.linear_num_value_heads * t.linear_value_head_dim
        conv = (2 * keys + values, t.linear_conv_kernel_dim)
        recurrent = (t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim)
    return types, (text_config.num_key_value_heads, head_dim), conv, recurrent


def bytes_per_row(model, length: int) -> int:
    """GPU bytes one more row of a decode batch holds at its peak: its static-cache buffers of `length`
    slots (keys and values; a linear-attention layer's conv state and fp32 recurrent state), as
    StaticDecoder allocates them; half of that again while `_compact` copies the running rows (at most
    half of them) out; a linear-attention layer's one-token update (transformers' reference delta rule
    makes ~4 temporaries of one layer's fp32 state, fla's kernel a new state; one_token_delta_rule none:
    it updates the state in place); and its logits of one step (the model's dtype, and the fp32 copy the
    choice reads with min_new_tokens or sampling: counted always)."""
    core = vision_language_core(model)
    text = core.config.text_config
    types, (heads, dim), conv, recurrent = _row_shapes(text)
    size = core.get_input_embeddings().weight.element_size()
    cache = sum(2 * heads * length * dim * size if kind == ATTENTION else math.prod(conv) * size + math.prod(recurrent) * 4
                for kind in types)
    update = 4 * math.prod(recurrent) * 4 if recurrent and not uses_one_token_delta_rule(core) else 0
    return cache + cache // 2 + update + text.vocab_size * (size + 4)


def cache_slots(prompt: int, max_new_tokens: int) -> int:
    """The static cache's length for a batch whose longest prompt is `prompt` tokens: the prompt, then every
    generated token but the last (it is never fed back), rounded up to CACHE_LENGTH_MULTIPLE."""
    return -(-(prompt + max(max_new_tokens - 1, 1)) // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """One token per row drawn from softmax(logits / temperature), restricted to the smallest set of
    tokens whose probability reaches top_p (the most likely token always stays): what generate's
    do_sample with these two settings draws, without a host sync."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before a token already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    noise = torch.empty_like(probs).exponential_()
    return (probs / noise).argmax(-1)


class _SlotCache:
    """The cache object handed to the model in a decode step: writes the new key/value at slot
    `write_at` (a 1-element device tensor, so a CUDA graph replays it at a moving slot) and returns
    the whole fixed-length buffers; the key mask hides the slots not yet written and the padding.
    Linear-attention layers get their fixed conv buffer, updated in place by the layer, and their
    recurrent buffer, copied into: the Cache methods their one-token step calls in transformers 5.24
    and 5.25 (5.25 adds increase_count and get_recurrent_states_to_keep), answered by name and
    signature as the library's own Cache answers them, so both versions run the same code here."""

    def __init__(self, keys, values, conv, recurrent, write_at):
        self.keys, self.values, self.write_at = keys, values, write_at
        self.conv, self.recurrent = conv, recurrent

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.write_at, key_states)
        self.values[layer_idx].index_copy_(2, self.write_at, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self.conv[layer_idx]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self.recurrent[layer_idx]

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0, **kwargs):
        buffer = self.recurrent[layer_idx]
        if recurrent_states is not buffer:  # one_token_delta_rule updated the buffer itself
            buffer.copy_(recurrent_states)
        return buffer

    def is_recording_past(self, layer_idx: int) -> bool:  # no rollback: the conv buffer stays 4 wide
        return False

    def increase_count(self, layer_idx: int, state_idx: int) -> None:
        # transformers 5.25 counts tokens per linear-attention layer (its get_seq_length); the decode
        # step keeps its own positions and slot (`write_at`), so there is nothing to count here
        pass

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        # transformers 5.25: intermediate states kept for a rollback (speculative decoding); none here
        return 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # transformers 5.24's and 5.25's Qwen-VL forwards read the cache length only when no position_ids
        # or 4-D mask are given; the decode step always passes both. Fail clearly if that changes.
        raise NotImplementedError("the static decode step passes position_ids and a 4-D mask itself")


class _State:
    """The fixed buffers of one (rows, cache length) shape, and its CUDA graph once captured."""

    def __init__(self, rows: int, length: int, max_new: int, storage, shapes, types, device, dtype):
        self.rows, self.length = rows, length
        views = [tuple(flat[:math.prod(shape)].view(shape) for flat, shape in zip(pair, layer_shapes))
                 for pair, layer_shapes in zip(storage, shapes)]
        # full-attention layers: keys and values (rows x heads x length x dim); linear-attention
        # layers: conv state (rows x channels x kernel) and recurrent state (rows x heads x dk x dv)
        self.keys = {i: v[0] for i, (v, kind) in enumerate(zip(views, types)) if kind == ATTENTION}
        self.values = {i: v[1] for i, (v, kind) in enumerate(zip(views, types)) if kind == ATTENTION}
        self.conv = {i: v[0] for i, (v, kind) in enumerate(zip(views, types)) if kind == LINEAR_ATTENTION}
        self.recurrent = {i: v[1] for i, (v, kind) in enumerate(zip(views, types)) if kind == LINEAR_ATTENTION}
        # the key mask as the attention adds it: 0 where a slot may be attended, -inf elsewhere, in the model's
        # dtype (torch's SDPA turns a boolean mask into this in every layer's call, in the versions that convert
        # it before choosing a kernel: a where and a logical_not each; the same values, so the same results)
        self.bias = torch.full((rows, length), float("-inf"), dtype=dtype, device=device)
        self.token = torch.zeros(rows, dtype=torch.long, device=device)            # last token, fed next
        self.position = torch.zeros(rows, dtype=torch.long, device=device)         # its M-RoPE position
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.history = torch.zeros(rows, max_new, dtype=torch.long, device=device)
        self.origin = torch.zeros(rows, dtype=torch.long, device=device)           # row of the batch
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)            # cache slot of `token`
        self.step = torch.zeros(1, dtype=torch.long, device=device)                # index of the token made
        self.cache = _SlotCache(self.keys, self.values, self.conv, self.recurrent, self.write_at)
        self.graph = None

    def layer_buffers(self):
        """Every per-layer buffer, each with the batch's rows first."""
        return [*self.keys.values(), *self.values.values(), *self.conv.values(), *self.recurrent.values()]


class StaticDecoder:
    """Greedy decoding of left-padded prompt chunks; see the module docstring.

    use_graphs: None = on CUDA; the step runs eagerly otherwise (CPU, or a capture that failed).
    compaction: None = $LATEXOCR_SPEED's choice (latexocr/fast/choices.py, on by default).
    compiled: the step through torch.compile (None = $LATEXOCR_SPEED's decode_compile, off by default): one
    compile with dynamic shapes serves every (rows, cache length), whose CUDA graphs then record the
    compiled kernels; it runs even inside predict's force_eager stance (which keeps training's compiled
    blocks from recompiling for generation).
    """

    def __init__(self, model, stop_ids: list[int], pad_id: int, max_new_tokens: int,
                 min_new_tokens: int = 0, use_graphs: bool | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, compaction: bool | None = None, compiled: bool | None = None):
        self.model = unwrap(model)
        self.core = vision_language_core(model)
        text = self.core.config.text_config
        self.types, self.kv_shape, self.conv_shape, self.recurrent_shape = _row_shapes(text)
        embed = self.core.get_input_embeddings().weight
        self.device, self.dtype = embed.device, embed.dtype
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=self.device)
        self.pad_id, self.max_new, self.min_new = pad_id, max_new_tokens, min_new_tokens
        self.temperature, self.top_p = temperature, top_p  # temperature 0: greedy
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        speed = speed_choices()
        self.compaction = speed.compaction if compaction is None else compaction
        self.compiled = speed.decode_compile if compiled is None else compiled
        self._compiled_step = None
        self.delta_rule = uses_one_token_delta_rule(self.core)  # Qwen3.5 without fla: one_token_delta_rule
        self.kernels = speed.decode_kernels and kernels.usable(embed)  # the step's Triton kernels (a GPU)
        self.prefill_kernel = uses_prefill_kernel(self.core)
        self.prefill_conv = uses_prefill_conv(self.core)
        self.swaps = decoder_swaps(self.core)  # every family: the kernels on a GPU; the given vision inputs
        self.conv_update = self.kernels and uses_kernel_conv_update(self.core)  # without causal-conv1d
        if not speed.fla and LINEAR_ATTENTION in self.types:
            from .linear_attention import use_reference_delta_rule
            use_reference_delta_rule(recurrent=True)  # fla switched off (bench/): the prefill's and the step's rules
        self.states: dict[tuple, _State] = {}
        self.storage, self.storage_rows, self.storage_slots = [], 0, 0
        self.pool = None

    # ---- buffers ----------------------------------------------------------------------------
    def _shapes(self, rows: int, length: int) -> list[tuple]:
        """The two buffers' shapes of each layer (see _State)."""
        heads, dim = self.kv_shape
        return [((rows, heads, length, dim),) * 2 if kind == ATTENTION
                else ((rows, *self.conv_shape), (rows, *self.recurrent_shape)) for kind in self.types]

    def _dtypes(self, kind: str) -> tuple:
        # the recurrent state stays fp32, as transformers' delta-rule kernels keep it
        return (self.dtype, self.dtype) if kind == ATTENTION else (self.dtype, torch.float32)

    def _state(self, rows: int, length: int) -> _State:
        """Buffers for this shape. Every shape views one storage per buffer (only one shape is in use
        at a time), sized for the largest shape seen (KV: rows x length; linear-attention states:
        rows); growing it drops the graphs that pointed at it."""
        if rows * length > self.storage_slots or rows > self.storage_rows:
            self.states.clear()
            self.storage = []  # free the old storage before allocating the new
            self.storage_rows, self.storage_slots = max(rows, self.storage_rows), max(rows * length, self.storage_slots)
            heads, dim = self.kv_shape
            for kind in self.types:
                sizes = ((self.storage_slots * heads * dim,) * 2 if kind == ATTENTION else
                         (self.storage_rows * math.prod(self.conv_shape), self.storage_rows * math.prod(self.recurrent_shape)))
                self.storage.append(tuple(torch.zeros(n, dtype=dtype, device=self.device)
                                          for n, dtype in zip(sizes, self._dtypes(kind))))
        key = (rows, length)
        if key not in self.states:
            self.states[key] = _State(rows, length, self.max_new, self.storage, self._shapes(rows, length),
                                      self.types, self.device, self.dtype)
        return self.states[key]

    # ---- one token ----------------------------------------------------------------------------
    def _pick(self, logits, step, finished):
        """Greedy choice as generate makes it (or a sample: `sample_tokens`): stop tokens barred before
        min_new_tokens, and pad once finished. Plain greedy takes the argmax of the model's logits as they are:
        the same index as of their fp32 copy (an exact upcast), without writing that copy (512 rows x 152k-248k
        fp32 values a step: 0.24 ms of Qwen2-VL-2B's 5.1 ms step in run AA's profile, where bench_infer's
        min_new_tokens took this path); min_new_tokens bars the stop tokens in those logits, in place. A sample
        takes its softmax from an fp32 copy."""
        if self.temperature > 0:
            logits = logits.float()
        if self.min_new:
            stops = self.stop_ids.expand(logits.shape[0], -1)
            barred = (step < self.min_new).expand_as(stops)
            logits.scatter_(1, stops, torch.where(barred, float("-inf"), logits.gather(1, stops)))
        token = logits.argmax(-1) if self.temperature <= 0 else sample_tokens(logits, self.temperature, self.top_p)
        return torch.where(finished, torch.full_like(token, self.pad_id), token)

    def _step(self, s: _State) -> None:
        """Feed `token`, write the next one: fixed buffers only (captured as a CUDA graph)."""
        s.bias.index_fill_(1, s.write_at, 0.0)
        position = s.position.view(1, -1, 1).expand(3, -1, 1)
        _ATTEND_UPTO[0] = s.write_at  # every slot after it is still -inf in every row's bias
        try:
            with _one_token_functions(self.delta_rule, self.conv_update, self.kernels, self.swaps):
                out = self.model(input_ids=s.token[:, None], position_ids=position,
                                 attention_mask=s.bias[:, None, None, :],  # 4-D: used as is, no mask building
                                 use_cache=True, logits_to_keep=1, cache=s.cache)
        finally:
            _ATTEND_UPTO[0] = None
        token = self._pick(out.logits[:, -1], s.step, s.finished)
        s.history.index_copy_(1, s.step, token[:, None])
        s.finished |= torch.isin(token, self.stop_ids)
        s.token.copy_(token)
        s.position += 1
        s.write_at += 1
        s.step += 1

    def _one_step(self, s: _State) -> None:
        """The step as it runs: `_step`, or its compiled form (`compiled`)."""
        if not self.compiled:
            return self._step(s)
        if self._compiled_step is None:
            kernels._triton()  # built outside the trace: an import inside it would break the trace there
            self._compiled_step = torch.compile(self._step, dynamic=True)
        with torch.compiler.set_stance("default"):
            return self._compiled_step(s)

    def _run_step(self, s: _State) -> None:
        if not self.use_graphs:
            return self._one_step(s)
        if s.graph is None:
            self._capture(s)  # runs one real step, then records the graph
            return
        s.graph.replay()

    def _capture(self, s: _State) -> None:
        """Run one real step on a side stream (cuBLAS handles, kernel choice, allocations happen off
        the capture), then record the step; if recording fails, later steps run eagerly."""
        warm_up_off_capture(lambda: self._one_step(s))  # the one real step of this call (and the compile)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graph, _ = record_graph(lambda: self._one_step(s), self.pool)
        except Exception as exc:  # capture errors surface as several types
            print(f"warning: the decode step could not be captured as a CUDA graph ({exc}); running it eagerly",
                  flush=True)
            self.use_graphs = False
            return
        s.graph = graph

    # ---- one batch ----------------------------------------------------------------------------
    def _prefill(self, chunks: list[dict], rows: int) -> _State:
        prompt = max(c["input_ids"].shape[1] for c in chunks)
        length = cache_slots(prompt, self.max_new)
        s = self._state(rows, length)
        s.bias.fill_(float("-inf"))
        s.finished.zero_()
        s.history.fill_(self.pad_id)
        s.origin.copy_(torch.arange(rows, device=self.device))
        first, row = [], 0
        for chunk in chunks:
            n, width = chunk["input_ids"].shape
            if "position_ids" not in chunk:  # as generate computes them: the text row, then the M-RoPE rows
                mask = chunk["attention_mask"]
                rope, _ = self.core.get_rope_index(chunk["input_ids"], image_grid_thw=chunk["image_grid_thw"],
                                                   attention_mask=mask, mm_token_type_ids=chunk["mm_token_type_ids"])
                text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
                chunk = {**chunk, "position_ids": torch.cat([text[None], rope])}
            rope = chunk["position_ids"][1:]
            with _prefill_functions(self.prefill_kernel, self.prefill_conv, self.swaps), given_vision(chunk) as inputs:
                out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            start = prompt - width
            for layer, (first_state, second_state) in enumerate(_layer_states(out.cache, self.types)):
                if self.types[layer] == ATTENTION:
                    s.keys[layer][row:row + n, :, start:prompt].copy_(first_state)
                    s.values[layer][row:row + n, :, start:prompt].copy_(second_state)
                else:  # no length: the state after the prompt's last token, whatever the padding
                    s.conv[layer][row:row + n].copy_(first_state)
                    s.recurrent[layer][row:row + n].copy_(second_state)
            s.bias[row:row + n, start:prompt].masked_fill_(chunk["attention_mask"].bool(), 0.0)
            # generate's next position: the last prompt position + 1 (a text token: equal on all three axes)
            s.position[row:row + n] = rope[:, :, -1].max(0).values + 1
            first.append(out.logits[:, -1])
            row += n
            del out
        s.step.zero_()
        token = self._pick(torch.cat(first), s.step, s.finished)
        s.history[:, 0] = token
        s.finished |= torch.isin(token, self.stop_ids)
        s.token.copy_(token)
        s.write_at.fill_(prompt)
        s.step.fill_(1)
        return s

    def _compact(self, s: _State, alive: torch.Tensor, done_tokens, done_finished) -> _State:
        """Move the running rows into the buffers of a smaller bucket (padding rows marked finished)."""
        keep = alive.nonzero().flatten()
        rows = max(MIN_BUCKET, 1 << (len(keep) - 1).bit_length())
        gone = (~alive).nonzero().flatten()
        done_tokens.index_copy_(0, s.origin[gone], s.history[gone])
        done_finished.index_copy_(0, s.origin[gone], s.finished[gone])
        # read everything out before the new views (same storage) are written
        saved = [buffer.index_select(0, keep) for buffer in s.layer_buffers()]
        small = {name: getattr(s, name).index_select(0, keep)
                 for name in ("bias", "token", "position", "finished", "history", "origin")}
        write_at, step = s.write_at.clone(), s.step.clone()
        t = self._state(rows, s.length)
        n = len(keep)
        for buffer, rows_kept in zip(t.layer_buffers(), saved):
            buffer[:n].copy_(rows_kept)
            buffer[n:].zero_()  # padding rows hold nothing of an earlier batch
        del saved
        for name, value in small.items():
            getattr(t, name)[:n].copy_(value)
        t.bias[n:] = float("-inf")
        t.bias[n:, 0] = 0.0  # padding rows attend to one slot (no all-masked softmax)
        t.finished[n:] = True
        t.origin[n:] = done_tokens.shape[0] - 1  # a scratch row
        t.token[n:] = self.pad_id  # padding rows hold nothing of an earlier batch
        t.position[n:] = 0
        t.history[n:] = self.pad_id
        t.write_at.copy_(write_at)
        t.step.copy_(step)
        return t

    @torch.inference_mode()
    def generate(self, chunks: list[dict], wait: bool = True):
        """(tokens: rows x max_new_tokens, pad after the stop token; stopped: rows) on the CPU, rows
        in the order of the chunks. Each chunk is a left-padded processor batch on the model's device.
        wait=False: returns as soon as the last steps and the copies to the CPU are queued, an Arriving
        whose .get() gives that pair; the host can meanwhile start the next batch (while the GPU runs up to
        STOP_CHECK_EVERY steps of this one) and then read this one's tokens."""
        rows = sum(c["input_ids"].shape[0] for c in chunks)
        s = self._prefill(chunks, rows)
        done_tokens = torch.full((rows + 1, self.max_new), self.pad_id, dtype=torch.long, device=self.device)
        done_finished = torch.zeros(rows + 1, dtype=torch.bool, device=self.device)
        made = 1
        while made < self.max_new:
            for _ in range(min(STOP_CHECK_EVERY, self.max_new - made)):
                self._run_step(s)
                made += 1
            if made >= self.max_new:
                break
            alive = ~s.finished
            running = int(alive.sum())  # the stop check: one sync every STOP_CHECK_EVERY tokens
            if running == 0:
                break
            if self.compaction and max(MIN_BUCKET, 1 << (running - 1).bit_length()) <= s.rows // 2:
                s = self._compact(s, alive, done_tokens, done_finished)
        done_tokens.index_copy_(0, s.origin, s.history)
        done_finished.index_copy_(0, s.origin, s.finished)
        arriving = Arriving(done_tokens[:rows], done_finished[:rows])
        return arriving.get() if wait else arriving


class Arriving:
    """Tensors on their way from the GPU to page-locked CPU memory: the copies are queued behind the work that
    writes them (stream order), and get() waits for them alone. On the CPU they are there at once."""

    def __init__(self, *tensors: torch.Tensor):
        self.done = None
        if not (tensors and tensors[0].is_cuda):
            self.tensors = tensors
            return
        # page-locked (torch's caching host allocator reuses the blocks once their copies are done), so the
        # copies are queued, not waited for
        self.tensors = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                             for t in tensors)
        self.done = torch.cuda.Event()
        self.done.record()

    def get(self) -> tuple[torch.Tensor, ...]:
        if self.done is not None:
            self.done.synchronize()
        return self.tensors
