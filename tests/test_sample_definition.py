"""The sample definition travels with every checkpoint, adapter and merged model (issue 12). CPU, tiny model.

train.py runs with a non-default image sizing; infer.py, run afterwards without any sizing flag,
must show the model the images exactly as training did (same predictions as with the flags and the
same scores as train.py's own final evaluation). The adapters are barely trained (2 steps), so
their output is a near-random function of the pixels: any change of sizing changes it.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

import infer

from latexocr.sample import SAMPLE_FILE, make_record
from helpers import ROOT, draw_formula, printed_metrics, read_csv, run_main

SHARED_VAL = ROOT.parent / "shared" / "latex_ocr" / "small"  # real LaTeX_OCR images, where present

LABELS = ["x ^ 2", "a + b = c", "\\pi", "y _ 1", "e ^ x", "1 / 2"]
MIN_PIXELS, MAX_PIXELS = 16 * 28 * 28, 128 * 28 * 28  # not the defaults (32 and 512 patches of 28 px)
TINY = ["--model-source", "local", "--num-workers", "0", "--swanlab-mode", "disabled", "--lora-dropout", "0",
        "--max-new-tokens", "8", "--save-steps", 1, "--batch-size", 6, "--micro-batch-size", 6,
        "--learning-rate", 1e-4, "--lora-alpha", 64, "--no-eval-base-model"]


def infer_args(model, out=None, adapter=None) -> list:
    args = ["--model-id", model, "--model-source", "local", "--num-workers", "0", "--max-new-tokens", "8"]
    if out is not None:
        args += ["--output-dir", out]
    if adapter is not None:
        args += ["--adapter", adapter]
    return args


def real_images(limit: int) -> list[tuple[str, str]]:
    """(path, label) of the shared LaTeX_OCR validation images, or [] where ../shared is absent."""
    matching = SHARED_VAL / "matching" / "val.matching.txt"
    if not matching.is_file():
        return []
    formulas = (SHARED_VAL / "formulas" / "val.formulas.norm.txt").read_text(encoding="utf-8").splitlines()
    pairs = []
    for line in matching.read_text(encoding="utf-8").splitlines()[:limit]:
        name, index = line.split()
        pairs.append((str(SHARED_VAL / "images" / "images_val" / name), formulas[int(index)]))
    return pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train.json: 6 drawn formulas of different sizes; val.json: those and 6 real LaTeX_OCR images."""
    folder = tmp_path_factory.mktemp("sample_data")
    train = []
    for i, label in enumerate(LABELS):
        draw_formula(folder / "images" / f"{i}.png", label, (90 + 45 * i, 26 + 9 * (i % 3)), seed=i)
        train.append(make_record(i, f"images/{i}.png", label))
    val = train + [make_record(100 + i, path, label) for i, (path, label) in enumerate(real_images(6))]
    (folder / "train.json").write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")
    (folder / "val.json").write_text(json.dumps(val, ensure_ascii=False), encoding="utf-8")
    return folder


def train_run(folder: Path, data: Path, model, *flags):
    out = folder / "out"
    proc = run_main("train.py", "--model-id", model, "--train-json", data / "train.json",
                      "--val-json", data / "val.json", "--output-dir", out, "--max-steps", 2, *TINY, *flags)
    return out, proc


def final_eval(stdout: str) -> dict:
    """train.py's '[eval @ step N] exact_match 0.5, ...' line as {name: text}."""
    line = re.findall(r"\[eval @ step \d+\] (.*)", stdout)[-1]
    return dict(item.split(" ") for item in line.split(", "))


def same_as_train_eval(metrics: dict, train_stdout: str) -> None:
    train = final_eval(train_stdout)
    for key in ("exact_match", "edit_distance", "edit_distance_ref", "bleu4", "n", "errors"):
        assert f"{metrics[key]:.4g}" == train[key], (key, metrics, train)


def predict(tmp: Path, name: str, data: Path, *args) -> tuple[list[str], str, dict]:
    """infer.py on val.json: (predictions, stderr, printed metrics)."""
    proc = run_main("infer.py", data / "val.json", "--output", tmp / f"{name}.csv", *args)
    return [r["prediction"] for r in read_csv(tmp / f"{name}.csv")], proc.stderr, printed_metrics(proc.stdout)


def predict_here(capsys, tmp: Path, name: str, data: Path, *args) -> tuple[list[str], str]:
    """The same in this process (faster: no interpreter start): (predictions, stderr)."""
    capsys.readouterr()
    infer.main([str(data / "val.json"), "--output", str(tmp / f"{name}.csv"), *map(str, args)])
    return [r["prediction"] for r in read_csv(tmp / f"{name}.csv")], capsys.readouterr().err


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory, data, tiny_model_dir):
    """(OUTPUT_DIR, train.py's process, infer.py's output without flags) of a run at --image-size 500x100."""
    folder = tmp_path_factory.mktemp("fixed")
    out, train = train_run(folder, data, tiny_model_dir, "--image-size", "500x100")
    return out, train, predict(folder, "plain", data, *infer_args(tiny_model_dir, out))


@pytest.fixture(scope="module")
def pixels_run(tmp_path_factory, data, tiny_model_dir):
    """The same for a run with non-default IMAGE_MIN_PIXELS / IMAGE_MAX_PIXELS."""
    folder = tmp_path_factory.mktemp("pixels")
    out, train = train_run(folder, data, tiny_model_dir,
                           "--image-min-pixels", MIN_PIXELS, "--image-max-pixels", MAX_PIXELS)
    return out, train, predict(folder, "plain", data, *infer_args(tiny_model_dir, out))


def test_fixed_size_travels_with_every_checkpoint_and_the_adapter(fixed_run, data, tiny_model_dir, tmp_path,
                                                                   capsys):
    out, train, (plain, err, metrics) = fixed_run
    for folder in ("checkpoint-1", "checkpoint-2", "final"):
        saved = json.loads((out / folder / SAMPLE_FILE).read_text())
        assert saved["image"]["fixed_size"] == "500x100" and saved["model_type"] == "qwen2_vl"
        assert saved["image"]["factor"] == 28 and saved["end_token"] == "<|im_end|>"
        assert "LaTex" in saved["prompt_text"] and "<|image_pad|>" in saved["prompt_text"]

    assert "warning: --" not in err and "note:" not in err
    flagged, err = predict_here(capsys, tmp_path, "flagged", data, *infer_args(tiny_model_dir, out),
                                "--image-size", "500x100")
    assert "warning: --" not in err
    assert plain == flagged
    same_as_train_eval(metrics, train.stdout)


def test_a_flag_that_contradicts_the_saved_size_wins_with_one_warning(fixed_run, data, tiny_model_dir, tmp_path,
                                                                       capsys):
    out, _, (plain, _, _) = fixed_run
    other, err = predict_here(capsys, tmp_path, "other", data, *infer_args(tiny_model_dir, out),
                              "--image-size", "100x500")
    assert "warning: --image-size 100x500 contradicts the 500x100 saved in" in err
    if not real_images(1):  # two steps on 6 drawn formulas leave the tiny model answering alike for every image
        pytest.skip(f"{SHARED_VAL} absent: no real images whose predictions show the sizing")
    assert other != plain  # the sizing decides the predictions: the checks above can fail


def test_pixel_bounds_travel_with_the_adapter(pixels_run, data, tiny_model_dir, tmp_path, capsys):
    out, train, (plain, err, metrics) = pixels_run
    saved = json.loads((out / "final" / SAMPLE_FILE).read_text())["image"]
    assert (saved["min_pixels"], saved["max_pixels"], saved["fixed_size"]) == (MIN_PIXELS, MAX_PIXELS, "")

    assert "warning: --" not in err
    flagged, err = predict_here(capsys, tmp_path, "flagged", data, *infer_args(tiny_model_dir, out),
                                "--image-min-pixels", MIN_PIXELS, "--image-max-pixels", MAX_PIXELS)
    assert "warning: --" not in err
    assert plain == flagged
    same_as_train_eval(metrics, train.stdout)

    other, err = predict_here(capsys, tmp_path, "other", data, *infer_args(tiny_model_dir, out),
                              "--image-min-pixels", 25088)
    assert f"warning: --image-min-pixels 25088 contradicts the {MIN_PIXELS} saved in" in err
    assert other != plain


def test_merged_model_predicts_and_resizes_as_training(pixels_run, data, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoProcessor

    from latexocr.images import load_image
    from latexocr.sample import ImageSizing

    out, _, (with_adapter, _, _) = pixels_run
    merged = tmp_path / "merged"
    infer.main(["--merge-to", str(merged), *map(str, infer_args(tiny_model_dir, out))])
    assert "warning" not in capsys.readouterr().err
    assert json.loads((merged / SAMPLE_FILE).read_text())["image"]["max_pixels"] == MAX_PIXELS

    from_merged, err, _ = predict(tmp_path, "merged", data, *infer_args(merged, adapter="none"))
    assert "warning: --" not in err
    assert from_merged == with_adapter

    # plain transformers: AutoProcessor on the original images gives training's image grid
    processor = AutoProcessor.from_pretrained(merged)
    training = ImageSizing(factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    paths = [str(p) for p in sorted(SHARED_VAL.parent.rglob("*.png"))][::3]  # printed and handwritten
    # and 20 shapes of our own: tiny, wide, tall, square, larger than the area bound
    for i, (w, h) in enumerate([(60, 20), (900, 60), (2000, 300), (300, 300), (120, 700), (1500, 1000),
                                (90, 26), (500, 100), (100, 500), (4000, 80), (33, 33), (640, 480),
                                (280, 40), (401, 53), (1234, 77), (57, 311), (800, 800), (150, 45),
                                (3000, 2000), (75, 1400)]):
        paths.append(str(draw_formula(tmp_path / "shapes" / f"{i}.png", "x", (w, h))))
    shapes = {Image.open(p).size for p in paths}
    assert len(shapes) >= 20
    for path in paths:
        expected = processor(text=["<|image_pad|>"], images=[load_image(path, training)])["image_grid_thw"]
        plain = processor(text=["<|image_pad|>"], images=[load_image(path)])["image_grid_thw"]
        assert plain.tolist() == expected.tolist(), path


def test_fixed_size_merge_warns_and_merged_folder_keeps_it(fixed_run, data, tiny_model_dir, tmp_path, capsys):
    out, _, (with_adapter, _, _) = fixed_run
    merged = tmp_path / "merged"
    infer.main(["--merge-to", str(merged), *map(str, infer_args(tiny_model_dir, out))])
    assert "warning: trained at a fixed 500x100 (sent as 504x112), which a plain AutoProcessor cannot express" \
        in capsys.readouterr().err
    from_merged, _, _ = predict(tmp_path, "merged", data, *infer_args(merged, adapter="none"))
    assert from_merged == with_adapter


def test_resume_continues_with_the_checkpoint_sizing(fixed_run, tmp_path, data, tiny_model_dir):
    out, _, _ = fixed_run
    run = tmp_path / "out"
    shutil.copytree(out / "checkpoint-2", run / "checkpoint-2")
    proc = run_main("train.py", "--model-id", tiny_model_dir, "--train-json", data / "train.json",
                      "--val-json", data / "missing.json", "--output-dir", run, "--resume", "--max-steps", 3,
                      *TINY)
    assert "warning: --" not in proc.stderr and "note:" not in proc.stderr
    assert json.loads((run / "final" / SAMPLE_FILE).read_text())["image"]["fixed_size"] == "500x100"
    assert json.loads((run / "checkpoint-3" / SAMPLE_FILE).read_text())["image"]["fixed_size"] == "500x100"


def test_old_adapter_without_the_file_loads_with_a_note(fixed_run, data, tiny_model_dir, tmp_path, capsys):
    out, _, _ = fixed_run
    old = tmp_path / "old_adapter"
    shutil.copytree(out / "final", old)
    (old / SAMPLE_FILE).unlink()
    preds, err = predict_here(capsys, tmp_path, "old", data, *infer_args(tiny_model_dir, adapter=str(old)))
    assert f"note: {old} has no {SAMPLE_FILE}" in err and "IMAGE_SIZE=''" in err
    assert len(preds) == len(json.loads((data / "val.json").read_text()))


def test_a_setting_yields_to_a_saved_value_unless_chosen():
    from argparse import Namespace

    from latexocr.cli import parse_settings
    from latexocr.sample import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, follow_sample_definition

    saved = {"image": {"min_pixels": 1000, "max_pixels": 2000, "fixed_size": "500x100"}}
    # unset (None) unless passed as a flag; a flag is typed as its setting's annotation says
    args = parse_settings(infer.SETTINGS, argv=["--input", "x.png", "--image-size", "", "--image-min-pixels", "3000"],
                          types=infer.__annotations__)
    assert (args.image_min_pixels, args.image_max_pixels, args.image_size) == (3000, None, "")

    unset = Namespace(image_min_pixels=None, image_max_pixels=None, image_size=None)
    follow_sample_definition(unset, saved, "adapter")
    assert (unset.image_min_pixels, unset.image_max_pixels, unset.image_size) == (1000, 2000, "500x100")

    # passed as a flag (even at its default value), or edited in the settings block: the user's value wins
    follow_sample_definition(args, saved, "adapter")
    assert (args.image_min_pixels, args.image_max_pixels, args.image_size) == (3000, 2000, "")

    # nothing saved (a new run, an adapter from before the file existed): today's defaults
    unset = Namespace(image_min_pixels=None, image_max_pixels=None, image_size=None)
    follow_sample_definition(unset, None, None)
    assert (unset.image_min_pixels, unset.image_max_pixels, unset.image_size) == (DEFAULT_MIN_PIXELS,
                                                                                DEFAULT_MAX_PIXELS, "")


def test_one_definition_of_each_default_and_of_a_usable_label():
    from latexocr.sample import is_valid_label, label_problem

    sources = {p: p.read_text(encoding="utf-8") for p in ROOT.rglob("*.py")
               if "tests" not in p.parts and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)}
    literal = {  # a default written as a value, not as the one constant of latexocr/sample.py
        "IMAGE_MIN_PIXELS": r"(?m)^\s*(IMAGE_MIN_PIXELS|DEFAULT_MIN_PIXELS)\s*=\s*\d",
        "IMAGE_MAX_PIXELS": r"(?m)^\s*(IMAGE_MAX_PIXELS|DEFAULT_MAX_PIXELS)\s*=\s*\d",
        "IMAGE_SIZE": r"(?m)^\s*(IMAGE_SIZE|DEFAULT_IMAGE_SIZE)\s*=\s*[\"']",
        "MAX_NEW_TOKENS": r"(?m)^\s*(MAX_NEW_TOKENS|DEFAULT_MAX_NEW_TOKENS)\s*=\s*\d",
        "prompt": r"你是一个LaText OCR助手",
        "usable label": r"def is_valid_label|NAN_STRINGS\s*=",
    }
    for what, pattern in literal.items():
        where = [str(p.relative_to(ROOT)) for p, text in sources.items() for _ in re.finditer(pattern, text)]
        assert len(where) == (2 if what == "usable label" else 1), (what, where)
        assert set(where) == {"latexocr/sample.py"}, (what, where)
    assert not is_valid_label("nan") and not is_valid_label(" ") and is_valid_label("n a n")
    assert label_problem("nan") == "missing label"


def test_saved_prompt_is_used_and_mismatches_are_named(tiny_model_dir, capsys):
    from latexocr.modeling import load_processor
    from latexocr.sample import SampleEncoder, check_sample_definition, sample_definition, sizing_for

    encoder = SampleEncoder(load_processor(str(tiny_model_dir)), sizing_for(load_processor(str(tiny_model_dir))))
    saved = sample_definition(encoder, "qwen2_vl")
    check_sample_definition(encoder, saved, "qwen2_vl", "adapter")
    assert capsys.readouterr().err == ""  # the same sample: nothing to say

    trained = encoder.prompt_text.replace("You are a helpful assistant.", "You read formulas.")
    saved = dict(saved, prompt_text=trained, model_type="qwen3_vl")
    check_sample_definition(encoder, saved, "qwen2_vl", "adapter")
    err = capsys.readouterr().err
    assert encoder.prompt_text == trained and "note: using the prompt saved in adapter" in err
    assert "warning: model type 'qwen2_vl' differs from the 'qwen3_vl' saved in adapter" in err
    assert encoder.prompt_text_tokens == len(encoder.tokenizer(trained, add_special_tokens=False).input_ids) - 1
