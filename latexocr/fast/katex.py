"""KaTeX's verdict on many formulas per call: the QuickJS engine inside pykatex's extension, driven directly.

pykatex 0.1.1 offers one function, ``renderToString``: per formula it parses, builds the MathML tree and
serialises it, and its C wrapper double-frees a JavaScript value on KaTeX's internal errors (latex.py).
Scoring needs only the verdict, and KaTeX's parser decides it: ``katex.__parse`` raises the same
ParseError that ``renderToString`` raises, without the build (~0.82 against ~1.2 ms a real label;
docs/BENCHMARKS.md, issue 32). pykatex's extension is QuickJS-ng 0.10.1 with KaTeX 0.16.22 compiled to
bytecode, and it exports QuickJS's C API and that bytecode (``qjsc_katex``, the module
``katex/katex.mjs``). So this file makes a QuickJS context of its own through ctypes, loads that same
KaTeX module into it, and calls a small JavaScript function that checks a whole JSON list of formulas,
catching every exception in JavaScript (no error value ever crosses into C, so no double free).

Private contracts (checked against pykatex 0.1.1, in fast/upstream.py's drift check): the exported
symbols below, their QuickJS-ng 0.10.1 signatures (a JSValue is 16 bytes: a union and an int64 tag),
the module name, and ``katex.__parse``. tests/test_metrics.py checks the verdicts against
``renderToString``'s and the MathML against pykatex's own.

KaTeX's lexer and macro expander also get fast paths in this context (_FAST_PATHS_JS: the same tokens,
~30 % less CPU a formula), while their JavaScript sources are the ones the paths copy.

Run as a script (``python latexocr/fast/katex.py``), it serves latex.py's child process: one JSON
request a line, one answer a line. It imports only the standard library (and pykatex's file), so the
child starts in ~30 ms and never imports the package (whose ``fast`` door imports torch).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import re
import sys

__all__ = ["Engine", "serve", "PYKATEX_CHECKED"]  # serve falls back on pykatex's renderToString

PYKATEX_CHECKED = "0.1.1"
KATEX_OPTIONS = '{output: "mathml", displayMode: true, throwOnError: true, strict: "ignore"}'  # latex.py's
# Fast paths of KaTeX's lexer and macro expander (~25 % of a formula's parse: QuickJS interprets every call,
# and a label is ~half spaces, each a token). They return the very tokens KaTeX's code returns, and hand every
# other case to it: Lexer.lex's regular expression is read by hand for the tokens that make up nearly all
# formulas (a run of spaces, one plain character, a control word that is not \verb), and expandNextToken
# skips expandOnce's round trip through the token stack for a token no macro defines. KaTeX's classes are
# not exported: a macro function (options.macros, this call's only) is handed the MacroExpander, whose
# lexer and prototype give them. Installed only while KaTeX's own methods are the sources these copy
# (FAST_PATH_SOURCES: their hash); tests/test_metrics.py checks the tokens and verdicts against KaTeX's own.
_FAST_PATHS_JS = r"""
const fast = (() => {
  let expander = null;
  katex.__parse("\\latexocrgrab", {...options, macros: {"\\latexocrgrab": me => { expander = me; return ""; }}});
  const Lexer = expander.lexer.constructor, Expander = expander.constructor;
  const sample = new Lexer("x", expander.settings).lex();
  const Token = sample.constructor, SourceLocation = sample.loc.constructor;
  const katexLex = Lexer.prototype.lex, katexExpandNextToken = Expander.prototype.expandNextToken;
  const isSpace = c => c === 32 || c === 9 || c === 10 || c === 13;  // [ \r\n\t]
  const isLetter = c => (c >= 97 && c <= 122) || (c >= 64 && c <= 90);  // [a-zA-Z@]
  function lex() {
    const input = this.input, regex = this.tokenRegex, pos = regex.lastIndex, n = input.length;
    if (pos >= n) return katexLex.call(this);
    const c = input.charCodeAt(pos);
    let end = pos + 1, text;
    if (isSpace(c)) {  // the regex's first alternative, greedy: one " " token
      while (end < n && isSpace(input.charCodeAt(end))) end++;
      text = " ";
    } else if (c === 92) {  // a control word and the spaces after it (\verb... and control symbols: KaTeX's)
      while (end < n && isLetter(input.charCodeAt(end))) end++;
      if (end === pos + 1 || input.startsWith("verb", pos + 1)) return katexLex.call(this);
      text = input.slice(pos, end);
      while (end < n && isSpace(input.charCodeAt(end))) end++;
    } else if ((c >= 0x21 && c <= 0x5B) || (c >= 0x5D && c <= 0x2027) || (c >= 0x202A && c <= 0xD7FF) ||
               c >= 0xF900) {  // one code unit of the regex's class, unless combining marks follow it
      if (end < n && input.charCodeAt(end) >= 0x300 && input.charCodeAt(end) <= 0x36F) return katexLex.call(this);
      text = input[pos];
    } else {
      return katexLex.call(this);
    }
    if (this.catcodes[text] === 14) return katexLex.call(this);  // a comment character
    regex.lastIndex = end;
    return new Token(text, new SourceLocation(this, pos, end));
  }
  function expandNextToken() {
    if (this.stack.length === 0) {  // KaTeX's expandOnce would lex it, find no macro, push it back and pop it
      const token = this.lexer.lex();
      if (this.macros.get(token.text) == null) return token;
      this.stack.push(token);
    }
    return katexExpandNextToken.call(this);
  }
  const copied = [katexLex, katexExpandNextToken, Expander.prototype.expandOnce, Expander.prototype.future,
                  Expander.prototype.popToken, Expander.prototype._getExpansion, expander.macros.get, Lexer, Token];
  return {
    sources: () => copied.map(f => f.toString()),
    install: on => {
      Lexer.prototype.lex = on ? lex : katexLex;
      Expander.prototype.expandNextToken = on ? expandNextToken : katexExpandNextToken;
      return "[]";
    },
  };
})();
"""
FAST_PATH_SOURCES = "2eb53b8681b2ba07"  # blake2b of KaTeX 0.16.22's sources that _FAST_PATHS_JS copies (Engine.source_digest)
# Every exception stays in JavaScript: "P" + a ParseError's message, "I" + an internal error's (a plain Error).
_JS = r"""
import katex from "katex/katex.mjs";
const options = %s;
function verdict(work, s) {
  try { return [null, work(s, options)]; }
  catch (e) { return [(e instanceof katex.ParseError ? "P" : "I") + String(e && e.message), null]; }
}
globalThis.latexocr = {
  check: json => JSON.stringify(JSON.parse(json).map(s => verdict(katex.__parse, s)[0])),
  render: json => JSON.stringify(verdict(katex.renderToString, JSON.parse(json))),
  version: katex.version,
  sources: () => JSON.stringify(fast.sources()),
  speedUp: json => fast.install(JSON.parse(json)),
};
""" % KATEX_OPTIONS + _FAST_PATHS_JS
_PARSE_PREFIX = "KaTeX parse error: "  # pykatex drops it from a ParseError's message; so does this
_POSITION = re.compile(r" at position \d+|at end of input|^KaTeX parse error")  # a ParseError names where it stopped
_JS_TAG_EXCEPTION, _JS_TAG_UNDEFINED, _JS_EVAL_TYPE_MODULE = 6, 3, 1


class _JSValue(ctypes.Structure):
    _fields_ = [("u", ctypes.c_uint64), ("tag", ctypes.c_int64)]


def _library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("pykatex")
    if spec is None or not spec.origin:
        raise ImportError("No module named 'pykatex' (pip install pykatex==0.1.1): KaTeX's render check needs it")
    lib = ctypes.CDLL(spec.origin)
    p, v, size = ctypes.c_void_p, _JSValue, ctypes.c_size_t
    for name, restype, argtypes in [
            ("JS_NewRuntime", p, []), ("JS_NewContext", p, [p]), ("js_std_init_handlers", None, [p]),
            ("JS_SetModuleLoaderFunc", None, [p, p, p, p]), ("js_std_add_helpers", None, [p, ctypes.c_int, p]),
            ("js_std_eval_binary", None, [p, p, size, ctypes.c_int]),
            ("JS_Eval", v, [p, ctypes.c_char_p, size, ctypes.c_char_p, ctypes.c_int]),
            ("JS_FreeValue", None, [p, v]), ("JS_GetException", v, [p]), ("JS_GetGlobalObject", v, [p]),
            ("JS_GetPropertyStr", v, [p, v, ctypes.c_char_p]), ("JS_NewStringLen", v, [p, ctypes.c_char_p, size]),
            ("JS_Call", v, [p, v, v, ctypes.c_int, ctypes.POINTER(v)]),
            ("JS_ToCStringLen2", p, [p, ctypes.POINTER(size), v, ctypes.c_bool]), ("JS_FreeCString", None, [p, p])]:
        function = getattr(lib, name)  # AttributeError: not the pykatex this was checked against
        function.restype, function.argtypes = restype, argtypes
    return lib


class Engine:
    """KaTeX (pykatex's bytecode) in a QuickJS context of this process's own."""

    def __init__(self, fast: bool = True):
        """``fast``: KaTeX's lexer and macro expander with the fast paths above (the same tokens), where
        KaTeX's own methods are the ones they were checked against."""
        try:
            lib = self.lib = _library()
            bytecode = ctypes.c_uint8.in_dll(lib, "qjsc_katex")
            bytecode_size = ctypes.c_uint32.in_dll(lib, "qjsc_katex_size").value
        except (AttributeError, ValueError) as exc:
            from importlib.metadata import version
            raise RuntimeError(f"pykatex {version('pykatex')} is not the build latexocr/fast/katex.py drives "
                               f"({exc}); install pykatex=={PYKATEX_CHECKED}") from None
        runtime = lib.JS_NewRuntime()
        lib.js_std_init_handlers(runtime)
        lib.JS_SetModuleLoaderFunc(runtime, None, ctypes.cast(lib.js_module_loader, ctypes.c_void_p), None)
        self.context = lib.JS_NewContext(runtime)
        lib.js_std_add_helpers(self.context, 0, None)  # as pykatex's own context: console exists
        lib.js_std_eval_binary(self.context, ctypes.addressof(bytecode), bytecode_size, 1)  # load, not run
        source = _JS.encode()
        lib.JS_FreeValue(self.context, self._value(lib.JS_Eval(self.context, source, len(source), b"latexocr.js",
                                                               _JS_EVAL_TYPE_MODULE)))
        api = self._value(lib.JS_GetPropertyStr(self.context, self._value(lib.JS_GetGlobalObject(self.context)),
                                                b"latexocr"))
        self._check, self._render, sources, speed_up = (self._value(lib.JS_GetPropertyStr(self.context, api, name))
                                                        for name in (b"check", b"render", b"sources", b"speedUp"))
        self.version = self._string(self._value(lib.JS_GetPropertyStr(self.context, api, b"version")))
        self.source_digest = hashlib.blake2b(json.dumps(self._call(sources, None)).encode(), digest_size=8).hexdigest()
        self.fast = fast and self.source_digest == FAST_PATH_SOURCES
        self._call(speed_up, self.fast)
        for function in (sources, speed_up):
            lib.JS_FreeValue(self.context, function)

    def _value(self, value: _JSValue) -> _JSValue:
        if value.tag == _JS_TAG_EXCEPTION:  # only set-up code can get here: the functions catch everything
            raise RuntimeError(f"KaTeX's set-up failed: {self._string(self.lib.JS_GetException(self.context))}")
        return value

    def _string(self, value: _JSValue) -> str:
        length = ctypes.c_size_t()
        pointer = self.lib.JS_ToCStringLen2(self.context, ctypes.byref(length), value, False)
        text = ctypes.string_at(pointer, length.value).decode("utf-8")
        self.lib.JS_FreeCString(self.context, pointer)
        self.lib.JS_FreeValue(self.context, value)
        return text

    def _call(self, function: _JSValue, payload) -> list:
        data = json.dumps(payload).encode("utf-8")
        argument = (_JSValue * 1)(self.lib.JS_NewStringLen(self.context, data, len(data)))
        result = self._value(self.lib.JS_Call(self.context, function, _JSValue(0, _JS_TAG_UNDEFINED), 1, argument))
        self.lib.JS_FreeValue(self.context, argument[0])
        return json.loads(self._string(result))

    def check(self, formulas: list[str]) -> list[str | None]:
        """KaTeX's verdict on each formula: None when it parses, else its one error message."""
        return [_message(error) for error in self._call(self._check, formulas)]

    def render(self, formula: str) -> tuple[str | None, str | None]:
        """(MathML, None) or (None, its error message): what pykatex.renderToString gives or raises."""
        error, mathml = self._call(self._render, formula)
        return mathml, _message(error)


def _message(error: str | None) -> str | None:
    if error is None:
        return None
    if error[0] == "P":
        return error[1:].removeprefix(_PARSE_PREFIX)
    return f"KaTeX internal error: {error[1:]}"


class _PublicApi:
    """pykatex's own renderToString, where the engine above cannot be set up (another pykatex build, a
    32-bit Python, a platform whose extension exports no symbols): slower, the same verdicts. After a
    KaTeX internal error pykatex's heap is not to be trusted (its double free): the child then exits
    once it has answered, and latex.py starts a fresh one for the next request."""

    def __init__(self):
        import pykatex
        self.pykatex, self.corrupt, self.version = pykatex, False, None

    def _verdict(self, formula: str) -> tuple[str | None, str | None]:
        try:
            return None, self.pykatex.renderToString(formula, output="mathml", displayMode=True,
                                                     throwOnError=True, strict="ignore")
        except Exception as exc:  # pykatex raises its ParseError for every JavaScript exception
            if _POSITION.search(str(exc)):
                return "P" + _PARSE_PREFIX + str(exc), None
            self.corrupt = True  # an internal error (a plain Error; pykatex drops its first 19 characters)
            return "I" + str(exc), None

    def check(self, formulas: list[str]) -> list[str | None]:
        return [_message(self._verdict(formula)[0]) for formula in formulas]

    def render(self, formula: str) -> tuple[str | None, str | None]:
        error, mathml = self._verdict(formula)
        return mathml, _message(error)


def serve() -> None:
    """latex.py's child: a line {"check": [formulas]} -> {"verdicts": [...]}, {"render": formula} ->
    {"mathml", "error"}; {"missing": ...} for every line when pykatex is not installed."""
    engine, missing = None, None
    try:
        engine = Engine() if ctypes.sizeof(ctypes.c_void_p) == 8 else _PublicApi()
    except ImportError as exc:
        missing = str(exc)
    except (OSError, RuntimeError):
        engine = _PublicApi()
    for line in sys.stdin:
        request = json.loads(line)
        if engine is None:
            answer = {"missing": missing}
        elif "check" in request:
            answer = {"verdicts": engine.check(request["check"])}
        else:
            mathml, error = engine.render(request["render"])
            answer = {"mathml": mathml, "error": error}
        print(json.dumps(answer), flush=True)
        if getattr(engine, "corrupt", False):
            return


if __name__ == "__main__":
    serve()
