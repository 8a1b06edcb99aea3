"""The fast path: everything that makes training and inference fast on a GPU beyond plain transformers + peft.

    choices.py    the speed choices the code makes ($LATEXOCR_SPEED changes them, for bench/)
    attention.py  packed attention for the vision tower and the language model (one varlen call);
                  prepare_model (inference and training) and plain_text_attention (generation)
    vision.py     the sync-free packed step of Qwen2-VL (inputs precomputed by the collator), the
                  vision tower as CUDA graphs
    compile.py    torch.compile of the blocks, CUDA graphs, the compile cache, when they pay
    head.py       the training loss's vocabulary projection a slice of tokens at a time (SFT's loss, GRPO's
                  log-probabilities): no [tokens x vocabulary] logits kept for the backward
    trainer.py    build_trainer: the trainer and step train.py runs (FastTrainer: the step above and
                  host-side replacements of per-step bookkeeping), and which parts of the fast path it takes
    decoding.py   StaticDecoder: infer.py's batched greedy / sampling decoder (static cache, CUDA-graph
                  decode step, compaction of stopped rows); kept over transformers' static-cache generate
                  by measurement (docs/BENCHMARKS.md, bench/bench_decoder.py: 2.0x at batch 512)
    standins.py   what the decoder stands in for inside the model while its prefill and step run: Qwen3.5's
                  delta-rule and convolution functions, the kernels' forwards and functions (recognised by
                  their source's hash), the vision tower's inputs from the loader, the joined q/k/v product
    kernels.py    Triton kernels for Qwen3.5's inference without fla / causal-conv1d: the delta rule (prefill
                  and decode step) and the step's convolution update, each reading a layer's state once;
                  for every family's inference: the RMSNorms, the rotary embedding, the MLP activations and
                  the decode step's attention, one kernel each
    linear_attention.py  packed rows through Qwen3.5's Gated DeltaNet layers with no state across samples:
                  flash-linear-attention's kernels with the boundaries where they run, else a padded batch
    katex.py      KaTeX's verdicts, many per call: pykatex's embedded QuickJS driven through ctypes (run by
                  latex.py as a child process's script, so it imports no torch)
    imports.py    bitsandbytes kept out of a command's process that loads no 4-bit model (peft imports it, and
                  it sets up torch.compile as it is imported: 1.8-2.5 s of a start on an H100 host)
    upstream.py   every private / patched transformers, peft, swanlab and torch hook the project relies on,
                  checked against versions

The one door: the rest of the project imports what this file names; train.py also imports
trainer.build_trainer and trainer.probe_step_loss, and grpo.py imports head.py. Nothing here loads training
code (trainer.py), so inference never does.
"""
from .attention import plain_text_attention, prepare_model
from .choices import SpeedChoices, speed_choices
from .decoding import StaticDecoder, bytes_per_row, static_decode_supported
from .linear_attention import (avoid_refused_kernels, config_has_linear_attention,
                               describe as describe_linear_attention,
                               describe_padded as describe_padded_linear_attention, has_linear_attention,
                               keep_packed_samples_apart, resolve_packing)
from .standins import given_vision, prefill_as_decoded

__all__ = ["SpeedChoices", "StaticDecoder", "bytes_per_row", "config_has_linear_attention", "describe_linear_attention",
           "given_vision", "describe_padded_linear_attention", "has_linear_attention",
           "avoid_refused_kernels", "keep_packed_samples_apart", "plain_text_attention", "prefill_as_decoded",
           "prepare_model", "resolve_packing", "speed_choices", "static_decode_supported"]
