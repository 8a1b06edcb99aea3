"""Scoring predictions against labels, in worker processes, off generation's critical path.

KaTeX's render check, BLEU and tokenising cost ~17 ms a row on a model's output: scored in the
main process after generation, 2,048 rows left the GPU idle for half a minute. A :class:`Scorer`
takes each batch's rows as generation hands them over (generation.predict's ``on_batch``) and
scores them in ``spawn`` worker processes while the GPU decodes the next batch. Imports no torch:
``infer.py --score`` re-scores a predictions file with this module alone.
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from .io import jsonl_records, read_text
from .metrics import aggregate, render_flags, render_ok, score_pair
from .verdicts import LabelVerdicts

__all__ = ["score_row", "score_items", "summarize_rows", "scored_summary", "default_workers", "available_cores",
           "Scorer", "read_predictions", "PredictionsFileError"]

CHUNK_ROWS = 128  # rows per task sent to a worker: small enough that a batch spreads over the workers


def score_row(prediction: str | None, label: str, truncated: bool = False) -> dict:
    """The per-row columns of a predictions file: the four scores, render_ok, truncated."""
    return score_items([(prediction, label, truncated)])[0][0]


def score_items(items: Sequence[tuple[str | None, str, bool]]) -> list[tuple[dict, tuple[int, ...]]]:
    """[(score_row's columns, BLEU statistics)] for (prediction, label, truncated) triples. Each
    row is tokenised once and each distinct prediction parsed once."""
    strings = _distinct_predictions(items)
    scored, verdicts = _score_chunk(items, strings)
    return _with_columns(items, scored, dict(zip(strings, verdicts)))


def _distinct_predictions(items: Sequence[tuple[str | None, str, bool]]) -> list[str]:
    return list(dict.fromkeys(prediction for prediction, _, _ in items if prediction is not None))


def _score_chunk(items: Sequence[tuple[str | None, str, bool]], strings: Sequence[str],
                 katex_processes: int = 1) -> tuple[list, list[bool]]:
    """The task a worker runs: (score_pair of every row, KaTeX's verdict on each of ``strings``).
    KaTeX (``katex_processes`` child processes, latex.py) parses them while this thread scores the rows."""
    with ThreadPoolExecutor(1) as katex:
        flags = katex.submit(render_flags, strings, katex_processes)
        return [score_pair(prediction, label) for prediction, label, _ in items], flags.result()


def _with_columns(items: Sequence[tuple[str | None, str, bool]], scored: Sequence[tuple[dict, tuple]],
                  verdicts: dict[str, bool]) -> list[tuple[dict, tuple[int, ...]]]:
    return [({**scores, "render_ok": prediction is not None and verdicts[prediction], "truncated": bool(truncated)},
             stats) for (prediction, _, truncated), (scores, stats) in zip(items, scored)]


def summarize_rows(rows: Sequence[dict], bleu_stats: Sequence[Sequence[int]], truncated: bool = True) -> dict:
    """The summary of rows that carry score_row's columns, with their BLEU statistics (as
    score_items / Scorer.results give them): aggregated, nothing re-scored. ``truncated``: report
    truncated_rate (False for a predictions file that has no truncated column)."""
    return aggregate(rows, bleu_stats, truncated=truncated)


def scored_summary(scorer: Scorer, rows: Sequence[dict], truncated: bool = True,
                   gather: Callable[[list], list] | None = None) -> tuple[list[dict], dict]:
    """The one ending of every scoring run (infer.py, infer.py --score, evaluation): ``rows`` (one
    per key submitted to ``scorer``, in key order, each with its ``error``: None or "" when the
    image gave a prediction) with score_row's columns added, and the summary: the metrics
    (summarize_rows) and ``errors``, the rows without a prediction. ``gather``: a function that
    combines every process's [(row, BLEU statistics)] (torch.distributed) before summarizing."""
    scores, bleu_stats = scorer.results()
    pairs = [({**row, **columns}, stats) for row, columns, stats in zip(rows, scores, bleu_stats, strict=True)]
    if gather is not None:
        pairs = gather(pairs)
    rows = [row for row, _ in pairs]
    summary = summarize_rows(rows, [stats for _, stats in pairs], truncated=truncated)
    summary["errors"] = sum(bool(row["error"]) for row in rows)
    return rows, summary


def default_workers(rows: int | None = None, processes_per_host: int = 1) -> int:
    """Scoring processes for this machine: up to 4, leaving one core to the process that feeds the
    GPU, shared among ``processes_per_host`` (torch.distributed ranks); at least 1.
    0 (score in this process) when the ``rows`` fit in one chunk: a worker would cost more to start."""
    if rows is not None and rows <= CHUNK_ROWS:
        return 0
    return max(1, min(4, available_cores() // max(1, processes_per_host) - 1))


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the main process handles it (and shuts the pool down);
    # a worker finishing its chunk must not print a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    render_ok("x")  # KaTeX's engine loaded before the first chunk arrives


class Scorer:
    """Scores (prediction, label, truncated) rows in ``workers`` processes (0: in this process)
    as they are submitted; ``results()`` waits for all and returns them in key order.

    The workers start at once: created before a model loads, their start-up overlaps the loading.
    KaTeX's render check is most of the cost (~1 ms a formula, against ~0.1 ms for the rest of a
    row), so each distinct prediction is parsed once per Scorer, in one worker: a string repeated
    across rows (a looping model, or one label predicted exactly for several images) costs one parse.

    A label's verdict is kept on disk (latexocr/verdicts.py): the next run that predicts that label
    exactly (the same validation set, scored again) takes it from there instead of parsing it again.

    ``katex_processes``: KaTeX child processes of each worker (or of this process, with no workers).
    ``infer.py --score`` scores in this process with one KaTeX child per core: KaTeX is ~7/8 of the
    CPU time, and worker processes would cost their start-up and a KaTeX child each on top.

    A context manager: leaving it (also on Ctrl-C or an error) cancels pending chunks and joins
    the workers, so none is left behind.
    """

    def __init__(self, workers: int | None = None, katex_processes: int = 1, kept: LabelVerdicts | None = None):
        workers = default_workers() if workers is None else int(workers)
        # spawn, not fork: the caller holds (or is about to hold) CUDA and torch's threads, which a
        # forked child must not inherit
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_worker_init) if workers > 0 else None)
        for _ in range(workers):  # the pool starts processes on demand: one no-op task each starts them all now
            self._pool.submit(int)
        self._chunks: list[tuple[list, list, list[str], Future | tuple]] = []
        self._asked: set[str] = set()
        self._katex_processes = katex_processes
        self._kept = LabelVerdicts() if kept is None else kept
        self._known: dict[str, bool] = {}  # verdicts taken from the kept file instead of a parse

    def submit(self, keys: Sequence, items: Sequence[tuple[str | None, str, bool]]) -> None:
        """Queue rows for scoring; ``keys`` (e.g. row indices) order the results."""
        keys, items = list(keys), list(items)
        # in this process, one chunk: KaTeX's children parse all of its strings in one request each, no gaps
        size = CHUNK_ROWS if self._pool else max(1, len(items))
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            strings = [s for s in _distinct_predictions(chunk) if s not in self._asked]
            self._asked.update(strings)
            known = {s: v for s in strings if (v := self._kept.get(s)) is not None}
            self._known.update(known)
            strings = [s for s in strings if s not in known]
            work = (self._pool.submit(_score_chunk, chunk, strings, self._katex_processes) if self._pool
                    else _score_chunk(chunk, strings, self._katex_processes))
            self._chunks.append((keys[start:start + size], chunk, strings, work))

    def results(self) -> tuple[list[dict], list[tuple[int, ...]]]:
        """(score_row's columns, BLEU statistics) of every submitted row, sorted by key."""
        outcomes = [work.result() if isinstance(work, Future) else work for *_, work in self._chunks]
        verdicts = dict(self._known)  # every chunk's first: a chunk's prediction may have been rendered by an earlier one
        for (_, _, strings, _), (_, flags) in zip(self._chunks, outcomes):
            verdicts.update(zip(strings, flags))
        for _, chunk, _, _ in self._chunks:  # exact predictions: their label's verdict, kept for the next run
            for prediction, label, _ in chunk:
                if prediction == label:
                    self._kept.add(label, verdicts[label])
        self._kept.save()
        scored = []
        for (keys, chunk, _, _), (rows, _) in zip(self._chunks, outcomes):
            scored += zip(keys, _with_columns(chunk, rows, verdicts))
        scored.sort(key=lambda pair: pair[0])
        return [columns for _, (columns, _) in scored], [stats for _, (_, stats) in scored]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PredictionsFileError(ValueError):
    """A predictions file that cannot be re-scored; the message is one line naming the file/row."""


# The columns infer.py writes (image, prediction, error, label, then the scores); "image_path" and
# "text" (the labelled CSV's names) are accepted too. Score columns found in the file are ignored:
# they are computed again.
_IMAGE, _LABEL = ("image", "image_path"), ("label", "text")


def read_predictions(path: str | Path) -> list[dict]:
    """Rows {image, prediction, error, label, truncated?} of a predictions CSV or JSONL.

    A relative image path is resolved against the file's folder. ``truncated`` is kept only when
    the file has that column (infer.py writes it), so truncated_rate is reported only then.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionsFileError(f"predictions file not found: {path}")
    text = read_text(path, PredictionsFileError)
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, record in jsonl_records(path, text, PredictionsFileError):
            if not isinstance(record, dict):
                raise PredictionsFileError(f"{path}: line {number} is a JSON {type(record).__name__}, "
                                           "not an object")
            records.append((f"line {number}", record))
    elif path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            records = [(f"line {reader.line_num}", record) for record in reader]
        except csv.Error as exc:
            raise PredictionsFileError(f"{path}: not a readable CSV ({exc})") from None
    else:
        raise PredictionsFileError(f"{path}: expected a .csv or .jsonl predictions file (infer.py --output)")
    if not records:
        raise PredictionsFileError(f"{path}: no rows")
    in_folder = _resolver(path.resolve().parent)
    rows = []
    for where, record in records:
        image = _column(record, _IMAGE, path, where)
        label = _column(record, _LABEL, path, where)
        if "prediction" not in record:
            raise PredictionsFileError(f"{path}: {where} has no 'prediction' column "
                                       f"(found: {', '.join(map(str, record)) or 'nothing'})")
        prediction = record["prediction"]
        if not isinstance(label, str) or (prediction is not None and not isinstance(prediction, str)):
            raise PredictionsFileError(f"{path}: {where}: label and prediction must be text")
        image = "" if image is None else str(image)
        row = {"image": in_folder(image),
               "prediction": prediction, "error": record.get("error") or "", "label": label}
        if "truncated" in record:
            row["truncated"] = _flag(record["truncated"], path, where)
        rows.append(row)
    return rows


def _resolver(base: Path) -> Callable[[str], str]:
    """image -> the image as read_predictions gives it: str(base / image) for a relative path, else as it is.
    pathlib parsed both per row (half of reading 9,443 rows): on POSIX, a file name (not "." or "")
    after a folder part is joined by hand to that folder's path, each folder computed once."""
    folders: dict[str, str] = {}

    def slow(image: str) -> str:
        return image if not image or Path(image).is_absolute() else str(base / image)

    def resolve(image: str) -> str:
        folder, _, name = image.rpartition("/")
        if not image or image.startswith("/") or name in ("", "."):
            return slow(image)
        if folder not in folders:
            folders[folder] = str(base / folder) if folder else str(base)
        return f"{folders[folder].rstrip('/')}/{name}"

    return resolve if os.sep == "/" and os.altsep is None else slow


def _column(record: dict, names: tuple[str, ...], path: Path, where: str):
    for name in names:
        if name in record:
            return record[name]
    raise PredictionsFileError(f"{path}: {where} has no {' or '.join(repr(n) for n in names)} column "
                               f"(found: {', '.join(map(str, record)) or 'nothing'}); expected infer.py's "
                               "predictions file (image, prediction, label)")


def _flag(value, path: Path, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0", ""):
        return False
    raise PredictionsFileError(f"{path}: {where}: truncated is {value!r}, not True/False")
