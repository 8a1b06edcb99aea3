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
KATEX_TIMEOUT = 30.0  # seconds for one formula before the child counts as hung (KaTeX takes ~1-12 ms a formula)
KATEX_TIMEOUT_EACH = 0.05  # and for each formula of a request (~4x a long looping output's time)


class _Child:
    """One child process running KaTeX (see above), replaced when it crashes or hangs."""

    def __init__(self):
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def send(self, request: dict) -> bool:
        """False when the child died (it is then stopped)."""
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, str(_SERVER)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            text=True, encoding="utf-8", bufsize=1)
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            return True
        except OSError:  # the child died between two requests
            self.stop()
            return False

    def receive(self, formulas: int = 1) -> dict:
        """The answer to the request sent, or RuntimeError when the child crashed or hung on it (then stopped)."""
        timeout = KATEX_TIMEOUT + KATEX_TIMEOUT_EACH * formulas
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError("KaTeX crashed on this formula" if ready else
                               f"KaTeX took more than {timeout:.0f} s on this formula")
        answer = json.loads(line)
        if "missing" in answer:
            self.stop()
            raise ImportError(answer["missing"])
        return answer


class _Katex:
    """KaTeX's child processes: one, or one per part of a long list of formulas (``processes``)."""

    def __init__(self):
        self.children, self.lock = [], threading.Lock()

    def stop(self) -> None:
        for child in self.children:
            child.stop()

    def _ask(self, requests: list[dict]) -> list[dict | RuntimeError]:
        """Each request to a child of its own, all at once; an answer, or the RuntimeError of a child that died."""
        with self.lock:
            self.children += [_Child() for _ in range(len(requests) - len(self.children))]
            sent = [child.send(request) for child, request in zip(self.children, requests)]
            answers = []
            for child, request, ok in zip(self.children, requests, sent):
                try:
                    answers.append(child.receive(len(request.get("check", [None]))) if ok else
                                   RuntimeError("KaTeX crashed on this formula"))
                except RuntimeError as exc:
                    answers.append(exc)
            return answers

    def check(self, formulas: list[str], processes: int = 1) -> list[str | None]:
        """KaTeX's error for each formula, None where it parses: one request per process, each with a
        contiguous part of about equal length (KaTeX's time grows with it)."""
        if not formulas:
            return []
        parts = _split(formulas, processes)
        verdicts = []
        for part, answer in zip(parts, self._ask([{"check": part} for part in parts])):
            if not isinstance(answer, RuntimeError):
                verdicts += answer["verdicts"]
            elif len(part) == 1:
                verdicts.append(str(answer))
            else:  # a crash or hang: each formula again on its own, so that only the culprit gets it
                verdicts += [verdict for formula in part for verdict in self.check([formula])]
        return verdicts

    def render(self, formula: str) -> tuple[str | None, str | None]:
        answer = self._ask([{"render": formula}])[0]
        if isinstance(answer, RuntimeError):
            return None, str(answer)
        return answer["mathml"], answer["error"]


def _split(formulas: list[str], parts: int) -> list[list[str]]:
    """At most ``parts`` contiguous, non-empty parts of about equal total length."""
    total, bounds, run = sum(map(len, formulas)) or 1, [0], 0
    for i, formula in enumerate(formulas):
        run += len(formula)
        if run * parts >= total * len(bounds) and len(bounds) < parts and i + 1 < len(formulas):
            bounds.append(i + 1)
    bounds.append(len(formulas))
    return [formulas[a:b] for a, b in zip(bounds, bounds[1:])]


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


def render_errors(texts: Sequence[str | None], processes: int = 1) -> list[str | None]:
    """render_error of each text, KaTeX asked once for all of them (split over ``processes`` child
    processes that parse in parallel). KaTeX's parser alone decides:
    every error renderToString raises is raised while parsing (checked on every shared label and
    perturbations of them, tests/test_metrics.py), and parsing is 2/3 of its cost."""
    latex = [strip_math(text) for text in texts]
    verdicts = iter(_katex.check([formula for formula in latex if formula], processes))
    return [_one_line(next(verdicts)) if formula else "empty formula" for formula in latex]


def _one_line(error: str | None) -> str | None:
    return None if error is None else (" ".join(error.split()) or "KaTeX error")


def render_error(text: str | None) -> str | None:
    """None when KaTeX parses the formula, else its one-line error (see render)."""
    return render_errors([text])[0]
