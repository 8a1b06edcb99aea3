"""Atomic file writes: a reader (or a re-run after a crash) never sees half a file.

Every output is written to a temporary file in the same folder and then moved over the
final name with os.replace, which is atomic on POSIX and Windows when both names are on
the same filesystem (hence "same folder", never /tmp).
"""
from __future__ import annotations

import contextlib
import io
import json
import hashlib
import os
import tempfile
from pathlib import Path

from PIL import Image

# mkstemp creates files readable by the owner only; give outputs the usual permissions.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Modes PNG stores as they are; anything else (CMYK, YCbCr, F, ...) is converted to RGB(A).
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """open() that only creates `path` when the block finishes without an exception."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # name the file the user asked for, not our temp file
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    path = Path(path)
    # A per-process temp name: two writers of the same file never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def to_png_bytes(data: bytes) -> bytes:
    """PNG bytes with exactly the pixels of the encoded image `data` (any format PIL reads).

    Already-PNG input is returned unchanged after a full decode (so truncated or corrupt
    files are caught): lossless, byte-identical and ~10x faster than re-encoding.
    Other formats are decoded and re-encoded as PNG, keeping the mode (RGBA stays RGBA:
    handwritten samples are transparent, and the training code composites them on white).
    Raises on anything that does not decode.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ValueError("no image bytes")
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes every pixel: verify() alone misses truncated image data
        if im.format == "PNG" and bytes(data[:8]) == PNG_SIGNATURE:
            return bytes(data)
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        if im.mode not in _PNG_MODES:
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        out = io.BytesIO()
        # compress_level 1: PNG is lossless at any level; higher levels only cost CPU.
        im.save(out, format="PNG", compress_level=1)
        return out.getvalue()


def save_image_png(data: bytes, path: str | os.PathLike, fsync: bool = False) -> None:
    """Validate `data` as an image and store it losslessly as PNG at `path`, atomically.

    No fsync by default: thousands of small files, and a crash leaves at worst a file that
    a re-run overwrites (the completion marker is only written after everything).
    """
    atomic_write_bytes(path, to_png_bytes(data), fsync=fsync)


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


def worker_init(parent_pid: int) -> None:
    """Process-pool initializer: Ctrl-C is the main process's to handle, and no worker
    outlives it, however it ends (even SIGKILL, which leaves no chance to clean up).

    SIGINT reaches the whole process group; a worker interrupted mid-task would break the
    pool's queues and could leave the main process waiting forever, so workers ignore it and
    the main process shuts them down. A daemon thread exits the worker once its parent is
    gone (re-parented: getppid changes).
    """
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def save_images_batch(items: list[tuple[int, bytes, str]]) -> list[tuple[int, str | None]]:
    """Process-pool entry point: [(index, image bytes, output path)] -> [(index, error or None)].

    Lives in the package (not the script) so worker processes can import it under any
    multiprocessing start method.
    """
    results = []
    for index, data, path in items:
        try:
            save_image_png(data, path)
            results.append((index, None))
        except Exception as exc:  # a bad row is reported, never fatal
            if isinstance(exc, OSError) and exc.errno is not None:  # writing failed: not the row's fault
                raise
            from .sample import image_problem
            # a stable phrase: the same bad row gives the same report in every run
            results.append((index, image_problem(data) or f"cannot convert to PNG ({type(exc).__name__})"))
    return results


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes: data2csv writes it into the completion record, csv2json checks it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
