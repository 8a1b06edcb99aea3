"""LaTeX as the metrics see it: the dataset's tokens, math delimiters stripped, KaTeX's verdict.

LaTeX_OCR's labels were normalised by KaTeX's parser and written with one space between tokens
(``\\frac { 1 } { 2 }``). :func:`tokenize` reproduces that tokenisation for labels exactly and
splits compact LaTeX (``\\frac{1}{2}``) into the same tokens, so scores judge the formula and not
its spacing. :func:`render` / :func:`render_error` ask KaTeX itself (through ``pykatex``, which
embeds KaTeX in QuickJS: no node, no browser), the parser that normalised the labels, in a child
process of its own (below: why).
"""
from __future__ import annotations

import atexit
import json
import re
import select
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["strip_math", "tokenize", "render", "render_error", "render_errors"]

# The dataset fuses a few constructs into one token: \begin{array}, \end{array}, \left / \right
# with their delimiter (\left(, \right., \left\{), and KaTeX's dash ligatures -- and --- (its lexer
# reads them as one token: `D _ { -- }`). Everything else is a control word (\frac), a control symbol
# (\{ \, \\), or one character.
_TOKEN = re.compile(
    r"\\(?:begin|end)\s*\{\s*[A-Za-z]+\*?\s*\}"               # \begin{array}
    r"|\\(?:left|right)(?![A-Za-z])\s*(?:\\[A-Za-z]+|\\.|[^\s\\])"  # \left( \right\} \left\langle
    r"|\\[A-Za-z]+"                                           # control word
    r"|\\."                                                   # control symbol
    r"|-{2,3}"                                                # the -- and --- ligatures
    r"|\S",                                                   # one character
    re.DOTALL,
)
_SPACE = re.compile(r"\s+")

# Wrappers models put around an answer: code fences and display/inline math delimiters.
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)
_WRAPPERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_ENVIRONMENT = re.compile(r"^\\begin\{(equation|displaymath|math)(\*?)\}(.*)\\end\{\1\2\}$", re.DOTALL)


def strip_math(text: str | None) -> str:
    """The formula without code fences, ``$$ $$``, ``\\[ \\]``, ``\\( \\)``, ``$ $`` or an
    ``equation``/``displaymath`` environment around it (peeled repeatedly); None -> ""."""
    if text is None:
        return ""
    text = str(text).strip()
    while True:
        fence = _FENCE.match(text)
        env = _ENVIRONMENT.match(text)
        if fence:
            inner = fence.group(1)
        elif env:
            inner = env.group(3)
        else:
            inner = next((text[len(a):-len(b)] for a, b in _WRAPPERS
                          if len(text) >= len(a) + len(b) and text.startswith(a) and text.endswith(b)), None)
        if inner is None:
            return text
        text = inner.strip()


def tokenize(text: str | None) -> list[str]:
    """The dataset's LaTeX tokens of ``text`` (delimiters stripped first).

    For a label this equals ``label.split()``; ``\\frac{1}{2}`` and ``\\frac { 1 } { 2 }`` give
    the same tokens. Inside a fused token the spaces are dropped (``\\left (`` -> ``\\left(``).
    """
    # a one-character token has no space to drop (most tokens: scoring tokenises every row)
    return [t if len(t) == 1 else _SPACE.sub("", t) for t in _TOKEN.findall(strip_math(text))]


# KaTeX runs in a child process of its own: latexocr/fast/katex.py run as a script, which drives the
# QuickJS engine inside pykatex's extension (pykatex's own renderToString double-frees a JavaScript
# value on every KaTeX internal error and then aborts or hangs; see that file). A formula never takes
# the scoring process with it: a child that crashes or hangs is replaced, and the formulas of that
# request are asked again one by one, so only the culprit gets the crash as its verdict.
_SERVER = Path(__file__).resolve().parent / "fast" / "katex.py"
KATEX_TIMEOUT = 30.0  # seconds for one request before the child counts as hung (KaTeX takes ~1-12 ms a formula)


class _Katex:
    """One child process running KaTeX (see above), replaced when it crashes or hangs."""

    def __init__(self):
        self.child, self.lock = None, threading.Lock()

    def stop(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None

    def _ask(self, request: dict) -> dict:
        """The child's answer, or RuntimeError when it crashed or hung on this request (it is then stopped)."""
        with self.lock:
            if self.child is None or self.child.poll() is not None:
                self.child = subprocess.Popen([sys.executable, str(_SERVER)], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                              text=True, encoding="utf-8", bufsize=1)
            ready = False
            try:
                self.child.stdin.write(json.dumps(request) + "\n")
                self.child.stdin.flush()
                ready, _, _ = select.select([self.child.stdout], [], [], KATEX_TIMEOUT)
                line = self.child.stdout.readline() if ready else ""
            except OSError:  # the child died between two requests
                line = ""
            if not line:
                self.stop()
                raise RuntimeError("KaTeX crashed on this formula" if ready else
                                   f"KaTeX took more than {KATEX_TIMEOUT:.0f} s on this formula")
            answer = json.loads(line)
            if "missing" in answer:
                self.stop()
                raise ImportError(answer["missing"])
            return answer

    def check(self, formulas: list[str]) -> list[str | None]:
        """KaTeX's error for each formula, None where it parses (one request for all of them)."""
        if not formulas:
            return []
        try:
            return self._ask({"check": formulas})["verdicts"]
        except RuntimeError as exc:
            if len(formulas) == 1:
                return [str(exc)]
        return [verdict for formula in formulas for verdict in self.check([formula])]

    def render(self, formula: str) -> tuple[str | None, str | None]:
        try:
            answer = self._ask({"render": formula})
        except RuntimeError as exc:
            return None, str(exc)
        return answer["mathml"], answer["error"]


_katex = _Katex()
atexit.register(_katex.stop)


def render(text: str | None) -> tuple[str | None, str | None]:
    """(KaTeX's MathML, None) when KaTeX parses the formula (delimiters stripped), else (None, its
    one-line error). Chromium, Firefox and Safari render the MathML natively.

    An empty formula counts as not rendering: an OCR model that writes nothing has failed.
    """
    latex = strip_math(text)
    if not latex:
        return None, "empty formula"
    mathml, error = _katex.render(latex)
    return mathml, _one_line(error)


def render_errors(texts: Sequence[str | None]) -> list[str | None]:
    """render_error of each text, all asked of KaTeX in one request. KaTeX's parser alone decides:
    every error renderToString raises is raised while parsing (checked on every shared label and
    perturbations of them, tests/test_metrics.py), and parsing is 2/3 of its cost."""
    latex = [strip_math(text) for text in texts]
    verdicts = iter(_katex.check([formula for formula in latex if formula]))
    return [_one_line(next(verdicts)) if formula else "empty formula" for formula in latex]


def _one_line(error: str | None) -> str | None:
    return None if error is None else (" ".join(error.split()) or "KaTeX error")


def render_error(text: str | None) -> str | None:
    """None when KaTeX parses the formula, else its one-line error (see render)."""
    return render_errors([text])[0]
