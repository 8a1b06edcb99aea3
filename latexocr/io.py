"""Atomic file writes: a reader (or a re-run after a crash) never sees half a file.

Every output is written to a temporary file in the same folder and then moved over the
final name with os.replace, which is atomic on POSIX and Windows when both names are on
the same filesystem (hence "same folder", never /tmp).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = True, **kwargs):
    """open() that only creates `path` when the block finishes without an exception.

    fsync: the data is on disk before the name points at it (off for data2csv's thousands of
    images, which a re-run rewrites if a crash lost them).
    """
    path = Path(path)
    # A per-process temp name: two processes writing the same file never share a temp file.
    # Not mkstemp: its random name and the chmod after it cost data2csv measurable time per image.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            f = open(tmp, mode, **kwargs)
        except FileNotFoundError:  # the folder is created on first use, not checked on every call
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, mode, **kwargs)
    except OSError as exc:  # name the file the user asked for, not our temp file
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    try:
        with f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def check_writable(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in `folder` (created if missing), or None if they can."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"cannot write to {folder}: {exc.strerror or exc}"
    return None


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes: data2csv writes it into the completion record, csv2json checks it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def completion_record(csv_path: Path) -> tuple[Path, object, bool]:
    """data2csv.py's completion record of a CSV: (its path CSV.done.json, its JSON or None when absent
    or unreadable, whether it is a record holding the CSV's current SHA-256). data2csv writes it last
    and skips a finished run by it; csv2json reads only a CSV it vouches for."""
    marker = csv_path.with_name(csv_path.name + ".done.json")
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        done = None
    finished = isinstance(done, dict) and csv_path.is_file() and done.get("csv_sha256") == file_sha256(csv_path)
    return marker, done, finished


def read_text(path: Path, error: type[Exception]) -> str:
    """A UTF-8 text file's contents (a BOM allowed), else `error` naming the first line that is not UTF-8.
    Line ends are kept as written (newline=""): a CSV field may hold a \r, which universal newlines would
    turn into \n; JSON and JSONL (jsonl_records) parse the same either way."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise error(f"{path}: line {line} is not UTF-8 text") from None


def jsonl_records(path: Path, text: str, error: type[Exception]) -> list[tuple[int, object]]:
    """(line number, value) of each non-empty line of a JSONL text, else `error` naming the line that is not JSON."""
    records = []
    # JSON Lines ends a line at \n only: str.splitlines also splits at \x1c-\x1e, \x85 and \u2028/9, which a
    # string may hold unescaped (json.dumps(ensure_ascii=False), as infer.py writes a model's output)
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except ValueError as exc:
                raise error(f"{path}: line {number} is not JSON ({exc})") from None
    return records
