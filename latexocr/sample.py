"""What one sample is: the prompt, the chat messages, how its image is loaded and sized, and the
encoder that turns a sample into tokens.

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
IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"

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


class SampleEncoder:
    """Encodes samples for one processor and one image sizing (shared by training and inference)."""

    def __init__(self, processor, sizing: ImageSizing):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.sizing = sizing
        # The prompt text is the same for every sample: one image placeholder and the instruction.
        self.prompt_text = processor.apply_chat_template(user_messages("image"), tokenize=False,
                                                         add_generation_prompt=True)
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        # Text tokens around the image placeholder, to compute a sample's length without encoding it.
        self.prompt_text_tokens = len(self.tokenizer(self.prompt_text, add_special_tokens=False).input_ids) - 1

    # ---- lengths (cheap: image header + label tokenisation) -------------------------------
    def image_tokens(self, width: int, height: int) -> int:
        w, h = self.sizing.target_size(width, height)
        return (w // self.sizing.factor) * (h // self.sizing.factor)

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False).input_ids + [self.end_of_turn_id]

    # ---- encoding ---------------------------------------------------------------------------
    def encode_prompts(self, images) -> dict:
        """Processor outputs for a list of already-loaded images, text not yet padded."""
        return self.processor(text=[self.prompt_text] * len(images), images=list(images),
                              return_tensors=None, padding=False)

    def encode_train(self, image, answer: str) -> dict:
        """input_ids / labels / mm_token_type_ids (lists) and pixel_values / image_grid_thw (tensors)."""
        out = self.processor(text=[self.prompt_text], images=[image], return_tensors="pt")
        prompt_ids = out["input_ids"][0].tolist()
        answer_ids = self.answer_ids(answer)
        # The answer is tokenised on its own and appended, so the prompt/answer boundary is exact.
        return {
            "input_ids": prompt_ids + answer_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
            "mm_token_type_ids": out["mm_token_type_ids"][0].tolist() + [0] * len(answer_ids),
            "pixel_values": out["pixel_values"],
            "image_grid_thw": out["image_grid_thw"],
        }


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
