"""Command-line flags made from a script's UPPER_CASE settings, so the two can never drift apart."""
from __future__ import annotations

import argparse


def parse_settings(defaults: dict, doc: str | None = None, argv=None, help: dict | None = None) -> argparse.Namespace:
    """One flag per setting: MAX_NEW_TOKENS -> --max-new-tokens, typed like its default.

    Booleans get --flag / --no-flag. Settings whose default is None take a string.
    The returned namespace uses the setting names in lower case (args.max_new_tokens).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in defaults.items():
        flag = "--" + name.lower().replace("_", "-")
        text = (help or {}).get(name, "")
        if isinstance(value, bool):
            parser.add_argument(flag, dest=name.lower(), default=value, action=argparse.BooleanOptionalAction,
                                help=text)
        else:
            kind = type(value) if value is not None else str
            parser.add_argument(flag, dest=name.lower(), default=value, type=kind,
                                help=f"{text} (default: {value})".strip())
    return parser.parse_args(argv)


def settings_given(defaults: dict, argv=None) -> set[str]:
    """The settings (UPPER_CASE names) passed on the command line, e.g. {"IMAGE_SIZE"}: a value
    saved with a model yields to these (latexocr/sample.py), so it must know which were typed."""
    parser = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for name, value in defaults.items():
        flag = "--" + name.lower().replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, dest=name.lower(), action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, dest=name.lower())
    given, _ = parser.parse_known_args(argv)
    return {name.upper() for name in vars(given)}
