"""What one sample is: the prompt, the chat messages, and how its image is loaded and sized.

Training (the collator) and inference (generation) both call `load_image` with the same
`ImageSizing`, so a formula is seen at exactly the same resolution in both.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# The tutorial's instruction, kept verbatim so adapters trained with it keep working.
PROMPT = "你是一个LaText OCR助手,目标是读取用户输入的照片，转换成LaTex公式。"

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

# Printed LaTeX_OCR images are ~200-500 px wide and 40-50 px high. The lower bound lifts a
# 400x50 formula to 448x56 (two rows of 28-px patches, 32 visual tokens) instead of
# squashing it to one row; the upper bound caps large handwritten photos at 512 tokens.
DEFAULT_MIN_PIXELS = 32 * 28 * 28
DEFAULT_MAX_PIXELS = 512 * 28 * 28


@dataclass(frozen=True)
class ImageSizing:
    """How an image is resized before the vision encoder sees it.

    factor: the model's patch size x spatial merge size (28 for Qwen2/2.5-VL, 32 for Qwen3-VL).
    min_pixels / max_pixels: the area bounds; the aspect ratio is kept (transformers' smart_resize).
    fixed: (width, height) to force one size for every image (the tutorial's 500x100), or None.
    """

    factor: int = 28
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    fixed: tuple[int, int] | None = None

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to: multiples of `factor`, within the bounds."""
        if self.fixed is not None:
            w, h = self.fixed
            return (max(self.factor, round(w / self.factor) * self.factor),
                    max(self.factor, round(h / self.factor) * self.factor))
        return _smart_resize(width, height, self.factor, self.min_pixels, self.max_pixels)


def _smart_resize(width: int, height: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    # transformers' own Qwen2-VL rule (the processor applies it too, so an image we already
    # sized passes through the processor unchanged). Extreme aspect ratios (> 200:1) are
    # rejected by transformers; formulas never reach that, so we clamp instead of failing.
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if max(width, height) / max(1, min(width, height)) > 190:
        raise ValueError(f"image of {width}x{height} has an aspect ratio above 190:1")
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'500x100' -> (500, 100); '' or None -> None (keep each image's aspect ratio)."""
    if not text:
        return None
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size must look like 500x100 (width x height), got {text!r}") from None
    return width, height


def sizing_for(processor, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
               fixed: tuple[int, int] | str | None = None) -> ImageSizing:
    """The sizing for a model, read from its own image processor (patch 14 or 16, merge 2).

    fixed: (width, height) or "500x100" to force one size for every image."""
    if isinstance(fixed, str) or fixed is None:
        fixed = parse_size(fixed)
    ip = processor.image_processor
    return ImageSizing(factor=int(ip.patch_size) * int(ip.merge_size),
                       min_pixels=min_pixels, max_pixels=max_pixels, fixed=fixed)


def load_image(path: str | os.PathLike, sizing: ImageSizing | None = None) -> Image.Image:
    """Open an image as RGB (transparent pixels on white, as the formula was drawn), resized by `sizing`.

    Raises FileNotFoundError / PIL.UnidentifiedImageError / OSError with the path in the message.
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


def user_messages(image) -> list[dict]:
    """The chat messages for one image (a PIL image or a path), without the answer."""
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": PROMPT}]}]


# ---- the tutorial's conversation JSON -------------------------------------------------------

def make_record(index: int, image_path: str, text: str) -> dict:
    """One row of latex_ocr_{train,val}.json, in the tutorial's format."""
    return {"id": f"identity_{index}",
            "conversations": [{"from": "user", "value": f"{VISION_START}{image_path}{VISION_END}"},
                              {"from": "assistant", "value": text}]}


def parse_record(record: dict, base_dir: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """(absolute image path, label or None) of a conversation record.

    Relative image paths are resolved against `base_dir` (the JSON file's folder), so the
    project folder can move; absolute paths are used as they are.
    """
    turns = record["conversations"]
    value = turns[0]["value"]
    if VISION_START in value:
        value = value.split(VISION_START, 1)[1].split(VISION_END, 1)[0]
    path = Path(value.strip())
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    label = turns[1]["value"] if len(turns) > 1 else None
    return str(path), label


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def is_valid_label(text) -> bool:
    """A usable label: a string with something besides whitespace (NaN and None are not)."""
    if not isinstance(text, str):
        return False
    return bool(text.strip())


# ---- the one "usable image" check (data2csv, csv2json, training, inference) -------------------

def image_problem(path) -> str | None:
    """Why an image cannot be used, as one stable phrase (no object addresses), or None if it can.

    `path`: a file path, or the encoded bytes of an image (data2csv checks rows before writing
    them). Every pixel is decoded: reading only the header misses truncated files.
    """
    import io

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
