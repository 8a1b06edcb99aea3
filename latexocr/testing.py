"""Tiny random-init Qwen-VL models built offline, for tests and smoke runs.

No hub is reachable from CI, so tests build a model folder that loads exactly like a real
checkpoint (`AutoModelForImageTextToText` + `AutoProcessor`): a byte-level tokenizer with
Qwen's special tokens and chat template, the family's image processor, and a ~0.2 M-parameter
model of the family's architecture.
"""
from __future__ import annotations

from pathlib import Path

# Qwen2-VL's chat template (the real one, from Qwen/Qwen2-VL-2B-Instruct).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen3.5's chat template, reduced to what a LaTeX OCR sample uses (tools and videos left out) but
# with the real template's behaviour in it: no default system turn; an image as
# <|vision_start|><|image_pad|><|vision_end|>; an assistant turn after the last user turn wrapped in
# its <think> block (reasoning_content or the text before </think>, empty if none); and the
# generation prompt opening a thinking block, or with enable_thinking=False an empty, closed one.
QWEN3_5_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = namespace(text='') %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{%- set content.text = content.text + '<|vision_start|><|image_pad|><|vision_end|>' %}"
    "{%- elif 'text' in part %}{%- set content.text = content.text + part['text'] %}{%- endif %}"
    "{%- endfor %}{%- set content = content.text %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set reasoning = message.get('reasoning_content') or '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1]"
    ".strip('\n') %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
    "{%- else %}{{- '<think>\n' }}{%- endif %}{%- endif %}"
)
THINK_TOKENS = ["<think>", "</think>"]  # added, not special: generated text would show them


def build_tokenizer(family: str = "qwen2_vl"):
    """A byte-level BPE tokenizer without merges and the family's special tokens and chat template."""
    from transformers import Qwen2Tokenizer, Qwen3_5Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    cls = Qwen3_5Tokenizer if family == "qwen3_5" else Qwen2Tokenizer
    tok = cls(vocab=vocab, merges=[], unk_token=None, bos_token=None,
              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    if family == "qwen3_5":
        tok.add_tokens(THINK_TOKENS)
    tok.chat_template = QWEN3_5_CHAT_TEMPLATE if family == "qwen3_5" else CHAT_TEMPLATE
    return tok


def build_tiny_model(out_dir: str | Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Write a tiny random-init model + processor of `family` (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5) to out_dir."""
    import torch
    from transformers import (AutoModelForImageTextToText, Qwen2VLImageProcessor)

    out_dir = Path(out_dir)
    tok = build_tokenizer(family)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tok)
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id, bos_token_id=None)
    patch = 16 if family in ("qwen3_vl", "qwen3_5") else 14
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLProcessor as Processor
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor as Processor
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLProcessor as Processor
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                  "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=64, deepstack_visual_indexes=[1])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)
    elif family == "qwen3_5":
        # both layer kinds: three Gated DeltaNet (linear attention) layers, then one full-attention layer
        from transformers import Qwen3_5Config, Qwen3VLProcessor as Processor
        text.update(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"], head_dim=16,
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                                     "mrope_section": [1, 1, 0], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
        config = Qwen3_5Config(text_config=text, vision_config=vision, **token_ids)
    else:
        raise ValueError(f"unknown family {family!r}: qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3_5")
    config.tie_word_embeddings = False
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = tok.pad_token_id

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    # At width 64 the default init (std 0.02) caps every logit near 1, so no amount of LoRA
    # training could make the model confident; a wider output layer lets tests memorise labels.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)

    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                            size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
    kwargs = {}
    if family in ("qwen3_vl", "qwen3_5"):
        from transformers import Qwen3VLVideoProcessor
        kwargs["video_processor"] = Qwen3VLVideoProcessor(patch_size=16)
    else:
        from transformers import Qwen2VLVideoProcessor
        kwargs["video_processor"] = Qwen2VLVideoProcessor()
    processor = Processor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template, **kwargs)
    processor.save_pretrained(out_dir)
    return out_dir
