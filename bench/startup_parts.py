"""Where a process's start-up goes on this host, before any model: each library's import and the CUDA context.

    python bench/startup_parts.py        # one fresh process; run it twice, the first pays the disk cache

Imports are timed in the order infer.py meets them. torchvision comes before dynamo because it imports dynamo
(torchvision.ops.roi_align), and transformers imports torchvision for the Qwen-VL image processors, so that
import is part of every start-up. The CUDA rows say whether starting the context early would pay.
"""
import time

start = last = time.perf_counter()
parts = []


def mark(name: str) -> None:
    global last
    now = time.perf_counter()
    parts.append(f"{name} {now - last:.2f}")
    last = now


import torch  # noqa: E402

mark("torch")
import transformers  # noqa: E402,F401

mark("transformers")
import torchvision  # noqa: E402,F401

mark("torchvision (imports dynamo)")
import torch._dynamo  # noqa: E402,F401

mark("dynamo rest")
import torch.nn.attention.varlen  # noqa: E402,F401

mark("varlen")
import peft  # noqa: E402,F401

mark("peft")
if torch.cuda.is_available():
    torch.cuda.init()
    mark("cuda init")
    torch.empty(1, device="cuda")
    mark("first tensor")
    x = torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    mark("first matmul (cuBLAS)")
print(f"startup parts, s: {', '.join(parts)}; total {time.perf_counter() - start:.2f}", flush=True)
