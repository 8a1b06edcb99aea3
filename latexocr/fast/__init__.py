"""The fast path: everything that makes training fast on a GPU beyond plain transformers + peft, behind one door.

    attention.py  packed attention for the vision tower and the language model (one varlen call);
                  prepare_model (inference and training) and plain_text_attention (generation)
    vision.py     the sync-free packed step of Qwen2-VL (inputs precomputed by the collator), the
                  vision tower as CUDA graphs
    compile.py    torch.compile of the blocks, CUDA graphs, the compile cache, when they pay
    trainer.py    FastTrainer: the step above and host-side replacements of per-step bookkeeping
    plan.py       plan_training: which of the above a training run takes (train.py's settings)
    upstream.py   the private / patched transformers, peft and torch hooks used, checked against versions

The rest of the project reaches it only through latexocr/speed.py; without this package it trains
with plain transformers (tests/test_fast.py). This file imports nothing, so that inference
(attention.py only) never loads the training code of trainer.py / plan.py.
"""
