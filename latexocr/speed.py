"""The one door to the fast path (latexocr/fast/): the rest of the project imports it only from here.

Delete latexocr/fast/ and everything still trains and infers with plain transformers + peft: this
module then hands out plain equivalents (tests/test_fast.py runs train.py without the package).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


@dataclass
class Plan:
    """How train.py runs: TrainCollator keyword arguments, the trainer class and its extra keyword
    arguments, a one-line summary; the rest is the fast path's own state."""

    collator_options: dict = field(default_factory=dict)
    trainer_class: type | None = None
    trainer_options: dict = field(default_factory=dict)
    summary: str = ""
    cuda_graphs: bool = False
    vision_graphs: object = None
    callbacks: list = field(default_factory=list)


try:
    from .fast import check_settings, plain_text_attention, plan_training, prepare_model
except ModuleNotFoundError as exc:
    if exc.name != f"{__package__}.fast":
        raise

    def prepare_model(model, attn_implementation: str = "sdpa", packed_vision_attention: bool = True):
        return model

    @contextlib.contextmanager
    def plain_text_attention(model):
        yield

    def check_settings(args) -> None:
        pass

    def plan_training(model, args, *, processes: int, accumulation: int, planned_steps: int) -> Plan:
        from .batching import sample_boundaries
        from .linear_attention import has_linear_attention
        from .training import OcrTrainer
        # linear-attention layers (Qwen3.5) keep packed samples apart only by the boundaries
        boundaries = args.packing and has_linear_attention(model)
        return Plan(collator_options={"packed_extras": sample_boundaries} if boundaries else {},
                    trainer_class=OcrTrainer,
                    summary="fast path: not installed (no latexocr/fast/), plain transformers training")
