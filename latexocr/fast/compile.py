"""torch.compile of the model's blocks and CUDA graphs: when they pay, and how."""
from __future__ import annotations

import os
from pathlib import Path

import torch


# Packed rows are padded up to a multiple of this many tokens when the language model's blocks
# replay as CUDA graphs (one graph is recorded per distinct shape). Over 2,000 random batches of 16
# of the sample images: 6 row lengths, 5.0 % padding (bench/host_costs.py).
CUDA_GRAPH_ROW_MULTIPLE = 256
# ... and the vision tower's patches (latexocr/fast/vision.py VisionGraphs) to a multiple of this many:
# 5 patch counts, 5.0 % padding over the same batches (161 patches per image; bench/host_costs.py).
CUDA_GRAPH_PATCH_MULTIPLE = 256
# compile_backend=cudagraphs traces a block once per row shape: how many shapes before dynamo gives up on it
GRAPHS_ONLY_SHAPES = 32


def warm_up_off_capture(run, times: int = 1) -> None:
    """Run `run()` for real on a side stream before it is recorded: cuBLAS handles, kernel choices,
    compiles and first allocations then happen outside the capture, which must not contain them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            run()
    torch.cuda.current_stream().wait_stream(side)


def record_graph(run, pool):
    """(graph, output) of `run()` recorded as a CUDA graph in memory `pool` (nothing runs until a replay).
    thread_local: CUDA calls of other threads (the DataLoader's pin-memory thread) must not invalidate
    the capture, as they do in the default "global" mode. The decoder (fast/decoding.py) and the vision
    tower (fast/vision.py) record through here."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = run()
    return graph, output


def compile_decoder_layers(model, cuda_graphs: bool = False, kernels: bool = True, **compile_options) -> int:
    """torch.compile each transformer block of the language model and vision tower (regional compilation).

    Blocks of one kind share their compiled code, so compilation happens a few times (per block
    kind and input variant: ~30 s in all on an H100), not once per layer;
    `dynamic=True` keeps packed batches of any length from recompiling. Fusing
    the many small ops of LoRA, RMSNorm and rotary embeddings cuts the host time per step. The
    packed attentions above trace whole (no graph break): their boundaries come in as inputs.

    cuda_graphs=True also replays the language model's blocks as CUDA graphs (inductor's
    "reduce-overhead" mode), which removes their per-kernel launch cost: the step is host-bound
    without it (docs/BENCHMARKS.md). A graph is recorded for every new row shape (~6 s each on an
    H100, the first few dozen steps). Use it with a collator that pads rows to few shapes
    (TrainCollator(pad_to_multiple_of=CUDA_GRAPH_ROW_MULTIPLE)) and call
    torch.compiler.cudagraph_mark_step_begin() before each forward pass. The vision blocks are
    compiled without graphs here; latexocr.fast.vision.VisionGraphs replays the whole (frozen) tower as
    one graph per padded patch count instead.

    kernels=False (with cuda_graphs): no kernels generated. Dynamo's "cudagraphs" backend records the
    blocks' own (eager) kernels, forward and backward, as CUDA graphs: the launch cost goes as with
    inductor, the fusion does not, and so does inductor's code generation. Run AE (H100, Qwen2-VL-2B): 150
    samples/s after ~30 s of traces and recordings, against inductor's 228 after 58 s and eager's 78-85.
    The vision blocks then stay eager (a frozen tower still replays whole through VisionGraphs).
    """
    # Python floats the blocks read (LoRA's scaling, dropout p, norm eps) become constants instead of
    # 0-d CPU tensor inputs: those cost a CPU kernel per call and keep a graph off CUDA graphs (torch
    # 2.11 skipped such graphs, or segfaulted in the backward when it partitioned around them).
    torch._dynamo.config.specialize_float = True
    compile_options = {"dynamic": True, **compile_options}
    from .linear_attention import convolution_traces_dynamically, delta_rules_run_eagerly
    delta_rules_run_eagerly(model)  # Qwen3.5: its delta rule between a block's compiled parts
    convolution_traces_dynamically(model)  # Qwen3.5: one compile for every sequence length
    first_block_input_requires_grad(model)
    graphs_only = cuda_graphs and not kernels
    if graphs_only:
        # one trace a shape (dynamic=False): the cudagraphs backend keys its recorded graphs by the integer inputs,
        # which a dynamic trace does not pass, so a graph recorded for one row length was replayed for the next
        # (torch 2.11 on an H100, run AD: "size of tensor a (2560) must match ... (2816)"). The collator gives few
        # shapes (CUDA_GRAPH_ROW_MULTIPLE), so each has its own (run AE: the first step 4.2 s, four shapes in 40 steps).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, GRAPHS_ONLY_SHAPES)
        layer_options = {**compile_options, "dynamic": False, "backend": "cudagraphs"}
    else:
        layer_options = {**compile_options, **({"mode": "reduce-overhead"} if cuda_graphs else {})}
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("DecoderLayer"):
            module.compile(**layer_options)
        elif name.endswith("VisionBlock") and not graphs_only:
            module.compile(**compile_options)
        else:
            continue
        count += 1
    return count


def uncompile(model) -> None:
    """Undo compile_decoder_layers (the modules run eagerly again)."""
    for module in model.modules():
        module._compiled_call_impl = None
        hook = module.__dict__.pop(_GRAD_HOOK, None)
        if hook is not None:
            hook.remove()


_GRAD_HOOK = "_latexocr_inputs_require_grad"  # on the language model: the hook's handle


def _inputs_require_grad(module, args, kwargs):
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None and torch.is_grad_enabled() and not embeds.requires_grad:
        return args, {**kwargs, "inputs_embeds": embeds.detach().requires_grad_()}
    return None


def first_block_input_requires_grad(model) -> None:
    """The language model's input embeddings require grad in training, so its first block compiles as the others
    do. That block's input is the frozen embeddings' (and frozen vision tower's) output, which does not; dynamo
    guards on it, so every compiled part of a block compiled twice, once for layer 0 alone (bench/compile_lengths.py,
    CPU, ten lengths: Qwen3.5 9 graphs in 60.3 s -> 6 in 52.3 s, Qwen2-VL 2 in 23.1 s -> 1 in 19.4 s). The price is
    layer 0's input gradient, one block's share of the backward's input-gradient products (~1/28); nothing before
    the language model is reached (the embeddings are cut off there). transformers' enable_input_require_grads
    would mark the vision tower's inputs too, a backward through the frozen tower. Idempotent."""
    from ..modeling import vision_language_core
    core = vision_language_core(model)
    text = core.language_model if core is not None else None
    if text is not None and _GRAD_HOOK not in text.__dict__:
        text.__dict__[_GRAD_HOOK] = text.register_forward_pre_hook(_inputs_require_grad, with_kwargs=True)


# Compiling and recording the CUDA graphs cost ~1 min in a cold run (H100, torch 2.11: 68 s in a
# 150-step run; torch's persistent caches in compile_cache_dir() cut later runs' share, H200: 61.9 s
# cold vs 46.1 s warm for the 125-step job) and then save 0.15-0.3 s per 16-sample step (compiled
# 223 samples/s, docs/BENCHMARKS.md run H; eager 0.254 s/step vs compiled 0.065 s/step in run I):
# a cold run pays from ~280 optimizer steps on; 300 leaves a margin. Hosts differ: where the eager step is fast
# (run AD's H100: 91.5 eager, 227.3 compiled after 54 s) it pays from ~530 steps.
COMPILE_FROM_STEPS = 300
# Qwen3.5 (linear-attention layers through fla's kernels) compiles more (each block in two parts around its
# delta rule, two layer kinds): run AC (H200, Qwen3.5-2B, fla 0.6.0) spent 140 s more than its steady speed
# explains (80 steps in 154.8 s at 85.2 samples/s, fla's Triton kernels already built) and then saves
# 16/37.35 - 16/85.17 = 0.24 s a step against eager: a cold run pays from ~580 steps on. Run AD's faster H100 host
# (after the shifted convolution and layer 0's shared graphs): 82 s, then 0.073 s a step (101.8 against 67-72
# eager): ~1,120 steps.
COMPILE_FROM_STEPS_LINEAR_ATTENTION = 600
CACHE_ENV = "LATEXOCR_COMPILE_CACHE"


def should_compile(setting: str, planned_steps: int, measured_setup: bool = True,
                   from_steps: int = COMPILE_FROM_STEPS) -> bool:
    """The compile choice (latexocr/fast/choices.py): "on", "off", or "auto": on a CUDA GPU, for runs of at least
    `from_steps` optimizer steps (long enough to repay the compile), and only in the setup it was measured in
    (`measured_setup`: no DeepSpeed, no gradient checkpointing, ...)."""
    setting = setting.lower()
    if setting not in ("auto", "on", "off"):
        raise SystemExit(f"compile must be auto, on or off, not {setting!r}")
    if setting == "auto":
        return torch.cuda.is_available() and measured_setup and planned_steps >= from_steps
    return setting == "on"


def compile_cache_dir() -> Path:
    """$LATEXOCR_COMPILE_CACHE, else ~/.cache/latexocr/torch-compile (torch's default is under /tmp,
    which many machines empty at reboot)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latexocr" / "torch-compile")


def _torch_default_cache_dir() -> str | None:
    try:  # private, checked against torch 2.14.1 (latexocr/fast/upstream.py)
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


class CompileCache:
    """torch's compile caches in compile_cache_dir()/inductor, or in $TORCHINDUCTOR_CACHE_DIR where
    the user chose one: kept across runs, so most of the compile cost is paid once per machine and setup."""

    def __init__(self, folder: Path | None = None):
        folder = Path(folder) if folder else compile_cache_dir()
        # torch itself writes its default (under /tmp) into the variable once it has looked it up,
        # which happens while the model loads: only another value is the user's choice
        chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if chosen and os.path.abspath(chosen) == _torch_default_cache_dir():
            chosen = None
        self.folder = Path(chosen) if chosen else folder / "inductor"

    def use(self) -> None:
        """Point torch's caches at the folder (before the first compile)."""
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.folder)  # torch reads it at every cache access


def should_use_cuda_graphs(enabled: bool, compiled: bool, processes: int, accumulation: int,
                           on_cuda: bool | None = None) -> bool:
    """The cuda_graphs choice applies only where it was measured: compiled blocks on one CUDA GPU, without
    gradient accumulation. A replay reuses the previous replay's output memory, so the gradients of
    one pass must be consumed by the optimizer step before the next pass runs."""
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    return enabled and compiled and on_cuda and processes == 1 and accumulation == 1
