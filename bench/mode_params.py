"""Trainable parameters of each training mode (train.py TUNE) for a model's real architecture,
built on the meta device (no weights, no memory): the numbers of README's "Training modes" table.

    python bench/mode_params.py                                  # ../shared/qwen2vl-2b/config.json
    python bench/mode_params.py --config path/to/config.json --lora-r 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (row label, TUNE, UNFREEZE_MERGER, UNFREEZE_VISION), the README table's rows
MODES = [("lora", "lora", False, False), ("lora + UNFREEZE_MERGER", "lora", True, False),
         ("lora_vision", "lora_vision", False, False), ("full", "full", False, False),
         ("full + UNFREEZE_MERGER", "full", True, False), ("full + UNFREEZE_VISION", "full", False, True)]


def mode_parameter_counts(config_path: str | Path, r: int = 64, alpha: int = 16) -> dict[str, dict[str, int]]:
    """{row label: parameter_counts(...)} for every row of MODES, train.py's LoRA defaults."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from latexocr.modeling import setup_training_mode

    config = AutoConfig.from_pretrained(Path(config_path).parent if Path(config_path).is_file() else config_path)
    out = {}
    for label, tune, merger, vision in MODES:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
            model = setup_training_mode(model, tune, r, alpha, 0.0, unfreeze_merger=merger, unfreeze_vision=vision)
        from latexocr.modeling import parameter_counts
        out[label] = parameter_counts(model)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT.parent / "shared" / "qwen2vl-2b" / "config.json"))
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=16)
    args = parser.parse_args()
    if not Path(args.config).exists():
        raise SystemExit(f"no model config at {args.config} (pass --config)")
    print("| mode | trainable parameters | of which vision side |\n|---|---|---|")
    for label, counts in mode_parameter_counts(args.config, args.lora_r, args.lora_alpha).items():
        print(f"| {label} | {counts['trainable']:,} | {counts['trainable_vision']:,} |")


if __name__ == "__main__":
    main()
