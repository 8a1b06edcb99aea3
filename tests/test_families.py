"""bench/families/: the published architectures the GPU benchmarks build (issue 28). A config that does not
load, resolves to another model class, or has the wrong size would make every number measured on it wrong."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import DEFAULT_SHARED, FAMILIES, family_folder  # noqa: E402

# billions of parameters as published (model cards) for the architectures stored in the repo
PUBLISHED = {"qwen2_5vl-3b": 3.75, "qwen3vl-2b": 2.13, "qwen3vl-4b": 4.44, "qwen3_5-0.8b": 0.85, "qwen3_5-4b": 4.54}
CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_published_architecture_builds_at_its_size(name):
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = family_folder(name, DEFAULT_SHARED)
    if not folder.exists():
        pytest.skip(f"{folder} absent (../shared/ holds this family's config)")
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert type(model).__name__ == CLASSES[config.model_type]
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED.get(name, FAMILIES[name][1]), rel=0.05)
    # the bench's time estimates scale with FAMILIES' sizes: they must be this architecture's
    assert billions == pytest.approx(FAMILIES[name][1], rel=0.08)
