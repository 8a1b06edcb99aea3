"""What one sample is: the prompt, the chat messages, how its image is sized, its label, its
record in the conversation JSON, and the encoder that turns a sample into tokens.

Training (the collator) and inference (generation) both load images with `images.load_image` and
the same `ImageSizing`, so a formula is seen at exactly the same resolution in both.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_write_json

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
DEFAULT_IMAGE_SIZE = ""  # "" keeps each image's aspect ratio; "500x100" forces the tutorial's fixed size
# The longest LaTeX_OCR label is ~223 Qwen2 tokens; 256 leaves room and stops runaway repetition.
DEFAULT_MAX_NEW_TOKENS = 256


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
    # sized passes through the processor unchanged). transformers rejects aspect ratios above
    # 200:1; we refuse a little earlier, with one line naming the size (formulas never get close).
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
        # Thinking off (Qwen3.5; other families' templates ignore the flag): the prompt ends with the
        # template's empty, closed <think></think> block, so the model learns to answer at once and
        # generation, from the same prompt, writes no <think> block. Only to a template that reads the flag:
        # transformers hands the processor any other keyword, with a warning on every run.
        thinking = {"enable_thinking": False} if "enable_thinking" in str(processor.chat_template) else {}
        self.use_prompt(processor.apply_chat_template(user_messages("image"), tokenize=False,
                                                      add_generation_prompt=True, **thinking))
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def use_prompt(self, prompt_text: str) -> None:
        """Encode with this rendered prompt (at start-up the template's; or the one a checkpoint was
        trained with)."""
        self.prompt_text = prompt_text
        # Text tokens around the image placeholder, to compute a sample's length without encoding it.
        self.prompt_text_tokens = len(self.tokenizer(prompt_text, add_special_tokens=False).input_ids) - 1

    # ---- lengths (cheap: image header + label tokenisation) -------------------------------
    def image_tokens(self, width: int, height: int) -> int:
        w, h = self.sizing.target_size(width, height)
        return (w // self.sizing.factor) * (h // self.sizing.factor)

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False).input_ids + [self.end_of_turn_id]

    # ---- encoding ---------------------------------------------------------------------------
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


# ---- the saved sample definition ----------------------------------------------------------
# train.py writes what one sample was into every checkpoint, OUTPUT_DIR/final and a merged model
# folder; infer.py and --resume read it back, so a model is always shown images and prompts the
# way it was trained, whatever the flags' defaults are on the day.

SAMPLE_FILE = "latexocr_sample.json"
SAMPLE_FORMAT = 1
# How labels become answers: used as written (the dataset's KaTeX-normalised text), the answer
# followed by the end token; empty labels are not samples (is_valid_label).
LABEL_RULE = "verbatim label + end_token; empty / whitespace-only / NaN labels skipped"
# The flags that decide a sample's image, with their one default each and the saved key.
SIZING_SETTINGS = {"IMAGE_MIN_PIXELS": ("min_pixels", DEFAULT_MIN_PIXELS),
                   "IMAGE_MAX_PIXELS": ("max_pixels", DEFAULT_MAX_PIXELS),
                   "IMAGE_SIZE": ("fixed_size", DEFAULT_IMAGE_SIZE)}


def sample_definition(encoder: SampleEncoder, model_type: str) -> dict:
    """Everything that decides what the model sees and must produce, as a small JSON-able dict."""
    sizing = encoder.sizing
    return {
        "about": "What one training sample is (written by train.py, read by infer.py and --resume; "
                 "not meant to be edited). See latexocr/sample.py.",
        "format": SAMPLE_FORMAT,
        "model_type": model_type,
        "instruction": PROMPT,
        "prompt_text": encoder.prompt_text,  # system + user turn (image placeholder, instruction) + answer header
        "end_token": END_OF_TURN,
        "labels": LABEL_RULE,
        "image": {"factor": sizing.factor, "min_pixels": sizing.min_pixels, "max_pixels": sizing.max_pixels,
                  "fixed_size": f"{sizing.fixed[0]}x{sizing.fixed[1]}" if sizing.fixed else ""},
    }


def write_sample_definition(folder: str | os.PathLike, definition: dict) -> Path:
    path = Path(folder) / SAMPLE_FILE
    atomic_write_json(path, definition)
    return path


def read_sample_definition(folder: str | os.PathLike | None) -> dict | None:
    """The definition saved in `folder`, or None if there is none (a model saved before it existed)."""
    if folder is None or not (Path(folder) / SAMPLE_FILE).is_file():
        return None
    path = Path(folder) / SAMPLE_FILE
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
        image = definition["image"]
        int(image["min_pixels"]), int(image["max_pixels"]), parse_size(image["fixed_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not a valid sample definition ({type(exc).__name__}: {exc}); "
                         f"restore it, or delete it to use today's defaults") from None
    return definition


def follow_sample_definition(args, definition: dict | None, where: str | None,
                             note_if_missing: bool = True, verbose: bool = True) -> None:
    """Fill args' unset image sizing (None: the scripts' default) from the saved definition, else
    with today's defaults. A value the user chose (a flag, or edited in the script) wins; where it
    contradicts the saved one, with a one-line warning naming both. Without a definition, a
    one-line note when `note_if_missing`. verbose=False: no messages (the other processes of a run)."""
    say = _messages(verbose)
    if definition is None and note_if_missing and where is not None:
        unset = [name for name in SIZING_SETTINGS if getattr(args, name.lower()) is None]
        current = ", ".join(f"{name}={SIZING_SETTINGS[name][1]!r}" for name in unset)
        say(f"note: {where} has no {SAMPLE_FILE} (saved before it existed)"
            + (f": using {current}; pass the flags it was trained with if they differ" if unset else ""))
    for name, (key, default) in SIZING_SETTINGS.items():
        current = getattr(args, name.lower())
        saved = definition["image"][key] if definition is not None else None
        if current is None:
            setattr(args, name.lower(), default if saved is None else saved)
            continue
        if isinstance(default, str):  # compare sizes as sizes: "500X100" is "500x100"
            saved, current = (_size_text(saved) if saved is not None else None), _size_text(current)
        if saved is not None and current != saved:
            flag = "--" + name.lower().replace("_", "-")
            say(f"warning: {flag} {current or '(aspect kept)'} contradicts the {saved or '(aspect kept)'} "
                f"saved in {Path(where) / SAMPLE_FILE}; using {current or '(aspect kept)'}")


def check_sample_definition(encoder: SampleEncoder, definition: dict | None, model_type: str, where: str,
                            verbose: bool = True) -> None:
    """Use the saved prompt; warn (one line each) where the model or its patch grid differ from training's."""
    if definition is None:
        return
    say = _messages(verbose)
    saved_file = Path(where) / SAMPLE_FILE
    if definition.get("prompt_text") and definition["prompt_text"] != encoder.prompt_text:
        say(f"note: using the prompt saved in {saved_file} ({definition['prompt_text']!r}) instead of "
            f"{encoder.prompt_text!r}")
        encoder.use_prompt(definition["prompt_text"])
    checks = [("model type", definition.get("model_type"), model_type),
              ("image patch factor", definition["image"].get("factor"), encoder.sizing.factor),
              ("end token", definition.get("end_token"), END_OF_TURN)]
    for what, saved, current in checks:
        if saved is not None and saved != current:
            say(f"warning: {what} {current!r} differs from the {saved!r} saved in {saved_file}")


def setup_sample(processor, args, model_type: str, folder: str | None, note_if_missing: bool = True,
                 verbose: bool = True) -> tuple[SampleEncoder, dict]:
    """(encoder, definition) of a run: what one sample is, as the model in `folder` (a checkpoint, an
    adapter, a merged model; None: a new run) was trained, unless settings say otherwise.

    Follows the definition saved there (image sizing, prompt), warns where the model differs from
    training's, and makes the processor resize as the encoder does (so the processor saved with
    each checkpoint gives training's image grid). The definition is what train.py saves."""
    saved = read_sample_definition(folder)
    follow_sample_definition(args, saved, folder, note_if_missing=note_if_missing, verbose=verbose)
    sizing = sizing_for(processor, args.image_min_pixels, args.image_max_pixels, args.image_size)
    encoder = SampleEncoder(processor, sizing)
    check_sample_definition(encoder, saved, model_type, folder, verbose=verbose)
    set_processor_sizing(processor, sizing)
    return encoder, sample_definition(encoder, model_type)


def _messages(verbose: bool):
    """Where a one-line note or warning goes: stderr, or nowhere (the other processes of a run)."""
    return (lambda text: print(text, file=sys.stderr)) if verbose else (lambda text: None)


def _size_text(text: str) -> str:
    size = parse_size(text)
    return f"{size[0]}x{size[1]}" if size else ""


def set_processor_sizing(processor, sizing: ImageSizing) -> None:
    """Make the processor resize as `sizing` does, so that a saved processor (plain
    AutoProcessor.from_pretrained) gives training's image grid for aspect-preserving sizing.

    A fixed size cannot be expressed by the processor: its bounds are then widened to let the
    pre-resized image pass unchanged (callers warn that plain loading won't resize to it).
    """
    low, high = sizing.min_pixels, sizing.max_pixels
    if sizing.fixed is not None:
        w, h = sizing.target_size(1, 1)
        low, high = min(low, w * h), max(high, w * h)
    ip = processor.image_processor
    ip.size = {"shortest_edge": low, "longest_edge": high}
    for name, value in (("min_pixels", low), ("max_pixels", high)):  # older transformers keep these too
        if getattr(ip, name, None) is not None:
            setattr(ip, name, value)


# ---- the conversation JSON (csv2json.py writes it, records.read_labelled reads it) ----------------

def make_record(index: int, image_path: str, text: str) -> dict:
    """One record of latex_ocr_{train,val}.json, exactly as the tutorial's csv2json.py writes it
    (its train.py reads the user turn's value as the image path)."""
    return {"id": f"identity_{index}",
            "conversations": [{"role": "user", "value": image_path},
                              {"role": "assistant", "value": text}]}


def parse_record(record: dict, base_dir: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """(absolute image path, label or None) of a conversation record: the tutorial's (the value
    is the path) or this project's earlier one ({"from": ..., "value": "<|vision_start|>path<|vision_end|>"}).

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


# ---- the label rule (data2csv, csv2json, training, inference's scoring) -------------------------

# How NaN/None look once a pandas-written CSV is read back as text: not labels (a KaTeX-normalised
# label spells a word with spaces, "n a n").
NAN_STRINGS = {"nan", "NaN", "NAN", "None", "null", "<NA>"}


def label_problem(text) -> str | None:
    """Why `text` is not a usable label (one of a few fixed phrases), or None if it is: a usable
    label is a string with something besides whitespace; NaN and None, also as text, are not."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "missing label"
    if not isinstance(text, str):
        return "label not a string"
    stripped = text.strip()
    if stripped in NAN_STRINGS:
        return "missing label"
    if not stripped:
        return "empty label" if text == "" else "whitespace-only label"
    return None


def is_valid_label(text) -> bool:
    return label_problem(text) is None
