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

__all__ = ["strip_math", "tokenize", "render", "render_error"]

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


# KaTeX runs in a child process of its own. pykatex 0.1.1 (its only release) frees a JavaScript value
# twice whenever KaTeX throws an internal error (a plain Error, e.g. "Expected node of type ... but got
# node of type cr" for `\begin{array} \\ x \end{array}`) rather than a ParseError; after a few such
# errors the process aborts (malloc_consolidate) or hangs. A formula never takes the scoring process
# with it: the child is replaced after an internal error, a crash or a hang.
_SERVER = r"""
import json, sys
try:
    import pykatex
except ImportError as exc:
    pykatex, missing = None, str(exc)
for line in sys.stdin:
    if pykatex is None:
        print(json.dumps({"missing": missing}), flush=True)
        continue
    try:
        answer = {"mathml": pykatex.renderToString(json.loads(line), output="mathml", displayMode=True,
                                                   throwOnError=True, strict="ignore")}
    except Exception as exc:
        answer = {"error": str(exc)}
    print(json.dumps(answer), flush=True)
"""
# KaTeX's own ParseError names where parsing stopped; an internal error does not (its text may be garbled).
_PARSE_ERROR = re.compile(r" at position \d+|at end of input|^KaTeX parse error")
KATEX_TIMEOUT = 30.0  # seconds for one formula before the child counts as hung (KaTeX takes ~1-12 ms)


class _Katex:
    """One child process running KaTeX (see above), replaced when its state may be corrupt."""

    def __init__(self):
        self.child, self.lock = None, threading.Lock()

    def stop(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None

    def __call__(self, latex: str) -> str:
        with self.lock:
            if self.child is None or self.child.poll() is not None:
                # strict="ignore" in the server: KaTeX's default ("warn") prints a console line for every
                # non-LaTeX character (a looping model writes thousands); only errors count
                self.child = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                              text=True, encoding="utf-8", bufsize=1)
            try:
                self.child.stdin.write(json.dumps(latex) + "\n")
                self.child.stdin.flush()
                ready, _, _ = select.select([self.child.stdout], [], [], KATEX_TIMEOUT)
                line = self.child.stdout.readline() if ready else ""
            except OSError:  # the child died between two formulas
                line = ""
            if not line:  # crashed or hung on this formula: its verdict, and a new child for the next
                self.stop()
                raise RuntimeError("KaTeX crashed on this formula" if ready else
                                   f"KaTeX took more than {KATEX_TIMEOUT:.0f} s on this formula")
            answer = json.loads(line)
            if "missing" in answer:
                self.stop()
                raise ImportError(answer["missing"])
            if "error" in answer:
                if not _PARSE_ERROR.search(answer["error"]):
                    self.stop()  # an internal error: pykatex's state is not to be trusted after it
                    raise RuntimeError(f"KaTeX internal error: {answer['error']}")
                raise ValueError(answer["error"])
            return answer["mathml"]


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
    try:
        return _katex(latex), None
    except ImportError:
        raise
    except Exception as exc:  # KaTeX's ParseError (and anything else it throws) is the verdict
        return None, " ".join(str(exc).split()) or type(exc).__name__


def render_error(text: str | None) -> str | None:
    """None when KaTeX parses the formula, else its one-line error (see render)."""
    return render(text)[1]
