"""csv2json.py: seeded disjoint split, relative paths, bad rows, datasets compatibility."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_SMALL = Path(__file__).resolve().parents[2] / "shared" / "latex_ocr" / "small"
sys.path.insert(0, str(ROOT))

import csv2json  # noqa: E402
from latexocr.sample import parse_record  # noqa: E402


def make_project(root: Path, n: int = 30, rows=None) -> Path:
    """A folder with images/ and data.csv (paths relative to the CSV, as data2csv writes)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 16, 3), i, dtype=np.uint8)).save(root / "images" / f"{i}.png")
    rows = rows if rows is not None else [(f"images/{i}.png", f"x _ {{ {i} }}") for i in range(n)]
    with open(root / "data.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "text"])
        w.writerows(rows)
    return root / "data.csv"


def run(csv_path: Path, *extra, out: Path | None = None, require_done=False) -> tuple[int, Path, Path]:
    """csv2json.main; CSVs made by hand here (make_project) have no data2csv completion record."""
    out = out or csv_path.parent
    train, val = out / "train.json", out / "val.json"
    done_flag = [] if require_done else ["--no-require-done"]
    rc = csv2json.main(["--csv-path", str(csv_path), "--train-json", str(train), "--val-json", str(val),
                        *done_flag, *extra])
    return rc, train, val


def load(path: Path) -> list[tuple[str, str]]:
    return [parse_record(r, path.parent) for r in json.loads(path.read_text(encoding="utf-8"))]


def test_split_is_seeded_and_disjoint(tmp_path):
    csv_path = make_project(tmp_path, n=40)
    rc, train, val = run(csv_path, "--val-size", "10")
    assert rc == 0
    t, v = load(train), load(val)
    assert len(t) == 30 and len(v) == 10
    assert not {p for p, _ in t} & {p for p, _ in v}
    first = val.read_bytes()
    run(csv_path, "--val-size", "10")
    assert val.read_bytes() == first  # same seed, same split
    run(csv_path, "--val-size", "10", "--seed", "7")
    assert val.read_bytes() != first
    rc, train, val = run(csv_path, "--val-size", "0.25")
    assert rc == 0 and len(load(val)) == 10 and len(load(train)) == 30


def test_labels_and_images_preserved(tmp_path):
    labels = [" a , b ", 'q "x"', "multi\nline", "中文", "NA"]
    csv_path = make_project(tmp_path, n=5, rows=[(f"images/{i}.png", t) for i, t in enumerate(labels)])
    rc, train, val = run(csv_path, "--val-size", "1")
    assert rc == 0
    got = dict(load(train) + load(val))
    assert sorted(got.values()) == sorted(labels)
    for path, label in got.items():
        i = labels.index(label)
        assert Path(path).resolve() == (tmp_path / "images" / f"{i}.png").resolve()


def test_duplicate_images_stay_on_one_side(tmp_path):
    rows = []
    for i in range(20):
        rows += [(f"images/{i}.png", f"label {i}"), (f"images/{i}.png", f"other label {i}")]
    rows.append(("images/0.png", "label 0"))  # an exact repeat: dropped
    csv_path = make_project(tmp_path, n=20, rows=rows)
    rc, train, val = run(csv_path, "--val-size", "5")
    assert rc == 0
    t, v = load(train), load(val)
    assert len(v) == 10 and len(t) == 30
    assert not {p for p, _ in t} & {p for p, _ in v}


def test_val_csv_is_used_and_overlap_removed(tmp_path):
    csv_path = make_project(tmp_path, n=12)
    val_csv = tmp_path / "val.csv"
    with open(val_csv, "w", newline="") as f:
        csv.writer(f).writerows([["image_path", "text"], ["images/10.png", "v10"], ["images/11.png", "v11"]])
    rc, train, val = run(csv_path, "--val-csv", str(val_csv))
    assert rc == 0
    assert [t for _, t in load(val)] == ["v10", "v11"]
    assert len(load(train)) == 10  # 12 minus the 2 that are validation images


def test_relative_paths_survive_moving_the_folder(tmp_path):
    csv_path = make_project(tmp_path / "proj", n=10)
    (tmp_path / "proj" / "json").mkdir()
    rc, train, _ = run(csv_path, "--val-size", "2", out=tmp_path / "proj" / "json")
    assert rc == 0
    raw = json.loads(train.read_text())[0]["conversations"][0]["value"]
    assert "../images/" in raw and str(tmp_path) not in raw  # relative to the JSON's folder
    shutil.move(tmp_path / "proj", tmp_path / "moved")
    moved = tmp_path / "moved" / "json" / "train.json"
    for path, _ in load(moved):
        assert Path(path).is_file() and "moved" in path
        Image.open(path).verify()
    # Absolute paths are still accepted on read.
    rec = json.loads(moved.read_text())[0]
    rec["conversations"][0]["value"] = f"<|vision_start|>{tmp_path / 'moved/images/3.png'}<|vision_end|>"
    assert parse_record(rec, "/somewhere/else")[0] == str(tmp_path / "moved/images/3.png")


def test_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    csv_path = make_project(tmp_path, n=10)
    rc, train, val = run(csv_path, "--val-size", "3")
    ds = datasets.Dataset.from_json(str(train), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 7 and set(ds.column_names) == {"id", "conversations"}
    assert [t["role"] for t in ds[0]["conversations"]] == ["user", "assistant"]


def test_json_is_the_tutorials_format_and_both_formats_are_read(tmp_path):
    """csv2json writes exactly what the tutorial's csv2json.py writes (its train.py reads the user
    turn's value as the image path); the readers also accept this project's earlier format."""
    from latexocr.records import read_labelled

    csv_path = make_project(tmp_path, n=6)
    rc, train, val = run(csv_path, "--val-size", "2")
    assert rc == 0
    written = json.loads(train.read_text(encoding="utf-8")) + json.loads(val.read_text(encoding="utf-8"))
    assert sorted(r["id"] for r in written) == [f"identity_{i}" for i in range(1, 7)]  # CSV rows, from 1
    for record in written:
        assert list(record) == ["id", "conversations"]
        user, assistant = record["conversations"]
        assert user == {"role": "user", "value": user["value"]} and assistant["role"] == "assistant"
        i = int(record["id"].removeprefix("identity_")) - 1  # CSV row i holds images/{i}.png
        assert user["value"] == f"images/{i}.png" and assistant["value"] == f"x _ {{ {i} }}"
    tutorial = load(train) + load(val)

    old = tmp_path / "old.json"  # the same records in this project's earlier format
    old.write_text(json.dumps([{"id": r["id"], "conversations": [
        {"from": "user", "value": f"<|vision_start|>{r['conversations'][0]['value']}<|vision_end|>"},
        {"from": "assistant", "value": r["conversations"][1]["value"]}]} for r in written]), encoding="utf-8")
    assert load(old) == tutorial
    both = read_labelled(train) + read_labelled(val)
    assert both == read_labelled(old) == tutorial
    assert all(Path(p).is_file() for p, _ in both)


def test_every_setting_is_a_flag_and_bad_values_are_one_line(tmp_path, capsys):
    args = csv2json.parse_args(["--csv-path", "a.csv", "--train-json", "t.json", "--val-json", "v.json",
                                "--val-size", "0.1", "--seed", "7", "--val-csv", "b.csv", "--no-require-done"])
    assert set(vars(args)) == {name.lower() for name in csv2json.SETTINGS}
    from latexocr.cli import settings_help
    described = {k for k, v in settings_help(ROOT / "csv2json.py").items() if v}
    assert set(csv2json.SETTINGS) <= described, set(csv2json.SETTINGS) - described  # --help explains each
    assert (args.val_size, args.seed, args.val_csv, args.require_done) == (0.1, 7, "b.csv", False)
    for bad in ("0", "-3", "2.5", "nan", "inf", "many"):
        assert run(make_project(tmp_path, n=3), "--val-size", bad)[0] == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: --val-size must be a count >= 1 or a fraction between 0 and 1, got {bad!r}"


def test_missing_images_and_bad_labels_reported(tmp_path, capsys):
    rows = [(f"images/{i}.png", f"ok {i}") for i in range(10)]
    rows += [("images/gone1.png", "a"), ("images/gone2.png", "b"), ("images/1.png", ""),
             ("images/2.png", "   "), ("images/3.png", "nan")]
    csv_path = make_project(tmp_path, n=10, rows=rows)
    rc, train, val = run(csv_path, "--val-size", "2")
    assert rc == 0
    out = capsys.readouterr().out
    assert "2 (missing image)" in out and "images/gone1.png" in out and "images/gone2.png" in out
    assert "3 (empty or NaN label)" in out
    assert len(load(train)) + len(load(val)) == 10


def test_wrong_columns_and_too_few_rows(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.png,x\n")
    assert run(bad)[0] == 2
    err = capsys.readouterr().err
    assert "expected columns image_path,text" in err and "found path,label" in err
    csv_path = make_project(tmp_path / "few", n=5)
    rc, train, _ = run(csv_path, "--val-size", "5")
    assert rc == 2 and "need at least 6" in capsys.readouterr().err and not train.exists()


def test_scripts_end_to_end_as_subprocesses(tmp_path):
    """data2csv.py then csv2json.py, run as a user runs them (from the repo root)."""
    import io as _io

    import pyarrow as pa
    import pyarrow.parquet as pq
    images, texts = [], []
    for i in range(25):
        buf = _io.BytesIO()
        Image.fromarray(np.full((10, 30, 3), i * 9, dtype=np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
        texts.append(f"y = {i}")
    pq.write_table(pa.table({"image": images, "text": texts}), tmp_path / "train.parquet")
    out = tmp_path / "proj"
    cmd = [sys.executable, "data2csv.py", "--source", str(tmp_path / "train.parquet"),
           "--csv-path", str(out / "latex_ocr_train.csv"), "--image-dir", str(out / "latex_ocr_images")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    cmd = [sys.executable, "csv2json.py", "--csv-path", str(out / "latex_ocr_train.csv"), "--val-size", "5",
           "--train-json", str(out / "latex_ocr_train.json"), "--val-json", str(out / "latex_ocr_val.json")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    t, v = load(out / "latex_ocr_train.json"), load(out / "latex_ocr_val.json")
    assert len(t) == 20 and len(v) == 5
    assert sorted(x for _, x in t + v) == sorted(texts)
    for path, label in t + v:
        i = texts.index(label)
        assert np.asarray(Image.open(path))[0, 0, 0] == i * 9


@pytest.mark.skipif(not SHARED_SMALL.is_dir(), reason=f"{SHARED_SMALL} not present")
def test_shared_small_with_its_validation_split(tmp_path):
    import data2csv
    for split in ("train", "validation"):
        assert data2csv.main(["--source", str(SHARED_SMALL), "--split", split, "--limit", "all", "--workers", "0",
                              "--csv-path", str(tmp_path / f"{split}.csv"),
                              "--image-dir", str(tmp_path / "images")]) == 0
    rc, train, val = run(tmp_path / "train.csv", "--val-csv", str(tmp_path / "validation.csv"), require_done=True)
    assert rc == 0
    # the `small` config's 30 validation images are byte-identical copies of its first 30
    # training images: with them in training, validation would measure memorisation
    assert len(load(train)) == 20 and len(load(val)) == 30
    assert all(Path(p).is_file() for p, _ in load(train) + load(val))
