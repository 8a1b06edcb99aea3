import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SWANLAB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# compiled runs keep torch's caches here, not in the user's ~/.cache/latexocr (latexocr/fast/compile.py)
os.environ.setdefault("LATEXOCR_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "latexocr-tests-compile-cache"))
# KaTeX's kept label verdicts (latexocr/verdicts.py): a folder of this session's own, not the user's ~/.cache,
# removed when the session ends (one folder per run would otherwise pile up in the temp dir)
if "LATEXOCR_VERDICT_CACHE" not in os.environ:
    os.environ["LATEXOCR_VERDICT_CACHE"] = tempfile.mkdtemp(prefix="latexocr-tests-verdicts-")
    atexit.register(shutil.rmtree, os.environ["LATEXOCR_VERDICT_CACHE"], ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU, with the reason)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-init Qwen2-VL folder that loads like a real checkpoint."""
    from latexocr.testing import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_vl"), "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory):
    from latexocr.testing import build_tiny_model
    return {f: build_tiny_model(tmp_path_factory.mktemp(f"tiny_{f}"), f)
            for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")}


@pytest.fixture(scope="session")
def formula_images(tmp_path_factory):
    """A few formula-like images of different sizes, with labels, written as PNG."""
    from PIL import Image, ImageDraw
    folder = tmp_path_factory.mktemp("formulas")
    labels = ["x ^ { 2 }", "\\frac { 1 } { 2 }", "a + b = c", "\\sqrt { x }", "\\alpha _ { i }",
              "e ^ { i \\pi } + 1 = 0", "\\sum _ { n } n", "y", "( a + b ) ^ { 2 }", "\\int _ { 0 } ^ { 1 } x d x",
              "\\mathrm { h o p f }", "f ( x )", "\\beta", "x _ { 1 } + x _ { 2 }", "\\lim _ { x } f", "k = 1"]
    rows = []
    for i, label in enumerate(labels):
        w, h = 120 + 40 * (i % 6), 30 + 8 * (i % 3)
        img = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(img).text((4, 4), label, fill=(0, 0, 0))
        path = folder / f"{i}.png"
        img.save(path)
        rows.append((str(path), label))
    return rows
