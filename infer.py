"""LaTeX from formula images with a fine-tuned checkpoint: one image, a folder/glob, or a labelled file.

    python infer.py formula.png                       # prints the LaTeX
    python infer.py images/ --output preds.csv        # every image of a folder -> CSV (or .jsonl)
    python infer.py latex_ocr_val.json                # labelled: predictions + metrics summary
    python infer.py latex_ocr_val.json --adapter none # the base model, for a before/after table
    python infer.py --merge-to merged/                # base + adapter as one plain model folder
    python infer.py --score preds.csv --report r.html # re-score a predictions file: no model, no GPU

The adapter is train.py's OUTPUT_DIR/final by default; its own saved LoRA config is used, and its
sample definition (latexocr_sample.json: image sizing, prompt), so no training flag needs repeating.
"""
# ---- settings: edit here, or pass as flags (MAX_NEW_TOKENS -> --max-new-tokens) ---------------
from latexocr.sample import DEFAULT_MAX_NEW_TOKENS

INPUT = "latex_ocr_val.json"  # an image, a folder, a glob ("imgs/*.png"), a .json/.jsonl (csv2json) or a .csv
MODEL_ID = "Qwen/Qwen2-VL-2B-Instruct"  # the base model: hub id or local folder (or a merged model)
MODEL_SOURCE = "modelscope"   # where MODEL_ID downloads from: modelscope | huggingface | local
OUTPUT_DIR = "output/Qwen2-VL-2B-LatexOCR"  # train.py's output folder
ADAPTER = "final"             # final (OUTPUT_DIR/final) | last (newest checkpoint) | a folder | none;
                              # a full model folder (train.py TUNE=full) is loaded in place of MODEL_ID
OUTPUT = ""                   # predictions file (.csv or .jsonl); default: print / <input>.predictions.csv
MAX_NEW_TOKENS = DEFAULT_MAX_NEW_TOKENS  # generation limit in tokens; the longest LaTeX_OCR label is ~223
LIMIT = 0                     # > 0: only the first N images
# ---- image sizing; None: the one saved with the model (latexocr_sample.json), else the default in brackets;
# a value given here or as a flag wins over the saved one, with a warning
IMAGE_MIN_PIXELS: int = None  # lower image area bound in pixels, aspect ratio kept [32*28*28]
IMAGE_MAX_PIXELS: int = None  # upper area bound in pixels [512*28*28]
IMAGE_SIZE: str = None        # "500x100": one fixed size in pixels for every image, "" keeps aspect [""]
# ---- memory and hardware
BATCH_SIZE: int = "auto"      # images per generation batch; auto: as many as fit the GPU's free memory
                              # (at most 512; measured, latexocr/memory.py), 512 on a CPU
NUM_WORKERS: int = "auto"     # processes loading and encoding images ahead of generation; auto: half the CPU
                              # cores, 2 to 8 (one H200's loop takes ~450 images/s, a worker core makes ~340)
DTYPE = "auto"                # weights and compute: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
QUANTIZATION = "none"         # none | 4bit: the base as a QLoRA adapter was trained on (train.py QUANTIZATION)
# ---- other jobs and outputs
REPORT = ""                   # also write one self-contained HTML page (images, rendered formulas, scores)
MERGE_TO = ""                 # write base+adapter merged (with processor files) to this folder and stop
SCORE = ""                    # re-score this predictions file (--output's CSV/JSONL: image, prediction, label)
                              # and stop: the metrics summary (and --report) without loading any model
SWANLAB_MODE = "disabled"     # log this evaluation to SwanLab: auto | cloud | local | offline | disabled;
                              # local and offline runs go to $SWANLAB_LOG_DIR, else ./swanlog
SWANLAB_PROJECT = "Qwen2-VL-LatexOCR"  # SwanLab project name
PROFILE = False               # print one line on stderr at the end: seconds per phase, start-up to metrics
                              # (latexocr/timing.py; docs/BENCHMARKS.md "infer.py end to end")
# The attention implementation and other speed choices are the code's: latexocr/fast/choices.py.
SETTINGS = {k: v for k, v in dict(globals()).items() if k.isupper() and not k.startswith("DEFAULT_")}
# -----------------------------------------------------------------------------------------------

import csv
import glob
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def collect_inputs(spec: str) -> tuple[list[str], list[str | None], bool]:
    """(image paths, labels or None, labelled?) for an image, folder, glob or labelled file.

    Stops with one line when the input does not exist, does not parse or has no usable image:
    main() calls it before any model is loaded or downloaded.
    """
    from latexocr.records import LabelledFileError, check_usable, read_labelled

    path = Path(spec)
    if path.is_file() and path.suffix.lower() in {".json", ".jsonl", ".csv"}:
        try:
            pairs = read_labelled(path)
            check_usable(spec, pairs, need_label=False)
        except LabelledFileError as exc:
            raise SystemExit(f"error: {exc}") from None
        return [p for p, _ in pairs], [t for _, t in pairs], True
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = [str(path)]
    else:
        files = sorted(glob.glob(spec, recursive=True))
    if not files:
        raise SystemExit(f"no images found at {spec!r} (an image, a folder, a glob or a labelled .json/.csv)")
    try:
        check_usable(spec, [(f, None) for f in files], need_label=False)
    except LabelledFileError as exc:
        raise SystemExit(f"error: {exc}") from None
    return files, [None] * len(files), False


def write_rows(rows: list[dict], out: Path) -> None:
    """CSV or JSONL (by suffix), via a temp file renamed at the end: never half-written."""
    from latexocr.io import atomic_open

    with atomic_open(out, "w", encoding="utf-8", newline="") as f:
        if out.suffix.lower() == ".jsonl":
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)


def load_for_inference(args, before_model=None, clock=None):
    """(model, processor, trained folder or None) of base + adapter, or of a fully fine-tuned model folder.
    before_model(processor, base folder, adapter): called once the processor is loaded, before the model
    (load_with_sample sets up the samples there, and infer.py starts its image loader, overlapping the load).
    clock: a latexocr.timing.Stopwatch that gets the parts of its "model load" phase (--profile)."""
    import torch
    from latexocr.modeling import (find_adapter, is_full_model, load_model, load_processor, peft_wrapping, pick_dtype,
                                   quantization_config, resolve_model)
    from latexocr.fast import prepare_model, speed_choices
    from latexocr.timing import Stopwatch

    adapter = find_adapter(args.adapter, args.output_dir)
    full = adapter is not None and is_full_model(adapter)  # train.py TUNE=full: the model itself, no adapter
    base = adapter if full else resolve_model(args.model_id, args.model_source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = pick_dtype(args.dtype)
    speed = speed_choices()  # the attention implementation and packed vision attention: latexocr/fast/choices.py
    # Prefer the processor saved with the adapter (what training used), else the base model's.
    # transformers >= 5 saves it as processor_config.json, older versions as preprocessor_config.json.
    saved = adapter and any(Path(adapter, f).exists() for f in ("processor_config.json", "preprocessor_config.json"))
    clock = clock or Stopwatch()
    with clock.part("model load", "processor"):
        processor = load_processor(adapter if saved else base)
    if before_model is not None:
        before_model(processor, base, adapter)
    with clock.part("model load", "weights"):
        model = load_model(base, dtype, speed.attention, device_map=device,
                           quantization=quantization_config(args.quantization, dtype))
    with clock.part("model load", "speed setup"):
        # process-wide: cuDNN's attention off, TF32 on (CUDA); the vision tower's attention packed (sdpa)
        prepare_model(model, speed)
    if full:
        print(f"model: {adapter} (fully fine-tuned, no adapter)", file=sys.stderr)
    elif adapter:
        with clock.part("model load", "adapter"):
            from peft import PeftModel
            with peft_wrapping():
                # not peft's low_cpu_mem_usage=True: it gave a 4-bit model's LoRA matrices the file's values
                # rounded to bf16 (peft 0.21.2), so infer.py scored another adapter than train.py had evaluated
                # (tests/test_modes.py test_qlora_4bit_trains_and_reloads, tests/test_infer.py)
                model = PeftModel.from_pretrained(model, adapter)  # its adapter_config.json
        # merged in memory, as --merge-to does without writing: the adapted projections then cost one matmul
        # each, not peft's four more kernels (a decode step is bound by its kernel count). A 4-bit model keeps
        # the adapter beside it: merging into NF4 would round the adapter away.
        merged = args.quantization == "none" and speed.merge_adapter
        if merged:
            with clock.part("model load", "merge"):
                model = model.merge_and_unload()
        print(f"adapter: {adapter}{' (merged into the weights for inference)' if merged else ''}", file=sys.stderr)
    else:
        print("adapter: none (base model)", file=sys.stderr)
    model.eval()
    return model, processor, adapter


def rescore(args) -> None:
    """infer.py --score: the metrics summary (and --report) of a predictions file, as the live run
    that wrote it printed them; no model, no torch."""
    from latexocr.latex import start_katex
    from latexocr.metrics import worst_first
    from latexocr.scoring import PredictionsFileError, Scorer, available_cores, read_predictions, scored_summary

    # no GPU to feed: this process scores the rows while one KaTeX child per core parses (~7/8 of the work);
    # the children start first, while this process reads the file
    katex_processes = min(4, available_cores())
    start_katex(katex_processes)
    try:
        rows = read_predictions(args.score)
    except PredictionsFileError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.limit > 0:
        rows = rows[: args.limit]
    with Scorer(0, katex_processes=katex_processes) as scorer:
        scorer.submit(range(len(rows)), [(r["prediction"], r["label"], r.get("truncated", False)) for r in rows])
        rows, summary = scored_summary(scorer, rows, truncated=all("truncated" in r for r in rows))
    print(json.dumps({"predictions": args.score, **summary}, indent=2))
    if args.report:
        from latexocr.report import write_report
        page = write_report(worst_first(rows), args.report, summary, title=f"{Path(args.score).name}: re-scored")
        print(f"report: {page}")


def load_with_sample(args, prefetch=None, clock=None):
    """(model, processor, adapter, sample encoder, sample definition, prefetch's answer): the model, and its
    samples shown as it was trained: the sizing and prompt saved with the adapter (else with a local model
    folder: a merged model), unless settings say otherwise. prefetch(encoder): called with the sample
    encoder and the model's config before the model loads (main: the image loader's workers start there)."""
    from latexocr.sample import setup_sample
    from latexocr.timing import Stopwatch
    sample, clock = {}, clock or Stopwatch()

    def before_model(processor, base, adapter):
        with clock.part("model load", "config + sample"):
            from transformers import AutoConfig
            trained = adapter or (args.model_id if Path(args.model_id).expanduser().is_dir() else None)
            config = AutoConfig.from_pretrained(base)  # the model's config, read before its weights
            sample["encoder"], sample["definition"] = setup_sample(processor, args, config.model_type, trained,
                                                                   note_if_missing=adapter is not None)
        with clock.part("model load", "loader start"):
            sample["prefetched"] = prefetch(sample["encoder"], config) if prefetch is not None else None

    model, processor, adapter = load_for_inference(args, before_model, clock)
    return model, processor, adapter, sample["encoder"], sample["definition"], sample["prefetched"]


def merge(args) -> None:
    """infer.py --merge-to: base + adapter written as one plain model folder."""
    from latexocr.sample import SAMPLE_FILE, write_sample_definition

    if args.adapter in ("none", ""):  # before any model is loaded or downloaded
        raise SystemExit("--merge-to needs an adapter (got --adapter none)")
    if args.quantization != "none":
        raise SystemExit("--merge-to merges into the full-precision base: leave --quantization none")
    model, processor, _, encoder, definition, _ = load_with_sample(args)
    # a fully fine-tuned model (or an adapter load_for_inference merged) is already one plain model
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(args.merge_to)
    processor.save_pretrained(args.merge_to)  # resizes as training did (setup_sample set its bounds)
    write_sample_definition(args.merge_to, definition)
    if encoder.sizing.fixed:
        w, h = encoder.sizing.target_size(1, 1)
        print(f"warning: trained at a fixed {args.image_size} (sent as {w}x{h}), which a plain AutoProcessor "
              f"cannot express: resize images to {w}x{h} before its processor, or use infer.py "
              f"(it reads {Path(args.merge_to) / SAMPLE_FILE})", file=sys.stderr)
    print(f"merged model written to {args.merge_to}; load it with AutoModelForImageTextToText / "
          f"AutoProcessor.from_pretrained, or pass it as --model-id with --adapter none")


def main(argv=None):
    from latexocr.cli import parse_settings, started_as_command

    # The input may also be given positionally: python infer.py image.png
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--input", argv[0]] + argv[1:]
    args = parse_settings(SETTINGS, __doc__, argv)
    if args.score:  # before anything imports torch
        return rescore(args)

    from latexocr.timing import Stopwatch
    clock = Stopwatch()
    with clock.phase("imports"):  # its parts: what --profile's "time, imports" line splits it into
        with clock.part("imports", "torch"):
            import torch  # noqa: F401
        with clock.part("imports", "transformers"):
            import transformers  # noqa: F401
        # latexocr's own imports pull in torch.nn.attention.varlen, which imports torch's compiler (dynamo)
        with clock.part("imports", "latexocr"):
            from latexocr.generation import default_loader_workers, predict
            from latexocr.memory import parse_auto
            from latexocr.metrics import worst_first
            from latexocr.scoring import Scorer, default_workers, scored_summary
    if started_as_command(__file__):  # a process of its own: no 4-bit model, no bitsandbytes (~2 s, run AH)
        from latexocr.fast.imports import leave_out_bitsandbytes
        leave_out_bitsandbytes(args.quantization)

    if not args.merge_to:  # the input is read and checked before any model is loaded or downloaded
        with clock.phase("read inputs"):
            images, labels, labelled = collect_inputs(args.input)
        if args.limit > 0:
            images, labels = images[: args.limit], labels[: args.limit]
        if args.output:
            from latexocr.io import check_writable
            problem = check_writable(Path(args.output).resolve().parent)
            if problem:
                raise SystemExit(f"error: {problem}")
    batch_size = parse_auto(args.batch_size, "BATCH_SIZE")  # auto (None) or a number: checked before any model loads
    workers = parse_auto(args.num_workers, "NUM_WORKERS", minimum=0)  # 0: images loaded in this process
    if not args.merge_to:  # a wrong value or missing bitsandbytes: said now, not after the model has loaded
        import torch
        from latexocr.modeling import quantization_config
        quantization_config(args.quantization, torch.bfloat16)
    if args.merge_to:
        return merge(args)

    # Labelled: the scoring workers start before the model loads (their start-up overlaps the loading),
    # then score each batch's rows while the next batch generates.
    with clock.phase("scoring start"):
        scorer = Scorer(default_workers(rows=len(images)) if labelled else 0)
    with scorer:
        # the image loader's workers start once the sample encoder is known, before the model loads: the
        # first prefill chunks are ready when the model is (run U: 0.85-1.24 s of waiting after it)
        prefetch = None
        loader_workers = default_loader_workers() if workers is None else workers
        if loader_workers != 0:
            from latexocr.generation import Prefetch, pinned_chunks
            from latexocr.modeling import pick_dtype

            def prefetch(encoder, config):
                return Prefetch(encoder, images, loader_workers, pick_dtype(args.dtype), pinned_chunks(config))
        with clock.phase("model load"):
            model, _, adapter, encoder, _, prefetched = load_with_sample(args, prefetch, clock)

        def score_batch(indices, results):
            scorer.submit(indices, [(r["prediction"], labels[i], r["truncated"]) for i, r in zip(indices, results)])

        results = predict(model, encoder, images, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                          num_workers=loader_workers,
                          progress=len(images) > 1, prefetched=prefetched,
                          on_batch=score_batch if labelled else None, stopwatch=clock)
        rows = [{"image": image, "prediction": result["prediction"], "error": result["error"] or ""}
                for image, result in zip(images, results)]
        summary = None
        if labelled:
            with clock.phase("scoring wait"):  # the rows still being scored after the last batch
                rows, summary = scored_summary(scorer, [{**row, "label": label} for row, label in zip(rows, labels)])
                scorer.close()  # its workers' shut-down too
        else:
            rows = [{**row, "truncated": result["truncated"]} for row, result in zip(rows, results)]
    errors = [r for r in rows if r["error"]]
    for r in errors:
        print(f"error: {r['image']}: {r['error']}", file=sys.stderr)

    if len(rows) == 1 and not labelled and not args.output and not args.report:
        if rows[0]["prediction"] is None:
            sys.exit(1)
        print(rows[0]["prediction"])
        return

    out = Path(args.output) if args.output else Path(f"{Path(args.input).with_suffix('')}.predictions.csv"
                                                    if Path(args.input).is_file() else "predictions.csv")
    with clock.phase("write"):
        write_rows(rows, out)
    print(f"{len(rows)} predictions ({len(errors)} errors) written to {out}")
    if labelled:
        print(json.dumps({"adapter": adapter or "none", **summary}, indent=2))
        if args.swanlab_mode != "disabled":
            from latexocr.tracking import Tracker, run_name
            tracker = Tracker(args.swanlab_mode, args.swanlab_project, run_name(adapter, args.input),
                              config=vars(args))
            tracker.log({f"infer/{k}": v for k, v in summary.items()})
            tracker.log_predictions([r for r in rows if not r["error"]], key="infer/predictions")
            tracker.log_worst(rows, key="infer/worst")
            tracker.finish()
    if args.report:
        from latexocr.report import write_report
        with clock.phase("report"):
            page = write_report(worst_first(rows) if labelled else rows, args.report, summary,
                                title=f"{Path(args.input).name}: adapter {adapter or 'none'}")
        print(f"report: {page}")
    if args.profile:
        print(clock.lines(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
    # Everything is printed and written by now (files closed, loader and scoring processes joined); what is
    # left is the interpreter tearing torch and transformers down, ~1.5 s a user waits for after the
    # metrics (docs/BENCHMARKS.md, "infer.py end to end"): skipped. Not after a SwanLab run, whose client
    # may still have work for its exit hooks.
    from latexocr.cli import started_as_command
    if started_as_command(__file__) and "swanlab" not in sys.modules:
        import os
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
