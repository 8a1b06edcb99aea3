"""One definition of a sample: labels, image sizing, packing. Tiny random-init models, CPU."""
from pathlib import Path

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


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_padded_batches_positions_from_the_collator_train_as_the_models_own(tiny_family_dirs, formula_images, family):
    """TrainCollator padded_positions (the fast path's default for padded batches, LATEXOCR_SPEED padded_positions):
    the position ids equal the model's get_rope_index (padding included), and the step's loss and LoRA gradients
    equal those of the model computing them itself; samples of different lengths, so some rows are padded."""
    from latexocr.fast.trainer import fast_supervised_loss
    from latexocr.modeling import add_lora
    processor = AutoProcessor.from_pretrained(tiny_family_dirs[family])
    encoder = SampleEncoder(processor, sizing_for(processor))
    samples = formula_images[:5]
    own = TrainCollator(encoder, packed=False)(samples)
    given = TrainCollator(encoder, packed=False, padded_positions=True)(samples)
    assert not torch.equal(own["attention_mask"].sum(1), own["attention_mask"].sum(1)[:1].expand(5))  # padded rows
    torch.manual_seed(0)
    model = add_lora(AutoModelForImageTextToText.from_pretrained(tiny_family_dirs[family], attn_implementation="sdpa"),
                     8, 16, 0.0)
    expected, _ = model.base_model.model.model.get_rope_index(
        own["input_ids"], mm_token_type_ids=own["mm_token_type_ids"], image_grid_thw=own["image_grid_thw"],
        attention_mask=own["attention_mask"])
    assert torch.equal(given["position_ids"], expected)
    assert {k: v for k, v in given.items() if k != "position_ids"}.keys() == own.keys()

    def step(batch):
        model.zero_grad()
        loss, n = fast_supervised_loss(model, dict(batch))
        (loss / n).backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    loss_own, grads_own = step(own)
    loss_given, grads_given = step(given)
    assert torch.allclose(loss_given, loss_own, rtol=1e-6) and torch.allclose(grads_given, grads_own, rtol=1e-5, atol=1e-8)
    loss_wrong, _ = step({**given, "position_ids": given["position_ids"] // 2})  # the model does read them
    assert not torch.allclose(loss_wrong, loss_own, rtol=1e-6)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "latex_ocr" / "full_val").is_dir(),
                    reason="../shared/latex_ocr/full_val (real images) is absent")
def test_count_syncs_finds_the_padded_steps_per_sample_syncs_gone():
    """bench/count_syncs.py (4 samples here, not train.py's 16: the CPU's time): Qwen3.5's padded step asks the
    GPU for values ~7 times a sample when the model computes its own M-RoPE positions, and only a fixed few
    (none of them per sample) when the collator gives them."""
    import json
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]

    def syncs(speed):
        proc = subprocess.run([sys.executable, str(root / "bench" / "count_syncs.py"), "--families", "qwen3_5",
                               "--micro", "4"], cwd=root / "bench", capture_output=True, text=True, timeout=600,
                              env={**os.environ, "LATEXOCR_SPEED": speed,
                                   "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    own, given = syncs("padded_positions=off"), syncs("")
    assert own["syncs"] >= given["syncs"] + 4 * 5, (own, given)
    assert not any("get_rope_index" in site for site in given["top_sites"]), given
