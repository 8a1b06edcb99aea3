"""Training speed of train.py on one GPU, against a tutorial-equivalent configuration measured in the same run.

    python bench/bench_train.py                       # all configurations, writes docs-ready markdown
    python bench/bench_train.py --configs default,tutorial --steps 40
    python bench/bench_train.py --configs eager,default_cold,default_warm --full eager,default_cold,default_warm
                                                      # the tutorial's job: eager, first run, second run
    python bench/bench_train.py --configs tutorial,default,qwen3_5,qwen3_5_no_packing --steps 20
                                                      # Qwen3.5-2B beside Qwen2-VL-2B

Builds a random-init Qwen2-VL-2B from ../shared/qwen2vl-2b (or uses --model), and for the qwen3_5*
configurations a random-init Qwen3.5-2B from ../shared/qwen3_5-2b (bench/common.py; or --qwen3-5-model),
cycles the real LaTeX_OCR images of ../shared/latex_ocr to --samples samples, and runs train.py itself
(a subprocess per configuration, SwanLab and evaluation off). Prints steady-state samples/s and
tokens/s (median of the logging intervals after warm-up), MFU, peak GPU memory, and the time of
the tutorial's workload (996 samples x 2 epochs).

MFU counts model FLOPs per sample as 4 * N_llm * tokens (forward 2N + backward through frozen
weights 2N; LoRA's own FLOPs are < 1 % and ignored) + 2 * N_vit * patches (the frozen vision
tower runs forward only) + 4 * d * V * supervised tokens (the vocabulary projection); N_llm and
N_vit are the decoder layers' and the vision tower's parameters (counted on the meta device);
attention score FLOPs and Qwen3.5's delta-rule state updates are ignored. Peak: 989 TFLOP/s (H100 SXM dense bf16).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_SHARED, ROOT, build_random_model, build_random_qwen3_5, real_samples, write_json

TUTORIAL = ["--micro-batch-size", "4", "--gradient-checkpointing", "--image-size", "500x100", "--num-workers", "0"]
TUTORIAL_SPEED = "packing=off,supervised_logits_only=off"  # $LATEXOCR_SPEED: latexocr/fast/choices.py
CONFIGS = {
    # name: (train.py flags, $LATEXOCR_SPEED, what it shows)
    "tutorial": (TUTORIAL, TUTORIAL_SPEED, "tutorial-equivalent: micro-batch 4 x 4, gradient checkpointing, "
                                           "500x100, padded, full logits, no workers"),
    "default": ([], "", "train.py defaults"),
    # the tutorial's job as a user runs it twice on one machine (compile=auto compiles it):
    # the first run with the compile cache emptied, the second finding it warm; eager beside them
    "eager": ([], "compile=off", "train.py defaults, eager (compile=off)"),
    "default_cold": ([], "", "train.py defaults, first run on the machine (compile cache emptied first)"),
    "default_warm": ([], "", "train.py defaults, second run (compile cache warm from default_cold)"),
    "default_500x100": (["--image-size", "500x100"], "", "defaults at the tutorial's fixed 500x100 size"),
    "compiled": ([], "compile=on", "defaults + torch.compile of each LLM and vision block, LLM blocks and vision "
                                   "tower as CUDA graphs (compile=auto: runs of >= 300 steps)"),
    "compiled_no_graphs": ([], "compile=on,cuda_graphs=off", "compiled, without CUDA graphs"),
    "graphs_only": ([], "compile=on,compile_backend=cudagraphs", "defaults, LLM blocks recorded as CUDA graphs of their "
                    "own eager kernels (dynamo's cudagraphs backend: no kernel generation)"),
    "compiled_500x100": (["--image-size", "500x100"], "compile=on", "compiled, at fixed 500x100"),
    "sdpa_text": ([], "packed_text_attention=off", "defaults, LLM attention through sdpa with a block mask"),
    "compiled_sdpa_text": ([], "compile=on,packed_text_attention=off", "compiled, sdpa text attention"),
    "no_packing": ([], "packing=off", "defaults, padded batches instead of packed"),
    "full_logits": ([], "supervised_logits_only=off", "defaults, logits at every position"),
    "whole_head": ([], "sliced_head=off", "defaults, the loss's vocabulary projection in one piece (fast/head.py off)"),
    "plain": ([], "fast=off", "plain transformers + peft training (none of latexocr/fast/)"),
    "grad_ckpt": (["--gradient-checkpointing"], "", "defaults + gradient checkpointing"),
    "micro4": (["--micro-batch-size", "4"], "", "defaults, micro-batch 4 x accumulation 4"),
    "workers0": (["--num-workers", "0"], "", "defaults, batches built in the main process"),
    # training modes (README "Training modes"); MFU below counts a frozen vision tower for all of them
    "lora_vision": (["--tune", "lora_vision"], "", "defaults, LoRA on the vision tower and merger too"),
    "lora_merger": (["--unfreeze-merger"], "", "defaults + the merger trained in full"),
    "full": (["--tune", "full", "--learning-rate", "1e-5"], "", "full fine-tuning of the LLM (fp32 master weights)"),
    "qlora": (["--quantization", "4bit"], "", "defaults on a 4-bit NF4 language model (bitsandbytes)"),
    "fp16": (["--dtype", "fp16"], "", "defaults in fp16 with loss scaling (GPUs without bf16)"),
    # Qwen3.5-2B (the qwen3_5 prefix picks the model): without fla's varlen path or causal-conv1d its Gated
    # DeltaNet layers would take a packed row as one padded batch of its samples, so packing=auto pads (run S)
    "qwen3_5": ([], "", "Qwen3.5-2B, train.py defaults (packing=auto)"),
    "qwen3_5_packed": ([], "packing=on", "Qwen3.5-2B, defaults, packed batches whatever the path"),
    "qwen3_5_no_packing": ([], "packing=off", "Qwen3.5-2B, defaults, padded batches instead of packed"),
    "qwen3_5_no_fla": ([], "fla=off", "Qwen3.5-2B, defaults on transformers' reference kernels even where fla runs"),
    "qwen3_5_fla_varlen": ([], "fla_varlen=on", "Qwen3.5-2B, defaults, packed rows through fla's varlen kernels "
                           "(its convolution and delta rule given the boundaries; where fla runs)"),
    "qwen3_5_grouped": ([], "group_by_length=on", "Qwen3.5-2B, defaults + length-grouped padded batches "
                        "(LengthGroupedSampler: a micro-batch pads less)"),
    "qwen3_5_whole_head": ([], "sliced_head=off", "Qwen3.5-2B, defaults, the loss's vocabulary projection in one "
                           "piece (fast/head.py off)"),
    "qwen3_5_compiled": ([], "compile=on", "Qwen3.5-2B, defaults + torch.compile of each block (the delta rules "
                         "eager between its parts), LLM blocks as CUDA graphs"),
    # a job long enough that compile=auto compiles (--long-steps, fast/compile.py COMPILE_FROM_STEPS_LINEAR_ATTENTION)
    "qwen3_5_long": ([], "", "Qwen3.5-2B, train.py defaults on a job of --long-steps steps (compile=auto compiles "
                     "where fla trains)"),
    "qwen3_5_compiled_grouped": ([], "compile=on,group_by_length=on,padded_graph_multiple=64",
                                 "Qwen3.5-2B, compiled, length-grouped padded batches rounded to 64 tokens (1.25x the "
                                 "samples' tokens in 3 shapes against 1.79x in 1, bench/train_padding.py)"),
    "qwen3_5_graphs_only": ([], "compile=on,compile_backend=cudagraphs", "Qwen3.5-2B, LLM blocks recorded as CUDA "
                            "graphs of their own eager kernels (no kernel generation), the delta rules between them"),
    "qwen3_5_compiled_no_graphs": ([], "compile=on,cuda_graphs=off", "Qwen3.5-2B, compiled, without CUDA graphs"),
    "qwen3_5_model_positions": ([], "padded_positions=off", "Qwen3.5-2B, defaults, the model computing its M-RoPE "
                                "positions (get_rope_index: ~7 GPU->CPU syncs a sample) instead of the collator"),
}
QWEN3_5_PREFIX = "qwen3_5"
PEAK_TFLOPS = 989.0


def model_flops_per_sample(model_dir: Path, json_path: Path, flags: list[str]) -> tuple[float, float]:
    """(FLOPs, tokens) per sample averaged over the dataset, for the sizing the flags select."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    from latexocr.batching import SampleEncoder
    from latexocr.records import read_labelled
    from latexocr.sample import sizing_for

    from transformers import AutoModelForImageTextToText

    from latexocr.modeling import vision_language_core

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # parameter counts of either family without building it
        core = vision_language_core(AutoModelForImageTextToText.from_config(cfg))
    n_llm = sum(p.numel() for p in core.language_model.layers.parameters())
    n_vit = sum(p.numel() for p in core.visual.parameters())
    d, vocab = cfg.text_config.hidden_size, cfg.text_config.vocab_size
    fixed = flags[flags.index("--image-size") + 1] if "--image-size" in flags else None
    processor = AutoProcessor.from_pretrained(model_dir)
    enc = SampleEncoder(processor, sizing_for(processor, fixed=fixed))
    from PIL import Image
    flops, tokens = [], []
    for path, label in read_labelled(json_path)[:200]:
        with Image.open(path) as im:
            img_tokens = enc.image_tokens(*im.size)
        ans = len(enc.answer_ids(label))
        n = enc.prompt_text_tokens + img_tokens + ans
        patches = img_tokens * processor.image_processor.merge_size ** 2
        flops.append(4 * n_llm * n + 2 * n_vit * patches + 4 * d * vocab * ans)
        tokens.append(n)
    return statistics.mean(flops), statistics.mean(tokens)


def parse_logs(text: str) -> list[dict]:
    logs = []
    for m in re.finditer(r"\{'[^{}]*\}", text):
        try:
            d = ast.literal_eval(m.group(0))
        except Exception:
            continue
        logs.append({k: (float(v) if isinstance(v, str) and re.fullmatch(r"[-+.\deE]+", v) else v)
                     for k, v in d.items()})
    return logs


LOGGING_STEPS = 5  # train.py's --logging-steps here: the k-th log line with samples/s is step k x 5


def run_config(name, flags, speed, model_dir, json_path, work, steps, epochs, nproc=1, warmup_half=False, profile=0):
    """One train.py run. profile > 0 (with steps): that many more steps after the timed ones, recorded by
    torch.profiler (latexocr/profiling.py); their time is left out of samples/s, their summary returned."""
    out_dir = work / f"out_{name}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    cmd = [*launcher, str(ROOT / "train.py"), "--model-id", str(model_dir), "--model-source", "local",
           "--train-json", str(json_path), "--val-json", str(work / "no_val.json"), "--output-dir", str(out_dir),
           "--logging-steps", str(LOGGING_STEPS), "--save-steps", "100000", "--swanlab-mode", "disabled", *flags]
    profile = profile if steps > 0 else 0
    cmd += ["--max-steps", str(steps + profile)] if steps > 0 else ["--epochs", str(epochs)]
    cache = work / "compile_cache"  # latexocr/fast/compile.py: torch's compile caches live here
    if name.endswith("_cold"):
        shutil.rmtree(cache, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    # the configuration's choices after the caller's own (e.g. LATEXOCR_SPEED=fla_varlen=on): later names win
    speed = ",".join(filter(None, (os.environ.get("LATEXOCR_SPEED", ""), speed)))
    env.update(PYTHONUNBUFFERED="1", LATEXOCR_COMPILE_CACHE=str(cache), LATEXOCR_SPEED=speed)
    report = work / f"profile_{name}.json"
    report.unlink(missing_ok=True)
    if profile:
        env.update(LATEXOCR_PROFILE_STEPS=f"{steps + 1}:{steps + profile}", LATEXOCR_PROFILE_OUT=str(report))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    (work / f"log_{name}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:])
        return {"name": name, "error": f"exit {proc.returncode}"}
    logs = parse_logs(proc.stdout + proc.stderr)
    steps_logs = [l for l in logs if "samples_per_second" in l]
    if profile:  # the profiled steps' own log lines (slowed by the profiler) are not timed
        steps_logs = steps_logs[:steps // LOGGING_STEPS] or steps_logs
    # steady state: the first intervals include warm-up; compiled runs also compile and record a CUDA
    # graph for every new row shape early on, so for them only the second half of the run counts
    steady = steps_logs[len(steps_logs) // 2:] if warmup_half else steps_logs[2:]
    steady = steady or steps_logs
    final = next((l for l in reversed(logs) if "train_samples_per_second" in l), {})  # the end-of-training summary
    return {
        "name": name,
        "samples_per_s": statistics.median(l["samples_per_second"] for l in steady),
        "tokens_per_s": statistics.median(l.get("tokens_per_second", 0) for l in steady),
        "peak_gib": max(l.get("gpu_mem_peak_gib", 0) for l in steps_logs),
        "first_loss": next((l["loss"] for l in logs if "loss" in l), None),
        "last_loss": [l["loss"] for l in logs if "loss" in l][-1],
        "losses": [l["loss"] for l in logs if "loss" in l],
        "train_runtime_s": final.get("train_runtime"),
        "job_samples_per_s": final.get("train_samples_per_second"),  # the whole run: warm-up and compiling too
        "fast_path": next((line for line in proc.stdout.splitlines() if line.startswith("fast path:")), ""),
        # the path the linear-attention layers took (train.py's line for packed rows, or for padded batches)
        "linear_attention": next((line for line in proc.stdout.splitlines()
                                  if line.startswith("linear-attention layers:")), ""),
        "wall_s": wall,
        **({"profile": {k: v for k, v in json.loads(report.read_text()).items() if k != "busiest"},
            "profile_file": str(report)} if profile and report.exists() else {}),
    }


def beyond_steady(r: dict) -> float | None:
    """Seconds the whole run took beyond its samples at the steady speed: compiling and recording CUDA graphs
    (and, in a machine's first run, fla's Triton kernels building), the first steps' warm-up."""
    if not (r.get("train_runtime_s") and r.get("job_samples_per_s") and r.get("samples_per_s")):
        return None
    samples = r["job_samples_per_s"] * r["train_runtime_s"]
    return round(r["train_runtime_s"] - samples / r["samples_per_s"], 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--model", type=Path, help="an existing model folder (default: build a random-init 2B)")
    ap.add_argument("--qwen3-5-model", type=Path,
                    help="the qwen3_5* configurations' model folder (default: build a random-init Qwen3.5-2B)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench"))
    ap.add_argument("--samples", type=int, default=996)
    ap.add_argument("--configs", default="tutorial,default,default_500x100,no_packing,full_logits,grad_ckpt")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per configuration")
    ap.add_argument("--compiled-steps", type=int, default=80,
                    help="optimizer steps of the compiled configurations: their first steps compile the blocks "
                         "and record a CUDA graph per new row shape, so steady state comes later")
    ap.add_argument("--long-steps", type=int, default=None,
                    help="optimizer steps of the *_long configurations (default: the steps from which "
                         "compile=auto compiles Qwen3.5, latexocr/fast/compile.py)")
    ap.add_argument("--full", default="default", help="configurations run for the whole 996 x 2 epochs")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="> 0: each configuration (not --full) runs this many more steps after the timed ones, "
                         "recorded by torch.profiler: where a step's GPU time goes by kernel category "
                         "(latexocr/profiling.py), in the JSON and a table; the kernels in $OUT/profile_<config>.json")
    ap.add_argument("--nproc", type=int, default=1,
                    help="GPUs: > 1 runs train.py under torchrun (data-parallel, same global batch)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_train.json")
    a = ap.parse_args()
    a.shared = a.shared.resolve()
    if a.long_steps is None:
        from latexocr.fast.compile import COMPILE_FROM_STEPS_LINEAR_ATTENTION
        a.long_steps = COMPILE_FROM_STEPS_LINEAR_ATTENTION
    names = a.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration(s) {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    qwen3_5 = [n for n in names if n.startswith(QWEN3_5_PREFIX)]
    if not (a.shared / "qwen2vl-2b").exists() and (a.model is None or (qwen3_5 and a.qwen3_5_model is None)):
        sys.exit(f"{a.shared}/qwen2vl-2b not found: pass --shared or --model (and --qwen3-5-model)")
    if qwen3_5 and a.qwen3_5_model is None and not (a.shared / "qwen3_5-2b").exists():
        sys.exit(f"{a.shared}/qwen3_5-2b not found (configurations {', '.join(qwen3_5)}): pass --shared or "
                 "--qwen3-5-model")
    a.work.mkdir(parents=True, exist_ok=True)
    models = {}

    def model_for(name: str) -> Path:  # built once, on first use
        family = "qwen3_5" if name.startswith(QWEN3_5_PREFIX) else "qwen2vl"
        if family not in models:
            if family == "qwen3_5":
                models[family] = a.qwen3_5_model or build_random_qwen3_5(a.shared, a.work / "qwen3_5-2b-random")
            else:
                models[family] = a.model or build_random_model(a.shared, a.work / "qwen2vl-2b-random")
        return models[family]

    json_path = write_json(real_samples(a.shared), a.samples, a.work / "train.json")

    import torch
    import transformers
    import peft
    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    print(env, flush=True)
    results = []
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        (flags, speed, what), model_dir = CONFIGS[name], model_for(name)
        full = name in a.full.split(",")
        long = name.endswith("_long")
        compiles = "compile=on" in speed or name.endswith(("_cold", "_warm")) or long  # (auto compiles these)
        steps = 0 if full else (a.long_steps if long else a.compiled_steps if compiles else a.steps)
        r = run_config(name, flags, speed, model_dir, json_path, a.work, steps, 2, a.nproc, warmup_half=compiles,
                       profile=a.profile_steps)
        if "profile_file" in r:  # beside the JSON, where the device call brings $OUT back
            copy = a.out.parent / Path(r["profile_file"]).name
            if copy.resolve() != Path(r["profile_file"]).resolve():
                shutil.copy(r["profile_file"], copy)
        r["gpus"] = a.nproc
        if "error" not in r:
            flops, tokens = model_flops_per_sample(model_dir, json_path, flags)
            r["tokens_per_sample"] = tokens
            r["tflop_per_sample"] = flops / 1e12
            r["mfu"] = r["samples_per_s"] * flops / (PEAK_TFLOPS * 1e12)
            r["tutorial_workload_s"] = r["train_runtime_s"] if full else 2 * 996 / r["samples_per_s"]
            r["beyond_steady_s"] = beyond_steady(r)
        r["what"] = what
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
        a.out.write_text(json.dumps({"env": env, "results": results}, indent=1))

    base = next((r for r in results if r["name"] == "tutorial" and "error" not in r), None)
    print(f"\n{env}\n")
    print("| configuration | samples/s | × tutorial-eq. | tokens/s | MFU | peak GiB | 996×2 workload | loss first→last "
          "| s beyond steady (compiling, warm-up) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} |")
            continue
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.1f}×" if base else "-"
        print(f"| {r['name']} | {r['samples_per_s']:.1f} | {ratio} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f} % "
              f"| {r['peak_gib']:.1f} | {r['tutorial_workload_s']:.0f} s | {r['first_loss']:.3f}→{r['last_loss']:.3f} "
              f"| {r.get('beyond_steady_s') if r.get('beyond_steady_s') is not None else '-'} |")
    profiled = [r for r in results if "profile" in r]
    if profiled:  # where a step's time goes, by kernel category (the profiled steps after the timed ones)
        names = sorted({c for r in profiled for c in r["profile"]["categories"]},
                       key=lambda c: -max(r["profile"]["categories"].get(c, {"ms": 0})["ms"] for r in profiled))
        print(f"\n| configuration | ms a step ({profiled[0]['profile']['timed']}) | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for r in profiled:
            cats = r["profile"]["categories"]
            print(f"| {r['name']} | {r['profile']['ms_per_step']:.1f} | " + " | ".join(
                f"{cats[c]['ms']:.1f} ({cats[c]['share']:.0%})" if c in cats else "-" for c in names) + " |")
        # the host's side of the same steps (latexocr/profiling.py host_side): is the step bound by the host?
        print("\n| configuration | wall ms a step (profiled) | GPU busy | operators a step | launches a step | "
              "the GPU's idle gaps, by cause (ms a step) |\n|---|---|---|---|---|---|")
        for r in profiled:
            host, steps = r["profile"].get("host", {}), r["profile"]["steps"]
            causes = host.get("device_gaps", {}).get("by_cause_ms", {})
            busy = f"{host['device_busy_share']:.0%}" if "device_busy_share" in host else "-"
            print(f"| {r['name']} | {host.get('wall_ms_per_step', '-')} | {busy} | "
                  f"{host.get('aten_ops_per_step', '-')} | {host.get('launches_per_step', '-')} | "
                  + "; ".join(f"{c}: {v['ms'] / steps:.1f}" for c, v in list(causes.items())[:4]) + " |")
    runs = {r["name"]: r for r in results if "error" not in r}
    if "eager" in runs and "eager" in a.full.split(","):
        for name in ("default_cold", "default_warm"):
            if name in runs and name in a.full.split(","):
                r, e = runs[name], runs["eager"]
                worst = max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(r["losses"], e["losses"]))
                print(f"{name}: 996x2 training {r['train_runtime_s']:.1f} s vs eager {e['train_runtime_s']:.1f} s "
                      f"({e['train_runtime_s'] / r['train_runtime_s']:.2f}x), losses within {100 * worst:.2f} % "
                      f"of eager's; {r['fast_path']}")


if __name__ == "__main__":
    main()
