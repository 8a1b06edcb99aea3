"""Step 2: turn data2csv.py's CSV into the tutorial's conversation JSON, train + validation.

    python csv2json.py                                   # latex_ocr_train.csv -> train/val JSON
    python csv2json.py --val-size 0.05                   # 5% of the rows for validation
    python csv2json.py --val-csv latex_ocr_val.csv       # the dataset's own validation split

The validation rows are drawn with a fixed seed and never share an image with training (the
same file, or another file of identical content). Only a CSV that data2csv.py finished is
read (its CSV_PATH.done.json must match the CSV; --no-require-done for CSVs made otherwise).
Image paths in the JSON are relative to the JSON file's folder, so the project folder can be
moved; rows whose image is missing or unusable or whose label is empty are skipped and reported.
"""
from __future__ import annotations

# ---- settings (edit here, or pass the same names as --flags: VAL_SIZE -> --val-size) -------------
CSV_PATH = "latex_ocr_train.csv"     # input: columns image_path,text (from data2csv.py)
TRAIN_JSON = "latex_ocr_train.json"  # output: training conversations
VAL_JSON = "latex_ocr_val.json"      # output: validation conversations
VAL_SIZE = "100"                     # validation rows: a count (100) or a fraction (0.05)
SEED = 42                            # fixed, so the split is the same on every run
VAL_CSV = None                       # a CSV of the dataset's validation split: used as the
                                     # validation set instead, and all of CSV_PATH trains
REQUIRE_DONE = True                  # read only CSVs whose data2csv completion record matches
                                     # (--no-require-done for a CSV made otherwise)
SETTINGS = {k: v for k, v in dict(globals()).items() if k.isupper()}
# ---------------------------------------------------------------------------------------------

import csv
import hashlib
import io
import os
import random
import sys
from collections import Counter
from pathlib import Path

from latexocr.cli import parse_settings
from latexocr.images import image_problem
from latexocr.io import atomic_write_json, completion_record, read_text
from latexocr.sample import is_valid_label, make_record


COLUMNS = ("image_path", "text")


class DataError(Exception):
    """Bad input; the message is for the user."""


def parse_args(argv=None):
    """The settings, each also a flag; DataError (one line) for a value that cannot be used."""
    args = parse_settings(SETTINGS, __doc__, argv)
    try:
        v = float(args.val_size)
        if not (0 < v < 1 or v >= 1 and v.is_integer()):  # NaN and inf fail both
            raise ValueError
    except ValueError:
        raise DataError(f"--val-size must be a count >= 1 or a fraction between 0 and 1, "
                        f"got {args.val_size!r}") from None
    args.val_size = int(v) if v >= 1 else v
    return args


def check_done(path: Path) -> None:
    """A CSV is read only if data2csv.py finished it: its marker exists and holds its hash.

    An interrupted or changed re-run of data2csv removes the marker first, so a CSV left
    behind (whose images may now be another run's) is refused here, not paired silently.
    """
    if not path.is_file():
        raise DataError(f"CSV not found: {path}")
    marker, done, finished = completion_record(path)
    if not finished:
        state = "does not match it (changed since)" if done is not None else "is missing"
        raise DataError(f"{path}: not a finished data2csv.py export (its completion record {marker.name} "
                        f"{state}); re-run data2csv.py, or pass --no-require-done to use it as it is")


def read_csv(path: Path) -> tuple[list[tuple[int, str, str]], Counter, list[str]]:
    """Usable rows [(row number, absolute image path, label)], skip counts, missing paths.

    Read with the csv module, not pandas: pandas would turn labels such as "NA" or "nan"
    into NaN and strip nothing we can see; here a label stays exactly as written.
    Relative image paths are resolved against the CSV's folder (how data2csv writes them),
    falling back to the current folder (how the original tutorial wrote them).
    """
    if not path.is_file():
        raise DataError(f"CSV not found: {path}")
    rows, skipped, missing = [], Counter(), []
    base = path.resolve().parent
    # a CSV that is not UTF-8 stops with the first bad line's number (the csv module would fail
    # later, naming neither file nor line)
    reader = csv.reader(io.StringIO(read_text(path, DataError), newline=""))
    header = next(reader, None)
    if header is None or not all(c in header for c in COLUMNS):
        raise DataError(f"{path}: expected columns {','.join(COLUMNS)}; found "
                        f"{','.join(header) if header else 'nothing (empty file)'}")
    ip, tx = header.index("image_path"), header.index("text")
    for n, fields in enumerate(reader, 1):  # numbered from 1, as the tutorial's ids
        if len(fields) <= max(ip, tx):
            skipped["short line"] += 1
            continue
        image, text = fields[ip], fields[tx]
        if not is_valid_label(text):
            skipped["empty or NaN label"] += 1
            continue
        p = Path(image.strip())
        if not p.is_absolute():
            p = base / p if (base / p).exists() or not p.exists() else p.resolve()
        problem = image_problem(p)  # the same check train.py and infer.py make
        if problem:
            skipped[problem] += 1
            missing.append(image)
            continue
        rows.append((n, os.path.normpath(p), text))
    return rows, skipped, missing


def dedupe(rows):
    """Drop exact repeats (same image, same label); an image's rows then stay together."""
    seen, out = set(), []
    for row in rows:
        key = (row[1], row[2])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out, len(rows) - len(out)


def content_key(path: str) -> str:
    """What identifies an image: its bytes, so two files of one image count as one."""
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def split_rows(rows, val_size, seed: int):
    """(train, val): validation = the rows of `val_size` images drawn with `seed`.

    Drawing images (not rows) keeps every row of one image on the same side, so a
    duplicated image can never be in both sets.
    """
    images = list(dict.fromkeys(r[1] for r in rows))  # unique, in CSV order
    n_val = val_size if isinstance(val_size, int) else max(1, round(val_size * len(images)))
    if len(images) < n_val + 1:
        raise DataError(f"need at least {n_val + 1} distinct usable images for {n_val} validation + "
                        f"1 training, found {len(images)}")
    val_images = set(random.Random(seed).sample(images, n_val))
    val = [r for r in rows if r[1] in val_images]
    # a copy (another file, same bytes) of a validation image is not trained on either
    val_keys = {content_key(r[1]) for r in val}
    train = [r for r in rows if r[1] not in val_images and content_key(r[1]) not in val_keys]
    return train, val


def records(rows, json_path: Path) -> list[dict]:
    base = json_path.resolve().parent
    out = []
    for n, image, text in rows:
        try:
            rel = Path(os.path.relpath(image, base)).as_posix()
        except ValueError:  # another drive on Windows
            rel = Path(image).as_posix()
        out.append(make_record(n, rel, text))
    return out


def report(name: str, skipped: Counter, missing: list[str]) -> None:
    if skipped:
        print(f"{name}: skipped " + ", ".join(f"{n} ({r})" for r, n in skipped.most_common()))
    if missing:
        print(f"  missing or unusable images, first {min(5, len(missing))}: " + ", ".join(missing[:5]))


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        for given in (args.csv_path, args.val_csv):
            if given and args.require_done:
                check_done(Path(given))
        rows, skipped, missing = read_csv(Path(args.csv_path))
        report(args.csv_path, skipped, missing)
        rows, dups = dedupe(rows)
        if dups:
            print(f"{args.csv_path}: dropped {dups} duplicate rows (same image and label)")
        if args.val_csv:
            val, vskipped, vmissing = read_csv(Path(args.val_csv))
            report(args.val_csv, vskipped, vmissing)
            val, _ = dedupe(val)
            val_images = {r[1] for r in val}
            val_keys = {content_key(r[1]) for r in val}
            train = [r for r in rows if r[1] not in val_images]
            same_file = len(rows) - len(train)
            train = [r for r in train if content_key(r[1]) not in val_keys]
            if same_file:
                print(f"removed {same_file} training rows whose image is in {args.val_csv}")
            if len(rows) - same_file - len(train):
                print(f"removed {len(rows) - same_file - len(train)} training rows whose image is identical "
                      f"in content to an image of {args.val_csv}")
            if not val or not train:
                raise DataError(f"need at least 1 training and 1 validation row; have "
                                f"{len(train)} and {len(val)}")
        else:
            train, val = split_rows(rows, args.val_size, args.seed)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    train_json, val_json = Path(args.train_json), Path(args.val_json)
    try:
        atomic_write_json(train_json, records(train, train_json))
        atomic_write_json(val_json, records(val, val_json))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(train)} training rows to {train_json} and {len(val)} validation rows to {val_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
