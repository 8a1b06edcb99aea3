"""One self-contained HTML page of predictions a person can look at (infer.py --report).

Each row: the input image (embedded as a data: URI), the prediction and the label rendered as
formulas, and the row's scores, worst first. Formulas are KaTeX's MathML, produced here in Python:
browsers render MathML natively, so the page needs no script, font or stylesheet from a CDN and
opens offline. A formula KaTeX rejects is shown as its raw LaTeX with KaTeX's error, marked as a
failure.
"""
from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path

from .io import atomic_open
from .latex import render

__all__ = ["write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .5em; vertical-align: middle; text-align: left; }
td.image img { max-width: 420px; max-height: 120px; border: 1px solid #eee; }
td.formula { font-size: 1.15em; min-width: 14em; }
.fail { background: #fdecea; }
.fail code { display: block; white-space: pre-wrap; word-break: break-all; font-size: .8em; }
.fail .why { color: #b00020; font-size: .8em; }
.scores { font-variant-numeric: tabular-nums; white-space: nowrap; font-size: .85em; }
table.summary { width: auto; margin-bottom: 1.5em; font-variant-numeric: tabular-nums; }
table.summary th { font-weight: normal; color: #555; font-size: .85em; }
"""


def _image_cell(path) -> str:
    try:
        data = Path(path).read_bytes()
    except (OSError, TypeError) as exc:
        return f'<td class="image fail"><span class="why">image not readable: {html.escape(str(exc))}</span></td>'
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<td class="image"><img src="{uri}" alt="{html.escape(str(path))}"></td>'


def _formula_cell(latex: str | None, kind: str) -> str:
    """The formula as MathML, or its raw text marked as a failure."""
    mathml, error = render(latex)  # one KaTeX call: the verdict and the MathML together
    if error is None:
        return f'<td class="formula {kind}" data-rendered="1">{mathml}</td>'
    raw = "" if latex is None else str(latex)
    return (f'<td class="formula {kind} fail" data-rendered="0"><code>{html.escape(raw)}</code>'
            f'<span class="why">does not render: {html.escape(error)}</span></td>')


def _scores_cell(row: dict) -> str:
    parts = []
    for key, label in (("exact_match", "EM"), ("edit_distance", "ED"), ("bleu4", "BLEU")):
        if row.get(key) is not None and row.get(key) != "":
            parts.append(f"{label} {float(row[key]):.3g}")
    if row.get("truncated"):
        parts.append("<b>hit MAX_NEW_TOKENS</b>")
    if row.get("error"):
        parts.append(f"error: {html.escape(str(row['error']))}")
    return f'<td class="scores">{"<br>".join(parts)}</td>'


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(rows: list[dict], path, summary: dict | None = None, title: str = "LaTeX OCR predictions") -> Path:
    """Write ``rows`` (image, prediction, optional label and score_row's columns) to one HTML
    file, in the given order (sort worst first before calling); never half-written."""
    path = Path(path)
    labelled = any("label" in r for r in rows)
    head = "<tr><th>#</th><th>image</th><th>prediction</th>" + ("<th>label</th><th>scores</th>" if labelled else "") + "</tr>"
    body = []
    for i, row in enumerate(rows, 1):
        cells = [f"<td>{i}</td>", _image_cell(row.get("image")), _formula_cell(row.get("prediction"), "prediction")]
        if labelled:
            cells += [_formula_cell(row.get("label"), "label"), _scores_cell(row)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    summary_line = ""
    if summary:  # every metric of the summary, one column each, in the summary's order
        summary_line = ('<table class="summary"><tr>' + "".join(f"<th>{html.escape(str(k))}</th>" for k in summary)
                        + "</tr><tr>" + "".join(f"<td>{html.escape(_number(v))}</td>" for v in summary.values())
                        + "</tr></table>")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{summary_line}"
            f"<table><thead>{head}</thead><tbody>\n" + "\n".join(body) + "\n</tbody></table></body></html>\n")
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
