"""The one door to the fast path (latexocr/fast/): the rest of the project reaches it only from here.

Inference takes `prepare_model` and `plain_text_attention` (latexocr/fast/attention.py, no training
code); train.py also takes `check_settings` and `plan_training` (latexocr/fast/plan.py, loaded only
when called). Delete latexocr/fast/ and everything still trains and infers with plain transformers
+ peft: this module then hands out plain equivalents (tests/test_fast.py runs train.py without it).
"""
from __future__ import annotations

import contextlib
import importlib.util

FAST_PATH = importlib.util.find_spec(f"{__package__}.fast") is not None

if FAST_PATH:
    from .fast.attention import plain_text_attention, prepare_model
else:
    def prepare_model(model, attn_implementation: str = "sdpa", packed_vision_attention: bool = True):
        return model

    @contextlib.contextmanager
    def plain_text_attention(model):
        yield


def check_settings(args) -> None:
    """Stops on a fast-path setting no run could take, before the model loads."""
    if FAST_PATH:
        from .fast.plan import check_settings as check
        check(args)


def plan_training(model, args, *, processes: int, accumulation: int, planned_steps: int):
    """The training.Plan for this run: latexocr/fast/plan.py's, else plain transformers training."""
    if FAST_PATH:
        from .fast.plan import plan_training as plan
        return plan(model, args, processes=processes, accumulation=accumulation, planned_steps=planned_steps)
    from .batching import sample_boundaries
    from .linear_attention import has_linear_attention
    from .training import OcrTrainer, Plan
    # linear-attention layers (Qwen3.5) keep packed samples apart only by the boundaries
    boundaries = args.packing and has_linear_attention(model)
    return Plan(collator_options={"packed_extras": sample_boundaries} if boundaries else {},
                trainer_class=OcrTrainer,
                summary="fast path: not installed (no latexocr/fast/), plain transformers training")
