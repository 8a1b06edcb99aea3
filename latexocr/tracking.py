"""Experiment tracking with SwanLab (cloud, local dashboard, offline or off).

Our own small integration, because transformers' ``report_to="swanlab"`` raises
"No active Run" unless ``swanlab.init`` ran first, and swanlab's own
``SwanLabCallback`` ignores ``config=``.

* :func:`resolve_mode` turns a user-facing mode (``auto``, ``cloud``/``online``,
  ``local``, ``offline``, ``disabled``) into the name SwanLab uses.
* :class:`Tracker` owns one SwanLab run: ``log`` scalars, ``log_predictions``
  (image captioned label first, then the prediction), ``log_worst`` / ``log_table``
  (tables, as text), ``finish``. The config is flat (``lora.r``): the dashboard shows a
  nested value as ``[object Object]``. ``enabled=False`` (non-main
  ranks) and mode ``disabled`` make every method a no-op that writes nothing.
* :class:`SwanLabCallback` is a ``transformers.TrainerCallback`` that forwards
  the Trainer's logs to a :class:`Tracker`.

Importing this module is cheap: swanlab and transformers are imported lazily
(``SwanLabCallback`` is built on first access).
"""

from __future__ import annotations

import enum
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from transformers import TrainerCallback as _TrainerCallbackBase  # noqa: F401

__all__ = ["MODES", "resolve_mode", "has_api_key", "dashboard_available", "Tracker", "SwanLabCallback", "run_name"]

#: Modes accepted by :func:`resolve_mode` (``cloud`` is an alias of ``online``).
MODES = ("auto", "cloud", "online", "local", "offline", "disabled")
DASHBOARD_INSTALL_HINT = 'pip install "swanlab[dashboard]"'
DEFAULT_PORT = 5092


def _warn(msg: str) -> None:
    print(f"[tracking] WARNING: {msg}", file=sys.stderr, flush=True)


def _strip_quotes(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1].strip()
    return value


def _netrc_paths() -> list[Path]:
    """Where swanlab 0.10 keeps a saved login (``swanlab login``): a ``.netrc``
    in ``./.swanlab/`` (project level), else in ``$SWANLAB_ROOT`` /
    ``$SWANLAB_SAVE_DIR`` / ``~/.swanlab`` (user level)."""
    user_dir = os.environ.get("SWANLAB_ROOT") or os.environ.get("SWANLAB_SAVE_DIR") or str(Path.home() / ".swanlab")
    return [Path.cwd() / ".swanlab" / ".netrc", Path(user_dir) / ".netrc"]


def _netrc_has_key(path: Path) -> bool:
    import netrc

    try:
        if not path.is_file():
            return False
        hosts = netrc.netrc(str(path)).hosts
    except Exception:
        return False
    return any(entry[2] for entry in hosts.values())


def has_api_key() -> bool:
    """True when a SwanLab API key is configured: env ``SWANLAB_API_KEY``, or
    whatever swanlab's own settings resolve (saved ``swanlab login`` netrc,
    ``.env``, ``swanlab.yaml``, secrets dir)."""
    if _strip_quotes(os.environ.get("SWANLAB_API_KEY", "")):
        return True
    try:
        from swanlab import Settings  # reads env, config files and the .netrc files

        return bool(Settings().api_key)
    except Exception:  # swanlab missing, or a broken config file: fall back to the netrc files
        return any(_netrc_has_key(p) for p in _netrc_paths())


def dashboard_available() -> bool:
    """True when the local dashboard package (``swanboard``) is importable."""
    try:
        return importlib.util.find_spec("swanboard") is not None
    except (ImportError, ValueError):
        return False


def resolve_mode(mode: str) -> str:
    """Map a user-facing mode onto SwanLab's: ``online``, ``local``, ``offline``
    or ``disabled``.

    ``auto``: ``$SWANLAB_MODE`` if set, else ``online`` (the cloud) when an API
    key is configured, else ``local``. ``cloud`` is an alias of ``online``.
    ``local`` without the dashboard package falls back to ``offline`` (with a
    warning), since swanlab's local mode refuses to start without it.
    """
    choices = ", ".join(MODES)
    if not isinstance(mode, str):
        raise ValueError(f"Invalid SwanLab mode {mode!r}; choose one of: {choices}")
    m = mode.strip().lower()
    if m == "auto":
        env_mode = _strip_quotes(os.environ.get("SWANLAB_MODE", "")).lower()
        if env_mode and env_mode != "auto":
            if env_mode not in MODES:
                raise ValueError(f"Invalid SWANLAB_MODE={env_mode!r}; choose one of: {choices}")
            return resolve_mode(env_mode)
        m = "online" if has_api_key() else "local"
    if m == "cloud":
        m = "online"
    if m not in MODES:
        raise ValueError(f"Invalid SwanLab mode {mode!r}; choose one of: {choices}")
    if m == "local" and not dashboard_available():
        _warn(
            "SwanLab 'local' mode needs the dashboard package, which is not installed; "
            f"falling back to 'offline' (logs only, upload later with `swanlab sync`). "
            f"Install it with: {DASHBOARD_INSTALL_HINT}"
        )
        m = "offline"
    return m


def _to_number(value: Any) -> float | int | None:
    """A finite Python number, or None for anything non-numeric / NaN / inf
    (a NaN in the local database breaks the dashboard's summary endpoint)."""
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, (int, float)) and callable(getattr(value, "item", None)):  # numpy / torch scalars
        try:
            value = value.item()  # raises for arrays / tensors with more than one element
        except Exception:
            return None
        if isinstance(value, bool):
            return int(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    return None


def _plain(value: Any, depth: int = 0) -> Any:
    """Config values SwanLab can store: primitives, lists and dicts; else str."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if type(value) in (type(None), bool, int, float, str) else _plain_scalar(value)
    if depth > 8:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, Path):
        return str(value)
    num = _to_number(value)
    return num if num is not None else str(value)


def _plain_scalar(value: Any) -> Any:
    for t in (bool, int, float, str):
        if isinstance(value, t):
            return t(value)
    return value


def flatten_config(config: Mapping, prefix: str = "") -> dict:
    """Nested mappings as one level of dotted keys ({"lora": {"r": 8}} -> {"lora.r": 8}); None as
    "None" (SwanLab stores None as an empty object, shown as [object Object] too)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}.") if value else {name: "{}"})
        else:
            flat[name] = "None" if value is None else value
    return flat


def run_name(adapter: str | None, input_spec: str) -> str:
    """An infer.py run's name: its adapter (checkpoint folder and its parent) and its input."""
    if adapter:
        a = Path(adapter)
        who = f"{a.parent.name}-{a.name}" if a.parent.name else a.name
    else:
        who = "base"
    return f"infer-{who}-{Path(str(input_spec)).stem or 'input'}"


#: What a caption keeps of a label and of a prediction: SwanLab's image grid shows only the start.
CAPTION_CHARS = 48


def _decode_image_dict(image: Mapping) -> Any:
    if image.get("bytes"):
        from io import BytesIO

        from PIL import Image

        return Image.open(BytesIO(image["bytes"]))
    return image.get("path")


def _shorten(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Tracker:
    """One SwanLab run.

    >>> tracker = Tracker("auto", "qwen2vl-latexocr", "lora-r8", config={"lr": 1e-4})
    >>> tracker.log({"eval/bleu": 71.2}, step=100)
    >>> tracker.finish()
    """

    def __init__(
        self,
        mode: str,
        project: str,
        experiment_name: str | None = None,
        config: dict | None = None,
        logdir: str | os.PathLike = "swanlog",
        enabled: bool = True,
    ):
        self.enabled = bool(enabled)
        self.project = project
        self.experiment_name = experiment_name
        self.logdir = Path(logdir)
        self.run = None
        self._finished = False
        if not self.enabled:
            self.mode = "disabled"
            return
        self.mode = resolve_mode(mode)
        if self.mode == "disabled":
            print("[tracking] SwanLab disabled: nothing is logged.", flush=True)
            return
        self._start(flatten_config(_plain(dict(config or {}))))

    # ------------------------------------------------------------------ setup
    def _start(self, config: dict) -> None:
        import swanlab

        kwargs = dict(project=self.project, name=self.experiment_name, config=config or None, reinit=True,
                      log_dir=str(self.logdir))
        # No run may ever wait at a prompt: without a key, swanlab.init(mode="online") shows its
        # login menu at a terminal and blocks; with interactive off, a bad key raises instead
        # (and falls back below) rather than asking for another.
        os.environ.setdefault("SWANLAB_INTERACTIVE", "false")
        if self.mode == "online" and not has_api_key():
            _warn("SwanLab cloud mode needs an API key and none is configured; falling back to 'offline'. "
                  "To use the cloud: `swanlab login` (or set SWANLAB_API_KEY), then upload this run with "
                  "`swanlab sync <run dir>`.")
            self.mode = "offline"
        try:
            self.run = swanlab.init(mode=self.mode, **kwargs)
        except Exception as e:
            # local: swanboard missing or of a version swanlab does not accept (ImportError);
            # online: no network / bad key (AuthenticationError after ~15 s of retries).
            if self.mode not in ("local", "online"):
                raise
            hint = f"install {DASHBOARD_INSTALL_HINT}" if self.mode == "local" else "check the API key / network"
            _warn(f"SwanLab {self.mode} mode failed ({type(e).__name__}: {e}); falling back to 'offline' ({hint}).")
            self.mode = "offline"
            self.run = swanlab.init(mode=self.mode, **kwargs)
        print(f"[tracking] {self.where()}", flush=True)

    def where(self) -> str:
        """One line saying the mode and where to look."""
        if self.mode == "disabled" or self.run is None:
            return "SwanLab disabled: nothing is logged."
        if self.mode == "online":
            try:
                url = self.run.url
            except Exception:
                url = "https://swanlab.cn"
            return f"SwanLab mode=online (cloud): {url}"
        run_dir = getattr(self.run, "dir", self.logdir)
        if self.mode == "local":
            return (
                f"SwanLab mode=local: run saved in {run_dir}; dashboard: "
                f"`swanlab watch {self.logdir} -h 127.0.0.1 -p {DEFAULT_PORT}` then open http://127.0.0.1:{DEFAULT_PORT}"
            )
        return f"SwanLab mode=offline: run saved in {run_dir}; upload later with `swanlab sync {run_dir}`"

    @property
    def active(self) -> bool:
        return self.run is not None and not self._finished and bool(getattr(self.run, "alive", True))

    # ---------------------------------------------------------------- logging
    def update_config(self, config: Mapping[str, Any]) -> None:
        """Add entries to the run's config (hyper-parameters)."""
        if not self.active or not config:
            return
        self.run.config.update(flatten_config(_plain(dict(config))))

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> dict:
        """Log the numeric (finite) values of ``metrics``; others are skipped.
        Returns what was logged."""
        if not self.active:
            return {}
        data = {}
        for key, value in (metrics or {}).items():
            num = _to_number(value)
            if num is not None:
                data[str(key)] = num
        if data:
            self.run.log(data, step=None if step is None else int(step))
        return data

    def log_predictions(
        self,
        rows: list[dict],
        step: int | None = None,
        key: str = "eval/predictions",
        max_rows: int = 32,
    ) -> int:
        """Log up to ``max_rows`` samples: each image (file path or PIL image)
        under ``key`` captioned label first, then the prediction (each cut to
        CAPTION_CHARS, so a looping prediction cannot hide the label), plus the
        same pair as text under ``f"{key}_text"`` (full length, easy to copy).
        Returns the number of rows logged."""
        if not self.active or not rows:
            return 0
        import swanlab

        from .metrics import exact_match

        images, texts = [], []
        for row in list(rows)[: max(0, int(max_rows))]:
            pred = "" if row.get("prediction") is None else str(row.get("prediction"))
            label = str(row.get("label", ""))
            match = bool(row.get("exact_match", exact_match(pred, label)))
            caption = (f"{'✓' if match else '✗'} label: {_shorten(label, CAPTION_CHARS)} | "
                       f"pred: {_shorten(pred, CAPTION_CHARS)}")
            image = row.get("image")
            if isinstance(image, os.PathLike):
                image = os.fspath(image)
            elif isinstance(image, Mapping):  # a datasets Image feature left undecoded: {bytes, path}
                image = _decode_image_dict(image)
            if image is not None:
                try:
                    images.append(swanlab.Image(image, caption=caption, size=1024))
                except Exception as e:  # unreadable file etc.: keep the text
                    _warn(f"could not log image {image!r}: {e}")
            texts.append(swanlab.Text(f"label: {label}\npred:  {pred}", caption="match" if match else "differs"))
        payload: dict[str, Any] = {}
        if images:
            payload[key] = images
        if texts:
            payload[f"{key}_text"] = texts
        if payload:
            self.run.log(payload, step=None if step is None else int(step))
        return len(texts)

    # Tables are logged as text: SwanLab's ECharts table does not show in the local dashboard
    # (its chart list skips it and its data endpoint fails), text charts show everywhere.
    def log_table(self, key: str, headers: list[str], rows: list[list], step: int | None = None) -> bool:
        """Log one small table as an aligned plain-text block under ``key``; True when logged."""
        if not self.active or not rows:
            return False
        import swanlab

        cells = [[str(h) for h in headers]] + [[str(_plain(v)) for v in r] for r in rows]
        widths = [max(len(line[c]) for line in cells) for c in range(len(headers))]
        text = "\n".join(" | ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)
        self.run.log({key: swanlab.Text(text, caption=key)}, step=None if step is None else int(step))
        return True

    def log_worst(self, rows: list[dict], step: int | None = None, key: str = "eval/worst",
                  max_rows: int = 20) -> int:
        """The ``max_rows`` worst-scored samples (highest edit distance first), one text entry
        each: caption = rank and scores, text = label, prediction, image. Returns the rows logged."""
        if not self.active:
            return 0
        import swanlab

        from .metrics import worst_first

        worst = worst_first([r for r in rows or [] if "edit_distance" in r])[: max(0, int(max_rows))]
        texts = []
        for rank, r in enumerate(worst, 1):
            caption = (f"#{rank} ED {float(r['edit_distance']):.3f} · EM {float(r.get('exact_match', 0)):g} · "
                       f"BLEU {float(r.get('bleu4', 0)):.1f} · {'renders' if r.get('render_ok') else 'does not render'}"
                       + (" · hit MAX_NEW_TOKENS" if r.get("truncated") else ""))
            pred = "" if r.get("prediction") is None else str(r["prediction"])
            texts.append(swanlab.Text(f"label: {r.get('label', '')}\npred:  {pred}\nimage: {r.get('image', '')}",
                                      caption=caption))
        if texts:
            self.run.log({key: texts}, step=None if step is None else int(step))
        return len(texts)

    def finish(self, state: str = "success", error: str | None = None) -> None:
        """Close the run (idempotent)."""
        if not self.active:
            return
        self._finished = True
        kwargs = {"state": state}
        if error is not None:
            kwargs["error"] = error
        self.run.finish(**kwargs)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.finish(state="aborted" if exc_type is KeyboardInterrupt else "crashed", error=repr(exc))


# --------------------------------------------------------------------------- Trainer callback
#: TrainingArguments recorded in the run config at the start of training.
TRAINING_ARG_KEYS = (
    "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
    "weight_decay", "max_grad_norm", "optim", "adam_beta1", "adam_beta2", "bf16", "fp16", "tf32",
    "gradient_checkpointing", "logging_steps", "eval_strategy", "eval_steps", "save_steps", "seed",
    "dataloader_num_workers", "world_size",
)


def rewrite_logs(logs: Mapping[str, Any]) -> dict:
    """Trainer log keys → namespaced keys: ``eval_x`` → ``eval/x``,
    ``test_x`` → ``test/x``, anything else → ``train/x`` (non-numeric dropped)."""
    out = {}
    for key, value in (logs or {}).items():
        if _to_number(value) is None:
            continue
        for prefix in ("eval_", "test_"):
            if key.startswith(prefix):
                out[f"{prefix[:-1]}/{key[len(prefix):]}"] = value
                break
        else:
            out[key if "/" in key else f"train/{key}"] = value
    return out


def _build_callback_class():
    from transformers import TrainerCallback

    class SwanLabCallback(TrainerCallback):
        """Forward the Trainer's logs to a :class:`Tracker` (main process only).

        ``on_log``: every numeric entry of ``logs`` (loss, learning_rate,
        grad_norm, epoch, ...) under ``train/...`` (``eval_*`` under ``eval/``)
        at ``state.global_step``. ``on_train_begin``: the key TrainingArguments
        (and the model's parameter counts) into the run config.
        """

        def __init__(self, tracker: Tracker):
            self.tracker = tracker

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero or not self.tracker.active:
                return
            targs = {k: getattr(args, k) for k in TRAINING_ARG_KEYS if hasattr(args, k)}
            extra: dict[str, Any] = {"training_args": targs}
            if model is not None and hasattr(model, "parameters"):
                try:
                    total = trainable = 0
                    for p in model.parameters():
                        total += p.numel()
                        trainable += p.numel() if p.requires_grad else 0
                    extra["model_params"] = {"total": total, "trainable": trainable}
                except Exception:
                    pass
            self.tracker.update_config(extra)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "train_samples_per_second" in logs and "loss" not in logs:
                # transformers' end-of-run totals would be one-point charts: keep them in the config
                self.tracker.update_config({f"run.{k}": v for k, v in logs.items() if _to_number(v) is not None})
                return
            self.tracker.log(rewrite_logs(logs), step=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            # Do not finish here: the caller may still log evaluation/predictions.
            return

    return SwanLabCallback


def __getattr__(name: str):
    if name == "SwanLabCallback":
        cls = _build_callback_class()
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    class SwanLabCallback(_TrainerCallbackBase):  # noqa: D101
        def __init__(self, tracker: Tracker): ...
