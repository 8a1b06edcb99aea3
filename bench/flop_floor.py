"""The arithmetic floor under inference (issue 32): how many FLOPs one image costs, and so how fast a card can
go at best. CPU only, no weights: the model is built on the meta device from its published config, the
prompts are measured with the project's own sample encoder on real images.

    python bench/flop_floor.py                                  # Qwen2-VL-2B, full_val's 4,096 images, 64 tokens
    python bench/flop_floor.py --rates 467.5,563                # also: what fraction of the peak measured speeds use
    python bench/flop_floor.py --family qwen3_5-2b              # another family (its image processor: patch 16)

Counted per image, matrix products only (2 FLOPs per multiply-add; elementwise work, norms and softmax are
left out, so the floor is a lower bound):
  vision     every linear of the vision tower (and its patch embedding) once per patch, the merger's once
             per merged token, plus attention within the image (all layers full: an upper bound for
             Qwen2.5-VL's windowed ones)
  prefill    every linear of the language model once per prompt token, causal attention over the prompt,
             Gated DeltaNet's state products per token (Qwen3.5)
  decode     the language model's linears once per generated token after the first (the last token is
             never fed back), attention over the prompt and the tokens so far
  lm head    once per generated token (the prefill's last position and each decode step)
The time floor divides by the card's dense bf16 peak (--peak-tflops, default 989: NVIDIA's figure for H100
SXM and H200, 1,979 with sparsity); a measured speed over that floor is the fraction of the peak it uses.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from PIL import Image

from common import DEFAULT_SHARED, family_config, family_name, full_val_samples

H200_BF16_DENSE_TFLOPS = 989.0


def weights_by_part(config):
    """{part: multiply-adds per use} of a model built on the meta device from `config` (no memory used)."""
    import torch
    from torch import nn
    from transformers import AutoModelForImageTextToText

    from latexocr.modeling import language_model_of, vision_tower_of

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    _, vision = vision_tower_of(model)
    _, language = language_model_of(model)
    per_patch = per_merged = 0
    for name, module in vision.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            if "merger" in name:  # the merger (and Qwen3-VL's deepstack mergers) run on merged tokens
                per_merged += module.weight.numel()
            else:
                per_patch += module.weight.numel()
    per_token = sum(m.weight.numel() for m in language.modules() if isinstance(m, nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    return {"per_patch": per_patch, "per_merged": per_merged, "per_token": per_token, "head": head}


def attention_shape(config):
    """(vision layers, vision width, full-attention LLM layers, their heads x head dim, Gated DeltaNet layers,
    their value heads x key dim x value dim)."""
    vision, text = config.vision_config, getattr(config, "text_config", config)
    vision_width = getattr(vision, "embed_dim", None) or vision.hidden_size
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    linear = types.count("linear_attention")
    state = (getattr(text, "linear_num_value_heads", 0) * getattr(text, "linear_key_head_dim", 0)
             * getattr(text, "linear_value_head_dim", 0)) if linear else 0
    return vision.depth, vision_width, types.count("full_attention"), text.num_attention_heads * head_dim, linear, state


def image_flops(patches: int, merged: int, prompt: int, new_tokens: int, weights: dict, shape) -> dict:
    """FLOPs of one image by part (see the module docstring)."""
    vision_layers, vision_width, attn_layers, attn_width, delta_layers, state = shape
    vision = 2 * (weights["per_patch"] * patches + weights["per_merged"] * merged)
    vision += vision_layers * 4 * patches * patches * vision_width  # q.k and p.v within the image
    prefill = 2 * weights["per_token"] * prompt
    prefill += attn_layers * 4 * (prompt * (prompt + 1) // 2) * attn_width  # causal
    delta = delta_layers * 2 * 4 * state  # per token: k.S, q.S, the decay and the rank-1 update of S
    prefill += delta * prompt
    fed = new_tokens - 1
    decode = 2 * weights["per_token"] * fed + delta * fed
    decode += attn_layers * 4 * attn_width * sum(prompt + s for s in range(1, fed + 1))
    head = 2 * weights["head"] * new_tokens
    return {"vision": vision, "prefill": prefill, "decode": decode, "lm head": head}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--family", default="qwen2vl-2b")
    ap.add_argument("--model", type=Path, help="a folder with the family's processor (default: Qwen2-VL-2B's from "
                                               "shared/, or the family's image processor with Qwen2's tokenizer)")
    ap.add_argument("--images", type=int, default=4096, help="full_val images measured")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per image (infer.py's bench cap)")
    ap.add_argument("--count", type=int, default=9443, help="images of the end-to-end run (the full test split)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    ap.add_argument("--rates", default="",
                    help="measured images/s to express as a fraction of the peak, e.g. 467.5,563")
    a = ap.parse_args()

    from latexocr.batching import SampleEncoder
    from latexocr.modeling import load_processor
    from latexocr.sample import sizing_for

    name = family_name(a.family)
    config = family_config(name, a.shared)
    processor = load_processor(str(a.model)) if a.model else family_processor(name, a.shared)
    encoder = SampleEncoder(processor, sizing_for(processor))
    merge = int(processor.image_processor.merge_size) ** 2
    weights, shape = weights_by_part(config), attention_shape(config)
    paths = sorted({image for image, _ in full_val_samples(a.shared)})[: a.images]
    per_image, prompts = [], []
    for path in paths:
        with Image.open(path) as im:
            merged = encoder.image_tokens(*im.size)
        prompt = merged + encoder.prompt_text_tokens
        prompts.append(prompt)
        per_image.append(image_flops(merged * merge, merged, prompt, a.new_tokens, weights, shape))
    parts = {k: statistics.mean(f[k] for f in per_image) for k in per_image[0]}
    total = sum(parts.values())
    print(f"{name}: {len(paths)} full_val images, prompts mean {statistics.mean(prompts):.1f} tokens, "
          f"{a.new_tokens} new tokens each; weights per use: {weights}")
    for part, flops in parts.items():
        print(f"  {part:8s} {flops / 1e9:8.1f} GFLOP per image ({flops / total:5.1%})")
    floor_rate = a.peak_tflops * 1e12 / total
    print(f"  total    {total / 1e9:8.1f} GFLOP per image: at {a.peak_tflops:g} TFLOP/s at most "
          f"{floor_rate:,.0f} images/s; {a.count:,} images take at least {a.count / floor_rate:.1f} s of matrix products")
    for rate in (float(r) for r in a.rates.split(",") if r):
        print(f"  {rate:g} images/s uses {rate / floor_rate:.1%} of the peak; "
              f"{a.count:,} images at it: {a.count / rate:.1f} s")


def family_processor(name: str, shared: Path):
    """A processor for `name` without its weights' folder: Qwen2-VL-2B's own (shared/), else the family's image
    processor with Qwen2's tokenizer and chat template (the prompt's text tokens are then approximate; the
    image's tokens, which dominate, are the family's)."""
    from transformers import AutoImageProcessor

    from common import family_folder
    from latexocr.modeling import load_processor
    processor = load_processor(str(shared / "qwen2vl-2b"))
    if name != "qwen2vl-2b":
        processor.image_processor = AutoImageProcessor.from_pretrained(family_folder(name, shared))
    return processor


if __name__ == "__main__":
    main()
