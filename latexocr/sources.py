"""Readers of the LaTeX_OCR dataset: hub parquet (ModelScope / Hugging Face) and local copies.

Every reader streams `Row`s in the source's order with a stable 0-based index, so a re-run
sees the same rows under the same indices (that is what makes data2csv resumable), and
memory stays flat whatever the size: parquet is read one record batch at a time.

Layouts understood:
  * hub / local parquet: `{config}/{split}-*.parquet` (the HF repo's main branch),
    `{config}/{split}/*.parquet` (its refs/convert/parquet branch), a flat folder of
    `{split}-*.parquet`, or a single parquet file. Columns: `image` (struct {bytes, path},
    or plain binary) and `text`.
  * LaTeX_OCR_PRO folders: `images/images_{split}/N.png`, `formulas/{split}.formulas.norm.txt`,
    `matching/{split}.matching.txt` with lines `N.png <formula line index>`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

CONFIGS = ("default", "full", "small", "synthetic_handwrite", "human_handwrite", "human_handwrite_print")
SPLITS = ("train", "validation", "test")
HUB_REPOS = {"modelscope": "AI-ModelScope/LaTeX_OCR", "huggingface": "linxy/LaTeX_OCR"}
# The other names a split goes by (LaTeX_OCR_PRO calls validation "val").
SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "dev"), "train": ("train",), "test": ("test",)}
IMAGE_COLUMNS = ("image", "img", "png")
TEXT_COLUMNS = ("text", "latex_formula", "formula", "latex", "label")


class SourceError(Exception):
    """A source that cannot be read; the message is meant for the user, one line."""


class Row(NamedTuple):
    index: int               # position in the source split, stable across runs
    image: bytes | None      # encoded image bytes, None when the source has none for this row
    text: object             # the label exactly as stored (may be None, NaN, an int, ...)
    problem: str | None = None  # a defect the reader already knows about (e.g. missing image file)


@dataclass
class Source:
    description: str
    num_rows: int | None
    _batches: Callable[[], Iterator[list[Row]]] = field(repr=False)
    # For a hub source: which files were downloaded (see downloaded_files_id). Its rows can change
    # upstream while the settings stay the same, so image names carry this too.
    data_id: str = ""

    def batches(self) -> Iterator[list[Row]]:
        """Lists of consecutive rows (a few hundred at a time), in index order."""
        return self._batches()


# ---- parquet ----------------------------------------------------------------------------------

def _pick(names: list[str], candidates: tuple[str, ...], what: str, path: Path) -> str:
    for c in candidates:
        if c in names:
            return c
    raise SourceError(f"{path}: no {what} column (looked for {', '.join(candidates)}; found {', '.join(names)})")


def _image_bytes(value, base_dir: Path) -> tuple[bytes | None, str | None]:
    """The encoded bytes of one `image` cell: struct {bytes, path}, raw binary or a path."""
    if value is None:
        return None, "missing image"
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return bytes(data), None
        value = value.get("path")  # datasets may store only a path; try it next to the file
        if not value:
            return None, "missing image"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        p = Path(value) if os.path.isabs(value) else base_dir / value
        try:
            return p.read_bytes(), None
        except OSError:
            return None, "missing image"
    return None, "missing image"


def parquet_source(files: list[Path], batch_size: int = 256) -> Source:
    import pyarrow.parquet as pq

    if not files:
        raise SourceError("no parquet files given")
    total = 0
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:
            raise SourceError(f"cannot read parquet file {f}: {exc}") from None
        total += pf.metadata.num_rows
        names = pf.schema_arrow.names  # checked here, before any output is touched
        _pick(names, IMAGE_COLUMNS, "image", f)
        _pick(names, TEXT_COLUMNS, "text", f)

    def batches() -> Iterator[list[Row]]:
        index = 0
        for f in files:
            # pre_buffer=False + a read buffer: pyarrow otherwise keeps every column chunk it
            # pre-fetched for the life of the file (RSS grew by the file's size).
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
            names = pf.schema_arrow.names
            img_col = _pick(names, IMAGE_COLUMNS, "image", f)
            txt_col = _pick(names, TEXT_COLUMNS, "text", f)
            # Only the two columns, one record batch at a time: memory is bounded by a row
            # group, not by the file.
            for batch in pf.iter_batches(batch_size=batch_size, columns=[img_col, txt_col]):
                images = batch.column(img_col).to_pylist()
                texts = batch.column(txt_col).to_pylist()
                rows = []
                for value, text in zip(images, texts):
                    data, problem = _image_bytes(value, f.parent)
                    rows.append(Row(index, data, text, problem))
                    index += 1
                yield rows

    desc = str(files[0]) if len(files) == 1 else f"{len(files)} parquet files in {files[0].parent}"
    return Source(desc, total, batches)


def find_parquet_files(folder: Path, config: str, split: str) -> list[Path]:
    """The parquet files of `config`/`split` under `folder`, tolerant of the known layouts."""
    folder = Path(folder)
    for name in SPLIT_ALIASES.get(split, (split,)):
        patterns = [f"{config}/{name}-*.parquet", f"{config}/{name}/*.parquet", f"{config}/{name}*.parquet"]
        if config == "default":  # datasets' default config usually lives in data/
            patterns += [f"data/{name}-*.parquet", f"data/{name}/*.parquet", f"data/{name}*.parquet"]
        patterns += [f"{name}-*.parquet", f"{name}/*.parquet", f"{name}*.parquet"]
        for pattern in patterns:
            found = sorted(p for p in folder.glob(pattern) if p.is_file())
            if found:
                return found
    return []


# ---- LaTeX_OCR_PRO folders --------------------------------------------------------------------

def is_pro_folder(folder: Path) -> bool:
    return (Path(folder) / "matching").is_dir() and (Path(folder) / "formulas").is_dir()


def _read_lines(path: Path) -> list[str | None]:
    # Bytes, split on \n only: a label is its line minus the line ending, nothing else
    # stripped. A line that is not UTF-8 becomes None (reported as a missing label).
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return out


def pro_source(folder: Path, split: str, batch_size: int = 256) -> Source:
    folder = Path(folder)
    for name in SPLIT_ALIASES.get(split, (split,)):
        matching = folder / "matching" / f"{name}.matching.txt"
        if matching.is_file():
            break
    else:
        raise SourceError(f"{folder}: no matching/{split}.matching.txt (LaTeX_OCR_PRO layout)")
    formulas_path = folder / "formulas" / f"{name}.formulas.norm.txt"
    if not formulas_path.is_file():
        formulas_path = folder / "formulas" / f"{name}.formulas.txt"
    if not formulas_path.is_file():
        raise SourceError(f"{folder}: no formulas/{name}.formulas.norm.txt")
    image_dir = folder / "images" / f"images_{name}"
    match_lines = [line for line in _read_lines(matching) if line is not None and line.strip()]
    formulas = _read_lines(formulas_path)  # random access by line index; ~10 MB for `full`

    def batches() -> Iterator[list[Row]]:
        rows = []
        for index, line in enumerate(match_lines):
            parts = line.rsplit(None, 1)  # the formula index is the last field; a file name may hold spaces
            problem, text, data = None, None, None
            if len(parts) != 2 or not parts[1].isdigit():
                problem = "bad matching line"
            elif int(parts[1]) >= len(formulas):
                problem = "missing label"
            else:
                text = formulas[int(parts[1])]
                try:
                    data = (image_dir / parts[0]).read_bytes()
                except OSError:
                    problem = "missing image"
            rows.append(Row(index, data, text, problem))
            if len(rows) == batch_size:
                yield rows
                rows = []
        if rows:
            yield rows

    return Source(f"LaTeX_OCR_PRO folder {folder} ({name})", len(match_lines), batches)


# ---- hub downloads ----------------------------------------------------------------------------

def _hub_patterns(config: str, split: str) -> list[str]:
    pats = []
    for name in SPLIT_ALIASES.get(split, (split,)):
        pats += [f"{config}/{name}-*", f"{config}/{name}/*"]
        if config == "default":
            pats += [f"data/{name}-*", f"data/{name}/*"]
    return pats


def download(hub: str, config: str, split: str, cache_dir: str | None = None) -> Path:
    """Fetch only `config`/`split`'s parquet files from the hub; returns the local folder.

    Uses the hub clients' file download (not MsDataset / load_dataset, which pin or pull in
    old `datasets` versions). Any failure is turned into a one-line SourceError.
    """
    repo = HUB_REPOS[hub]
    patterns = _hub_patterns(config, split)
    try:
        if hub == "modelscope":
            from modelscope.hub.snapshot_download import snapshot_download
            folder = snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=patterns,
                                       cache_dir=cache_dir)
        else:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=patterns,
                                       cache_dir=cache_dir)
    except ImportError as exc:
        raise SourceError(f"the {hub} client is not installed ({exc}); pip install it or use a local SOURCE") from None
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SourceError(f"could not download {repo} ({config}/{split}) from {hub}: "
                          f"{type(exc).__name__}: {first[:160]} -- no network? Pass a local "
                          f"SOURCE instead (a parquet file/folder or a LaTeX_OCR_PRO folder).") from None
    return Path(folder)


# ---- what a source is, for naming its images ---------------------------------------------------

def source_fingerprint(source: str, config: str, split: str) -> str:
    """A short hash naming one source's config/split: it goes into every image file name.

    Two runs with different sources (or a local source whose files changed: size, mtime)
    get different image names, so a run can never overwrite or reuse another run's images.
    Cheap (stat only, no download): data2csv calls it before deciding anything.
    """
    import hashlib

    key = {"hf": "huggingface", "ms": "modelscope"}.get(source.lower(), source.lower())
    path = Path(source).expanduser()
    parts = [config, split]
    if key in HUB_REPOS and not path.exists():
        parts.append(HUB_REPOS[key])
    else:
        path = path.resolve()
        if path.is_file():
            files = [path]
        elif is_pro_folder(path):  # its text files, and the image folders (files added or removed)
            files = sorted([*path.glob("matching/*.txt"), *path.glob("formulas/*.txt"), *path.glob("images/*")])
        else:
            files = find_parquet_files(path, config, split)
        parts.append(str(path))
        for f in files:
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def downloaded_files_id(files: list[Path]) -> str:
    """A short hash of which hub files these are: name, size and, for the Hugging Face cache,
    the content-addressed blob each snapshot file links to (ModelScope stores plain files).

    Not the path or mtime: clearing the cache and downloading the same revision again keeps the
    id, so the earlier images are reused; a new revision of the data gets new image names.
    """
    import hashlib

    parts = [f"{f.name}:{f.stat().st_size}:{Path(os.path.realpath(f)).name}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


# ---- entry point -------------------------------------------------------------------------------

def open_source(source: str, config: str, split: str, cache_dir: str | None = None) -> Source:
    """`source`: 'modelscope', 'huggingface' (alias 'hf') or a local path."""
    key = {"hf": "huggingface", "ms": "modelscope"}.get(source.lower(), source.lower())
    if key in HUB_REPOS and not Path(source).exists():
        folder = download(key, config, split, cache_dir)
        files = find_parquet_files(folder, config, split)
        if not files:
            raise SourceError(f"{HUB_REPOS[key]} has no parquet files for config={config!r} split={split!r} "
                              f"(downloaded to {folder})")
        found = parquet_source(files)
        found.data_id = downloaded_files_id(files)
        return found
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"SOURCE {source!r} is neither 'modelscope', 'huggingface' nor an existing path")
    if path.is_file():
        return parquet_source([path])
    if is_pro_folder(path):
        return pro_source(path, split)
    files = find_parquet_files(path, config, split)
    if not files:
        raise SourceError(f"{path}: no parquet files for config={config!r} split={split!r} (looked for "
                          f"{config}/{split}-*.parquet, {split}-*.parquet, ...) and not a LaTeX_OCR_PRO folder")
    return parquet_source(files)
