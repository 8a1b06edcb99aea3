"""KaTeX's verdicts on label strings, kept on disk from one scoring run to the next.

A data set's labels are scored again and again: every evaluation of a training run, infer.py on every
checkpoint. A prediction equal to its label needs that label's verdict, and those parses were 4.06 of
the 6.45 CPU s KaTeX took on 9,443 real pairs (docs/BENCHMARKS.md, "Scoring with KaTeX's parser alone").
Only strings that were some row's label are kept (a fixed set per data set, so the file stays small:
~40 bytes a label), keyed by a hash of the string, in one file per KaTeX build (pykatex's version) and
format. Any string found in the file gets its verdict from it, prediction or not.

The file is $LATEXOCR_VERDICT_CACHE/<name>, else ~/.cache/latexocr/katex-verdicts/<name>;
LATEXOCR_VERDICT_CACHE=off keeps nothing. A file that cannot be read is started again (it is a cache);
one that cannot be written is skipped with one line. Written whole to a temp file and renamed, so two
processes (torch.distributed ranks) never leave a half-written file; the later writer keeps the union of
what it read when it started and what it found.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from .io import atomic_open

CACHE_ENV = "LATEXOCR_VERDICT_CACHE"
FORMAT = 1  # raise when what a verdict means changes (latexocr/metrics.py render_ok)


def cache_file() -> Path | None:
    """Where the verdicts of this KaTeX build are kept, or None (LATEXOCR_VERDICT_CACHE=off)."""
    folder = os.environ.get(CACHE_ENV, "")
    if folder.lower() == "off":
        return None
    try:
        from importlib.metadata import version
        build = version("pykatex")
    except Exception:  # not installed: scoring itself will say so
        return None
    base = Path(folder).expanduser() if folder else Path.home() / ".cache" / "latexocr" / "katex-verdicts"
    return base / f"v{FORMAT}-pykatex-{build}.json"


def _key(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class LabelVerdicts:
    """The verdicts kept for this KaTeX build: ``get`` a string's (None: not kept), ``add`` a label's,
    ``save`` the file when something was added."""

    def __init__(self, path: Path | None | str = "default"):
        self.path = cache_file() if path == "default" else (Path(path) if path else None)
        self._kept = self._read() if self.path else {}
        self._changed = False  # a verdict added since the file was read: save writes it

    def _read(self) -> dict[str, bool]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            return {k: v for k, v in data.items() if isinstance(v, bool)} if isinstance(data, dict) else {}
        except (OSError, ValueError):  # absent, unreadable or cut: started again
            return {}

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, text: str) -> bool | None:
        return self._kept.get(_key(text))

    def add(self, text: str, verdict: bool) -> None:
        key = _key(text)
        if self._kept.get(key) != verdict:
            self._kept[key], self._changed = bool(verdict), True

    def save(self) -> None:
        if not self.path or not self._changed:
            return
        merged = {**self._read(), **self._kept}  # another process may have added labels since
        try:
            with atomic_open(self.path, "w", encoding="utf-8", fsync=False) as f:
                json.dump(merged, f, separators=(",", ":"))
        except OSError as exc:
            print(f"warning: KaTeX verdicts not kept ({exc}); set {CACHE_ENV}=off to skip this", file=sys.stderr)
        self._kept, self._changed = merged, False
