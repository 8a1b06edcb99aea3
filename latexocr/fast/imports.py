"""Imports a run does not need, kept out of its process.

peft imports bitsandbytes wherever it is installed (peft 0.21 `peft/helpers.py`, at `import peft`), and
bitsandbytes 0.50 wraps its default ops in torch.compile as it is imported (`bitsandbytes/backends/default/
ops.py`), which imports torch's inductor: 1.8-2.5 s of every start that imports peft (infer.py with an adapter, a
LoRA train.py) on an H100 host, ~1 s on this repo's 2-core CPU box (docs/BENCHMARKS.md run AH), for a library
that only a 4-bit model (QUANTIZATION=4bit) uses, and which requirements.txt installs for it.

A None entry in sys.modules is Python's documented way to make a module unimportable: `import` raises
ImportError and `importlib.util.find_spec` answers None, which peft (`is_bnb_available`), transformers
(`is_bitsandbytes_available`) and accelerate read as "not installed", as in a setup without bitsandbytes.
peft keeps that answer for the process's life, so only a script's own process does this (cli.started_as_command),
never code that may load a 4-bit model later in the same process (the tests run the scripts' main() in theirs).

Checked against peft 0.21.2, bitsandbytes 0.50.2, transformers 5.24.0 and 5.25.0: tests/test_infer.py
`test_a_command_with_an_adapter_imports_no_bitsandbytes` runs infer.py and train.py as commands and fails if
either imports it, or if the adapter no longer loads without it.
"""
from __future__ import annotations

import sys

from .choices import speed_choices


def leave_out_bitsandbytes(quantization: str) -> bool:
    """Make bitsandbytes unimportable in this process when no 4-bit model is asked for (QUANTIZATION=none), the
    speed choice skip_bitsandbytes is on, and nothing imported it yet. True if it did so."""
    if quantization != "none" or not speed_choices().skip_bitsandbytes or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None
    return True
