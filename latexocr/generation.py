"""Batched greedy generation over many images: the one code path of infer.py and train.py's evaluation."""
from __future__ import annotations

import contextlib
import itertools
import sys
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .batching import (VISION_CU_SEQLENS_KEY, VISION_MAX_LENGTH_KEY, VISION_POSITIONS_KEY, SampleEncoder,
                       generation_batch, mrope_positions, vision_inputs)
from .fast import (StaticDecoder, bytes_per_row, config_has_linear_attention, given_vision, plain_text_attention,
                   prefill_as_decoded, speed_choices, static_decode_supported)
from .images import load_image
from .memory import (MARGIN, MAX_GENERATION_ROWS, balanced_rows, choose_generation_rows, gib, out_of_memory_message,
                     release, usable_bytes)
from .modeling import vision_tower_of
from .sample import DEFAULT_MAX_NEW_TOKENS, END_OF_TURN
from .timing import Stopwatch

# The static-cache loop prefills a batch in chunks of this many images of similar size (the batch is
# sorted by area), each padded to its own longest prompt: less padding, and prefill activations
# stay small next to the KV cache of the whole batch.
PREFILL_CHUNK_ROWS = 128
ENGINES = ("auto", "static", "generate")


class _Images(Dataset):
    def __init__(self, paths, sizing):
        self.paths, self.sizing = paths, sizing

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, load_image(self.paths[i], self.sizing), None
        except OSError as exc:
            return i, None, str(exc)


class _Collate:
    """(indices, failed, chunks): the readable images as left-padded batches of `chunk_rows` each
    (None: one batch), in order; chunks is None when no image of the batch could be read.
    with_positions adds each chunk's 4 x rows x length position ids (text row + M-RoPE rows, as
    generate builds them), computed here in the worker: the model's get_rope_index loops over the
    rows on the GPU with a few syncs each."""

    def __init__(self, encoder, chunk_rows: int | None = None, with_positions: bool = False,
                 pixel_dtype: torch.dtype | None = None):
        self.encoder, self.chunk_rows, self.with_positions = encoder, chunk_rows, with_positions
        self.pixel_dtype = pixel_dtype  # vision_dtype(model): the cast the model's forward would make, made here

    def __call__(self, items):
        ok = [(i, im) for i, im, err in items if im is not None]
        failed = [(i, err) for i, im, err in items if im is None]
        images = [im for _, im in ok]
        step = self.chunk_rows or max(len(images), 1)
        chunks = [generation_batch(self.encoder, images[j:j + step]) for j in range(0, len(images), step)]
        if self.pixel_dtype is not None:
            for chunk in chunks:
                chunk["pixel_values"] = chunk["pixel_values"].to(self.pixel_dtype)
        if self.with_positions:
            merge = self.encoder.processor.image_processor.merge_size
            given = speed_choices().vision_inputs
            for chunk in chunks:
                chunk["position_ids"] = prompt_positions(chunk["attention_mask"], chunk["mm_token_type_ids"],
                                                         chunk["image_grid_thw"], merge)
                if given:
                    chunk.update(vision_inputs(chunk["image_grid_thw"], merge))
        return [i for i, _ in ok], failed, chunks or None


def prompt_positions(attention_mask, mm_token_type_ids, grid_thw, merge_size: int) -> torch.Tensor:
    """4 x rows x length positions of a left-padded batch of one-image prompts: the text positions
    (attention_mask.cumsum - 1) and the three M-RoPE rows of the model's get_rope_index (equal to it,
    tests/test_batching.py); padding positions are 0 and never attended to."""
    rows, length = attention_mask.shape
    pos = torch.zeros(4, rows, length, dtype=torch.long)
    pos[0] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask
    for r in range(rows):
        n = int(attention_mask[r].sum())
        pos[1:, r, length - n:] = mrope_positions(mm_token_type_ids[r, length - n:].tolist(), grid_thw[r], merge_size)
    return pos


def default_loader_workers(processes: int = 1) -> int:
    """DataLoader workers for NUM_WORKERS=auto (infer.py; train.py per training process): half the cores
    this process may use, shared by `processes` such processes on the machine, 2 to 8 each.

    A worker core turns ~340 real LaTeX_OCR images a second into prefill chunks (bench/bench_host.py),
    one H200's decode loop takes ~450 (docs/BENCHMARKS.md); the other half of the cores is left to the
    main process (it feeds the GPU) and to the scoring workers and their KaTeX children."""
    from .scoring import available_cores
    return max(2, min(8, available_cores() // 2 // max(1, processes)))


def loader_unit(batch_size: int | None, static: bool) -> int | None:
    """Images per DataLoader batch: with the static loop one prefill chunk (PREFILL_CHUNK_ROWS), whatever the
    generation batch (joined_batches where it is whole chunks, else rebatched cuts the chunks where a batch
    ends), so a batch's chunks are built by several workers at once and the first batch (which the GPU waits
    for) is ready in a fraction of the time one worker takes to build it all. A batch of one DataLoader unit
    (one worker building 344 images while the GPU waits) decoded Qwen3.5-2B's 2,048 images at 158.9 images/s
    against 184.3 at 384 rows (docs/BENCHMARKS.md run V). With generate: one DataLoader batch is one
    generation batch (None before BATCH_SIZE=auto's probe decided it)."""
    return PREFILL_CHUNK_ROWS if static else batch_size


def vision_dtype(model) -> torch.dtype | None:
    """The dtype the model's forward casts pixel values to before its vision tower (every family's forward
    starts with `pixel_values.type(self.visual.dtype)`, transformers 5.24 / 5.25; tests/test_decoding.py checks
    that a batch cast beforehand gives bit-identical logits). None where the model has no vision tower."""
    try:
        _, tower = vision_tower_of(model)
    except ValueError:
        return None
    return getattr(tower, "dtype", None)


def pinned_chunks(config) -> bool:
    """LATEXOCR_SPEED pinned_batches for the model of this config: the loader's pin thread copies each chunk into
    page-locked memory, so its copy to the GPU (predict: non_blocking) is queued without the host waiting for
    it. auto: on, except for models with linear-attention layers (Qwen3.5: slower pinned in run X, where its
    eager prefill keeps the host busier). Only with a GPU."""
    choice = speed_choices().pinned_batches
    return torch.cuda.is_available() and (choice == "on" or (choice == "auto"
                                                              and not config_has_linear_attention(config)))


def start_loader(encoder: SampleEncoder, paths: list[str], unit: int, num_workers: int, static: bool,
                 pixel_dtype: torch.dtype | None = None, pinned: bool = False):
    """An iterator over (indices into paths, failed [(index, error)], chunks or None) of `unit` paths each, in
    order, built by `num_workers` DataLoader processes (0: in this one, on demand); the workers start now.
    pixel_dtype: the pixel values leave the workers in it (vision_dtype): bf16 halves the bytes through
    shared memory and to the GPU (the fp32 frames of 512 images are 390 MB; run O: 2.4 s of copies).
    pinned: the chunks in page-locked memory (pinned_chunks)."""
    loader = DataLoader(_Images(paths, encoder.sizing), batch_size=unit, shuffle=False, num_workers=num_workers,
                        collate_fn=_Collate(encoder, PREFILL_CHUNK_ROWS if static else None, static, pixel_dtype),
                        persistent_workers=False, pin_memory=pinned)
    return iter(loader)


class Prefetch:
    """The static decoder's image loader started before the model exists (infer.py: while it loads): the
    images in predict's order (largest first) and the workers building their first prefill chunks. predict
    takes it over where it would have started the same loader (the static decoder, these images, the
    vision tower's dtype, pinned or not), and otherwise starts its own (this one's workers stop with it)."""

    def __init__(self, encoder: SampleEncoder, image_paths: list[str], num_workers: int,
                 pixel_dtype: torch.dtype | None, pinned: bool = False):
        self.image_paths, self.pixel_dtype, self.pinned = image_paths, pixel_dtype, pinned
        self.unit = loader_unit(None, static=True)  # prefill chunks, whatever the batch size
        self.order = _size_order(image_paths)[::-1]
        self.paths = [image_paths[i] for i in self.order]
        self.units = start_loader(encoder, self.paths, self.unit, num_workers, True, pixel_dtype, pinned)

    def take(self, image_paths: list[str], unit: int | None, static: bool, pixel_dtype, pinned: bool = False):
        """(order, paths, loader) where the loader is the one predict would start, else None; either way
        this object lets go of it (an unused loader's workers stop once nothing holds it)."""
        units, self.units = self.units, None
        if units is None or not (static and image_paths is self.image_paths and unit == self.unit
                                 and pixel_dtype == self.pixel_dtype and pinned == self.pinned):
            return None
        return self.order, self.paths, units


def joined_batches(units, unit: int, batch_size: int):
    """Generation batches of `batch_size` paths from consecutive loader units of `unit` paths (a divisor)."""
    per_batch, group = batch_size // unit, []
    for part in units:
        group.append(part)
        if len(group) == per_batch:
            yield _joined(group)
            group = []
    if group:
        yield _joined(group)


def chunk_rows(chunk: dict, start: int, stop: int) -> dict:
    """Rows start:stop of a left-padded prefill chunk, their images' patches with them and the columns that
    are padding in all of them dropped: the chunk the processor would build from those images alone."""
    patches = chunk["image_grid_thw"].prod(-1)
    offsets = [0, *patches.cumsum(0).tolist()]
    used = chunk["attention_mask"][start:stop].any(0).nonzero()
    first = int(used[0]) if len(used) else 0  # left padding: the first column any of these rows uses
    out = {}
    for key, value in chunk.items():
        if key in (VISION_CU_SEQLENS_KEY, VISION_MAX_LENGTH_KEY):
            continue  # from the rows' own grids, below
        if key in ("pixel_values", VISION_POSITIONS_KEY):  # one row per patch, the images in order
            out[key] = value[offsets[start]:offsets[stop]]
        elif key == "image_grid_thw":
            out[key] = value[start:stop]
        elif key == "position_ids":  # 4 x rows x length
            out[key] = value[:, start:stop, first:]
        else:  # rows x length: input_ids, attention_mask, mm_token_type_ids
            out[key] = value[start:stop, first:]
    if VISION_CU_SEQLENS_KEY in chunk:
        cu_seqlens = chunk[VISION_CU_SEQLENS_KEY]
        if len(cu_seqlens) == len(patches) + 1:  # one attention segment per image (a frame each): cut as the rows
            cu_seqlens = cu_seqlens[start:stop + 1] - cu_seqlens[start]
            out.update({VISION_CU_SEQLENS_KEY: cu_seqlens, VISION_MAX_LENGTH_KEY: int(cu_seqlens.diff().max())})
        else:  # the tower computes them itself
            out.pop(VISION_POSITIONS_KEY, None)
    return type(chunk)(out)  # the processor's BatchFeature (its .to() moves every tensor)


def rebatched(units, rows: int):
    """Generation batches of `rows` readable images from loader units of any size (a BATCH_SIZE=auto that
    is not whole prefill chunks): the units' chunks, cut where a batch ends (chunk_rows). The loader's
    chunks, built before the probe, are used as they are instead of being built again."""
    indices, failed, parts, have = [], [], [], 0
    for unit_indices, unit_failed, chunks in units:
        failed += unit_failed
        position = 0
        for chunk in chunks or ():
            n, start = chunk["input_ids"].shape[0], 0
            while start < n:
                take = min(n - start, rows - have)
                parts.append(chunk if take == n else chunk_rows(chunk, start, start + take))
                indices += unit_indices[position + start:position + start + take]
                start, have = start + take, have + take
                if have == rows:
                    yield indices, failed, parts
                    indices, failed, parts, have = [], [], [], 0
            position += n
    if indices or failed:
        yield indices, failed, parts or None


def generation_batches(units, unit: int, batch_size: int):
    """Generation batches of `batch_size` paths from loader units of `unit` paths: the units joined where
    `unit` divides `batch_size`, else their chunks cut where a batch ends (a small card's auto, a
    --batch-size of 344)."""
    return joined_batches(units, unit, batch_size) if batch_size % unit == 0 else rebatched(units, batch_size)


def image_batches(encoder: SampleEncoder, paths: list[str], batch_size: int, num_workers: int, static: bool,
                  pixel_dtype: torch.dtype | None = None):
    """(indices into paths, failed, chunks or None) per generation batch of `batch_size` paths, as predict()
    builds them (see loader_unit)."""
    unit = loader_unit(batch_size, static)
    return generation_batches(start_loader(encoder, paths, unit, num_workers, static, pixel_dtype), unit, batch_size)


def _joined(parts):
    """One generation batch of consecutive loader units."""
    if len(parts) == 1:
        return parts[0]
    chunks = [c for _, _, cs in parts for c in cs or ()]
    return [i for p in parts for i in p[0]], [f for p in parts for f in p[1]], chunks or None


def _size_order(paths) -> list[int]:
    """Indices sorted by image area (header only), so a batch holds similar lengths and pads little."""
    def area(p):
        try:
            with Image.open(p) as im:
                return im.size[0] * im.size[1]
        except Exception:
            return 0
    return sorted(range(len(paths)), key=lambda i: area(paths[i]))


class Fit(NamedTuple):
    """BATCH_SIZE=auto's answer: rows per generation batch, why (for the log line), and the rows one prefill
    call takes (PREFILL_CHUNK_ROWS, or fewer where the largest images' chunk did not fit at once)."""
    rows: int
    why: str
    prefill_rows: int


def prefill_pieces(chunks: list[dict], rows: int) -> list[dict]:
    """The chunks cut into consecutive pieces of at most `rows` rows (chunk_rows): the prefill calls a card
    that cannot take a whole chunk at once makes; the same rows in the same order."""
    pieces = []
    for chunk in chunks:
        n = chunk["input_ids"].shape[0]
        pieces += [chunk] if n <= rows else [chunk_rows(chunk, start, min(start + rows, n))
                                             for start in range(0, n, rows)]
    return pieces


def largest_fitting_prefill(chunk: dict, run) -> tuple[dict | None, int]:
    """(the largest leading rows of `chunk` that `run` (a prefill on the GPU) takes without running out of
    memory, and the peak it reported): the chunk, else its first half, quarter ... one row; (None, 0) when
    not even one row fits. The rows are the largest images first (predict's order), so what fits here fits
    every later chunk cut to as many rows. The retry runs outside the `except`: its frames (and the tensors
    the failed pass held) are freed first."""
    while True:
        try:
            return chunk, run(chunk)
        except torch.OutOfMemoryError:
            pass
        release()
        rows = chunk["input_ids"].shape[0]
        if rows == 1:
            return None, 0
        chunk = chunk_rows(chunk, 0, rows // 2)


MIN_PREFILL_ROWS = 16  # pieces no smaller than this for more rows: below it the prefill's launches add up
MORE_ROWS = 1.25  # smaller prefill pieces only for at least this many times the rows


def pieces_for_more_rows(piece: dict, prefill_bytes: int, rows: int, per_row: int, budget: int, run,
                         smallest: int = MIN_PREFILL_ROWS) -> tuple[dict, int, int]:
    """(prefill piece, its prefill bytes, rows per batch): where the prefill's own memory keeps the batch small
    (run R, 16 GiB: Qwen3-VL-4B got 56 rows beside a 3.0 GiB prefill of the 128 largest images, Qwen3.5-2B
    128 beside 4.8 GiB), the piece halved while that lets at least MORE_ROWS times the rows fit: each half
    probed by `run` (its peak measured, not assumed). A batch of more rows costs little more per decode
    step, so it decodes more images a second."""
    while rows < MAX_GENERATION_ROWS and piece["input_ids"].shape[0] // 2 >= smallest:
        if choose_generation_rows(prefill_bytes // 2, per_row, budget, MAX_GENERATION_ROWS) < rows * MORE_ROWS:
            break
        half = chunk_rows(piece, 0, piece["input_ids"].shape[0] // 2)
        half_bytes = run(half)
        more = choose_generation_rows(half_bytes, per_row, budget, MAX_GENERATION_ROWS)
        if more < rows * MORE_ROWS:
            break
        piece, prefill_bytes, rows = half, half_bytes, more
    return piece, prefill_bytes, rows


def fit_rows(model, encoder: SampleEncoder, largest_paths: list[str], max_new_tokens: int, static: bool,
             batch_setting: str = "BATCH_SIZE", reserved_bytes: int = 0, chunk: dict | None = None,
             clock: Stopwatch | None = None) -> Fit:
    """Rows per generation batch for BATCH_SIZE=auto, why, and the rows per prefill call: a memory model
    calibrated by one probe.

    The probe prefills one chunk of the largest images (what the decoder's prefill holds at once) as the
    engine does: for the static decoder with the position ids computed on the CPU (the model's own
    get_rope_index loops over the rows with GPU syncs; with the images loaded in this process, 4-7 s for 128
    rows on an H200, docs/BENCHMARKS.md run Q); each row then adds its
    cache and logits (decoding.bytes_per_row, from the config; twice that for generate, whose growing
    cache is copied). A card too small for the whole chunk (a 4B model on 16 GiB, a QLoRA 2B on 8 GiB,
    docs/BENCHMARKS.md run R) is probed with half of it, a quarter ...; and where smaller pieces let many
    more rows fit (pieces_for_more_rows), the static decoder's are halved too: the engine then prefills in
    pieces of that many rows (prefill_pieces). On a CPU: MAX_GENERATION_ROWS, nothing probed.
    chunk: that chunk already built (predict: the loader's first, which it then decodes), else built here
    from `largest_paths`. reserved_bytes: memory the caller will need later that is not allocated yet
    (GRPO: the optimizer's state before the first step), kept out of the budget. clock: its parts are timed
    as the "memory probe" phase's (infer.py --profile: run Y's 1.9-2.1 s a probe, warm, with no split).
    """
    device = next(model.parameters()).device

    def part(name: str):
        return clock.part("memory probe", name) if clock is not None else contextlib.nullcontext()

    if device.type != "cuda":
        return Fit(MAX_GENERATION_ROWS, "no GPU: no memory probe", PREFILL_CHUNK_ROWS)
    if chunk is None:
        items = []
        for i, path in enumerate(largest_paths):
            try:
                items.append((i, load_image(path, encoder.sizing), None))
            except OSError as exc:
                items.append((i, None, str(exc)))  # predict() reports it with its row
        _, _, chunks = _Collate(encoder, None, with_positions=static, pixel_dtype=vision_dtype(model))(items)
        if chunks is None:
            return Fit(MAX_GENERATION_ROWS, "no readable image to probe", PREFILL_CHUNK_ROWS)
        chunk = chunks[0]
    with part("release"):
        release(collect=False)  # what the model load left: a cycle it left is counted in `base` (fewer rows)
    base = torch.cuda.memory_allocated(device)

    def prefill(piece: dict) -> int:
        torch.cuda.reset_peak_memory_stats(device)
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in piece.items()}
        with prefill_as_decoded(model) if static else contextlib.nullcontext(), given_vision(moved) as inputs:
            model(**inputs, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize(device)  # the prefill's own seconds, not the next phase's
        return torch.cuda.max_memory_allocated(device) - base

    rows_offered = chunk["input_ids"].shape[0]
    with part(f"prefill of the {rows_offered} largest"):
        probed, prefill_bytes = largest_fitting_prefill(chunk, prefill)
    if probed is None:
        quantized = getattr(model, "hf_quantizer", None) is not None
        raise SystemExit(f"out of GPU memory reading the largest image alone: use smaller images "
                         f"(--image-max-pixels){'' if quantized else ' or --quantization 4bit'}")
    rows_fitting = probed["input_ids"].shape[0]
    length = probed["input_ids"].shape[1] + max_new_tokens
    per_row = bytes_per_row(model, length)
    budget = int(usable_bytes(device) * (1 - MARGIN)) - base - reserved_bytes
    if static:
        rows = choose_generation_rows(prefill_bytes, per_row, budget, MAX_GENERATION_ROWS)
        # not one row beside the prefill of the piece that fitted (Qwen3.5-4B at 12 GiB, docs/BENCHMARKS.md
        # run T: 16 images' prefill left no room): pieces below MIN_PREFILL_ROWS, down to one image, before
        # stopping; a slow prefill beats no inference
        with part("smaller pieces"):
            probed, prefill_bytes, rows = pieces_for_more_rows(probed, prefill_bytes, rows, per_row, budget,
                                                               prefill, smallest=MIN_PREFILL_ROWS if rows else 1)
        rows_probed = probed["input_ids"].shape[0]
    else:  # generate prefills its whole batch: the prefill's bytes grow with the rows
        rows_probed = rows_fitting
        per_row = 2 * per_row + prefill_bytes // rows_probed
        rows = choose_generation_rows(0, per_row, budget, MAX_GENERATION_ROWS)
    chunk = probed = None
    with part("release"):
        release(collect=False)  # an out-of-memory error caught above was collected where it was caught
    if rows < 1:
        raise SystemExit(out_of_memory_message(batch_setting, 1, "while generating"))
    pieces = ""
    if rows_probed < rows_fitting:
        pieces = f"; prefill in pieces of {rows_probed}, so that more rows fit"
    elif rows_probed < rows_offered:
        pieces = f"; {rows_offered} at once ran out of memory: prefill in pieces of {rows_probed}"
    return Fit(rows, f"{gib(budget)} usable beside the weights ({MARGIN:.0%} margin); prefill of the {rows_probed} "
                     f"largest images {gib(prefill_bytes)}, {per_row / 2**20:.1f} MiB per row at {length} tokens"
                     f"{pieces}", rows_probed if rows_probed < rows_offered else PREFILL_CHUNK_ROWS)


def _hand_over(on_batch, results: list[dict], done: list[int]) -> None:
    if on_batch is not None and done:
        on_batch(done, [results[i] for i in done])


@torch.inference_mode()
def predict(model, encoder: SampleEncoder, image_paths: list[str], batch_size: int | None = 64,
            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, num_workers: int = 2,
            progress: bool = True, engine: str = "auto", on_batch=None, batch_setting: str = "BATCH_SIZE",
            stopwatch: Stopwatch | None = None, prefetched: Prefetch | None = None, **generate_kwargs) -> list[dict]:
    """Greedy LaTeX for each image, in input order:
    [{"prediction": str | None, "error": str | None, "truncated": bool}].

    An image that cannot be read gives an error row (prediction None) and the run continues.
    Batches are left-padded so every prompt ends where generation starts; generation stops at
    <|im_end|> (end of turn), the token the model was trained to emit after the formula;
    "truncated" marks a row that hit max_new_tokens without it (usually a repetition loop).
    engine: "static" = latexocr/fast/decoding.py's static-cache loop (CUDA graphs on GPU), "generate" =
    transformers' generate (the reference), "auto" = static where `static_decode_supported`.
    batch_size None: as many images as fit the GPU (fit_rows), said in one line on stderr; an
    out-of-memory that still happens stops with one line naming `batch_setting` and a value that fits.
    on_batch(indices, results): called after each batch with its rows' positions in image_paths
    and their result dicts (every row once, unreadable images included), so a caller can score
    them while later batches generate (the static loop calls it once the next batch is decoded, the
    last batch's at the end: see `land_decoded` below).
    stopwatch: where the seconds of each phase are added (infer.py --profile), see latexocr/timing.py.
    prefetched: the loader a caller started for these images before the model loaded (Prefetch), taken
    over where it is the one this call would start.
    """
    from tqdm.auto import tqdm

    clock = stopwatch or Stopwatch()

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    tok = encoder.tokenizer
    stop_ids = [tok.convert_tokens_to_ids(END_OF_TURN)] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[dict] = [{"prediction": None, "error": None, "truncated": False} for _ in image_paths]
    try:
        # Blocks compiled for training (latexocr/fast/compile.py) would recompile for eval mode, the KV cache
        # and every new length: generation runs them eagerly.
        with plain_text_attention(model), torch.compiler.set_stance("force_eager"):
            supported = static_decode_supported(model, generate_kwargs)
            static = engine == "static" or (engine == "auto" and supported)
            if engine == "static" and not supported:
                raise ValueError("engine='static' does not support this model or these generate options "
                                 f"({sorted(generate_kwargs)}); use engine='generate'")
            # the workers start before the memory probe where their unit does not depend on its answer; the
            # probe prefills their first chunk (the largest images, built in a worker), decoded with its batch
            unit = loader_unit(batch_size, static)
            pixels, pinned = vision_dtype(model), pinned_chunks(model.config)
            taken = prefetched.take(image_paths, unit, static, pixels, pinned) if prefetched is not None else None
            if taken is not None:
                order, paths, units = taken
            else:
                with clock.phase("sort by size"):
                    order = _size_order(image_paths)[::-1]  # the largest first: the first chunk is the probe's
                    paths = [image_paths[i] for i in order]
                with clock.phase("data wait"):
                    units = (start_loader(encoder, paths, unit, num_workers, static, pixels, pinned)
                             if unit is not None else None)
            taken = None
            prefill_rows = PREFILL_CHUNK_ROWS  # rows per prefill call: fewer where auto's probe found them too many
            if batch_size is None:
                first = None
                if units is not None:
                    with clock.phase("data wait"):
                        first = next(units, None)
                    units = itertools.chain([first] if first is not None else [], units)
                chunk = first[2][0] if first is not None and first[2] else None
                with clock.phase("memory probe"):
                    most, why, prefill_rows = fit_rows(model, encoder, paths[:PREFILL_CHUNK_ROWS], max_new_tokens,
                                                       static, batch_setting, chunk=chunk, clock=clock)
                    first = chunk = None  # the loader's chain holds the unit until its batch is decoded
                batch_size = balanced_rows(len(image_paths), most)
                even = (f"; {most} fit, {batch_size} make {-(-len(image_paths) // batch_size)} even batches"
                        if batch_size != most else "")
                print(f"{batch_setting}=auto: {batch_size} images per batch ({why}{even})", file=sys.stderr, flush=True)
            if unit is None:  # generate's auto: one loader batch per generation batch, now that its size is known
                unit = batch_size
                with clock.phase("data wait"):
                    units = start_loader(encoder, paths, unit, num_workers, static, pixels, pinned)
            batches = generation_batches(units, unit, batch_size)  # the chunks already on their way
            decoder = StaticDecoder(model, stop_ids, tok.pad_token_id, max_new_tokens,
                                    generate_kwargs.get("min_new_tokens", 0)) if static else None

            def land(indices, failed, new_tokens, truncated):
                """A batch's texts into results, then to on_batch (with the batch's unreadable images)."""
                with clock.phase("detokenise"):
                    texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
                for i, text, cut in zip(indices, texts, truncated):
                    results[order[i]].update(prediction=text.strip(), truncated=cut)
                with clock.phase("scoring hand-over"):
                    _hand_over(on_batch, results, [order[i] for i in [*indices, *(i for i, _ in failed)]])

            def land_decoded(indices, failed, arriving):
                with clock.phase("engine"):  # the copies to the CPU, queued behind the batch's last steps
                    new_tokens, stopped = arriving.get()
                land(indices, failed, new_tokens, (~stopped).tolist())

            # The static loop lands a batch once the next one is under way: its last steps and copies to the CPU
            # are queued when generate returns, so the GPU runs them while the host takes the next batch and
            # queues its prefill, then reads and detokenises this one (no idle GPU between batches for that).
            decoded = None  # (indices, failed, Arriving) of the batch generated last, not yet landed
            try:
                batches = tqdm(batches, desc="generate", disable=not progress, unit="batch",
                               total=-(-len(image_paths) // batch_size))
                for indices, failed, chunks in clock.waited(batches, "data wait"):
                    for i, err in failed:
                        results[order[i]]["error"] = err
                    if chunks is None:
                        _hand_over(on_batch, results, [order[i] for i, _ in failed])
                        continue
                    with clock.phase("to device"):
                        if static and prefill_rows < PREFILL_CHUNK_ROWS:
                            chunks = prefill_pieces(chunks, prefill_rows)
                        chunks = [c.to(device, non_blocking=True) for c in chunks]  # from pinned memory: queued
                    if static:
                        with clock.phase("engine"):
                            arriving = decoder.generate(chunks, wait=False)
                        if decoded is not None:
                            land_decoded(*decoded)
                        decoded = (indices, failed, arriving)
                        continue
                    batch = chunks[0]
                    with clock.phase("engine"):
                        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                             eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                                             use_cache=True, temperature=None, top_p=None, top_k=None,
                                             **generate_kwargs)
                        new_tokens = out[:, batch["input_ids"].shape[1]:].cpu()
                    stopped = torch.isin(new_tokens, torch.tensor(stop_ids)).any(1)
                    land(indices, failed, new_tokens, (~stopped & (new_tokens.shape[1] >= max_new_tokens)).tolist())
                if decoded is not None:
                    land_decoded(*decoded)
            except torch.OutOfMemoryError:  # another process took memory, or fragmentation: one line, no traceback
                release()
                raise SystemExit(out_of_memory_message(batch_setting, batch_size, "while generating")) from None
    finally:
        model.train(was_training)
        if device.type == "cuda":  # the cache and the decode graphs' private pool: training (an evaluation's
            decoder = None           # caller) cannot reuse a graph pool's blocks until they are given back
            release()
    return results
