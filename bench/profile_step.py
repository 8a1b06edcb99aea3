"""Where a training step's time goes, and what each speed setting buys, in a plain loop on one GPU.

    python bench/profile_step.py                     # the eager speed settings, one by one
    python bench/profile_step.py --extra             # eager, then compiled blocks, with profiler summaries
    python bench/profile_step.py --variants blocks,cuda_graphs --cprofile step.prof

Runs train.py's pieces (collator, LoRA model, supervised loss, AdamW) without the Trainer, on
fresh real-shaped batches for every variant (shapes change every step, as in training), and
prints ms/step for: everything off (cuDNN attention, per-image vision attention, peft input
casts), then each setting switched on in turn; then a torch.profiler table of the final setup.
--variants instead measures the eager default, then each named variant in turn in the same process
(blocks: every block compiled; cuda_graphs: the LLM blocks also replayed as CUDA graphs, rows padded
to --bucket tokens, as train.py does; see --help for the rest); --profile prints kernels, GPU busy
time and host syncs per step of the last one, --cprofile the host's Python time per function.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import DEFAULT_SHARED, build_random_model, real_samples


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench"))
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--image-size", default="")
    ap.add_argument("--extra", action="store_true", help="profile eager, then --variants (default blocks,guards)")
    ap.add_argument("--variants", default="", help="comma list, measured in order in this process: eager, "
                    "blocks, cuda_graphs[_legacy|_nopartition|_nostatic], vision_graphs (after cuda_graphs), bucket, "
                    "combo_kernels, guards, fused_adamw")
    ap.add_argument("--bucket", type=int, default=0,
                    help="cuda_graphs and bucket variants: pad rows to a multiple of this (default: train.py's, 256)")
    ap.add_argument("--profile", action="store_true", help="profiler summary of the last variant")
    ap.add_argument("--seen-shapes", action="store_true",
                    help="time and profile batches that already ran once (CUDA graphs: replays only, no recordings)")
    ap.add_argument("--cprofile", default="", help="write cProfile stats of the last variant's steps here")
    a = ap.parse_args()
    a.shared = a.shared.resolve()
    a.work.mkdir(parents=True, exist_ok=True)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from latexocr.batching import SampleEncoder, TrainCollator
    from latexocr.modeling import add_lora, load_model, load_processor
    from latexocr.fast import prepare_model
    from latexocr.sample import sizing_for
    from latexocr.fast.attention import (PACKED_TEXT_ATTENTION, PACKED_VISION_ATTENTION, set_attention,
                                         use_packed_text_attention)
    from latexocr.fast.compile import CUDA_GRAPH_ROW_MULTIPLE
    from latexocr.fast.trainer import NoLoraInputCast, fast_supervised_loss as supervised_loss
    from latexocr.fast.vision import PackedExtras

    a.bucket = a.bucket or CUDA_GRAPH_ROW_MULTIPLE
    model_dir = build_random_model(a.shared, a.work / "qwen2vl-2b-random")
    processor = load_processor(str(model_dir))
    enc = SampleEncoder(processor, sizing_for(processor, fixed=a.image_size))
    model = prepare_model(load_model(str(model_dir), torch.bfloat16, "sdpa", device_map="cuda"))
    model = add_lora(model, 64, 16, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    no_lora_input_cast = NoLoraInputCast(model)
    pairs = real_samples(a.shared)
    live = {"collate": TrainCollator(enc, packed=True, packed_extras=PackedExtras()),
            "opt": torch.optim.AdamW(params, lr=1e-4), "vision": None}  # variants swap them
    offset = [0]

    def fresh_batches(n):  # rotate through the samples so every batch has new shapes
        out = []
        for _ in range(n):
            out.append(live["collate"]([pairs[(offset[0] + j * 7) % len(pairs)] for j in range(a.micro)]))
            offset[0] += 1
        return out

    def timing_batches(n, cast=False):
        """n fresh batches; with --seen-shapes each has already run once (its CUDA graphs are recorded)."""
        batches = fresh_batches(n)
        if a.seen_shapes:
            for b in batches:
                step(dict(b), cast)
        return batches

    def step(batch, cast):
        torch.compiler.cudagraph_mark_step_begin()  # (CUDA-graph variants) a new step's outputs may reuse memory
        batch = {k: v.to("cuda", non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with no_lora_input_cast(active=not cast), torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = supervised_loss(model, batch, vision_graphs=live["vision"])
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        live["opt"].step()
        live["opt"].zero_grad(set_to_none=True)

    use_packed_text_attention(model.base_model.model)  # registers it; measure() picks per variant

    def measure(name, cudnn, packed_vision, cast, packed_text=False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        set_attention(model, "vision_config", PACKED_VISION_ATTENTION if packed_vision else "sdpa")
        set_attention(model, "text_config", PACKED_TEXT_ATTENTION if packed_text else "sdpa")
        for b in fresh_batches(2):
            step(b, cast)
        batches = timing_batches(a.steps, cast)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            step(b, cast)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / len(batches)
        print(f"{name:55s} {dt * 1000:6.0f} ms/step  {a.micro / dt:6.1f} samples/s", flush=True)

    if not (a.extra or a.variants):
        measure("all off (cuDNN sdpa, per-image vision, peft casts)", True, False, True)
        measure("+ cuDNN attention off", False, False, True)
        measure("+ packed vision attention", False, True, True)
        measure("+ no peft input casts", False, True, False)
    measure("+ packed (flash varlen) text attention (= train.py default)", False, True, False, True)
    print(f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    def where_time_goes(name, n=3):
        """Kernels, GPU busy time and host syncs per step, from torch.profiler over n fresh steps."""
        from torch.autograd import DeviceType
        batches = timing_batches(n)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for b in batches:
                step(b, False)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / n
        events = prof.events()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / n / 1000
        count = lambda *names: sum(1 for e in events if e.name in names) / n  # noqa: E731
        print(f"{name}: {wall * 1000:.0f} ms/step under the profiler, {len(kernels) / n:.0f} GPU kernels/step, "
              f"GPU busy {busy:.0f} ms/step ({busy / wall / 10:.0f} %), syncs/step: "
              f"{count('cudaStreamSynchronize', 'cudaDeviceSynchronize', 'cudaEventSynchronize'):.0f} "
              f"(.item {count('aten::_local_scalar_dense'):.0f}, nonzero {count('aten::nonzero'):.0f})", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        # where the syncs come from: torch reports each (deduplicated by source line)
        import warnings
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(fresh_batches(1)[0], False)
        torch.cuda.set_sync_debug_mode(0)
        sites = {}
        for w in caught:
            key = f"{Path(w.filename).name}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
        print("sync sites:", dict(sorted(sites.items(), key=lambda kv: -kv[1])[:15]), flush=True)

    if a.extra:
        a.variants = a.variants or "blocks,guards"
        where_time_goes("eager default")
    if a.variants:
        import torch._inductor.config as inductor_config
        from torch._dynamo.utils import counters
        from latexocr.fast.compile import compile_decoder_layers, uncompile

        def warm(n, label):
            t0 = time.perf_counter()
            for b in fresh_batches(n):
                step(b, False)
            torch.cuda.synchronize()
            print(f"{label}: compile + {n} warm-up steps {time.perf_counter() - t0:.0f} s", flush=True)

        def recompile(**options):
            uncompile(model)
            torch._dynamo.reset()
            counters.clear()
            return compile_decoder_layers(model, **options)

        for variant in a.variants.split(","):
            torch.cuda.reset_peak_memory_stats()
            if variant == "blocks":  # every LLM and vision block compiled on its own, no CUDA graphs
                recompile()
            elif "cuda_graphs" in variant:
                # LLM blocks replayed as CUDA graphs (train.py's compiled blocks on a GPU), rows padded to
                # few shapes (--bucket); "legacy" uses inductor's older cudagraphify, not CUDA graph trees
                inductor_config.triton.cudagraph_trees = "legacy" not in variant
                if "nopartition" in variant:  # no splitting of graphs around cudagraph-unsafe ops
                    inductor_config.graph_partition = False
                if "nostatic" in variant:  # triton's own launcher instead of inductor's static one
                    inductor_config.use_static_cuda_launcher = False
                recompile(cuda_graphs=True)
            elif variant == "vision_graphs":  # + the vision tower as one CUDA graph per padded patch count
                from latexocr.fast.compile import CUDA_GRAPH_PATCH_MULTIPLE
                from latexocr.fast.vision import graph_vision_tower
                live["vision"] = graph_vision_tower(model)
                live["collate"] = TrainCollator(
                    enc, packed=True, pad_to_multiple_of=a.bucket,
                    packed_extras=PackedExtras(pad_patches_to_multiple_of=CUDA_GRAPH_PATCH_MULTIPLE))
            elif variant in ("eager", "bucket"):  # bucket: the compiled code so far, on padded rows
                pass
            elif variant == "combo_kernels":  # inductor fuses independent kernels horizontally: fewer launches
                inductor_config.combo_kernels = True
                recompile()
            elif variant == "guards":  # unsafe in train.py: evaluation flips the blocks to eval mode
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
            elif variant == "fused_adamw":
                live["opt"] = torch.optim.AdamW(params, lr=1e-4, fused=True)
            else:
                raise SystemExit(f"unknown variant {variant!r}; see --help")
            if "cuda_graphs" in variant or variant == "bucket":  # rows padded as train.py pads them for graphs
                live["collate"] = TrainCollator(enc, packed=True, pad_to_multiple_of=a.bucket,
                                                packed_extras=PackedExtras())
            if variant != "eager":
                warm(6 if "graphs" not in variant else 12, variant)
            measure(variant, False, True, False, True)
            print(f"  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; dynamo stats:",
                  dict(counters["stats"]), "graph breaks:", sum(counters["graph_break"].values()), flush=True)
            torch.compiler.set_stance("default")
        if a.profile:
            where_time_goes(a.variants.split(",")[-1])
        if a.cprofile:  # the host's Python time per function, over 6 fresh steps of the last variant
            import cProfile
            import pstats
            batches = timing_batches(6)
            torch.cuda.synchronize()
            with cProfile.Profile() as prof:
                for b in batches:
                    step(b, False)
                torch.cuda.synchronize()
            prof.dump_stats(a.cprofile)
            pstats.Stats(prof).sort_stats("tottime").print_stats(40)
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in fresh_batches(3):
            step(b, False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50))


if __name__ == "__main__":
    main()
