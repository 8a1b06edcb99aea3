"""The speed choices the code makes, and the one way to change them: $LATEXOCR_SPEED.

Each was measured (docs/BENCHMARKS.md) and is decided here, not in a script's settings block: a user
who changes the learning rate never meets them. bench/ measures the alternatives by setting, e.g.,

    LATEXOCR_SPEED="packing=off,supervised_logits_only=off" python train.py   # the tutorial's step
    LATEXOCR_SPEED="compile=on" python train.py                                # compile a short run too
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

ENV = "LATEXOCR_SPEED"


@dataclass(frozen=True)
class SpeedChoices:
    """Each field: the default the code takes, and what it switches."""
    fast: bool = True                     # off: plain transformers + peft, none of latexocr/fast/ (the
                                          # reference tests/test_fast.py compares the fast path with)
    attention: str = "sdpa"               # transformers' attn_implementation: sdpa | flash_attention_2 | eager
    packing: str = "auto"                 # padding-free training batches: auto (on, except where a model's linear-
                                          # attention layers would pad the packed samples again: slower than padded
                                          # batches, runs K and S; fast/linear_attention.py resolve_packing) | on |
                                          # off (right-padded, as the tutorial)
    supervised_logits_only: bool = True   # vocabulary projection only where a label is supervised (~1/3 of tokens)
    sliced_head: bool = True              # training: the vocabulary projection and the loss a slice of tokens at a
                                          # time, each slice's gradient taken at once (fast/head.py): the peak holds
                                          # one slice's logits, not every supervised token's (Qwen3.5's 248k
                                          # vocabulary: ~3 MB a token; bench/head_memory.py, CPU: 3.15 -> 0.65
                                          # GiB at 1,130 tokens). The same products, fewer passes over the
                                          # logits; on an H100 the same speed within the spread and 1.2-1.9 GiB
                                          # less peak (docs/BENCHMARKS.md run Z: bench_train whole_head)
    packed_vision_attention: bool = True  # one attention call over all images of a batch (sdpa only)
    packed_text_attention: bool = True    # packed rows: per-sample flash varlen attention on GPU (sdpa only)
    compile: str = "auto"                 # torch.compile of each block: auto (fast/compile.py should_compile) | on | off
    cuda_graphs: bool = True              # compiled blocks replayed as CUDA graphs, where measured (fast/compile.py)
    compile_backend: str = "inductor"     # what compiling a block makes: inductor (fused kernels generated, then
                                          # replayed as CUDA graphs where cuda_graphs applies) | cudagraphs (where
                                          # cuda_graphs applies: the blocks' own eager kernels recorded as CUDA graphs,
                                          # dynamo's cudagraphs backend, no kernel generation; elsewhere inductor).
                                          # Run AE (H100, Qwen2-VL-2B): 150 samples/s after ~30 s of traces, against
                                          # eager's 78-85 and inductor's 228 after 58 s: the tutorial's 125 steps take
                                          # longer than eager, so compile=auto never picks it (docs/BENCHMARKS.md)
    padded_graph_multiple: int = 256      # padded batches replayed as CUDA graphs: each micro-batch's length rounded
                                          # up to a multiple of this (a graph is recorded per shape). Packed rows take
                                          # fast/compile.py CUDA_GRAPH_ROW_MULTIPLE. For Qwen3.5's samples (~143
                                          # tokens) 256 computes 1.79x their tokens; length-grouped batches at 64:
                                          # 1.25x in 3 shapes (bench/train_padding.py; not yet timed on a GPU)
    fla_varlen: bool = False              # packed Qwen3.5 rows through fla's varlen kernels (cu_seqlens, fla's own conv)
                                          # instead of right-padded samples through fla's chunk rule (runs O and V:
                                          # slower; V: 33.4 samples/s against the padded default's 47.8)
    fla: bool = True                      # off: Qwen3.5's linear-attention layers on transformers' reference kernels
                                          # even where flash-linear-attention runs (bench/: both paths in one run)
    group_by_length: bool = False         # padded batches (packing off): each optimizer step's samples drawn from a
                                          # window of the run sorted by token count (transformers' LengthGroupedSampler
                                          # over OcrDataset.lengths), so a micro-batch pads to a length near its own
                                          # samples'; off: random order, as the tutorial. For Qwen3.5's padded default
                                          # (issue 31); not yet measured on a GPU (bench/bench_train.py qwen3_5_grouped)
    delta_step: bool = True               # Qwen3.5 decoding without fla: the one-token delta rule as one batched matmul
                                          # and one in-place update of each layer's state (fast/standins.py)
    decode_kernels: bool = True           # Qwen3.5 decoding on a GPU: the step's delta rule (without fla) and
                                          # convolution update (without causal-conv1d) as Triton kernels that read
                                          # and write each layer's state once (fast/kernels.py); off: their torch
                                          # forms. Run U: the step's 1.26x
    prefill_kernel: bool = True           # Qwen3.5 inference on a GPU: the prefill's delta rule token by token (without
                                          # fla) and its convolution (without causal-conv1d) as Triton kernels
                                          # (fast/kernels.py delta_rule, causal_conv); off: the torch forms. Run U:
                                          # the delta rule's 1.01x and 1.4 GiB less; run V, both: 1.12x
    prefill_rule: str = "chunked"         # the prefill kernel's delta rule: chunked (16 tokens at a time as tensor-core
                                          # matrix products, fast/kernels.py chunk_rule_kernel; run X: Qwen3.5-2B's
                                          # loop 256.6-262.3 images/s) | tokens (each prompt token by token, the state
                                          # tile on chip: 243.5 in the same run; alone, run W: 4.43 against 0.98 ms)
    norm_kernel: bool = True              # inference on a GPU, every family: the RMSNorms (Qwen3.5's gated one too)
                                          # of the static decoder's prefill and step in one Triton kernel each
                                          # (fast/kernels.py rms_norm)
                                          # instead of ~7 torch kernels; off: the torch form. Run V: Qwen3.5-2B's
                                          # loop 1.14x, Qwen2-VL-2B's 1.08x
    rotary_kernel: bool = True            # inference on a GPU, every family: the rotary embedding of q and k (the text
                                          # layers' and the vision towers') in one Triton kernel (fast/kernels.py
                                          # rotary), bit for bit the torch form's ~10 kernels (the towers': over fp32
                                          # copies); off: the torch form. Run W, alone: 3-6x; run X: see vision_inputs
    activation_kernel: bool = True        # inference on a GPU, every family: the MLPs' activation in one Triton kernel
                                          # (fast/kernels.py gated_silu: silu(gate) * up; quick_gelu: Qwen2-VL's vision
                                          # MLP) instead of 2-3 torch kernels; off: the torch form. Run W, alone: 1.3x
                                          # (silu * up, prefill), 2.3x (QuickGELU); at a decode step's size Triton's
                                          # launch outweighs it outside a CUDA graph; run X: see vision_inputs
    attention_kernel: bool = True         # inference on a GPU, every family: the decode step's attention (one query
                                          # token a row against its cache slots) in one Triton kernel
                                          # (fast/kernels.py decode_attention) instead of SDPA's memory-efficient
                                          # kernel (run V's profile: 25 % of Qwen2-VL-2B's step, ~4x the time its
                                          # keys and values take to read); off: SDPA. Run W, alone: 1.6-1.8x SDPA;
                                          # run X: see vision_inputs
    patch_matmul: bool = True             # inference on a GPU, every family: the vision tower's patch embedding (a
                                          # Conv3d whose kernel is its stride) as the one matrix product it is, in the
                                          # static decoder's prefill (fast/standins.py patch_embed_classes); run V's
                                          # Qwen3.5-2B profile: cuDNN's convolution 5.8 ms a chunk of 128 images.
                                          # Run W, alone: 21-27x; run X: see vision_inputs
    vision_inputs: bool = True            # the static decoder's prefill, every family: the vision tower's patch
                                          # positions and attention boundaries computed by the loader workers on the
                                          # CPU with the tower's own functions (batching.vision_inputs) instead of
                                          # its loop over the images (~1,400 small GPU kernels a chunk of 128) and
                                          # two GPU->CPU syncs. Run X, Qwen2-VL-2B's loop with this and the four
                                          # kernels above: 447.6 images/s, 343.3 with all five off (one call)
    pinned_batches: str = "auto"          # inference on a GPU: the loader's chunks copied into page-locked memory by its
                                          # pin thread, so their copies to the GPU are queued without the host waiting
                                          # (run V's profile: 25 pageable copies a 512-row batch, 55 ms for Qwen2-VL-2B,
                                          # 126 ms for Qwen3.5-2B, while the GPU waits). auto: on, except for models
                                          # with linear-attention layers (run X: Qwen2-VL-2B's loop 467.5 and 476.9
                                          # images/s pinned against 442.8 and 447.6; Qwen3.5-2B's 238.3 against 256.6
                                          # and 262.3, one run, the first of its call) | on | off
    padded_positions: bool = True         # padded training batches (Qwen3.5's default; packing=off) carry their
                                          # M-RoPE positions from the collator (TrainCollator padded_positions):
                                          # the model's get_rope_index asks the GPU for ~7 values a sample, each
                                          # a sync (bench/count_syncs.py: Qwen3.5's step of 16 samples, 128 -> 16).
                                          # Run AB (H100, fla): no faster, 38.0 and 36.6 samples/s against 38.9
                                          # off; kept on: the same positions, fewer syncs
    fused_qkv: bool = True                # the static decoder's prefill and step, every family: each text attention's
                                          # query, key and value projections as one product of their joined weights
                                          # (fast/standins.py qkv_swaps; +176 MiB for Qwen2-VL-2B); a decode step's
                                          # narrow key and value products fill few SMs. Qwen2-VL-2B's loop (H100,
                                          # runs Z and AA, three rounds each, interleaved): 475.7, 476.4, 474.7
                                          # images/s on against 464.3, 460.1, 456.6 off (1.03x)
    merge_adapter: bool = True            # infer.py: a LoRA adapter merged into the base weights in memory (bf16;
                                          # not a 4-bit model), so a decode step runs the base model's kernels
                                          # only, not peft's ~4 more per adapted projection (196 in Qwen2-VL-2B);
                                          # off: peft's layers beside the base ones (bench/bench_infer.py --adapter;
                                          # run V, Qwen2-VL-2B, 9,443 images: 48.6 s merged, 63.7 s not)
    compaction: bool = True               # the static decoder moves its running rows into a smaller batch once at
                                          # most half still run (latexocr/fast/decoding.py; bench/bench_decoder.py)
    skip_bitsandbytes: bool = True        # infer.py and train.py run as commands with QUANTIZATION=none: bitsandbytes
                                          # kept out of the process (fast/imports.py), whose import through peft's
                                          # sets up torch.compile: run AH (H100 host), infer.py with an adapter
                                          # 28.8-28.9 s against 31.0-31.1, the tutorial's train.py 37.5 against 39.3-40.0
    decode_compile: bool = False          # the static decoder's step through torch.compile (its elementwise kernels
                                          # fused) before the step is recorded as a CUDA graph; off: Qwen2-VL-2B's
                                          # loop ran 0.65x the eager graphed step after 1-2 min of compiling (run R);
                                          # Qwen3.5's step still to measure (bench/bench_decoder.py)

    @property
    def packed(self) -> bool:
        """Training batches packed: packing on, or auto before resolve_packing decided it for the model."""
        return self.packing != "off"


TRI_STATE = ("compile", "packing", "pinned_batches")  # auto | on | off
NAMED = {"prefill_rule": ("tokens", "chunked"),  # choices that take one of these words
         "compile_backend": ("inductor", "cudagraphs")}


def speed_choices(text: str | None = None) -> SpeedChoices:
    """The choices with $LATEXOCR_SPEED's changes ("name=value,..."; booleans on/off); stops with one
    line on an unknown name or value."""
    kinds = {f.name: type(f.default) for f in fields(SpeedChoices)}
    changes = {}
    for item in filter(None, (os.environ.get(ENV, "") if text is None else text).replace(" ", "").split(",")):
        name, _, value = item.lower().partition("=")
        allowed = (("on", "off") if kinds.get(name) is bool else ("auto", "on", "off") if name in TRI_STATE
                   else NAMED.get(name))
        if (name not in kinds or (allowed and value not in allowed)
                or (kinds[name] is int and not (value.isdigit() and int(value) > 0))):
            raise SystemExit(f"{ENV}: {item!r}: the choices are {', '.join(kinds)}; {', '.join(TRI_STATE)} must be "
                             f"auto, on or off, prefill_rule tokens or chunked, compile_backend inductor or "
                             f"cudagraphs, attention an attn_implementation, padded_graph_multiple a positive whole "
                             f"number, the others on or off")
        changes[name] = value == "on" if kinds[name] is bool else int(value) if kinds[name] is int else value
    return SpeedChoices(**changes)
