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
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["strip_math", "tokenize", "render", "render_error", "render_errors", "start_katex"]

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
# Where a token may hold a space (a fused token written with spaces, or a backslash before one): else
# the tokens are findall's as they are (labels, and most predictions: no per-token pass)
_MAY_HOLD_SPACE = re.compile(r"\\\s|\\(?:begin|end|left|right)(?![A-Za-z])\s|\\(?:begin|end)\s*\{[^}]*\s")

# Wrappers models put around an answer: code fences and display/inline math delimiters.
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)
_WRAPPERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_OPENERS = ("```", "\\begin{", "$", "\\[", "\\(")  # how each wrapper above and below begins
_ENVIRONMENT = re.compile(r"^\\begin\{(equation|displaymath|math)(\*?)\}(.*)\\end\{\1\2\}$", re.DOTALL)


def strip_math(text: str | None) -> str:
    """The formula without code fences, ``$$ $$``, ``\\[ \\]``, ``\\( \\)``, ``$ $`` or an
    ``equation``/``displaymath`` environment around it (peeled repeatedly); None -> ""."""
    if text is None:
        return ""
    text = str(text).strip()
    while True:
        if not text.startswith(_OPENERS):  # most texts: no wrapper can match (scoring strips every row)
            return text
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
    text = strip_math(text)
    tokens = _TOKEN.findall(text)
    if _MAY_HOLD_SPACE.search(text) is None:
        return tokens
    # a one-character token has no space to drop
    return [t if len(t) == 1 else _SPACE.sub("", t) for t in tokens]


# KaTeX runs in a child process of its own: latexocr/fast/katex.py run as a script, which drives the
# QuickJS engine inside pykatex's extension (pykatex's own renderToString double-frees a JavaScript
# value on every KaTeX internal error and then aborts or hangs; see that file). A formula never takes
# the scoring process with it: a child that crashes or hangs is replaced, and the formulas of that
# request are asked again one by one, so only the culprit gets the crash as its verdict.
_SERVER = Path(__file__).resolve().parent / "fast" / "katex.py"
KATEX_TIMEOUT = 30.0  # seconds for one formula before the child counts as hung (KaTeX takes ~1-12 ms a formula)
KATEX_TIMEOUT_EACH = 0.05  # and for each formula of a request (~4x a long looping output's time)
MIN_PART = 16  # formulas: a request costs ~0.2 ms besides KaTeX's work (~1 ms a formula)


class _Child:
    """One child process running KaTeX (see above), replaced when it crashes or hangs."""

    def __init__(self):
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def start(self) -> None:
        """A process, unless one is running."""
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, str(_SERVER)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            text=True, encoding="utf-8", bufsize=1)

    def send(self, request: dict) -> bool:
        """False when the child died (it is then stopped)."""
        self.start()
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            return True
        except OSError:  # the child died between two requests
            self.stop()
            return False

    def receive(self, formulas: int = 1, wait: float | None = None) -> dict:
        """The answer to the request sent, or RuntimeError when the child crashed or hung on it (then stopped).
        ``wait``: seconds still to wait, where the caller has waited already (the timeout's name stays)."""
        timeout = KATEX_TIMEOUT + KATEX_TIMEOUT_EACH * formulas
        ready, _, _ = select.select([self.process.stdout], [], [], timeout if wait is None else wait)
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
    """KaTeX's child processes: one, or ``processes`` sharing the parts of a long list of formulas."""

    def __init__(self):
        self.children, self.lock = [], threading.Lock()

    def stop(self) -> None:
        for child in self.children:
            child.stop()

    def start(self, processes: int) -> None:
        with self.lock:
            self.children += [_Child() for _ in range(processes - len(self.children))]
            for child in self.children[:processes]:
                child.start()

    def _ask(self, requests: list[dict], processes: int) -> list[dict | RuntimeError]:
        """Every request answered by one of ``processes`` children, each handed the next request as soon as it
        answers (parts of equal length still take unequal times: no child waits for another at the end);
        an answer, or the RuntimeError of a child that died or hung on that request."""
        self.start(processes)
        with self.lock:
            answers: list = [None] * len(requests)
            waiting = iter(range(len(requests)))
            busy: dict[_Child, tuple[int, float]] = {}  # child -> (its request, when it counts as hung)

            def hand_next(child: _Child) -> None:
                for i in waiting:
                    if child.send(requests[i]):
                        busy[child] = i, time.monotonic() + KATEX_TIMEOUT + KATEX_TIMEOUT_EACH * _size(requests[i])
                        return
                    answers[i] = RuntimeError("KaTeX crashed on this formula")

            for child in self.children[:processes]:
                hand_next(child)
            while busy:
                first_due = min(due for _, due in busy.values())
                ready, _, _ = select.select([child.process.stdout for child in busy], [], [],
                                            max(0.0, first_due - time.monotonic()))
                now = time.monotonic()
                for child in [c for c in busy if c.process.stdout in ready or busy[c][1] <= now]:
                    i, _ = busy.pop(child)
                    try:
                        answers[i] = child.receive(_size(requests[i]), wait=0)
                    except RuntimeError as exc:
                        answers[i] = exc
                    hand_next(child)
            return answers

    def check(self, formulas: list[str], processes: int = 1) -> list[str | None]:
        """KaTeX's error for each formula, None where it parses: contiguous parts of about equal length
        (KaTeX's time grows with it), shared among ``processes`` children."""
        if not formulas:
            return []
        parts = [formulas] if processes == 1 else _shrinking_parts(formulas, processes)
        verdicts = []
        for part, answer in zip(parts, self._ask([{"check": part} for part in parts], processes)):
            if not isinstance(answer, RuntimeError):
                verdicts += answer["verdicts"]
            elif len(part) == 1:
                verdicts.append(str(answer))
            else:  # a crash or hang: each formula again on its own, so that only the culprit gets it
                verdicts += [verdict for formula in part for verdict in self.check([formula])]
        return verdicts

    def render(self, formula: str) -> tuple[str | None, str | None]:
        answer = self._ask([{"render": formula}], 1)[0]
        if isinstance(answer, RuntimeError):
            return None, str(answer)
        return answer["mathml"], answer["error"]


def _size(request: dict) -> int:
    return len(request.get("check", [None]))


def _shrinking_parts(formulas: list[str], processes: int) -> list[list[str]]:
    """Contiguous parts, each about 1/(2 ``processes``) of the length still left (at least MIN_PART formulas),
    handed out in this order: the last parts are small, so that the children finish together."""
    parts, start, left = [], 0, sum(map(len, formulas))
    while start < len(formulas):
        goal, run, end = left / (2 * processes), 0, start
        while end < len(formulas) and (run < goal or end - start < MIN_PART):
            run += len(formulas[end])
            end += 1
        parts.append(formulas[start:end])
        start, left = end, left - run
    return parts


_katex = _Katex()
atexit.register(_katex.stop)


def start_katex(processes: int = 1) -> None:
    """Start KaTeX's ``processes`` children now (~40 ms each: Python, then KaTeX loaded into QuickJS), so that
    their start-up overlaps what the caller does before it asks for verdicts (infer.py --score: imports,
    reading the file)."""
    _katex.start(processes)


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
