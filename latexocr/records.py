"""Reading labelled files: the conversation JSON written by csv2json.py, or a CSV (image_path,text)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .sample import parse_record


def read_labelled(path: str | Path) -> list[tuple[str, str | None]]:
    """(absolute image path, label) pairs from a conversation JSON/JSONL or an image_path,text CSV.

    Relative image paths are resolved against the file's own folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"labelled file not found: {path}")
    base = path.resolve().parent
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"image_path", "text"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: expected columns image_path,text; found {reader.fieldnames}")
            return [(_resolve(row["image_path"], base), row["text"]) for row in reader]
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    if not isinstance(records, list) or (records and "conversations" not in records[0]):
        raise ValueError(f"{path}: expected a list of {{'id', 'conversations'}} records (csv2json.py output)")
    return [parse_record(r, base) for r in records]


def _resolve(p: str, base: Path) -> str:
    q = Path(p)
    return str(q if q.is_absolute() else base / q)
