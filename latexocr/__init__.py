"""Shared logic of the LaTeX-OCR fine-tuning scripts.

One definition of a sample (prompt, messages, image sizing), of batching, of
generation, of metrics and of tracking, imported by data2csv.py, csv2json.py,
train.py and infer.py so that training and inference can never disagree.
"""

import logging as _logging

# bitsandbytes (QUANTIZATION=4bit; peft imports it whenever it is installed) logs a warning at import
# on CPUs with AVX512-BF16 that an optional CPU kernel from the hub ("kernels-community") is missing:
# every run would start with it though nothing uses that kernel. Checked with bitsandbytes 0.50.2.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
