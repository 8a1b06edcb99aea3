"""Checks behind README's Metrics section, on the LaTeX_OCR labels in ../shared/ (CPU, seconds).

    python bench/metric_checks.py                                   # tokenizer, KaTeX, compact forms
    python bench/metric_checks.py --node-katex node_modules/katex   # + agreement with node's KaTeX
    python bench/metric_checks.py --latex2mathml                    # + what latex2mathml accepts

1. The tokenizer reproduces every label (tokens == label.split()).
2. Which formulas the render check accepts: the labels, and broken variants of them (last "}"
   dropped, an unknown command, a \\left without \\right); compared with KaTeX under node
   (`npm install katex`) and with latex2mathml when asked.
3. Every label written compactly (spaces removed where LaTeX does not need them): scores on
   the tokens vs the old whitespace split.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latexocr import metrics  # noqa: E402
from latexocr.latex import render_error, tokenize  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "latex_ocr"


def labels() -> list[str]:
    files = sorted(SHARED.glob("*/formulas/*.formulas.norm.txt"))
    seen, out = set(), []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip() and line not in seen:
                seen.add(line)
                out.append(line)
    return out


def compact(label: str) -> str:
    """The label without the spaces LaTeX does not need: kept only after a control word before a
    letter, and in a control space (the labels' lone "\\" token is "\\ ")."""
    toks = label.split()
    out = toks[0] if toks else ""
    for prev, tok in zip(toks, toks[1:]):
        needs = (re.fullmatch(r"\\[A-Za-z]+", prev) and re.match(r"[A-Za-z]", tok)) or prev == "\\"
        out += (" " if needs else "") + tok
    return out


def broken(label: str) -> list[str]:
    i = label.rfind("}")
    return ([label[:i] + label[i + 1:]] if i >= 0 else []) + [label + r" \notacommand", r"\left( " + label]


def node_katex_accepts(formulas: list[str], katex_dir: str) -> list[bool]:
    js = ("const k=require(process.argv[1]);let d='';process.stdin.on('data',c=>d+=c).on('end',()=>{"
          "console.log(JSON.stringify(JSON.parse(d).map(f=>{try{k.renderToString(f,{displayMode:true,"
          "throwOnError:true,output:'mathml'});return true}catch(e){return false}})))})")
    out = subprocess.run(["node", "-e", js, str(Path(katex_dir).resolve())], input=json.dumps(formulas),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node-katex", default="", help="a node_modules/katex folder (npm install katex)")
    ap.add_argument("--latex2mathml", action="store_true", help="also run latex2mathml (pip install latex2mathml)")
    args = ap.parse_args()
    refs = labels()
    if not refs:
        raise SystemExit(f"no labels under {SHARED}")
    wrong = [r for r in refs if tokenize(r) != r.split()]
    print(f"1. tokenizer: {len(refs) - len(wrong)}/{len(refs)} distinct labels give label.split()")

    bad = [b for r in refs for b in broken(r)]
    ours_ok = [render_error(r) is None for r in refs]
    ours_bad = [render_error(b) is None for b in bad]
    print(f"2. render check (pykatex): accepts {sum(ours_ok)}/{len(refs)} labels, "
          f"{sum(ours_bad)}/{len(bad)} broken variants")
    for r, ok in zip(refs, ours_ok):
        if not ok:
            print(f"   rejected label: {render_error(r)[:90]}")
    if args.node_katex:
        node_ok = node_katex_accepts(refs, args.node_katex)
        node_bad = node_katex_accepts(bad, args.node_katex)
        agree = sum(a == b for a, b in zip(ours_ok + ours_bad, node_ok + node_bad))
        print(f"   node KaTeX: accepts {sum(node_ok)}/{len(refs)} labels, {sum(node_bad)}/{len(bad)} broken; "
              f"same verdict as pykatex on {agree}/{len(refs) + len(bad)}")
    if args.latex2mathml:
        from latex2mathml.converter import convert

        def l2m(f):
            try:
                convert(f)
                return True
            except Exception:
                return False
        print(f"   latex2mathml: accepts {sum(map(l2m, refs))}/{len(refs)} labels, "
              f"{sum(map(l2m, bad))}/{len(bad)} broken variants")

    preds = [compact(r) for r in refs]
    new = metrics.summarize(preds, refs)
    old_em = sum(p.split() == r.split() for p, r in zip(preds, refs)) / len(refs)
    print(f"3. {len(refs)} labels written compactly: exact_match {new['exact_match']:.3f} "
          f"edit_distance {new['edit_distance']:.4f} bleu4 {new['bleu4']:.2f} render_rate {new['render_rate']:.3f} "
          f"(whitespace tokens: exact_match {old_em:.3f})")


if __name__ == "__main__":
    main()
