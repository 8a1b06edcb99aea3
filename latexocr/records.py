"""Reading labelled files: the conversation JSON written by csv2json.py, or a CSV (image_path,text).

Every way such a file can be wrong ends in one LabelledFileError whose message names the file
(and the record or line): train.py and infer.py print it and stop before loading any model.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .images import image_problem
from .io import jsonl_records, read_text
from .sample import is_valid_label, parse_record

JSON_SHAPE = "a list of {'id', 'conversations': [user turn with the image, assistant turn]} records (csv2json.py output)"


class LabelledFileError(ValueError):
    """A labelled file that cannot be used; the message is one line for the user."""


def read_labelled(path: str | Path) -> list[tuple[str, str | None]]:
    """(absolute image path, label) pairs from a conversation JSON/JSONL or an image_path,text CSV.

    Relative image paths are resolved against the file's own folder.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelledFileError(f"labelled file not found: {path}")
    base = path.resolve().parent
    text = read_text(path, LabelledFileError)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            missing = {"image_path", "text"} - set(reader.fieldnames or [])
            if missing:
                raise LabelledFileError(f"{path}: expected columns image_path,text; found "
                                        f"{','.join(reader.fieldnames or []) or 'nothing (empty file)'}")
            return [(_resolve(row["image_path"] or "", base), row["text"]) for row in reader]
        except csv.Error as exc:
            raise LabelledFileError(f"{path}: not a readable CSV ({exc})") from None
    if path.suffix.lower() == ".jsonl":
        records = [record for _, record in jsonl_records(path, text, LabelledFileError)]
    else:
        try:
            records = json.loads(text)
        except ValueError as exc:
            raise LabelledFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise LabelledFileError(f"{path}: expected {JSON_SHAPE}; found a JSON {type(records).__name__}")
    pairs = []
    for number, record in enumerate(records):
        problem = _record_problem(record)
        if problem:
            raise LabelledFileError(f"{path}: record {number}{_record_id(record)}: {problem}; expected {JSON_SHAPE}")
        pairs.append(parse_record(record, base))
    return pairs


def _record_problem(record) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no 'conversations' list" if not isinstance(turns, list) else "empty 'conversations'"
    if not all(isinstance(t, dict) for t in turns[:2]):
        return "a turn that is not an object"
    if not isinstance(turns[0].get("value"), str) or not turns[0]["value"].strip():
        return "the first turn names no image"
    return None


def _record_id(record) -> str:
    return f" ({record['id']})" if isinstance(record, dict) and isinstance(record.get("id"), str) else ""


def check_usable(path: str | Path, pairs: list[tuple[str, str | None]], need_label: bool) -> None:
    """Stop with one line unless at least one row has a usable image (and label, for training).

    Called before a model is loaded: an unusable input is found in a second, not after a
    download. Stops at the first usable row, so it costs one image decode in the normal case.
    """
    if not pairs:
        raise LabelledFileError(f"{path}: no samples")
    problems = {}
    for image, label in pairs:
        if need_label and not is_valid_label(label):
            problems.setdefault("empty or missing label", image)
            continue
        problem = image_problem(image)
        if problem is None:
            return
        problems.setdefault(problem, image)
    raise LabelledFileError(f"{path}: no usable {'sample' if need_label else 'image'} among {len(pairs)} ("
                            + "; ".join(f"{r}, e.g. {p}" for r, p in problems.items()) + ")")


def _resolve(p: str, base: Path) -> str:
    q = Path(p)
    return str(q if q.is_absolute() else base / q)
