"""Step 1: export LaTeX_OCR rows to PNG files plus a CSV of `image_path,text`.

    python data2csv.py                                    # 1000 rows of ModelScope's default/train
    python data2csv.py --source huggingface --limit all   # everything, from the HF mirror
    python data2csv.py --source ../shared/latex_ocr/small --split validation \\
        --csv-path latex_ocr_val.csv

Streams the source (memory stays flat), writes each image losslessly as PNG, and can be
interrupted and re-run: finished PNGs are kept, and the CSV and the completion marker
(`CSV_PATH.done.json`, holding the CSV's SHA-256) appear only when every row has been handled.
Image names carry a fingerprint of the source, so runs of different sources never share,
overwrite or delete each other's images. Rows with an unreadable image or an unusable label
are skipped and listed in `CSV_PATH.skipped.csv`.
Image paths in the CSV are relative to the CSV's folder (csv2json.py resolves them so).
"""
from __future__ import annotations

# ---- settings (edit here, or pass the same names as --flags: CSV_PATH -> --csv-path) ------------
SOURCE = "modelscope"        # 'modelscope' (AI-ModelScope/LaTeX_OCR), 'huggingface' (linxy/LaTeX_OCR),
                             # or a local parquet file / folder / LaTeX_OCR_PRO folder
CONFIG = "default"           # default, full, small, synthetic_handwrite, human_handwrite, human_handwrite_print
SPLIT = "train"              # train, validation, test
LIMIT = "1000"               # source rows to export, as in the tutorial; 'all' for every row
IMAGE_DIR = "latex_ocr_images"     # where the PNGs go
CSV_PATH = "latex_ocr_train.csv"   # the output: columns image_path,text
WORKERS = 2                  # processes validating/writing images; 0 = all in this process
CACHE_DIR = None             # hub download cache (None = the hub client's default)
FORCE = False                # rewrite every image even if a finished run matches
SETTINGS = {k: v for k, v in dict(globals()).items() if k.isupper()}
# ---------------------------------------------------------------------------------------------

import csv
import os
import signal
import sys
from collections import Counter, deque
from pathlib import Path

from tqdm import tqdm

from latexocr.cli import parse_settings
from latexocr.images import save_images_batch, worker_init
from latexocr.io import atomic_open, atomic_write_json, check_writable, completion_record, file_sha256
from latexocr.sample import label_problem
from latexocr.sources import SourceError, open_source, source_fingerprint


CHUNK = 64                   # rows per task sent to a worker: big enough to amortize pickling


def parse_args(argv=None):
    """The settings, each also a flag; ValueError (one line) for a value that cannot be used."""
    args = parse_settings(SETTINGS, __doc__, argv)
    given = args.limit
    if str(given).strip().lower() in ("all", "none"):
        args.limit = None
        return args
    try:
        args.limit = int(given)
    except ValueError:
        args.limit = 0
    if args.limit <= 0:
        raise ValueError(f"--limit must be a positive integer or 'all', got {given!r}")
    return args


def run_params(args) -> dict:
    """What identifies a run: a marker with other values does not count as finished."""
    local = Path(args.source).expanduser()
    source = str(local.resolve()) if local.exists() else args.source.lower()
    return {"source": source, "source_id": source_fingerprint(args.source, args.config, args.split),
            "config": args.config, "split": args.split, "limit": args.limit,
            "image_dir": str(Path(args.image_dir).resolve())}


def prepare_image_dir(image_dir: Path, prefix: str) -> None:
    """Remove temp files a killed run of this source left (never a finished PNG, never
    another source's files: their names carry another fingerprint)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    for tmp in image_dir.glob(f".{prefix}_*.tmp"):
        tmp.unlink(missing_ok=True)


class _Done:
    """A finished 'future', for work done in this process (WORKERS=0)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    csv_path = Path(args.csv_path)
    image_dir = Path(args.image_dir)
    report_path = csv_path.with_name(csv_path.name + ".skipped.csv")
    params = run_params(args)

    marker, done, finished = completion_record(csv_path)
    if not args.force and finished and done.get("params") == params:
        print(f"{csv_path} is already complete for these settings ({done.get('rows')} rows); "
              f"--force to redo it")
        return 0
    try:
        source = open_source(args.source, args.config, args.split, args.cache_dir)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for folder in dict.fromkeys((csv_path.resolve().parent, image_dir.resolve())):
        problem = check_writable(folder)
        if problem:  # before anything is removed: the earlier outputs stay as they were
            print(f"error: {problem}", file=sys.stderr)
            return 2
    # From here on nothing claims to be finished: csv2json refuses a CSV without its marker.
    # The old CSV itself stays as it was and still true: this run's images carry other names.
    marker.unlink(missing_ok=True)
    total = source.num_rows if args.limit is None else min(args.limit, source.num_rows or args.limit)
    print(f"reading {source.description}: {source.num_rows} rows, exporting {total}")

    # Names depend on the source's fingerprint, config, split and row index: a re-run of the
    # same source finds its earlier PNGs, and no other source's run can touch them.
    # A hub source adds which files it downloaded: a new revision upstream never reuses the images
    # an earlier one left under the same settings.
    prefix = f"{args.config}_{args.split}_{params['source_id']}" + (f"-{source.data_id}" if source.data_id else "")
    prepare_image_dir(image_dir, prefix)
    csv_dir = csv_path.resolve().parent
    try:  # paths in the CSV are relative to the CSV, so the folder can move as a whole
        rel_dir = Path(os.path.relpath(image_dir.resolve(), csv_dir)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        rel_dir = image_dir.resolve().as_posix()

    skipped: list[tuple[int, str, str]] = []  # (row index, reason, detail)
    written = reused = 0
    pending: deque = deque()  # (rows to emit in order, future of their image jobs)
    pool = None
    if args.workers > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        # spawn, not fork: forking while pyarrow's threads hold locks can deadlock a worker.
        # ProcessPoolExecutor, not multiprocessing.Pool: after a Ctrl-C, Pool.terminate() could
        # wait forever for its task queue's lock, held by an idle worker (about 1 Ctrl-C in 60).
        pool = ProcessPoolExecutor(args.workers, multiprocessing.get_context("spawn"),
                                   initializer=worker_init, initargs=(os.getpid(),))
        # All workers start now, with SIGINT ignored (a disposition survives exec, and Python keeps
        # an ignored SIGINT): a Ctrl-C to the whole process group while they start up would
        # otherwise print a KeyboardInterrupt traceback from each, before worker_init ignores it.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:  # one task per worker: the executor starts a process per task while none is idle
            started = [pool.submit(os.getpid) for _ in range(args.workers)]
        finally:
            signal.signal(signal.SIGINT, previous)
        del started
    max_pending = max(2, 4 * args.workers)  # bounded: the source is never read far ahead

    def emit(block_until: int) -> None:
        nonlocal written
        while len(pending) > block_until:
            entries, future = pending.popleft()
            errors = dict(future.result()) if future is not None else {}
            for index, rel, text in entries:
                err = errors.get(index)
                if err:
                    skipped.append((index, "unreadable image", err))
                else:
                    writer.writerow([rel, text])
                    written += 1

    try:
        with atomic_open(csv_path, "w", encoding="utf-8", newline="") as f, \
                tqdm(total=total, unit="row", desc="data2csv", dynamic_ncols=True) as bar:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image_path", "text"])
            stop = False
            for batch in source.batches():
                if args.limit is not None and batch[0].index >= args.limit:
                    break
                for start in range(0, len(batch), CHUNK):
                    entries, jobs = [], []
                    for row in batch[start:start + CHUNK]:
                        if args.limit is not None and row.index >= args.limit:
                            stop = True
                            break
                        reason = label_problem(row.text) or row.problem
                        if reason:
                            skipped.append((row.index, reason, ""))
                            continue
                        name = f"{prefix}_{row.index:06d}.png"
                        out = image_dir / name
                        entries.append((row.index, f"{rel_dir}/{name}", row.text))
                        # PNGs are only ever created by os.replace of a complete file, so
                        # one that exists was finished by an earlier run: keep it.
                        if not args.force and out.is_file() and out.stat().st_size > 0:
                            reused += 1
                        else:
                            jobs.append((row.index, row.image, str(out)))
                    if jobs:
                        future = (pool.submit(save_images_batch, jobs) if pool
                                  else _Done(save_images_batch(jobs)))
                    else:
                        future = None
                    pending.append((entries, future))
                    emit(max_pending)
                    if stop:
                        break
                bar.update(min(len(batch), total - bar.n) if total else len(batch))
                bar.set_postfix(skipped=len(skipped), refresh=False)
                if stop:
                    break
            emit(0)
    except OSError as exc:  # the disk, not the data (full, read-only, removed folder)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if pool is not None:
            # Queued chunks are dropped; the workers finish the few already handed to them (at most
            # WORKERS + 1 chunks of 64 images: well under a second) and exit. An image being written
            # is a temp file until complete (a re-run removes it). A Ctrl-C that lands inside the
            # executor's own bookkeeping can leave its shutdown waiting forever (seen once in 120
            # Ctrl-Cs): leaving by an exception, the workers are stopped after SHUTDOWN_SECONDS.
            interrupted = sys.exc_info()[0] is not None
            with _deadline(SHUTDOWN_SECONDS if interrupted else None):
                pool.shutdown(wait=True, cancel_futures=True)

    # The report, then the marker last: a marker means everything before it is on disk.
    with atomic_open(report_path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["index", "reason", "detail"])
        w.writerows(sorted(skipped))
    counts = Counter(reason for _, reason, _ in skipped)
    print(f"wrote {written} rows to {csv_path} ({reused} images kept from an earlier run), "
          f"images in {image_dir}")
    if skipped:
        print(f"skipped {len(skipped)} rows: " + ", ".join(f"{r}: {n}" for r, n in counts.most_common()))
        for index, reason, detail in sorted(skipped)[:10]:
            print(f"  row {index}: {reason}{' (' + detail + ')' if detail else ''}")
        print(f"  full list: {report_path}")
    atomic_write_json(marker, {"params": params, "rows": written, "skipped": dict(counts),
                               "csv_sha256": file_sha256(csv_path)})
    return 0


SHUTDOWN_SECONDS = 5


class _deadline:
    """Within `seconds` (None: no limit) the block ends, else the worker processes are killed and the
    process exits with 130, as after a Ctrl-C: every output is already written whole or removed."""

    def __init__(self, seconds: float | None):
        import threading
        self.timer = threading.Timer(seconds, self._expire) if seconds else None

    @staticmethod
    def _expire():
        import multiprocessing
        for worker in multiprocessing.active_children():
            worker.kill()
        print(f"\ninterrupted: the workers did not stop within {SHUTDOWN_SECONDS} s and were killed; finished "
              "images are kept, run the same command again to continue", file=sys.stderr, flush=True)
        os._exit(130)

    def __enter__(self):
        if self.timer is not None:
            self.timer.daemon = True
            self.timer.start()

    def __exit__(self, *exc):
        if self.timer is not None:
            self.timer.cancel()


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: workers shut down, temp files removed


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        code = main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("\ninterrupted: finished images are kept; run the same command again to continue",
              file=sys.stderr)
        code = 130
    # Everything is settled (outputs written or removed): a Ctrl-C landing now, while the
    # interpreter shuts down, would only print a stray "KeyboardInterrupt" and exit 1.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
