"""GRPO's rewards: what a sampled formula is worth, from the evaluation's own metric code.

Three built-in components, each in [0, 1], each computed as latexocr/metrics.py scores a prediction:

- **edit**: 1 - the token edit distance to the label (metrics' normalised ``edit_distance``): partial
  credit, so a group of completions that are all wrong still ranks the nearer ones higher;
- **exact**: 1 when the tokens equal the label's (``exact_match``): the evaluation's headline metric;
- **render**: 1 when KaTeX parses the completion (``render_ok``) and the completion ended with the end
  token. A truncated completion (it hit MAX_NEW_TOKENS: usually a repetition loop) gets no render
  credit, whatever its first part parses to.

The reward of a completion is the weighted sum of the components (REWARD_WEIGHTS, e.g.
"edit=1,exact=1,render=0.5"; a component left out weighs 0), plus the user's own reward where
REWARD_WEIGHTS names one with its weight ("edit=1,my_rewards:fn=2"). A user reward is one Python function::

    def my_reward(predictions: list[str], labels: list[str]) -> list[float]:
        '''One finite number per prediction; predictions[i] is the decoded completion (special
        tokens removed, stripped) for the image labelled labels[i].'''

named ``module:function`` (a module importable from the working folder) or ``path/to/file.py:function``.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Callable

from .metrics import render_ok, score_pair

COMPONENTS = ("edit", "exact", "render")
FUNCTION = "function"  # the REWARD_WEIGHTS key of the user's reward

RewardFunction = Callable[[list, list], list]


def parse_weights(text: str) -> tuple[dict[str, float], str]:
    """"edit=1,render=0.5,my_rewards:fn=2" -> ({"edit": 1.0, "exact": 0.0, "render": 0.5, "function": 2.0},
    "my_rewards:fn"): every component's weight (0 where unnamed) and the user function's spec ("" for
    none; its weight under "function"). Stops with one line on anything else."""
    weights, spec = dict.fromkeys(COMPONENTS, 0.0), ""
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.rpartition("=")
        name = name.strip()
        try:
            if ":" in name and not spec:  # module:function or path/to/file.py:function
                name, spec = FUNCTION, name
            elif name not in COMPONENTS:
                raise ValueError
            weights[name] = float(value)
            if not math.isfinite(weights[name]):
                raise ValueError
        except ValueError:
            raise SystemExit(f"REWARD_WEIGHTS: {item!r} is not NAME=NUMBER with NAME one of "
                             f"{', '.join(COMPONENTS)} or one module:function (e.g. \"edit=1,exact=1,render=0.5\")"
                             ) from None
    return weights, spec


def formula_scores(predictions: list[str], labels: list[str], truncated: list[bool]) -> dict[str, list[float]]:
    """The three built-in components of each completion (see the module docstring)."""
    scores = {name: [] for name in COMPONENTS}
    for prediction, label, cut in zip(predictions, labels, truncated):
        pair = score_pair(prediction, label)[0]
        scores["edit"].append(1.0 - pair["edit_distance"])
        scores["exact"].append(pair["exact_match"])
        scores["render"].append(float(not cut and render_ok(prediction)))
    return scores


def load_reward_function(spec: str) -> RewardFunction:
    """The function REWARD_WEIGHTS names ("module:function" or "file.py:function"); one line if absent."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise SystemExit(f"REWARD_WEIGHTS' {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ImportError(f"no file {where}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as exc:  # ImportError, or whatever the module raises while it loads
        raise SystemExit(f"REWARD_WEIGHTS' {spec!r}: cannot load {where} ({type(exc).__name__}: {exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise SystemExit(f"REWARD_WEIGHTS' {spec!r}: {where} has no function {name!r}")
    return function


def call_reward_function(function: RewardFunction, predictions: list[str], labels: list[str],
                         spec: str = "your reward") -> list[float]:
    """The user's rewards for these predictions, checked: one finite number each, else one line."""
    try:
        values = [float(v) for v in function(list(predictions), list(labels))]
    except SystemExit:
        raise
    except Exception as exc:
        raise SystemExit(f"REWARD_WEIGHTS' {spec!r} failed: {type(exc).__name__}: {exc}") from None
    if len(values) != len(predictions):
        raise SystemExit(f"REWARD_WEIGHTS' {spec!r} returned {len(values)} rewards for {len(predictions)} "
                         f"predictions; it must return one number per prediction")
    if not all(math.isfinite(v) for v in values):
        raise SystemExit(f"REWARD_WEIGHTS' {spec!r} returned a reward that is not a finite number")
    return values


class Rewards:
    """The reward of each completion and its components: rewards(predictions, labels, truncated) ->
    (total per completion, {component: values}), components with weight 0 left out."""

    def __init__(self, weights: str):
        self.weights, self.spec = parse_weights(weights)
        self.function = load_reward_function(self.spec) if self.spec else None
        if not any(self.weights.values()):
            raise SystemExit("REWARD_WEIGHTS gives every reward weight 0: nothing to learn from")

    def check(self, labels: list[str]) -> None:
        """Call the user's function once on a few labels (as predictions), before the model loads:
        a function that fails or answers with the wrong length stops the run here, in a second."""
        if self.function is not None:
            call_reward_function(self.function, labels, labels, self.spec)

    def __call__(self, predictions: list[str], labels: list[str], truncated: list[bool]):
        parts = {name: values for name, values in formula_scores(predictions, labels, truncated).items()
                 if self.weights[name]}
        if self.function is not None:
            parts[FUNCTION] = call_reward_function(self.function, predictions, labels, self.spec)
        total = [sum(self.weights[name] * parts[name][i] for name in parts) for i in range(len(predictions))]
        return total, parts
