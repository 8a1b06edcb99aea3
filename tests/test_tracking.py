"""latexocr.tracking: mode resolution, a real local SwanLab run served by `swanlab watch`,
no-op modes, and prediction logging. CPU only, no network (the dashboard runs on 127.0.0.1)."""
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("swanlab")
from helpers import free_port as _free_port, get_json as _get_json, run_main  # noqa: E402
from latexocr import tracking  # noqa: E402  (imports swanlab)


@pytest.fixture
def iso(tmp_path, monkeypatch):
    """Isolate from any real SwanLab login/config on this machine: fresh HOME, SwanLab root
    and working directory; no SWANLAB_* env that could change the mode."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SWANLAB_ROOT", str(home / ".swanlab"))
    for var in ("SWANLAB_SAVE_DIR", "SWANLAB_API_KEY", "SWANLAB_MODE", "SWANLAB_API_HOST", "SWANLAB_WEB_HOST"):
        monkeypatch.delenv(var, raising=False)
    # local mode sets os.environ["SWANLAB_LOG_DIR"] itself: setenv makes monkeypatch restore it.
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "unused-swanlog"))
    monkeypatch.chdir(work)
    return SimpleNamespace(tmp=tmp_path, home=home, work=work)


def _files_under(path: Path):
    return sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else []


# ---------------------------------------------------------------------------- 1. resolve_mode
def test_resolve_mode_explicit(iso):
    expected_local = "local" if tracking.dashboard_available() else "offline"
    assert tracking.resolve_mode("cloud") == "online"
    assert tracking.resolve_mode("online") == "online"
    assert tracking.resolve_mode("local") == expected_local
    assert tracking.resolve_mode(" LOCAL ") == expected_local
    assert tracking.resolve_mode("offline") == "offline"
    assert tracking.resolve_mode("disabled") == "disabled"
    for bad in ("wandb", "", "none", None):
        with pytest.raises(ValueError) as exc:
            tracking.resolve_mode(bad)
        for choice in ("auto", "cloud", "local", "offline", "disabled"):
            assert choice in str(exc.value)


def test_resolve_mode_auto(iso, monkeypatch):
    monkeypatch.setattr(tracking, "dashboard_available", lambda: True)
    assert not tracking.has_api_key()
    assert tracking.resolve_mode("auto") == "local"

    monkeypatch.setenv("SWANLAB_API_KEY", "k" * 21)
    assert tracking.has_api_key()
    assert tracking.resolve_mode("auto") == "online"

    monkeypatch.setenv("SWANLAB_MODE", "offline")  # an explicit SWANLAB_MODE wins for auto
    assert tracking.resolve_mode("auto") == "offline"
    assert tracking.resolve_mode("local") == "local"  # ...but not over an explicit mode
    monkeypatch.delenv("SWANLAB_MODE")
    monkeypatch.delenv("SWANLAB_API_KEY")
    assert tracking.resolve_mode("auto") == "local"


def test_resolve_mode_auto_saved_login(iso, monkeypatch):
    """`swanlab login` saves the key as a .netrc in $SWANLAB_ROOT (default ~/.swanlab)."""
    monkeypatch.setattr(tracking, "dashboard_available", lambda: True)
    root = iso.home / ".swanlab"
    root.mkdir()
    netrc = root / ".netrc"
    netrc.write_text("machine https://api.swanlab.cn\n\tlogin https://swanlab.cn\n\tpassword " + "s" * 21 + "\n")
    netrc.chmod(0o600)
    assert tracking.has_api_key()
    assert tracking.resolve_mode("auto") == "online"
    netrc.unlink()
    assert tracking.resolve_mode("auto") == "local"


def test_local_without_dashboard_falls_back_to_offline(iso, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "dashboard_available", lambda: False)
    assert tracking.resolve_mode("local") == "offline"
    err = capsys.readouterr().err
    assert "swanlab[dashboard]" in err and "offline" in err
    assert tracking.resolve_mode("auto") == "offline"


# ---------------------------------------------------------------------------- helpers: dashboard
def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read()


class _Dashboard:
    """`swanlab watch <logdir>` on a free local port; always killed on exit."""

    def __init__(self, logdir: Path, log_file: Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        self._out = open(log_file, "wb")
        cmd = [sys.executable, "-m", "swanlab", "watch", str(logdir), "-h", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"swanlab watch exited with {self.proc.returncode}: {self.log_file.read_text()}")
            try:
                status, _ = _get(self.base + "/", timeout=2)
                if status == 200:
                    return
            except OSError as e:
                last = e
            time.sleep(0.3)
        pytest.fail(f"dashboard not ready after {timeout}s ({last}): {self.log_file.read_text()}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._out.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------- 2. local run + dashboard
def test_local_run_visible_in_dashboard(iso, capsys):
    if not tracking.dashboard_available():
        pytest.skip('needs swanlab[dashboard]')
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState

    logdir = iso.tmp / "swanlog"
    tracker = tracking.Tracker("local", project="latexocr-test", experiment_name="tiny-run",
                               config={"lr": 1e-4, "lora": {"r": 8}, "path": Path("/x")}, logdir=logdir)
    assert tracker.mode == "local"
    out = capsys.readouterr().out
    assert f"swanlab watch {logdir}" in out and "mode=local" in out

    assert tracker.log({"train/loss": 0.9}, step=1) == {"train/loss": 0.9}
    tracker.log({"train/loss": 0.7}, step=2)
    logged = tracker.log({"train/loss": 0.5, "note": "text", "bad": float("nan"), "none": None}, step=3)
    assert logged == {"train/loss": 0.5}  # non-numeric and NaN skipped

    cb = tracking.SwanLabCallback(tracker)
    args = SimpleNamespace(learning_rate=1e-4, per_device_train_batch_size=4, gradient_accumulation_steps=4,
                           num_train_epochs=2, seed=42, output_dir=str(iso.tmp / "out"))
    control = TrainerControl()
    main = TrainerState(global_step=4, is_world_process_zero=True)
    other = TrainerState(global_step=5, is_world_process_zero=False)
    cb.on_train_begin(args, main, control)
    cb.on_log(args, main, control, logs={"loss": 0.25, "learning_rate": 5e-5, "grad_norm": 1.5, "epoch": 0.5,
                                          "eval_loss": 0.3, "comment": "skip me"})
    cb.on_log(args, other, control, logs={"loss": 99.0})  # non-main process: ignored
    from PIL import Image
    tracker.log_predictions([{"image": Image.new("RGB", (64, 24), "white"), "prediction": "x^2", "label": "x^2"}],
                            step=4)
    tracker.finish()
    tracker.finish()  # idempotent
    assert tracker.log({"train/loss": 1.0}) == {}  # no-op after finish

    assert (logdir / "runs.swanlab").is_file()
    with _Dashboard(logdir, iso.tmp / "watch.log") as dash:
        dash.wait_ready(30)
        project = _get_json(dash.base + "/api/v1/project")
        assert project["name"] == "latexocr-test"
        runs = [e for e in project["experiments"] if e["name"] == "tiny-run"]
        assert len(runs) == 1, project["experiments"]
        exp = runs[0]
        cfg = {k: v["value"] for k, v in exp["config"].items()}
        # flat: the dashboard shows a nested value as [object Object]
        assert not any(isinstance(v, dict) for v in cfg.values()), cfg
        assert cfg["lr"] == 1e-4 and cfg["lora.r"] == 8 and cfg["path"] == "/x"
        assert cfg["training_args.per_device_train_batch_size"] == 4

        summary = _get_json(f"{dash.base}/api/v1/experiment/{exp['id']}/summary")
        values = {s["key"]: s["value"] for s in summary["summaries"]}
        assert math.isclose(values["train/loss"], 0.25)  # last logged value, rank>0 ignored
        assert math.isclose(values["train/learning_rate"], 5e-5)
        assert math.isclose(values["train/grad_norm"], 1.5)
        assert "train/epoch" not in values and cfg["run.epoch"] == 0.5  # a count, not a chart
        assert math.isclose(values["eval/loss"], 0.3)
        assert "train/comment" not in values
        assert "eval/predictions" in values and "eval/predictions_text" in values

        tag = urllib.parse.quote("train/loss", safe="")
        series = _get_json(f"{dash.base}/api/v1/experiment/{exp['id']}/tag/{tag}")
        assert [(p["index"], p["data"]) for p in series["list"]] == [(1, 0.9), (2, 0.7), (3, 0.5), (4, 0.25)]


# ---------------------------------------------------------------------------- 3. no-op modes
def test_disabled_and_not_enabled_write_nothing(iso):
    import swanlab

    logdir = iso.tmp / "swanlog"
    trackers = [
        tracking.Tracker("disabled", project="p", config={"a": 1}, logdir=logdir),
        tracking.Tracker("local", project="p", config={"a": 1}, logdir=logdir, enabled=False),
        tracking.Tracker("auto", project="p", logdir=logdir, enabled=False),
    ]
    for t in trackers:
        assert t.mode == "disabled" and not t.active
        assert t.log({"train/loss": 1.0}, step=1) == {}
        assert t.log_predictions([{"image": None, "prediction": "a", "label": "b"}]) == 0
        t.update_config({"b": 2})
        t.finish()
    assert not swanlab.has_run()
    assert _files_under(logdir) == [] and _files_under(iso.work) == [] and _files_under(iso.home) == []


def test_callback_noop_when_disabled(iso):
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState

    cb = tracking.SwanLabCallback(tracking.Tracker("disabled", project="p", logdir=iso.tmp / "swanlog"))
    state = TrainerState(global_step=1)
    cb.on_train_begin(SimpleNamespace(learning_rate=1.0), state, TrainerControl())
    cb.on_log(SimpleNamespace(), state, TrainerControl(), logs={"loss": 1.0})
    assert _files_under(iso.tmp / "swanlog") == []


# ---------------------------------------------------------------------------- 4. predictions
def test_log_predictions_local(iso):
    from PIL import Image

    if not tracking.dashboard_available():
        pytest.skip('needs swanlab[dashboard]')
    logdir = iso.tmp / "swanlog"
    img_path = iso.tmp / "formula.png"
    Image.new("L", (80, 30), 255).save(img_path)
    rows = [
        {"image": Image.new("RGB", (120, 40), "white"), "prediction": r"\frac{1}{2}", "label": r"\frac{1}{2}"},
        {"image": Image.new("RGBA", (60, 20), "gray"), "prediction": "x^{2}", "label": "x^{3}"},
        {"image": str(img_path), "prediction": "a", "label": "b"},
        {"image": img_path, "prediction": "c" * 1000, "label": "c"},
        {"image": None, "prediction": "text only", "label": "text only"},
    ]
    tracker = tracking.Tracker("local", project="p", experiment_name="preds", logdir=logdir)
    assert tracker.log_predictions(rows, step=7) == 5
    assert tracker.log_predictions(rows, step=8, key="test/samples", max_rows=2) == 2
    run_dir = Path(tracker.run.dir)
    tracker.finish()
    pngs = [p for p in _files_under(run_dir / "media") if p.suffix == ".png"]
    texts = [p for p in _files_under(run_dir / "media") if p.suffix == ".txt"]
    assert len(pngs) >= 6  # 4 + 2 images (the row without one: text only)
    assert len(texts) >= 7  # 5 + 2 texts
    assert any("x^{3}" in p.read_text() for p in texts)


# ---------------------------------------------------------------------------- offline + fallback
def test_online_failure_falls_back_to_offline(iso, monkeypatch, capsys):
    """No network / bad key: swanlab.init(mode="online") raises (after retries); we keep an
    offline run instead of crashing the training. Simulated, so no network is touched."""
    import swanlab

    real_init = swanlab.init
    calls = []

    def fake_init(*args, mode=None, **kwargs):
        calls.append(mode)
        if mode == "online":
            raise RuntimeError("Failed to initialize the SwanLab client")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(swanlab, "init", fake_init)
    monkeypatch.setenv("SWANLAB_API_KEY", "a-key-the-cloud-would-reject")  # without one it never tries
    logdir = iso.tmp / "swanlog"
    tracker = tracking.Tracker("cloud", project="p", experiment_name="fallback", config={"a": 1}, logdir=logdir)
    assert calls == ["online", "offline"] and tracker.mode == "offline"
    captured = capsys.readouterr()
    assert "falling back to 'offline'" in captured.err
    assert "swanlab sync" in captured.out
    tracker.log({"train/loss": 0.1}, step=1)
    tracker.finish()
    assert not swanlab.has_run()
    assert any(p.name == "config.yaml" for p in _files_under(logdir))
    assert not (logdir / "runs.swanlab").exists()  # only local mode writes the dashboard database


# ---------------------------------------------------------------------------- real Trainer
def test_callback_with_real_trainer(iso):
    """A few steps of transformers.Trainer on a toy model: the callback logs every step
    under train/ at the global step and records the TrainingArguments in the run config."""
    if not tracking.dashboard_available():
        pytest.skip('needs swanlab[dashboard]')
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import yaml

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x=None, labels=None):
            pred = self.lin(x).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(pred, labels), "logits": pred}

    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(iso.tmp / "out"), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    logdir = iso.tmp / "swanlog"
    tracker = tracking.Tracker("local", project="p", experiment_name="trainer", config={"model": "toy"},
                               logdir=logdir)
    seen = []
    real_log = tracker.log
    tracker.log = lambda metrics, step=None: seen.append((step, real_log(metrics, step=step)))
    trainer = transformers.Trainer(model=Toy(), args=args, train_dataset=data,
                                   callbacks=[tracking.SwanLabCallback(tracker)])
    trainer.train()
    run_dir = Path(tracker.run.dir)
    tracker.finish()

    per_step = [(step, logged) for step, logged in seen if "train/loss" in logged]
    assert [step for step, _ in per_step] == [1, 2, 3, 4]
    for _, logged in per_step:
        assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(logged)
    # counts and transformers' end-of-run totals (one point each): kept in the config, not charted
    assert not any(k in logged for k in ("train/epoch", "train/train_samples_per_second", "train/train_loss")
                   for _, logged in seen)
    cfg = yaml.safe_load((run_dir / "files" / "config.yaml").read_text())
    assert cfg["model"]["value"] == "toy"
    assert cfg["run.train_runtime"]["value"] > 0 and "run.train_loss" in cfg and cfg["run.epoch"]["value"] == 1
    assert cfg["training_args.per_device_train_batch_size"]["value"] == 4
    assert cfg["training_args.lr_scheduler_type"]["value"] == "linear"
    assert cfg["model_params.total"]["value"] == 5 and cfg["model_params.trainable"]["value"] == 5


def test_cloud_without_key_never_prompts_at_a_terminal(iso, tmp_path):
    """At an interactive terminal, swanlab.init(mode="online") without a key shows a login menu
    and waits for input. Run it as a user would (a pseudo-terminal, nothing typed): it must
    fall back to offline at once, naming the login command, and never show the menu."""
    import pty

    code = ("from latexocr.tracking import Tracker; t = Tracker('cloud', 'p', 'nokey', logdir='swanlog'); "
            "print('MODE', t.mode); t.finish()")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB_")}
    env.update(HOME=str(iso.home), SWANLAB_ROOT=str(iso.home / ".swanlab"), PYTHONPATH=str(Path(__file__).parents[1]))
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=child, stdout=child, stderr=child, env=env,
                            cwd=iso.work)
    os.close(child)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    try:
        rc = proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"blocked at a prompt: {output.decode(errors='replace')[-500:]}")
    finally:
        os.close(main)
    text = output.decode(errors="replace")
    assert rc == 0, text
    assert "MODE offline" in text and "swanlab login" in text, text
    assert "Enter your choice" not in text


# ---------------------------------------------------------------------------- names, flat config
def test_run_names_say_adapter_and_input():
    assert tracking.run_name("output/Qwen2-VL-2B-LatexOCR/final", "latex_ocr_val.json") == \
        "infer-Qwen2-VL-2B-LatexOCR-final-latex_ocr_val"
    assert tracking.run_name("output/run/checkpoint-100", "data/test.csv") == "infer-run-checkpoint-100-test"
    assert tracking.run_name(None, "imgs/") == "infer-base-imgs"


def test_config_is_flat():
    flat = tracking.flatten_config({"lr": 1e-4, "lora": {"r": 8, "alpha": {"x": 1}}, "none": None, "empty": {}})
    assert flat == {"lr": 1e-4, "lora.r": 8, "lora.alpha.x": 1, "none": "None", "empty": "{}"}


# ---------------------------------------------------------------------------- train.py's dashboard
#: What a training run charts (issue 25): the curves people read, and nothing that is a total or a count.
CHARTS = {"train/loss", "train/grad_norm", "train/learning_rate", "train/samples_per_second", "train/tokens_per_second",
          "eval/exact_match", "eval/edit_distance", "eval/edit_distance_ref", "eval/bleu4", "eval/render_rate",
          "eval/truncated_rate"}
NOT_CHARTS = {"train/epoch", "train/num_input_tokens_seen", "train/train_runtime", "train/train_tokens_per_second",
              "train/train_samples_per_second", "train/train_steps_per_second", "train/total_flos",
              "train/train_loss", "train/global_step", "eval/n", "eval/errors"}


def _tiny_dataset(folder: Path) -> Path:
    from PIL import Image, ImageDraw

    from latexocr.sample import make_record

    records = []
    for i, label in enumerate(["x ^ 2", "a + b = c", "\\pi", "y _ 1"]):
        img = Image.new("RGB", (100 + 20 * i, 28 + 6 * (i % 3)), "white")
        ImageDraw.Draw(img).text((4, 4), label, fill=(0, 0, 0))
        (folder / "images").mkdir(parents=True, exist_ok=True)
        img.save(folder / "images" / f"{i}.png")
        records.append(make_record(i, f"images/{i}.png", label))
    path = folder / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _train(iso, model_dir, data, name, *extra):
    """train.py with its defaults (tracking local), sized for the tiny model; returns the run as the
    local dashboard stores it: {tag: (type, [(step, value), ...])} read from swanlog/runs.swanlab."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB_")}
    logdir = iso.tmp / "swanlog"
    env.update(HOME=str(iso.home), SWANLAB_ROOT=str(iso.home / ".swanlab"), HF_HUB_OFFLINE="1",
               SWANLAB_LOG_DIR=str(logdir))
    run_main("train.py", "--model-id", model_dir, "--model-source", "local", "--train-json", data,
             "--val-json", data, "--output-dir", iso.tmp / name, "--max-steps", 3, "--batch-size", 2,
             "--micro-batch-size", 2, "--logging-steps", 1, "--num-workers", 0, "--max-new-tokens", 6,
             "--swanlab-mode", "local", "--experiment-name", name, *extra,
             cwd=iso.work, env=env)
    db = sqlite3.connect(logdir / "runs.swanlab")  # the local dashboard's database
    try:
        (exp_id, run_id), = db.execute("SELECT id, run_id FROM experiment WHERE name = ?", (name,)).fetchall()
        tags = db.execute("SELECT folder, name, type FROM tag WHERE experiment_id = ?", (exp_id,)).fetchall()
    finally:
        db.close()
    run_dir = logdir / run_id
    points = {}
    for folder, tag, kind in tags:  # each tag's points: logs/<folder>/*.log, one JSON line per step
        lines = [json.loads(line) for f in sorted((run_dir / "logs" / folder).glob("*.log"))
                 for line in f.read_text().splitlines()]
        points[tag] = (kind, [(p["index"], p["data"]) for p in lines])
    import yaml

    config = {k: v["value"] for k, v in yaml.safe_load((run_dir / "files" / "config.yaml").read_text()).items()}
    return points, config


def test_train_dashboard_before_after_by_default(iso, tiny_model_dir):
    """Issue 25: the dashboard a user opens after `python train.py` (defaults): every eval/* curve
    starts at step 0 (the base model) and ends at the last step; only the charts people read; totals
    and counts in the config; the before/after table logged. --no-eval-base-model skips the base pass."""
    if not tracking.dashboard_available():
        pytest.skip("needs swanlab[dashboard]")
    data = _tiny_dataset(iso.tmp / "data")
    points, config = _train(iso, tiny_model_dir, data, "defaults")

    charts = {tag for tag, (kind, _) in points.items() if kind == "line"}
    assert charts == CHARTS, charts ^ CHARTS
    assert not NOT_CHARTS & set(points)
    for tag in CHARTS:
        if tag.startswith("eval/"):
            assert [step for step, _ in points[tag][1]] == [0, 3], (tag, points[tag])
    assert [step for step, _ in points["train/loss"][1]] == [1, 2, 3]
    # prediction images and the worst samples stay as media, before and after
    assert points["eval/predictions"][0] == "image" and [s for s, _ in points["eval/predictions"][1]] == [0, 3]
    assert [s for s, _ in points["eval/worst"][1]] == [0, 3]
    table = points["eval/base_vs_finetuned"][1][-1][1][0]
    assert table.splitlines()[0].split() == ["metric", "|", "base", "|", "fine-tuned"]
    assert "not run" not in table and any(line.startswith("exact_match") for line in table.splitlines())
    # the totals and counts are numbers of the run, in its config
    assert config["run.eval_n"] == 4 and config["run.eval_errors"] == 0 and config["run.epoch"] == 1.5
    assert config["run.train_runtime"] > 0 and config["run.num_input_tokens_seen"] > 0
    assert config["eval_base_model"] is True

    # the same run through the dashboard's HTTP API, as the browser reads it
    with _Dashboard(iso.tmp / "swanlog", iso.tmp / "watch.log") as dash:
        dash.wait_ready()
        project = _get_json(dash.base + "/api/v1/project")
        run, = [e for e in project["experiments"] if e["name"] == "defaults"]
        summary = {s["key"]: s["value"] for s in _get_json(f"{dash.base}/api/v1/experiment/{run['id']}/summary")["summaries"]}
        assert math.isfinite(summary["train/loss"]) and 0.0 <= summary["eval/exact_match"] <= 1.0
        assert {"eval/bleu4", "eval/edit_distance", "eval/render_rate", "eval/truncated_rate"} <= set(summary)
        flat = {k: v["value"] for k, v in run["config"].items()}
        assert flat["max_steps"] == 3 and flat["train_samples"] == 4 and "run.train_runtime" in flat
        assert not any(isinstance(v, dict) for v in flat.values()), flat  # flat: no [object Object]
        tag = urllib.parse.quote("eval/predictions", safe="")
        captions = [m["caption"] for point in _get_json(f"{dash.base}/api/v1/experiment/{run['id']}/tag/{tag}")["list"]
                    for m in point["more"]]
        assert len(captions) == 8 and all(c[0] in "✓✗" and " label: " in c for c in captions), captions

    points, config = _train(iso, tiny_model_dir, data, "no-base", "--no-eval-base-model")
    assert [step for step, _ in points["eval/exact_match"][1]] == [3]
    assert config["eval_base_model"] is False
