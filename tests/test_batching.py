"""One definition of a sample: labels, image sizing, packing. Tiny random-init models, CPU."""
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from latexocr.batching import IGNORE_INDEX, SampleEncoder, TrainCollator, mrope_positions
from latexocr.images import load_image
from latexocr.sample import ImageSizing, sizing_for


def test_supervised_tokens_are_answer_and_end_of_turn(tiny_model_dir, formula_images):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    encoder = SampleEncoder(processor, sizing_for(processor))
    batch = TrainCollator(encoder, packed=False)(formula_images[:4])
    for row, (_, label) in zip(batch["labels"], formula_images[:4]):
        supervised = row[row != IGNORE_INDEX].tolist()
        assert processor.tokenizer.decode(supervised) == label + "<|im_end|>"
    # image, system and user tokens are never supervised
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not ((batch["input_ids"] == image_id) & (batch["labels"] != IGNORE_INDEX)).any()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_image_size_same_in_training_and_inference(tiny_family_dirs, formula_images, family):
    processor = AutoProcessor.from_pretrained(tiny_family_dirs[family])
    sizing = sizing_for(processor)
    assert sizing.factor == (32 if family == "qwen3_vl" else 28)
    encoder = SampleEncoder(processor, sizing)
    from latexocr.batching import generation_batch
    for path, label in formula_images[:6]:
        raw = Image.open(path)
        w, h = sizing.target_size(*raw.size)
        assert w % sizing.factor == 0 and h % sizing.factor == 0
        assert w * h >= sizing.min_pixels
        train = TrainCollator(encoder, packed=True)([(path, label)])
        infer = generation_batch(encoder, [load_image(path, sizing)])
        patch = sizing.factor // 2
        assert train["image_grid_thw"].tolist() == infer["image_grid_thw"].tolist() == [[1, h // patch, w // patch]]
        assert torch.equal(train["pixel_values"], infer["pixel_values"])


def test_sizing_keeps_aspect_and_bounds():
    sizing = ImageSizing(factor=28, min_pixels=32 * 28 * 28, max_pixels=512 * 28 * 28)
    assert sizing.target_size(400, 50) == (448, 56)
    w, h = sizing.target_size(3000, 2000)
    assert w * h <= 512 * 28 * 28 and abs(w / h - 1.5) < 0.1
    assert ImageSizing(factor=28, fixed=(500, 100)).target_size(123, 45) == (504, 112)


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (60, 30), (0, 0, 0, 0))
    img.putpixel((5, 5), (0, 0, 0, 255))
    img.save(tmp_path / "a.png")
    rgb = load_image(tmp_path / "a.png")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((5, 5)) == (0, 0, 0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_mrope_positions_match_model(tiny_family_dirs, formula_images, family):
    processor = AutoProcessor.from_pretrained(tiny_family_dirs[family])
    model = AutoModelForImageTextToText.from_pretrained(tiny_family_dirs[family])
    encoder = SampleEncoder(processor, sizing_for(processor))
    batch = TrainCollator(encoder, packed=False)(formula_images[:3])
    expected, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"],
                                             attention_mask=batch["attention_mask"])
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        ours = mrope_positions(batch["mm_token_type_ids"][i, :n].tolist(), batch["image_grid_thw"][i],
                               processor.image_processor.merge_size)
        assert torch.equal(ours, expected[:, i, :n])



@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_the_prompt_is_built_without_a_library_warning(tiny_family_dirs, family):
    """The sample's prompt turns thinking off only in a template that reads the flag (Qwen3.5's): transformers
    hands any other keyword of apply_chat_template to the processor with a warning, which every run of
    train.py and infer.py printed for Qwen2-VL and Qwen2.5-VL."""
    import logging

    class Caught(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    warnings, handler = [], Caught(logging.WARNING)
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        processor = AutoProcessor.from_pretrained(tiny_family_dirs[family])
        encoder = SampleEncoder(processor, sizing_for(processor))
    finally:
        library.removeHandler(handler)
    assert not [w for w in warnings if "processor_kwargs" in w], warnings
    assert encoder.prompt_text.endswith("<think>\n\n</think>\n\n" if family == "qwen3_5" else "assistant\n")

