"""Experiment tracking with SwanLab (cloud, local dashboard, offline or off).

:func:`resolve_mode` maps a user-facing mode onto SwanLab's; :class:`Tracker` owns one run (a no-op
with mode ``disabled`` or ``enabled=False``, i.e. non-main ranks); :class:`SwanLabCallback` is
swanlab's own transformers integration, logging through a Tracker. Charts are what changes step by
step (loss, grad norm, learning rate, samples/s, tokens/s, the eval metrics); totals and counts
(:data:`NOT_CHARTED`: epoch, tokens seen, transformers' end-of-run totals, eval n and errors) go
into the run's config as ``run.<name>``, in every mode.
"""

from __future__ import annotations

import enum
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import swanlab
from swanlab.integration.transformers import SwanLabCallback as _SwanLabIntegration
from swanlab.integration.transformers import rewrite_logs

from .metrics import exact_match, worst_first

#: Modes accepted by :func:`resolve_mode` (``cloud`` is an alias of ``online``).
MODES = ("auto", "cloud", "online", "local", "offline", "disabled")
DASHBOARD_INSTALL_HINT = 'pip install "swanlab[dashboard]"'
DEFAULT_PORT = 5092
#: Last parts of metric keys that are totals or counts, not curves (``train/epoch``, ``eval/n``).
NOT_CHARTED = {"epoch", "num_input_tokens_seen", "train_runtime", "train_tokens_per_second", "train_samples_per_second",
               "train_steps_per_second", "total_flos", "train_loss", "n", "errors", "gpu_mem_peak_gib",
               "gpu_mem_reserved_gib", "gpu_alloc_retries"}
CAPTION_CHARS = 48  #: what a caption keeps of a label and of a prediction: the image grid shows the start


def _warn(msg: str) -> None:
    print(f"[tracking] WARNING: {msg}", file=sys.stderr, flush=True)


def has_api_key() -> bool:
    """True when swanlab's own settings find an API key (SWANLAB_API_KEY, `swanlab login`, swanlab.yaml)."""
    try:
        return bool(swanlab.Settings().api_key)
    except Exception:  # a broken swanlab config file: swanlab.init would fail the same way
        return False


def dashboard_available() -> bool:
    """True when the local dashboard package (``swanboard``) is importable."""
    return importlib.util.find_spec("swanboard") is not None


def resolve_mode(mode: str) -> str:
    """``online``, ``local``, ``offline`` or ``disabled``. ``auto``: ``$SWANLAB_MODE`` if set, else the cloud
    with an API key, else ``local``; ``local`` without the dashboard package (it refuses to start): ``offline``."""
    m = mode.strip().lower() if isinstance(mode, str) else None
    if m == "auto" and (env := os.environ.get("SWANLAB_MODE", "").strip().lower()) not in ("", "auto"):
        mode, m = f"SWANLAB_MODE={env}", env  # an explicit SWANLAB_MODE decides for auto
    elif m == "auto":
        m = "online" if has_api_key() else "local"
    m = "online" if m == "cloud" else m
    if m not in MODES:
        raise ValueError(f"Invalid SwanLab mode {mode!r}; choose one of: {', '.join(MODES)}")
    if m == "local" and not dashboard_available():
        _warn("SwanLab 'local' mode needs the dashboard package, which is not installed; falling back to "
              f"'offline' (logs only, upload later with `swanlab sync`). Install it with: {DASHBOARD_INSTALL_HINT}")
        m = "offline"
    return m


def flatten_config(config: Mapping, prefix: str = "") -> dict:
    """Nested mappings as dotted keys ({"lora": {"r": 8}} -> {"lora.r": 8}), None as "None" (the dashboard shows
    a nested value and None as [object Object]), an enum as its value (not "SchedulerType.LINEAR")."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}.") if value else {name: "{}"})
        else:
            flat[name] = "None" if value is None else value.value if isinstance(value, enum.Enum) else value
    return flat


def run_name(adapter: str | None, input_spec: str) -> str:
    """An infer.py run's name: its adapter (checkpoint folder and its parent) and its input."""
    a = Path(adapter or "base")
    who = f"{a.parent.name}-{a.name}" if adapter and a.parent.name else a.name
    return f"infer-{who}-{Path(str(input_spec)).stem or 'input'}"


def _number(value: Any) -> float | int | None:
    """A finite number (numpy / torch scalars too, ints kept), else None: NaN breaks the dashboard's summary."""
    try:
        number = float(value) if not isinstance(value, str) else math.nan
    except Exception:  # None, arrays, objects
        return None
    return (int(value) if isinstance(value, int) else number) if math.isfinite(number) else None


def _shorten(text: str, limit: int = CAPTION_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Tracker:
    """One SwanLab run: ``Tracker("auto", "project", "lora-r8", config={"lr": 1e-4})``."""

    def __init__(self, mode: str, project: str, experiment_name: str | None = None, config: dict | None = None,
                 logdir: str | os.PathLike | None = None, enabled: bool = True):
        # local and offline runs: where SwanLab itself keeps them ($SWANLAB_LOG_DIR, else ./swanlog)
        self.logdir, self.run = Path(logdir or os.environ.get("SWANLAB_LOG_DIR") or "swanlog"), None
        self.mode = resolve_mode(mode) if enabled else "disabled"
        if self.mode == "disabled":
            if enabled:
                print("[tracking] SwanLab disabled: nothing is logged.", flush=True)
            return
        # No run may wait at a prompt: without a key, swanlab.init(mode="online") shows its login
        # menu at a terminal; with interactive off, a bad key raises (and falls back) instead.
        os.environ.setdefault("SWANLAB_INTERACTIVE", "false")
        if self.mode == "online" and not has_api_key():
            _warn("SwanLab cloud mode needs an API key and none is configured; falling back to 'offline'. "
                  "To use the cloud: `swanlab login` (or set SWANLAB_API_KEY), then upload this run with "
                  "`swanlab sync <run dir>`.")
            self.mode = "offline"
        kwargs = dict(project=project, name=experiment_name, config=flatten_config(config or {}) or None,
                      reinit=True, log_dir=str(self.logdir))
        try:
            self.run = swanlab.init(mode=self.mode, **kwargs)
        except Exception as e:  # local: swanboard of a version swanlab refuses; online: no network / bad key
            if self.mode == "offline":
                raise
            hint = f"install {DASHBOARD_INSTALL_HINT}" if self.mode == "local" else "check the API key / network"
            _warn(f"SwanLab {self.mode} mode failed ({type(e).__name__}: {e}); falling back to 'offline' ({hint}).")
            self.mode = "offline"
            self.run = swanlab.init(mode=self.mode, **kwargs)
        print(f"[tracking] {self.where()}", flush=True)

    def where(self) -> str:
        """One line saying the mode and where to look."""
        if self.mode == "online":
            return f"SwanLab mode=online (cloud): {getattr(self.run, 'url', 'https://swanlab.cn')}"
        if self.mode == "local":
            return (f"SwanLab mode=local: run saved in {self.run.dir}; dashboard: `swanlab watch {self.logdir} "
                    f"-h 127.0.0.1 -p {DEFAULT_PORT}` then open http://127.0.0.1:{DEFAULT_PORT}")
        return f"SwanLab mode=offline: run saved in {self.run.dir}; upload later with `swanlab sync {self.run.dir}`"

    @property
    def active(self) -> bool:
        return self.run is not None

    def update_config(self, config: Mapping[str, Any]) -> None:
        if self.active and config:
            self.run.config.update(flatten_config(config))

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> dict:
        """Chart the finite numbers of ``metrics`` at ``step``; a :data:`NOT_CHARTED` key goes into the
        config as ``run.<name>`` (``train/`` dropped: ``run.epoch``, ``run.eval_n``). Returns what was charted."""
        if not self.active:
            return {}
        numbers = {str(k): n for k, v in (metrics or {}).items() if (n := _number(v)) is not None}
        charted = {k: v for k, v in numbers.items() if k.rsplit("/", 1)[-1] not in NOT_CHARTED}
        self.update_config({"run." + k.removeprefix("train/").replace("/", "_"): v
                            for k, v in numbers.items() if k not in charted})
        if charted:
            self.run.log(charted, step=step)
        return charted

    def log_predictions(self, rows: list[dict], step: int | None = None, key: str = "eval/predictions",
                        max_rows: int = 32) -> int:
        """Up to ``max_rows`` images (path or PIL) under ``key``, captioned label first (both cut to CAPTION_CHARS:
        a looping prediction cannot hide the label); the full pairs as text under ``f"{key}_text"``."""
        if not self.active or not rows:
            return 0
        images, texts = [], []
        for row in rows[:max_rows]:
            pred, label = str(row.get("prediction") or ""), str(row.get("label", ""))
            match = bool(row.get("exact_match", exact_match(pred, label)))
            caption = f"{'✓' if match else '✗'} label: {_shorten(label)} | pred: {_shorten(pred)}"
            if (image := row.get("image")) is not None:
                try:
                    images.append(swanlab.Image(os.fspath(image) if isinstance(image, os.PathLike) else image,
                                                caption=caption, size=1024))
                except Exception as e:  # an unreadable file: keep the text
                    _warn(f"could not log image {image!r}: {e}")
            texts.append(swanlab.Text(f"label: {label}\npred:  {pred}", caption="match" if match else "differs"))
        self.run.log({**({key: images} if images else {}), f"{key}_text": texts}, step=step)
        return len(texts)

    def log_table(self, key: str, headers: list[str], rows: list[list], step: int | None = None) -> bool:
        """One small table as aligned text under ``key`` (SwanLab's ECharts table does not show in the
        local dashboard, text does everywhere); True when logged."""
        if not self.active or not rows:
            return False
        cells = [[str(h) for h in headers]] + [[str(v) for v in r] for r in rows]
        widths = [max(len(line[c]) for line in cells) for c in range(len(headers))]
        text = "\n".join(" | ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)
        self.run.log({key: swanlab.Text(text, caption=key)}, step=step)
        return True

    def log_worst(self, rows: list[dict], step: int | None = None, key: str = "eval/worst",
                  max_rows: int = 20) -> int:
        """The ``max_rows`` worst samples (metrics.worst_first), one text each, scores in the caption."""
        if not self.active:
            return 0
        texts = []
        for rank, r in enumerate(worst_first([r for r in rows or [] if "edit_distance" in r])[:max_rows], 1):
            caption = (f"#{rank} ED {float(r['edit_distance']):.3f} · EM {float(r.get('exact_match', 0)):g} · "
                       f"BLEU {float(r.get('bleu4', 0)):.1f} · "
                       f"{'renders' if r.get('render_ok') else 'does not render'}"
                       + (" · hit MAX_NEW_TOKENS" if r.get("truncated") else ""))
            texts.append(swanlab.Text(f"label: {r.get('label', '')}\npred:  {r.get('prediction') or ''}\n"
                                      f"image: {r.get('image', '')}", caption=caption))
        if texts:
            self.run.log({key: texts}, step=step)
        return len(texts)

    def finish(self, state: str = "success", error: str | None = None) -> None:
        """Close the run (idempotent; later calls of every method do nothing)."""
        if self.active:
            run, self.run = self.run, None
            run.finish(state=state, **({"error": error} if error is not None else {}))


class SwanLabCallback(_SwanLabIntegration):
    """swanlab's transformers callback (rank 0, ``eval_x`` -> ``eval/x``, else ``train/x``, the last checkpoint
    in the config) logging through :meth:`Tracker.log` (the chart policy); it never starts a run of its own."""

    #: TrainingArguments that train.py's own settings do not already record.
    TRAINING_ARG_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
                         "optim", "bf16", "fp16", "max_grad_norm", "weight_decay")

    def __init__(self, tracker: Tracker):
        super().__init__(log_config=False)  # its config is the whole model config and TrainingArguments, nested
        self.tracker = tracker

    def setup(self, args, state, model=None):
        if self.tracker.active:  # without a run the base class would start one with its defaults
            super().setup(args, state, model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        if state.is_world_process_zero:
            config = {"training_args": {k: getattr(args, k) for k in self.TRAINING_ARG_KEYS if hasattr(args, k)}}
            if model is not None:
                config["model_params"] = {"total": sum(p.numel() for p in model.parameters()),
                                          "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            self.tracker.update_config(config)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.tracker.log(rewrite_logs(logs), step=state.global_step)
