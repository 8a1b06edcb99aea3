"""LaTeX as the metrics see it: the dataset's tokens, math delimiters stripped, KaTeX's verdict.

LaTeX_OCR's labels were normalised by KaTeX's parser and written with one space between tokens
(``\\frac { 1 } { 2 }``). :func:`tokenize` reproduces that tokenisation for labels exactly and
splits compact LaTeX (``\\frac{1}{2}``) into the same tokens, so scores judge the formula and not
its spacing. :func:`render` / :func:`render_error` ask KaTeX itself (through ``pykatex``, which
embeds KaTeX in QuickJS: no node, no browser), the parser that normalised the labels.
"""
from __future__ import annotations

import re

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


def _katex(latex: str) -> str:
    import pykatex  # imported here: the metrics module stays importable where no wheel exists

    # strict="ignore": KaTeX's default ("warn") prints a console line for every non-LaTeX character
    # (a random or looping model writes thousands); the verdict is the same, only errors count.
    return pykatex.renderToString(latex, output="mathml", displayMode=True, throwOnError=True, strict="ignore")


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
