"""What the tests share: the tiny datasets, running the four scripts (in this process, or as a
user's separate process where that is what is tested), reading their outputs, a local dashboard."""
from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import traceback
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from latexocr.sample import make_record

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PY = sys.executable

# Short, distinct labels in the dataset's convention (tokens separated by spaces); some have four
# or more tokens so that corpus BLEU-4 is defined (100 when every prediction is exact).
LABELS = ["x ^ 2", "a + b = c", "\\pi", "y _ 1", "e ^ x", "1 / 2", "\\beta", "f ( x )",
          "n !", "k = 1", "\\int", "c - d", "z ^ { 3 }", "\\sum", "a b", "q"]

# train.py flags for the tiny model: no workers, no tracking, no base-model pass, short generation.
TINY = ["--model-source", "local", "--num-workers", "0", "--swanlab-mode", "disabled",
        "--lora-dropout", "0", "--max-new-tokens", "12", "--no-eval-base-model"]

# Subprocess limits catch a hang, not slowness: each is >= 5x the run's duration on 2 idle cores,
# so a machine busy with other work (CI neighbours, a CPU-burning process) does not fail a test.
SCRIPT_TIMEOUT = 1200


def script_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(SWANLAB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def default_sigint() -> None:
    """preexec_fn of a child that is sent SIGINT: the default handler, also when this suite runs as a
    background job (whose children start with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _failed(name, args, code, stdout, stderr):
    pytest.fail(f"{name} {' '.join(map(str, args))} exited {code}\n"
                f"--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-6000:]}")


def run_script(name: str, *args, cwd=None, env=None, timeout=SCRIPT_TIMEOUT, check=True) -> subprocess.CompletedProcess:
    """python <name> args... as a separate process (where a process is what is tested: signals,
    start-up, imports); stdout and stderr captured; a non-zero exit fails with the output."""
    proc = subprocess.run([PY, str(ROOT / name), *map(str, args)], cwd=cwd, env=env or script_env(),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=default_sigint)
    if check and proc.returncode != 0:
        _failed(name, args, proc.returncode, proc.stdout, proc.stderr)
    return proc


@contextlib.contextmanager
def _cwd(folder):
    before = os.getcwd()
    os.chdir(folder or before)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _environment(env: dict | None):
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_main(name: str, *args, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    """The script's main(argv) in this process, as `python <name> args...` would run it (its exit
    status, stdout and stderr), without paying the 10-15 s of imports of a new process."""
    module = importlib.import_module(Path(name).stem)
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _cwd(cwd), _environment(env), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main(argv) or 0
        except SystemExit as exc:  # as the interpreter reports it: a message goes to stderr, exit 1
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except Exception:
            traceback.print_exc()
            code = 1
    proc = subprocess.CompletedProcess([name, *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        _failed(name, args, code, proc.stdout, proc.stderr)
    return proc


def draw_formula(path: Path, text: str, size: tuple[int, int], seed: int | None = None) -> Path:
    """The text in black on white, or on a light random texture (seeded) that makes every image
    distinct at the patch level, so a tiny frozen random vision tower tells them apart quickly."""
    if seed is None:
        img = Image.new("RGB", size, "white")
    else:
        rng = np.random.default_rng(seed)
        img = Image.fromarray(rng.integers(128, 256, (size[1], size[0], 3), dtype=np.uint8))
    ImageDraw.Draw(img).text((4, 4), text, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_dataset(folder: Path, labels: list[str], name: str = "data.json") -> Path:
    """One image per label (different sizes) and a conversation JSON with paths relative to it."""
    records = []
    for i, label in enumerate(labels):
        draw_formula(folder / "images" / f"{i}.png", label, (100 + 20 * (i % 5), 28 + 6 * (i % 3)), seed=i)
        records.append(make_record(i, f"images/{i}.png", label))
    path = folder / name
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def printed_metrics(stdout: str) -> dict:
    """The JSON summary infer.py prints last for a labelled input."""
    start = stdout.rindex("\n{") + 1 if "\n{" in stdout else stdout.index("{")
    return json.loads(stdout[start:])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def losses(stdout: str) -> list[float]:
    """The loss of every logged step of a train.py run."""
    import ast
    return [float(ast.literal_eval(line)["loss"]) for line in stdout.splitlines() if line.startswith("{'loss'")]


# ---- a local SwanLab dashboard's HTTP API -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    """The `data` of a dashboard API answer (status 200, code 0)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.status == 200, url
        payload = json.loads(resp.read())
    assert payload.get("code") == 0, payload
    return payload["data"]
