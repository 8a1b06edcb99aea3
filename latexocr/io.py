"""Atomic file writes: a reader (or a re-run after a crash) never sees half a file.

Every output is written to a temporary file in the same folder and then moved over the
final name with os.replace, which is atomic on POSIX and Windows when both names are on
the same filesystem (hence "same folder", never /tmp).
"""
from __future__ import annotations

import contextlib
import io
import json
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
            results.append((index, f"{type(exc).__name__}: {exc}"[:200]))
    return results
