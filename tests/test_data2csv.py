"""data2csv.py: local sources, byte-identical labels, lossless images, bad rows, resume, hub paths."""
from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_SMALL = Path(__file__).resolve().parents[2] / "shared" / "latex_ocr" / "small"
sys.path.insert(0, str(ROOT))

import data2csv  # noqa: E402
import latexocr.images  # noqa: E402
from latexocr.sample import label_problem  # noqa: E402

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# ---- helpers ----------------------------------------------------------------------------------

def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def random_image(seed: int, mode: str = "RGB", size=(60, 20)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def pixels(data_or_path) -> tuple[str, np.ndarray]:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        im.load()
        return im.mode, np.asarray(im)


def write_parquet(path: Path, images: list, texts: list, text_type=None, row_group_size=7) -> Path:
    structs = [None if b is None else {"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)]
    table = pa.table({"image": pa.array(structs, type=IMAGE_TYPE),
                      "text": pa.array(texts, type=text_type or pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)  # several row groups: batches cross them
    return path


# Labels that break naive CSV handling or stripping; all must come back byte-identical.
TRICKY = ["x ^ { 2 }", "a , b", 'say "hi"', " leading and trailing ", "multi\nline", "tab\there",
          "\\frac { 1 } { 2 }", "中文 公式", "NA", "x\r\ny", "  \\alpha"]


def good_source(tmp_path: Path, n: int = 30) -> tuple[Path, list[bytes], list[str]]:
    images, texts = [], []
    for i in range(n):
        mode = ("RGB", "RGBA", "L")[i % 3]
        fmt = "JPEG" if i % 10 == 9 and mode != "RGBA" else "PNG"  # some rows need re-encoding
        images.append(encode(random_image(i, mode), fmt))
        texts.append(TRICKY[i % len(TRICKY)] + f" {i}")
    return write_parquet(tmp_path / "src" / "train-00000-of-00001.parquet", images, texts), images, texts


def read_csv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_path", "text"]
    return rows[1:]


def run(tmp_path: Path, source, *extra, out="out") -> tuple[int, Path, Path]:
    csv_path = tmp_path / out / "data.csv"
    image_dir = tmp_path / out / "images"
    rc = data2csv.main(["--source", str(source), "--csv-path", str(csv_path), "--image-dir", str(image_dir),
                        "--workers", "0", *extra])
    return rc, csv_path, image_dir


def check_against_source(csv_path: Path, images: list[bytes], texts: list[str], indices=None):
    rows = read_csv(csv_path)
    indices = list(range(len(texts))) if indices is None else indices
    assert len(rows) == len(indices)
    for (rel, text), i in zip(rows, indices):
        assert text == texts[i]  # byte-identical label
        path = csv_path.parent / rel  # relative to the CSV's folder
        assert path.name.endswith(f"_{i:06d}.png")
        with open(path, "rb") as f:
            assert f.read(8) == latexocr.images.PNG_SIGNATURE
        mode, got = pixels(path)
        src_mode, want = pixels(images[i])
        assert mode == src_mode  # RGBA stays RGBA
        np.testing.assert_array_equal(got, want)


# ---- tests ------------------------------------------------------------------------------------

def test_parquet_source_roundtrip(tmp_path):
    src, images, texts = good_source(tmp_path)
    rc, csv_path, _ = run(tmp_path, src, "--limit", "all")
    assert rc == 0
    check_against_source(csv_path, images, texts)
    # Already-PNG source bytes are written unchanged (lossless and fast).
    assert (csv_path.parent / read_csv(csv_path)[0][0]).read_bytes() == images[0]
    assert (csv_path.parent / "data.csv.done.json").is_file()


def test_parquet_folder_with_config_layout_and_limit(tmp_path):
    _, images, texts = good_source(tmp_path)
    # The HF repo layout: {config}/{split}-*.parquet, several shards.
    write_parquet(tmp_path / "repo" / "small" / "train-00000-of-00002.parquet", images[:12], texts[:12])
    write_parquet(tmp_path / "repo" / "small" / "train-00001-of-00002.parquet", images[12:], texts[12:])
    write_parquet(tmp_path / "repo" / "small" / "test-00000-of-00001.parquet", images[:3], texts[:3])
    rc, csv_path, image_dir = run(tmp_path, tmp_path / "repo", "--config", "small", "--limit", "20")
    assert rc == 0
    check_against_source(csv_path, images, texts, range(20))
    # config, split, a fingerprint of the source's files, the row index
    assert re.fullmatch(r"small_train_[0-9a-f]{10}_000000\.png", sorted(p.name for p in image_dir.glob("*.png"))[0])
    rc, csv_path, _ = run(tmp_path, tmp_path / "repo", "--config", "small", "--split", "test", out="t")
    check_against_source(csv_path, images, texts, range(3))


def test_label_problem_reasons():
    assert label_problem("x") is None
    assert label_problem(" x ") is None
    assert label_problem(None) == "missing label"
    assert label_problem(float("nan")) == "missing label"
    assert label_problem(3) == "label not a string"
    assert label_problem(1.5) == "label not a string"
    assert label_problem("") == "empty label"
    assert label_problem(" \t\n") == "whitespace-only label"


def test_every_setting_is_a_flag_and_a_bad_limit_is_one_line(tmp_path, capsys):
    args = data2csv.parse_args(["--source", "s", "--config", "small", "--split", "test", "--limit", "all",
                                "--image-dir", "i", "--csv-path", "c.csv", "--workers", "0", "--cache-dir", "h",
                                "--force"])
    assert set(vars(args)) == {name.lower() for name in data2csv.SETTINGS}
    from latexocr.cli import settings_help
    described = {k for k, v in settings_help(ROOT / "data2csv.py").items() if v}
    assert set(data2csv.SETTINGS) <= described, set(data2csv.SETTINGS) - described  # --help explains each
    assert (args.limit, args.workers, args.cache_dir, args.force) == (None, 0, "h", True)
    assert data2csv.parse_args(["--limit", "25"]).limit == 25 and not data2csv.parse_args([]).force
    for bad in ("0", "-1", "some"):
        rc, csv_path, _ = run(tmp_path, tmp_path / "nowhere", "--limit", bad)
        assert rc == 2 and not csv_path.parent.exists()
        assert capsys.readouterr().err.strip() == f"error: --limit must be a positive integer or 'all', got {bad!r}"


def test_bad_rows_are_skipped_and_reported(tmp_path, capsys):
    good = encode(random_image(0))
    truncated = good[: len(good) // 2]
    images = [good, b"not an image", good, good, good, truncated, None, good, b"", good]
    texts = ["ok 0", "ok 1", "", "   \t", None, "ok 5", "ok 6", "ok 7", "ok 8", "ok 9"]
    src = write_parquet(tmp_path / "bad.parquet", images, texts)
    rc, csv_path, _ = run(tmp_path, src)
    assert rc == 0
    rows = read_csv(csv_path)
    assert [t for _, t in rows] == ["ok 0", "ok 7", "ok 9"]
    out = capsys.readouterr().out
    assert "skipped 7 rows" in out
    assert "unreadable image: 2" in out and "missing image: 2" in out
    assert "empty label: 1" in out and "whitespace-only label: 1" in out and "missing label: 1" in out
    with open(csv_path.with_name("data.csv.skipped.csv"), newline="") as f:
        report = {int(r["index"]): r["reason"] for r in csv.DictReader(f)}
    assert report == {1: "unreadable image", 2: "empty label", 3: "whitespace-only label", 4: "missing label",
                      5: "unreadable image", 6: "missing image", 8: "missing image"}
    assert "nan" not in csv_path.read_text().lower()


@pytest.mark.parametrize("texts,text_type,reasons", [
    ([7, 8, None], pa.int64(), {0: "label not a string", 1: "label not a string", 2: "missing label"}),
    ([float("nan"), 1.5, None], pa.float64(), {0: "missing label", 1: "label not a string", 2: "missing label"}),
])
def test_non_string_labels(tmp_path, texts, text_type, reasons):
    good = encode(random_image(1))
    src = write_parquet(tmp_path / "n.parquet", [good] * 3, texts, text_type=text_type)
    rc, csv_path, _ = run(tmp_path, src)
    assert rc == 0 and read_csv(csv_path) == []
    with open(csv_path.with_name("data.csv.skipped.csv"), newline="") as f:
        assert {int(r["index"]): r["reason"] for r in csv.DictReader(f)} == reasons
    assert "nan" not in csv_path.read_text().lower()


def test_resume_after_interruption(tmp_path, monkeypatch, capsys):
    src, images, texts = good_source(tmp_path, n=40)
    rc, ref_csv, ref_dir = run(tmp_path, src, "--limit", "all", out="ref")  # uninterrupted
    assert rc == 0

    real, calls = latexocr.images.save_image_png, []

    def flaky(data, path, **kw):
        if len(calls) == 13:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after 13 images
        calls.append(path)
        return real(data, path, **kw)

    monkeypatch.setattr(latexocr.images, "save_image_png", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, src, "--limit", "all", out="run")
    out_dir = tmp_path / "run"
    assert not (out_dir / "data.csv").exists() and not (out_dir / "data.csv.done.json").exists()
    assert len(list((out_dir / "images").glob("*.png"))) == 13
    assert not [p for p in out_dir.rglob("*") if p.name.endswith(".tmp")]  # no temp leftovers

    monkeypatch.setattr(latexocr.images, "save_image_png", real)
    capsys.readouterr()
    rc, csv_path, image_dir = run(tmp_path, src, "--limit", "all", out="run")
    assert rc == 0
    assert "13 images kept from an earlier run" in capsys.readouterr().out
    assert csv_path.read_bytes() == ref_csv.read_bytes()
    assert sorted(p.name for p in image_dir.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
    for p in ref_dir.glob("*.png"):
        assert (image_dir / p.name).read_bytes() == p.read_bytes()

    # A finished run is recognised; different settings are not taken as finished.
    capsys.readouterr()
    run(tmp_path, src, "--limit", "all", out="run")
    assert "already complete" in capsys.readouterr().out
    run(tmp_path, src, "--limit", "5", out="run")
    assert len(read_csv(csv_path)) == 5


def test_changed_source_does_not_reuse_images(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", [encode(random_image(i)) for i in range(4)], list("abcd"))
    b_images = [encode(random_image(100 + i)) for i in range(4)]
    b = write_parquet(tmp_path / "b.parquet", b_images, list("efgh"))
    assert run(tmp_path, a)[0] == 0
    rc, csv_path, _ = run(tmp_path, b)
    assert rc == 0
    check_against_source(csv_path, b_images, list("efgh"))


def make_pro_folder(root: Path, split_name: str, images: list[bytes], texts: list[str]) -> Path:
    """A LaTeX_OCR_PRO-style folder; the matching file maps images to shuffled formula lines."""
    (root / "images" / f"images_{split_name}").mkdir(parents=True)
    (root / "formulas").mkdir()
    (root / "matching").mkdir()
    order = list(reversed(range(len(texts))))  # formula line of image i is order[i]
    lines = [None] * len(texts)
    for i, line_no in enumerate(order):
        lines[line_no] = texts[i]
        (root / "images" / f"images_{split_name}" / f"{i}.png").write_bytes(images[i])
    (root / "formulas" / f"{split_name}.formulas.norm.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "matching" / f"{split_name}.matching.txt").write_text(
        "".join(f"{i}.png {order[i]}\n" for i in range(len(texts))))
    return root


def test_pro_folder(tmp_path):
    images = [encode(random_image(i, "RGBA" if i % 2 else "RGB")) for i in range(6)]
    texts = [f"\\alpha _ {{ {i} }}" for i in range(5)] + ["   "]
    src = make_pro_folder(tmp_path / "pro", "val", images, texts)
    (src / "images" / "images_val" / "2.png").unlink()  # a missing image file
    rc, csv_path, _ = run(tmp_path, src, "--split", "validation")
    assert rc == 0
    check_against_source(csv_path, images, texts, [0, 1, 3, 4])
    with open(csv_path.with_name("data.csv.skipped.csv"), newline="") as f:
        assert {int(r["index"]): r["reason"] for r in csv.DictReader(f)} == {2: "missing image",
                                                                              5: "whitespace-only label"}


@pytest.mark.skipif(not SHARED_SMALL.is_dir(), reason=f"{SHARED_SMALL} not present")
@pytest.mark.parametrize("split,name,n", [("train", "train", 50), ("validation", "val", 30)])
def test_shared_small(tmp_path, split, name, n):
    rc, csv_path, _ = run(tmp_path, SHARED_SMALL, "--split", split, "--limit", "all")
    assert rc == 0
    rows = read_csv(csv_path)
    assert len(rows) == n
    formulas = (SHARED_SMALL / "formulas" / f"{name}.formulas.norm.txt").read_text(encoding="utf-8").split("\n")
    matching = (SHARED_SMALL / "matching" / f"{name}.matching.txt").read_text().split()
    for (rel, text), (img, line) in zip(rows, zip(matching[0::2], matching[1::2])):
        assert text == formulas[int(line)]
        src = (SHARED_SMALL / "images" / f"images_{name}" / img).read_bytes()
        np.testing.assert_array_equal(pixels(csv_path.parent / rel)[1], pixels(src)[1])


def test_hub_download_is_called_correctly(tmp_path, monkeypatch):
    """Hub sources: only config/split files are requested; the snapshot is read like a local repo."""
    hf = pytest.importorskip("huggingface_hub")
    _, images, texts = good_source(tmp_path, n=5)
    repo = tmp_path / "snapshot"
    write_parquet(repo / "small" / "validation-00000-of-00001.parquet", images, texts)
    seen = {}

    def fake_snapshot_download(repo_id, repo_type=None, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, repo_type=repo_type, allow_patterns=allow_patterns)
        return str(repo)

    monkeypatch.setattr(hf, "snapshot_download", fake_snapshot_download)
    rc, csv_path, _ = run(tmp_path, "huggingface", "--config", "small", "--split", "validation")
    assert rc == 0
    check_against_source(csv_path, images, texts)
    assert seen["repo_id"] == "linxy/LaTeX_OCR" and seen["repo_type"] == "dataset"
    assert "small/validation-*" in seen["allow_patterns"]
    assert not any(p.startswith(("full/", "default/")) for p in seen["allow_patterns"])


def test_a_new_hub_revision_never_reuses_the_earlier_images(tmp_path, monkeypatch):
    """The hub's rows change upstream, the settings stay: a re-run (a larger limit) must pair each
    row with its own new image, not with the earlier revision's PNG of the same row number.
    Laid out as the Hugging Face cache does: snapshot files link to content-addressed blobs."""
    hf = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "cache"
    revisions = []
    for rev in range(2):
        images = [encode(random_image(100 * rev + i)) for i in range(8)]
        texts = [f"rev{rev} row{i}" for i in range(8)]
        blob = write_parquet(cache / "blobs" / f"blob{rev}", images, texts)
        snap = cache / "snapshots" / f"commit{rev}" / "small"
        snap.mkdir(parents=True)
        (snap / "validation-00000-of-00001.parquet").symlink_to(blob)
        revisions.append((snap.parent, images, texts))
    current = {"rev": 0}
    monkeypatch.setattr(hf, "snapshot_download", lambda *a, **kw: str(revisions[current["rev"]][0]))
    args = ("huggingface", "--config", "small", "--split", "validation")
    rc, csv_path, image_dir = run(tmp_path, *args, "--limit", "4")
    assert rc == 0
    check_against_source(csv_path, *revisions[0][1:], indices=range(4))
    current["rev"] = 1
    rc, csv_path, _ = run(tmp_path, *args, "--limit", "8")
    assert rc == 0
    check_against_source(csv_path, *revisions[1][1:])
    # the same revision again (another limit, so no "already complete"): its images are reused
    assert len(list(image_dir.glob("*.png"))) == 12
    rc, csv_path, _ = run(tmp_path, *args, "--limit", "all")
    assert rc == 0 and len(list(image_dir.glob("*.png"))) == 12


@pytest.mark.parametrize("hub", ["huggingface", "modelscope"])
def test_network_failure_is_one_clear_line(tmp_path, monkeypatch, capsys, hub):
    if hub == "modelscope":
        mod = pytest.importorskip("modelscope.hub.snapshot_download")
    else:
        mod = pytest.importorskip("huggingface_hub")

    def offline(*a, **kw):
        raise ConnectionError("Failed to resolve host\nlong traceback-ish details")

    monkeypatch.setattr(mod, "snapshot_download", offline)
    rc, csv_path, _ = run(tmp_path, hub)
    assert rc == 2 and not csv_path.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "could not download" in err and "local SOURCE" in err and "details" not in err


def test_script_subprocess_with_workers(tmp_path):
    """As a user runs it: the script itself, a process pool, from the repo root."""
    src, images, texts = good_source(tmp_path, n=300)
    csv_path = tmp_path / "out" / "latex_ocr_train.csv"
    proc = subprocess.run([sys.executable, "data2csv.py", "--source", str(src), "--limit", "250",
                           "--csv-path", str(csv_path), "--image-dir", str(tmp_path / "out" / "img"),
                           "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 250 rows" in proc.stdout
    check_against_source(csv_path, images, texts, range(250))
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "data2csv.py"), "--source", str(tmp_path / "nowhere")],
                          cwd=empty, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "neither" in proc.stderr
    assert list(empty.iterdir()) == []  # a failed start leaves nothing in the user's folder
