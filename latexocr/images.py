"""Image files: loading one for the model, the one "is this image usable" check, and PNG export.

data2csv.py converts and checks with it, csv2json.py and training check with `image_problem`, and
training (the collator) and inference (generation) both load with `load_image` and the same
`sample.ImageSizing`, so a formula is seen at exactly the same resolution in both.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from .io import atomic_open

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Modes PNG stores as they are; anything else (CMYK, YCbCr, F, ...) is converted to RGB(A).
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


# ---- loading, for the model -----------------------------------------------------------------

def load_image(path: str | os.PathLike, sizing=None) -> Image.Image:
    """Open an image as RGB (transparent pixels on white, as the formula was drawn), resized by
    `sizing` (a sample.ImageSizing, or None to keep its size).

    Raises FileNotFoundError / OSError with the path in the message.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            image = _to_rgb(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as exc:  # PIL raises several types for broken files
        raise OSError(f"cannot read image {path}: {exc}") from exc
    if sizing is not None:
        size = sizing.target_size(*image.size)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


# ---- the one "usable image" check (data2csv, csv2json, training, inference) -------------------

def image_problem(path) -> str | None:
    """Why an image cannot be used, as one stable phrase (no object addresses), or None if it can.

    `path`: a file path, or the encoded bytes of an image (data2csv checks rows before writing
    them). Every pixel is decoded: reading only the header misses truncated files.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        if len(path) == 0:
            return "empty image (0 bytes)"
        source = io.BytesIO(bytes(path))
    else:
        try:
            size = os.stat(path).st_size
        except (FileNotFoundError, NotADirectoryError):
            return "missing image"
        except OSError as exc:
            return f"unreadable image file ({exc.strerror or type(exc).__name__})"
        if not Path(path).is_file():
            return "missing image"
        if size == 0:
            return "empty image file (0 bytes)"
        source = path
    try:
        with Image.open(source) as im:
            im.load()
            width, height = im.size
    except Image.DecompressionBombError:
        return "image too large (decompression bomb limit)"
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        if isinstance(exc, Image.UnidentifiedImageError):
            return "not an image (undecodable)"
        if "truncat" in str(exc).lower():
            return "truncated image"
        if isinstance(exc, OSError) and exc.errno is not None:  # the file system, not the data
            return f"unreadable image file ({exc.strerror})"
        return "corrupt image (undecodable)"
    if width == 0 or height == 0:
        return "image of zero size"
    return None


# ---- PNG export (data2csv.py) -----------------------------------------------------------------

def to_png_bytes(data: bytes) -> bytes:
    """PNG bytes with exactly the pixels of the encoded image `data` (any format PIL reads).

    Already-PNG input is returned unchanged after a full decode (so truncated or corrupt
    files are caught): lossless, byte-identical and ~10x faster than re-encoding.
    Other formats are decoded and re-encoded as PNG, keeping the mode (RGBA stays RGBA:
    handwritten samples are transparent, and load_image composites them on white).
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


def save_image_png(data: bytes, path: str | os.PathLike) -> None:
    """Validate `data` as an image and store it losslessly as PNG at `path`, atomically.

    No fsync: thousands of small files, and a crash leaves at worst a file that a re-run
    overwrites (data2csv's completion marker is only written, with fsync, after everything).
    """
    png = to_png_bytes(data)
    with atomic_open(path, "wb", fsync=False) as f:
        f.write(png)


# ---- data2csv.py's process pool: its initializer and its task -----------------------------------
# In the package (not the script), so worker processes can import them under any start method.

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
    """[(index, image bytes, output path)] -> [(index, error or None)]: a bad row is reported, never fatal."""
    results = []
    for index, data, path in items:
        try:
            save_image_png(data, path)
            results.append((index, None))
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # writing failed: not the row's fault
                raise
            # a stable phrase: the same bad row gives the same report in every run
            results.append((index, image_problem(data) or f"cannot convert to PNG ({type(exc).__name__})"))
    return results
