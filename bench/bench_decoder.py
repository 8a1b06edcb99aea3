"""Decide the decoder by measurement (issue 32): latexocr's static-cache loop against transformers' own
`generate(cache_implementation="static")` with its compiled decode step, on one card, the same inputs and
batch sizes; and the loop's compaction on and off with rows that stop where real predictions stop.

    python bench/bench_decoder.py                # GPU: random-init Qwen2-VL-2B, full_val's real images
    python bench/bench_decoder.py --tiny         # CPU: a tiny random model in fp32, the tokens agree (~1 min)

Every measurement decodes the same --images real images (../shared/latex_ocr/full_val, cycled), sorted
by image area as infer.py sorts them, in batches of one size, from batches encoded beforehand on the
host: prefill + decode + the copy to the GPU are timed, the DataLoader and detokenising are not (engine
speed alone). Warm-up first: ours one pass over every batch (each (rows, cache length) CUDA graph
captured), the library one batch (its torch.compile; compile_s = that batch - a timed batch).

  ours      latexocr.fast.decoding.StaticDecoder, infer.py's engine (CUDA-graph decode step)
  library   model.generate(cache_implementation="static", compile_config=CompileConfig(...)): transformers
            compiles the one-token forward (mode reduce-overhead: CUDA graphs) when the cache is static;
            its static cache is sized once per cap (max_cache_len = longest prompt of the data + cap),
            so every batch of a size replays one graph (dynamic=False: one compile per batch size and
            cap); M-RoPE positions come from generate's own get_rope_index call, once per batch.
  @cap      every row generates exactly --new-tokens (min = max, default 64): engine speed alone
  @labels   each row says <|im_end|> at the step where its real label's tokens end, under
            --labels-cap (default 256, infer.py's; full_val's longest label is 200 tokens, half are
            over 64): the end-of-turn logit is the only finite one at that step, so the stop goes
            through each engine's own stop handling (ours: the stop check every 8 tokens and, with
            compaction on, the move to a smaller batch; generate: its stopping criteria)

  /compiled ours@cap/compiled, ours@labels/compiled (not in the default --runs): ours with its step
            through torch.compile (LATEXOCR_SPEED=decode_compile=on), the compile in its warm-up; the decision
            table gives compiled / eager, and how many rows' tokens the two agree on

Batch sizes: 512 (infer.py's default), auto (what infer.py's BATCH_SIZE=auto picks: fit_rows, capped at
MAX_GENERATION_ROWS) and card (the same memory fit uncapped, at most --images); duplicates measured once.

One JSON object per line on stdout and appended to $OUT/bench_decoder.jsonl as each measurement
finishes (a cut run keeps what finished), then the decision table. The rule (issue 32): the library
within 1.3x of ours -> delete ours; compaction stays only if it measures faster.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

from common import DEFAULT_SHARED, build_random_model, full_val_samples

RULE = 1.3  # ours must be faster than the library by more than this to keep its lines
LIBRARY_RUN_S, OUR_RUN_S = 150, 40  # what one run may take on an H200 at 2,048 images, compile included
RUNS = ("ours@cap", "library@cap", "ours@labels", "ours@labels/no-compaction", "library@labels")
# ours with its step through torch.compile (LATEXOCR_SPEED=decode_compile=on; the warm-up holds the compile)
COMPILED_RUNS = ("ours@cap/compiled", "ours@labels/compiled")
MODES = ("cap", "labels", "labels/no-compaction", "cap/compiled", "labels/compiled")


def make_label_stops(decoder_cls):
    """StaticDecoder whose rows emit <|im_end|> at given steps (see the module docstring, @labels)."""
    import torch

    class LabelStops(decoder_cls):
        def __init__(self, *args, max_rows: int, **kwargs):
            super().__init__(*args, **kwargs)
            # indexed by a row's place in its batch (state.origin, which follows the rows through
            # compaction); -1 never; the last entry is the scratch row of compaction's padding rows
            self.stop_at = torch.full((max_rows + 1,), -1, dtype=torch.long, device=self.device)
            self.origin = None
            self.forced = None

        def set_stops(self, stops: list[int]) -> None:
            self.stop_at.fill_(-1)
            self.stop_at[:len(stops)] = torch.tensor(stops, device=self.device)

        def _state(self, rows, length):
            s = super()._state(rows, length)
            self.origin = s.origin
            return s

        def _step(self, s):
            self.origin = s.origin  # buffers fixed per shape: the CUDA graph reads them in place
            super()._step(s)

        def _pick(self, logits, step, finished):
            if self.forced is None or self.forced.shape[-1] != logits.shape[-1]:
                self.forced = torch.full((1, logits.shape[-1]), float("-inf"), device=self.device)
                self.forced[0, self.stop_ids[0]] = 0.0
            force = (self.stop_at[self.origin] == step)[:, None]
            return super()._pick(torch.where(force, self.forced, logits.float()), step, finished)

    return LabelStops


def make_force_stops(prompt_length: int, stops, eot: int, vocab: int, device):
    """A logits processor for generate doing what LabelStops does."""
    import torch
    from transformers import LogitsProcessor

    class ForceStops(LogitsProcessor):
        def __init__(self):
            self.stop_at = torch.tensor(stops, device=device)
            self.forced = torch.full((1, vocab), float("-inf"), device=device)
            self.forced[0, eot] = 0.0

        def __call__(self, input_ids, scores):
            force = (self.stop_at == input_ids.shape[1] - prompt_length)[:, None]
            return torch.where(force, self.forced.to(scores.dtype), scores)

    return ForceStops()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--model", type=Path, help="a model folder (default: random-init Qwen2-VL-2B, built once)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Qwen2-VL in fp32 (CPU check: tokens equal)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench"))
    ap.add_argument("--images", type=int, help="images per measurement, rounded to whole batches (default 2048; "
                                                   "--tiny: 12)")
    ap.add_argument("--new-tokens", type=int, help="the cap (default 64, as bench_infer.py; --tiny: 8)")
    ap.add_argument("--batch-sizes", help="comma-separated numbers, auto, card (default 512,auto,card; --tiny: 4,card)")
    ap.add_argument("--labels-cap", type=int, help="max new tokens of the @labels runs (default 256, infer.py's; "
                                                       "--tiny: 128): every real label of full_val ends before it")
    ap.add_argument("--runs", default=",".join(RUNS), help="which measurements (run in this order: ours, then the library's @cap, then its @labels)")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="CompileConfig.mode for the library path")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="compile the library's decode step: auto = on a GPU (generate's own rule); on = on a CPU "
                         "too (mode default: checks the compiled path's tokens, slowly)")
    ap.add_argument("--time-limit-s", type=float,
                    help="skip a run that could end past this many seconds from the start (a library run is "
                         f"counted as {LIBRARY_RUN_S} s, ours as {OUR_RUN_S} s), so the table still prints (default 570; "
                         "--tiny: none)")
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers encoding the batches beforehand")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_decoder.jsonl")
    a = ap.parse_args()
    started = time.perf_counter()
    defaults = dict(images=12, new_tokens=8, labels_cap=128, batch_sizes="4,card", time_limit_s=float("inf")) \
        if a.tiny else dict(images=2048, new_tokens=64, labels_cap=256, batch_sizes="512,auto,card", time_limit_s=570)
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    a.shared = a.shared.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("")

    import torch
    import transformers
    from torch.utils.data import DataLoader
    from transformers import CompileConfig, LogitsProcessorList

    from latexocr import generation
    from latexocr.batching import SampleEncoder
    from latexocr.fast import StaticDecoder
    from latexocr.fast import plain_text_attention, prepare_model
    from latexocr.modeling import load_model, load_processor, pick_dtype
    from latexocr.sample import sizing_for

    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    if a.tiny:
        from latexocr.testing import build_tiny_model
        model_dir = a.model or a.work / "tiny-qwen2vl"
        if not (model_dir / "config.json").exists():
            build_tiny_model(model_dir, "qwen2_vl")
        dtype = torch.float32
    else:
        model_dir = a.model or build_random_model(a.shared, a.work / "qwen2vl-2b-random")
        dtype = pick_dtype("auto")
    t0 = time.perf_counter()
    model = prepare_model(load_model(str(model_dir), dtype, "sdpa", device_map=device)).eval()
    processor = load_processor(str(model_dir))
    encoder = SampleEncoder(processor, sizing_for(processor))
    tok = encoder.tokenizer
    stop_ids = [encoder.end_of_turn_id] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    eot, pad = encoder.end_of_turn_id, tok.pad_token_id
    vocab = model.get_output_embeddings().weight.shape[0]
    cap = a.new_tokens

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        with a.out.open("a") as f:
            f.write(line + "\n")

    env = {"env": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                   "transformers": transformers.__version__, "model": str(model_dir), "dtype": str(dtype),
                   "new_tokens": cap, "images": a.images, "load_s": round(time.perf_counter() - t0, 1)}}
    emit(env)

    pairs = full_val_samples(a.shared)
    order = generation._size_order([p for p, _ in pairs])
    pairs = [pairs[i] for i in order]  # by area, as predict() sorts; cycling keeps whole batches similar

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def resolve(spec: str) -> int:
        if spec not in ("auto", "card"):
            return int(spec)
        largest = [p for p, _ in pairs[-generation.PREFILL_CHUNK_ROWS:]]
        limit = generation.MAX_GENERATION_ROWS
        if spec == "card":  # the same memory fit, without infer.py's cap (at most --images: one batch)
            generation.MAX_GENERATION_ROWS = a.images
        try:
            rows, why, _ = generation.fit_rows(model, encoder, largest, cap, static=True)
        finally:
            generation.MAX_GENERATION_ROWS = limit
        emit({"batch": spec, "rows": rows, "why": why})
        return rows

    sizes = []
    for spec in a.batch_sizes.split(","):
        rows = resolve(spec.strip())
        if rows not in sizes:
            sizes.append(rows)

    def encoded(n: int, batch: int, static: bool):
        """The first n images (cycled) as predict() encodes them: per batch, 128-row prefill chunks with
        their positions (ours) or one left-padded batch (generate); with each row's label length in
        tokens (the step at which it says <|im_end|>)."""
        chosen = [pairs[i % len(pairs)] for i in range(n)]
        # chosen is sorted within each cycle; sort once more so batches hold similar sizes, as predict's do
        chosen.sort(key=lambda pair: order_key[pair[0]])
        loader = DataLoader(generation._Images([p for p, _ in chosen], encoder.sizing), batch_size=batch,
                            num_workers=0 if a.tiny else a.workers,
                            collate_fn=generation._Collate(encoder, generation.PREFILL_CHUNK_ROWS if static else None,
                                                           static))
        batches = []
        for indices, failed, chunks in loader:
            if failed:
                raise SystemExit(f"unreadable images: {failed[:3]}")
            stops = [len(encoder.answer_ids(chosen[i][1])) - 1 for i in indices]
            batches.append((chunks, stops))
        return batches

    order_key = {p: i for i, (p, _) in enumerate(pairs)}
    # the library's static cache: one length for every call (the longest prompt of the data + the cap),
    # so every batch of a size replays one compiled graph; the prompt length from the image header
    longest_prompt = max(encoder.prompt_text_tokens + encoder.image_tokens(*image_size(p)) for p, _ in pairs)

    def ours(batches, decoder, limit: int | None):
        """limit None: every row to the cap; else rows stop at their label's end (labels >= limit: at it)."""
        out = []
        for chunks, stops in batches:
            if limit is not None:
                decoder.set_stops([t if t < limit else -1 for t in stops])
            tokens, _ = decoder.generate([c.to(device) for c in chunks])
            out.append(tokens)
        return out

    # static shapes: one graph per (batch, cache length), the fastest kernels
    compile_config = None
    if a.compile == "on" or (a.compile == "auto" and device == "cuda"):
        compile_config = CompileConfig(mode=a.compile_mode if device == "cuda" else "default", dynamic=False)
        compile_config._compile_all_devices = device != "cuda"  # generate compiles on a GPU only, unless told

    def library(batches, limit: int, at_cap: bool):
        out = []
        for (batch,), stops in batches:
            batch = batch.to(device)
            width = batch["input_ids"].shape[1]
            if width > longest_prompt:
                raise SystemExit(f"a prompt of {width} tokens, longer than the {longest_prompt} computed beforehand")
            extra = {}
            if not at_cap:
                stops = [t if t < limit else -1 for t in stops]
                extra["logits_processor"] = LogitsProcessorList([make_force_stops(width, stops, eot, vocab, device)])
            if compile_config is not None:
                extra["compile_config"] = compile_config
            else:
                extra["disable_compile"] = True
            sequences = model.generate(**batch, max_new_tokens=limit, min_new_tokens=limit if at_cap else 0,
                                       do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                       eos_token_id=stop_ids, pad_token_id=pad, use_cache=True,
                                       cache_implementation="static", max_cache_len=longest_prompt + limit, **extra)
            new = sequences[:, width:].cpu()
            out.append(torch.nn.functional.pad(new, (0, limit - new.shape[1]), value=pad))
        return out

    def timed(fn, batches, warm_batches: int, *args):
        """(warm-up s, timed s, tokens per batch) of fn over all batches, after warm_batches of them."""
        sync()
        t0 = time.perf_counter()
        fn(batches[:warm_batches], *args)
        sync()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = fn(batches, *args)
        sync()
        return warm, time.perf_counter() - t0, tokens

    def made(tokens) -> float:
        """Mean new tokens per row up to and including its stop token."""
        total = rows = 0
        for t in tokens:
            stop = torch.isin(t, torch.tensor(stop_ids))
            first = torch.where(stop.any(1), stop.int().argmax(1) + 1, torch.full((t.shape[0],), t.shape[1]))
            total, rows = total + int(first.sum()), rows + t.shape[0]
        return total / rows

    # Order: our runs first (seconds each), then the library's (a compile each): its @cap runs before
    # its @labels ones, because generate's static cache only grows within a process (it keeps the
    # longest length used, so as not to recompile) and @labels needs the longer one. A run that
    # would pass --time-limit-s is skipped, so the decision table still prints inside the lead's call.
    runs = a.runs.split(",")
    for run in runs:
        engine, _, mode = run.partition("@")
        if engine not in ("ours", "library") or mode not in MODES or (engine == "library" and "/" in mode):
            raise SystemExit(f"--runs: unknown run {run!r}; the runs are {RUNS + COMPILED_RUNS}")
    plan = ([(rows, run) for rows in sizes for run in runs if run.startswith("ours")]
            + [(rows, run) for mode in ("cap", "labels") for rows in sizes for run in runs
               if run == f"library@{mode}"])
    encodings = {}  # (rows, ours?) -> batches, encoded once
    results, outputs = {}, {}  # (run, rows) -> images/s, tokens
    disagreements = []
    for rows, run in plan:
        engine, _, mode = run.partition("@")
        elapsed = time.perf_counter() - started
        if elapsed + (LIBRARY_RUN_S if engine == "library" else OUR_RUN_S) > a.time_limit_s:
            emit({"run": run, "rows": rows, "skipped": f"{elapsed:.0f} s elapsed, --time-limit-s {a.time_limit_s}"})
            continue
        static, at_cap = engine == "ours", mode.startswith("cap")
        limit = cap if at_cap else a.labels_cap
        n = rows * max(1, round(a.images / rows))
        if (rows, static) not in encodings:
            encodings[(rows, static)] = encoded(n, rows, static)
        batches = encodings[(rows, static)]
        gc.collect()  # the last run's decoder, its buffers and graphs
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            # the library's path runs under generate's own no_grad: inference tensors are not what
            # its compiled, CUDA-graph-replayed step is used with
            with torch.inference_mode(static), plain_text_attention(model):
                if static:
                    # warm-up: every batch once, so each (rows, cache length) graph is captured,
                    # compaction's smaller ones included
                    options = dict(compaction="no-compaction" not in mode, compiled=mode.endswith("/compiled"))
                    decoder = (StaticDecoder(model, stop_ids, pad, limit, limit, **options) if at_cap else
                               make_label_stops(StaticDecoder)(model, stop_ids, pad, limit, max_rows=rows, **options))
                    warm, dt, tokens = timed(ours, batches, len(batches), decoder, None if at_cap else limit)
                    del decoder
                else:  # warm-up: one batch (the compile); the cache's shape is the same in every call
                    warm, dt, tokens = timed(library, batches, 1, limit, at_cap)
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            emit({"run": run, "rows": rows, "error": f"out of memory: {str(exc)[:200]}"})
            continue
        record = {"run": run, "rows": rows, "images": n, "max_new_tokens": limit, "images_per_s": round(n / dt, 1),
                  "seconds": round(dt, 2), "warmup_s": round(warm, 1), "mean_new_tokens": round(made(tokens), 1),
                  "elapsed_s": round(time.perf_counter() - started)}
        if not at_cap:
            lengths = [t for _, stops in batches for t in stops]
            record["rows_stopping_before_the_cap"] = round(sum(t < limit for t in lengths) / len(lengths), 3)
        if engine == "library":
            record["compile_s"] = round(warm - dt / len(batches), 1)
        if device == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        results[(run, rows)] = n / dt
        outputs[(run, rows)] = tokens
        emit(record)
        # the same inputs give the same greedy tokens? (fp32: all rows; bf16: batch shapes differ, a few may not)
        other = outputs.get((f"{'library' if static else 'ours'}@{'cap' if at_cap else 'labels'}", rows))
        if run in ("library@cap", "library@labels", "ours@cap", "ours@labels") and other is not None:
            same = identical_rows(tokens, other, stop_ids)
            emit({"agreement": mode, "rows": rows, "identical_rows": sum(same), "of": len(same)})
            if dtype == torch.float32 and not all(same):
                disagreements.append(f"{mode} at {rows} rows: {len(same) - sum(same)} of {len(same)}")
        eager = outputs.get((run.removesuffix("/compiled"), rows)) if run.endswith("/compiled") else None
        if eager is not None:  # the compiled step's tokens against the eager step's (bf16: fused rounding may differ)
            same = identical_rows(tokens, eager, stop_ids)
            emit({"agreement": f"{mode} vs eager", "rows": rows, "identical_rows": sum(same), "of": len(same)})

    table = decision(results, sizes)
    emit({"decision": table})
    print_table(table)
    if disagreements:  # fp32: the two engines must give the same greedy tokens
        raise SystemExit(f"the library's tokens differ from ours in fp32: {'; '.join(disagreements)}")


def image_size(path: str) -> tuple[int, int]:
    from PIL import Image
    with Image.open(path) as im:
        return im.size


def identical_rows(tokens, other, stop_ids) -> list[bool]:
    """Per row of two runs' batches of tokens: the same tokens up to the first stop?"""
    return [row_tokens(m, stop_ids) == row_tokens(t, stop_ids) for mb, tb in zip(tokens, other) for m, t in zip(mb, tb)]


def row_tokens(row, stop_ids) -> list[int]:
    """A row's tokens up to and including its first stop token."""
    out = []
    for t in row.tolist():
        out.append(t)
        if t in stop_ids:
            break
    return out


def decision(results: dict, sizes: list[int]) -> list[dict]:
    table = []
    for rows in sizes:
        get = lambda run: results.get((run, rows))  # noqa: E731
        entry = {"rows": rows, **{run: round(v, 1) for (run, r), v in results.items() if r == rows}}
        if get("ours@cap") and get("library@cap"):
            ratio = get("library@cap") / get("ours@cap")
            entry["library/ours @cap"] = round(ratio, 3)
            entry["decoder"] = "delete ours" if ratio * RULE >= 1 else "keep ours"
        if get("ours@labels") and get("library@labels"):
            entry["library/ours @labels"] = round(get("library@labels") / get("ours@labels"), 3)
        for mode in ("cap", "labels"):
            if get(f"ours@{mode}") and get(f"ours@{mode}/compiled"):
                entry[f"decode_compile on/off @{mode}"] = round(get(f"ours@{mode}/compiled") / get(f"ours@{mode}"), 3)
        if get("ours@labels") and get("ours@labels/no-compaction"):
            gain = get("ours@labels") / get("ours@labels/no-compaction")
            entry["compaction on/off"] = round(gain, 3)
            entry["compaction"] = "keep" if gain > 1 else "delete"
        table.append(entry)
    verdicts = {entry["decoder"] for entry in table if "decoder" in entry}
    if verdicts:
        table.append({"decoder, every batch size": verdicts.pop() if len(verdicts) == 1 else "mixed: see each size"})
    return table


def print_table(table: list[dict]) -> None:
    print(f"\ndecision (images/s; rule: library within {RULE}x of ours -> delete ours; compaction stays only if "
          "faster)")
    for entry in table:
        print("  " + "  ".join(f"{k}={v}" for k, v in entry.items()), flush=True)


if __name__ == "__main__":
    main()
