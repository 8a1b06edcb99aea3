"""Command-line flags made from a script's UPPER_CASE settings, so the two can never drift apart."""
from __future__ import annotations

import argparse
import io
import sys
import tokenize
from pathlib import Path


def settings_help(source_file) -> dict[str, str]:
    """{SETTING: its comment} from a script's settings block: the comment after the value,
    plus the indented comment-only lines right below it (how a long comment continues).

    Read with tokenize, so a '#' inside a string value is not taken for a comment.
    """
    try:
        with open(source_file, encoding="utf-8") as f:
            tokens = list(tokenize.generate_tokens(io.StringIO(f.read()).readline))
    except (OSError, SyntaxError, tokenize.TokenError):
        return {}
    comments: dict[str, list[str]] = {}
    current, statement_row = None, None
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.start[1] == 0:
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            # NAME = value, or NAME: type = value (an unset setting, typed by its annotation)
            is_setting = tok.string.isupper() and following is not None and following.string in ("=", ":")
            current = tok.string if is_setting else None
            statement_row = tok.start[0]
        elif tok.type == tokenize.COMMENT and current:
            if tok.start[1] == 0:  # a section heading above the next settings, not this one's
                current = None
            elif tok.line[: tok.start[1]].strip() or tok.start[0] > statement_row:
                comments.setdefault(current, []).append(tok.string.lstrip("#").strip())
    return {name: " ".join(parts) for name, parts in comments.items()}


def parse_settings(defaults: dict, doc: str | None = None, argv=None, help: dict | None = None,
                   types: dict | None = None) -> argparse.Namespace:
    """One flag per setting: MAX_NEW_TOKENS -> --max-new-tokens, typed like its default.

    Booleans get --flag / --no-flag (also a bool-annotated setting whose default is a word such as
    "auto": `GRADIENT_CHECKPOINTING: bool = "auto"`). A setting whose default is None ("unset": e.g. use the value
    saved with the model) is typed by its annotation in the settings block (`IMAGE_SIZE: str = None`;
    `types`, by default the calling script's annotations), else a string.
    The returned namespace uses the setting names in lower case (args.max_new_tokens).
    Each flag's help is `help[NAME]`, by default the setting's comment in the calling script.
    """
    caller = sys._getframe(1).f_globals
    if help is None:  # the settings block of the script that called us
        help = settings_help(caller.get("__file__", ""))
    if types is None:
        types = caller.get("__annotations__", {})
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in defaults.items():
        flag = "--" + name.lower().replace("_", "-")
        text = (help or {}).get(name, "").replace("%", "%%")  # argparse formats help with %
        if isinstance(value, bool) or types.get(name) in (bool, "bool"):  # also `NAME: bool = "auto"`
            parser.add_argument(flag, dest=name.lower(), default=value, action=argparse.BooleanOptionalAction,
                                help=text if isinstance(value, bool) else f"{text} (default: {value})".strip())
        else:
            kind = type(value) if value is not None else types.get(name, str)
            kind = {"int": int, "float": float, "str": str}.get(kind, kind)  # annotations read as text
            parser.add_argument(flag, dest=name.lower(), default=value, type=kind,
                                help=f"{text} (default: {'unset' if value is None else value})".strip())
    return parser.parse_args(argv)


def started_as_command(script_file) -> bool:
    """True in `python <script_file> ...` (interpreter options allowed, as torchrun starts each process), not
    where other code runs the script's main() (runpy, the tests): what only a process of its own may do
    (end without the interpreter's teardown, keep a library out of its imports) asks this first."""
    words = getattr(sys, "orig_argv", [])[1:]
    i = 0
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] in ("-X", "-W") else 1  # the options that take their value as the next word
    return i < len(words) and Path(words[i]).resolve() == Path(script_file).resolve()
