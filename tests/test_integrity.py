"""Nothing silently wrong (issue 13), as a user sees it: the data scripts run as subprocesses.

* data2csv/csv2json never pair an image with another row's label: two CSVs sharing one image
  folder, and a re-run with another source that is interrupted (pixels are checked);
* Ctrl-C ends data2csv within seconds every time; no worker outlives its main process;
* each bad input ends in one line naming the file (and row) and a non-zero exit, before any
  model is loaded.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SWANLAB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def png(seed: int, size=(48, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def make_source(path: Path, tag: str, n: int, seed0: int) -> dict[str, bytes]:
    """A parquet of n rows; returns {label: image bytes} (labels are unique, tagged by source)."""
    images = [png(seed0 + i) for i in range(n)]
    labels = [f"{tag} _ {{ {i} }}" for i in range(n)]
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in images], type=IMAGE_TYPE),
                      "text": labels})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=256)
    return dict(zip(labels, images))


def pixels(src) -> np.ndarray:
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        return np.asarray(im.convert("RGB"))


from helpers import default_sigint  # noqa: E402


def script(name: str, *args, timeout=120, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / name), *map(str, args)], cwd=kw.pop("cwd", ROOT), env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, **kw)


def data2csv(source, csv_path, image_dir, *extra, **kw):
    return script("data2csv.py", "--source", source, "--csv-path", csv_path, "--image-dir", image_dir,
                  "--workers", "0", *extra, **kw)


def assert_pairs_true(csv_path: Path, truth: dict[str, bytes]) -> int:
    """Every row of the CSV pairs a label with exactly that source row's pixels."""
    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows
    for row in rows:
        np.testing.assert_array_equal(pixels(csv_path.parent / row["image_path"]), pixels(truth[row["text"]]),
                                      err_msg=f"{csv_path}: {row['image_path']} is not the image of {row['text']!r}")
    return len(rows)


def assert_json_pairs_true(json_path: Path, truth: dict[str, bytes]) -> int:
    from latexocr.records import read_labelled
    pairs = read_labelled(json_path)
    for image, label in pairs:
        np.testing.assert_array_equal(pixels(image), pixels(truth[label]), err_msg=f"{json_path}: {image}")
    return len(pairs)


def one_line(proc: subprocess.CompletedProcess, library_noise=False) -> str:
    """The one line a bad input gives (after a model library's own import warnings, if allowed)."""
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    if library_noise:
        assert err and err[-1].startswith("error: ") and sum(e.startswith("error: ") for e in err) == 1, proc.stderr
        return err[-1]
    assert len(err) == 1, proc.stderr
    return err[0]


# ---- 1. two CSVs sharing one image folder -------------------------------------------------------

def test_two_csvs_sharing_an_image_folder_keep_their_own_images(tmp_path):
    truth_a = make_source(tmp_path / "A.parquet", "a", 60, 0)
    truth_b = make_source(tmp_path / "B.parquet", "b", 60, 1000)
    images = tmp_path / "latex_ocr_images"
    a_csv, b_csv = tmp_path / "a.csv", tmp_path / "b.csv"
    assert data2csv(tmp_path / "A.parquet", a_csv, images, "--limit", "40").returncode == 0
    p = data2csv(tmp_path / "B.parquet", b_csv, images, "--limit", "40")
    assert p.returncode == 0 and "removing" not in p.stdout  # nothing of A's is deleted
    p = data2csv(tmp_path / "A.parquet", a_csv, images, "--limit", "40")
    assert p.returncode == 0 and "already complete" in p.stdout
    assert assert_pairs_true(a_csv, truth_a) == 40
    assert assert_pairs_true(b_csv, truth_b) == 40
    for name, truth in (("a", truth_a), ("b", truth_b)):  # and through csv2json
        p = script("csv2json.py", "--csv-path", tmp_path / f"{name}.csv", "--val-size", "5",
                   "--train-json", tmp_path / f"{name}_train.json", "--val-json", tmp_path / f"{name}_val.json")
        assert p.returncode == 0, p.stderr
        assert assert_json_pairs_true(tmp_path / f"{name}_train.json", truth) == 35
        assert assert_json_pairs_true(tmp_path / f"{name}_val.json", truth) == 5


# ---- 2. an interrupted re-run with another source ---------------------------------------------

def test_interrupted_rerun_with_another_source_is_refused_and_the_old_csv_stays_true(tmp_path):
    truth_a = make_source(tmp_path / "A.parquet", "a", 300, 0)
    make_source(tmp_path / "B.parquet", "b", 3000, 5000)
    csv_path, images = tmp_path / "latex_ocr_train.csv", tmp_path / "latex_ocr_images"
    assert data2csv(tmp_path / "A.parquet", csv_path, images, "--limit", "all").returncode == 0
    a_files = {p.name: p.read_bytes() for p in images.glob("*.png")}
    proc = subprocess.Popen([PY, str(ROOT / "data2csv.py"), "--source", str(tmp_path / "B.parquet"),
                             "--csv-path", str(csv_path), "--image-dir", str(images), "--limit", "all",
                             "--workers", "2"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 60
    while len(list(images.glob("*.png"))) < len(a_files) + 200 and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until B's images are being written
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not csv_path.with_name(csv_path.name + ".done.json").exists()
    # csv2json refuses the unfinished CSV with one line naming it ...
    p = script("csv2json.py", "--csv-path", csv_path, "--train-json", tmp_path / "t.json",
               "--val-json", tmp_path / "v.json")
    line = one_line(p)
    assert str(csv_path) in line and "--no-require-done" in line and p.returncode == 2
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "v.json").exists()
    # ... and the earlier outputs are intact: A's CSV still pairs A's own pixels, A's files unchanged
    assert assert_pairs_true(csv_path, truth_a) == 300
    assert all((images / n).read_bytes() == b for n, b in a_files.items())
    # the refusal can be overridden, and then the JSON is still right
    p = script("csv2json.py", "--csv-path", csv_path, "--train-json", tmp_path / "t.json",
               "--val-json", tmp_path / "v.json", "--no-require-done")
    assert p.returncode == 0, p.stderr
    assert assert_json_pairs_true(tmp_path / "t.json", truth_a) + assert_json_pairs_true(tmp_path / "v.json", truth_a) == 300


# ---- 3. interrupts ------------------------------------------------------------------------------

def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _wait_group_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """Enough rows that a run with 2 workers takes a few seconds on this machine."""
    path = tmp_path_factory.mktemp("big") / "big.parquet"
    make_source(path, "x", 4000, 0)
    return path


def _start(source: Path, out: Path) -> subprocess.Popen:
    # its own process group, as a shell gives a foreground job: Ctrl-C reaches main and workers
    return subprocess.Popen([PY, str(ROOT / "data2csv.py"), "--source", str(source), "--limit", "all",
                             "--csv-path", str(out / "data.csv"), "--image-dir", str(out / "img"), "--workers", "2"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)


def test_30_sigints_at_random_moments_each_end_within_10_s(tmp_path, big_source):
    rng = random.Random(13)
    outcomes = []
    for i in range(30):
        out = tmp_path / f"run{i}"
        proc = _start(big_source, out)
        if i % 3 == 0:  # start-up: imports, reading the source, starting the workers
            # from 0.3 s on: a SIGINT inside CPython's own start-up (importing site, before any line
            # of data2csv runs) ends it with "Fatal Python error: init_import_site" whatever a program does
            time.sleep(rng.uniform(0.3, 1.0))
        else:  # mid-export: once a random number of its 4,000 images exist, however fast this machine is
            target, deadline = rng.randint(1, 3000), time.monotonic() + 120
            while (proc.poll() is None and time.monotonic() < deadline
                   and sum(1 for _ in (out / "img").glob("*.png")) < target):
                time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        start = time.monotonic()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"SIGINT #{i} did not end data2csv within 10 s")
        took = time.monotonic() - start
        assert _wait_group_gone(proc.pid, 5), f"SIGINT #{i}: a worker outlived the main process"
        err = proc.stderr.read()
        assert proc.returncode in (130, -signal.SIGINT, 0), (proc.returncode, err)
        outcomes.append((proc.returncode, round(took, 2)))
        print(f"SIGINT #{i}: exit {proc.returncode} after {took:.2f} s")  # pytest -s shows how far from 10 s
        marker = tmp_path / f"run{i}" / "data.csv.done.json"
        if marker.exists():  # finished before the signal landed: the marker vouches for a whole CSV
            csv_text = (tmp_path / f"run{i}" / "data.csv").read_text(encoding="utf-8")
            assert json.loads(marker.read_text())["rows"] == 4000 == len(csv_text.splitlines()) - 1
        else:
            assert proc.returncode != 0
    assert sum(rc != 0 for rc, _ in outcomes) >= 20, outcomes  # most were really interrupted mid-run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_worker_outlives_a_killed_main_process(tmp_path, big_source, sig):
    proc = _start(big_source, tmp_path)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "img").glob("*.png")) and time.monotonic() < deadline:
        time.sleep(0.05)  # workers are running
    os.kill(proc.pid, sig)  # the main process only, as `kill PID` does
    proc.wait(timeout=10)
    assert _wait_group_gone(proc.pid, 5), f"workers left running after {sig.name} of the main process"
    assert not (tmp_path / "data.csv.done.json").exists()


# ---- 4. bad inputs: one line, the file (and row), a non-zero exit -------------------------------

def test_data2csv_bad_inputs(tmp_path):
    pq.write_table(pa.table({"picture": [b"x"], "caption": ["y"]}), tmp_path / "cols.parquet")
    line = one_line(data2csv(tmp_path / "cols.parquet", tmp_path / "o.csv", tmp_path / "img"))
    assert "cols.parquet" in line and "image column" in line
    assert not (tmp_path / "o.csv").exists()
    make_source(tmp_path / "ok.parquet", "a", 5, 0)
    (tmp_path / "a_file").write_text("not a folder")
    line = one_line(data2csv(tmp_path / "ok.parquet", tmp_path / "a_file" / "o.csv", tmp_path / "img"))
    assert "cannot write to" in line and "a_file" in line and ".tmp" not in line
    line = one_line(data2csv(tmp_path / "ok.parquet", tmp_path / "o.csv", tmp_path / "a_file" / "img"))
    assert "cannot write to" in line and "a_file" in line


def test_data2csv_skip_reasons_are_stable_and_pro_names_may_hold_spaces(tmp_path):
    """A non-image's skip reason holds no object address (same report in every run); a
    LaTeX_OCR_PRO matching line whose file name has a space is read, not 'missing label'."""
    good = png(1)
    table = pa.table({"image": pa.array([{"bytes": b"no image", "path": None}, {"bytes": good, "path": None}],
                                        type=IMAGE_TYPE), "text": ["x", "y"]})
    pq.write_table(table, tmp_path / "s.parquet")
    reports = []
    for run in ("r1", "r2"):
        assert data2csv(tmp_path / "s.parquet", tmp_path / run / "o.csv", tmp_path / run / "img").returncode == 0
        reports.append((tmp_path / run / "o.csv.skipped.csv").read_text())
    assert reports[0] == reports[1] and "0x" not in reports[0] and "not an image" in reports[0]
    pro = tmp_path / "pro"
    for d in ("images/images_train", "formulas", "matching"):
        (pro / d).mkdir(parents=True)
    (pro / "images/images_train/my formula.png").write_bytes(good)
    (pro / "formulas/train.formulas.norm.txt").write_text("a + b\n")
    (pro / "matching/train.matching.txt").write_text("my formula.png 0\n")
    assert data2csv(pro, tmp_path / "p.csv", tmp_path / "pimg").returncode == 0
    assert assert_pairs_true(tmp_path / "p.csv", {"a + b": good}) == 1


def _project(tmp_path: Path, n=12) -> Path:
    make_source(tmp_path / "src.parquet", "a", n, 0)
    assert data2csv(tmp_path / "src.parquet", tmp_path / "d.csv", tmp_path / "img").returncode == 0
    return tmp_path / "d.csv"


def test_csv2json_bad_inputs(tmp_path):
    out = ["--train-json", tmp_path / "t.json", "--val-json", tmp_path / "v.json"]
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("image_path,text\nimg/0.png,caf\u00e9\n".encode("latin-1"))
    line = one_line(script("csv2json.py", "--csv-path", bad, "--no-require-done", *out))
    assert "latin1.csv" in line and "line 2" in line and "UTF-8" in line
    (tmp_path / "ro").write_text("a file, not a folder")
    csv_path = _project(tmp_path)
    line = one_line(script("csv2json.py", "--csv-path", csv_path, "--val-size", "2",
                           "--train-json", tmp_path / "ro" / "t.json", "--val-json", tmp_path / "v.json"))
    assert "cannot write" in line and str(tmp_path / "ro" / "t.json") in line and ".tmp" not in line
    assert not (tmp_path / "v.json").exists()


def test_csv2json_zero_byte_image_is_counted_and_val_copies_leave_training(tmp_path):
    csv_path = _project(tmp_path, n=12)
    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    first = tmp_path / rows[1][0]
    (tmp_path / "copies").mkdir()
    val_rows = [["image_path", "text"]]
    for i, (rel, text) in enumerate(rows[1:4]):  # another export of 3 training images, as validation
        copy = tmp_path / "copies" / f"{i}.png"
        copy.write_bytes((tmp_path / rel).read_bytes())
        val_rows.append([f"copies/{i}.png", text])
    with open(tmp_path / "val.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(val_rows)
    (tmp_path / rows[5][0]).write_bytes(b"")  # a zero-byte PNG in training
    p = script("csv2json.py", "--csv-path", csv_path, "--val-csv", tmp_path / "val.csv", "--no-require-done",
               "--train-json", tmp_path / "t.json", "--val-json", tmp_path / "v.json")
    assert p.returncode == 0, p.stderr
    assert "1 (empty image file (0 bytes))" in p.stdout
    assert "removed 3 training rows whose image is identical in content" in p.stdout
    train = json.loads((tmp_path / "t.json").read_text())
    assert len(train) == 12 - 1 - 3 and len(json.loads((tmp_path / "v.json").read_text())) == 3
    assert first.name not in (tmp_path / "t.json").read_text()


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to find, download or load a model fails the test: the checks must come first."""
    import latexocr.modeling as modeling

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was resolved or loaded before the input was checked")
    for name in ("resolve_model", "load_model", "load_processor"):
        monkeypatch.setattr(modeling, name, forbidden)


def test_infer_checks_its_input_before_loading_any_model(tmp_path, no_model_loads):
    """--model-id is a hub id that would be downloaded: each bad input must stop before that."""
    from helpers import run_main
    hub = ["--model-id", "Qwen/Qwen2-VL-2B-Instruct", "--model-source", "modelscope", "--adapter", "none"]
    (tmp_path / "dict.json").write_text('{"conversations": []}')
    (tmp_path / "empty_conv.json").write_text('[{"id": "identity_0", "conversations": []}]')
    (tmp_path / "notext.csv").write_text("image_path,label\na.png,x\n")
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "bad.png").write_bytes(b"")
    cases = {"dict.json": "found a JSON dict", "empty_conv.json": "record 0 (identity_0): empty 'conversations'",
             "notext.csv": "expected columns image_path,text", "broken.json": "not valid JSON",
             "empty_dir": "no images found", "missing.png": "no images found",
             "bad.png": "no usable image among 1 (empty image file (0 bytes)"}
    for name, expected in cases.items():
        line = one_line(run_main("infer.py", tmp_path / name, *hub, check=False))
        assert expected in line and name in line, (name, line)


def test_train_checks_its_input_before_loading_any_model(tmp_path, tiny_model_dir, monkeypatch, no_model_loads):
    from helpers import run_main
    hub = ["--model-id", "Qwen/Qwen2-VL-2B-Instruct", "--model-source", "modelscope"]
    (tmp_path / "empty_conv.json").write_text('[{"id": "identity_0", "conversations": []}]')
    line = one_line(run_main("train.py", "--train-json", tmp_path / "empty_conv.json", *hub, check=False))
    assert "empty_conv.json" in line and "empty 'conversations'" in line
    line = one_line(run_main("train.py", "--train-json", tmp_path / "nowhere.json", *hub, check=False))
    assert "nowhere.json" in line and "not found" in line
    # MAX_LENGTH below every sample: found with the tokenizer, before the weights are loaded
    from transformers import AutoProcessor

    import latexocr.modeling as modeling
    from latexocr.sample import make_record
    monkeypatch.setattr(modeling, "resolve_model", lambda model_id, source: model_id)
    monkeypatch.setattr(modeling, "load_processor", AutoProcessor.from_pretrained)
    Image.fromarray(np.full((20, 60, 3), 255, dtype=np.uint8)).save(tmp_path / "0.png")
    (tmp_path / "ok.json").write_text(json.dumps([make_record(0, "0.png", "x ^ 2")]))
    p = run_main("train.py", "--train-json", tmp_path / "ok.json", "--val-json", tmp_path / "none.json",
                 "--model-id", tiny_model_dir, "--model-source", "local", "--max-length", "8",
                 "--output-dir", tmp_path / "out", "--swanlab-mode", "disabled", check=False)
    line = one_line(p)
    assert "ok.json" in line and "no usable samples" in line and "longer than max_length=8" in line
    assert not (tmp_path / "out").exists()


def test_help_is_fast_imports_no_torch_and_describes_every_setting():
    import runpy

    from latexocr.cli import settings_help
    for name in ("train.py", "infer.py"):
        start = time.monotonic()
        p = script(name, "--help", timeout=60)
        took = time.monotonic() - start
        assert p.returncode == 0 and took < 2, (name, took)
        settings = runpy.run_path(str(ROOT / name))["SETTINGS"]  # the settings block only: main() not run
        helps = settings_help(ROOT / name)
        assert set(settings) <= {k for k, v in helps.items() if v}, (name, set(settings) - set(helps))
        # compared without whitespace: argparse wraps the help to the terminal's width, also after
        # a hyphen ("micro-" / "batch"), which a single-space join would not restore
        flat = "".join(p.stdout.split())
        for key, text in helps.items():
            assert "".join(text.split()) in flat, (name, key)
        probe = (f"import runpy, sys; sys.argv = [{str(ROOT / name)!r}, '--help']\n"
                 f"try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
                 f"print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
        out = subprocess.run([PY, "-c", probe], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60).stdout
        assert "HEAVY []" in out, (name, out[-300:])


def test_a_shutdown_that_hangs_after_ctrl_c_is_cut_short(tmp_path):
    """data2csv's last resort (a Ctrl-C inside the process pool's bookkeeping can leave its shutdown
    waiting forever): after the deadline the workers are killed and the process exits 130."""
    code = ("import multiprocessing, sys, time; sys.path.insert(0, sys.argv[1]); import data2csv\n"
            "if __name__ == '__main__':\n"
            "    worker = multiprocessing.get_context('spawn').Process(target=time.sleep, args=(60,))\n"
            "    worker.start(); print(worker.pid, flush=True)\n"
            "    with data2csv._deadline(0.5):\n"
            "        time.sleep(60)  # a shutdown that never returns\n")
    script = tmp_path / "hang.py"
    script.write_text(code)
    start = time.monotonic()
    proc = subprocess.run([PY, str(script), str(ROOT)], capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 130 and time.monotonic() - start < 30, (proc.returncode, proc.stderr)
    assert "were killed" in proc.stderr and "run the same command again" in proc.stderr
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the worker outlived the main process")
