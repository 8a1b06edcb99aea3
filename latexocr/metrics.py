"""Metrics for LaTeX OCR (formula image -> LaTeX), scored over LaTeX tokens, not characters.

Both sides are first cut into the dataset's LaTeX tokens (:func:`latexocr.latex.tokenize`: math
delimiters and code fences stripped; labels give exactly ``label.split()``, and compact
``\\frac{1}{2}`` gives the same tokens as ``\\frac { 1 } { 2 }``). A failed sample (prediction
``None``) counts as an empty prediction: EM 0, ED 1, no n-gram matches, not rendered.

- **exact_match**: 1 if the token sequences are equal, else 0; mean over rows.
- **edit_distance**: token Levenshtein distance / the longer sequence's length (UniMERNet's
  normalised edit distance, on tokens), in [0, 1], 0 when both are empty; mean over rows.
- **edit_distance_ref**: token Levenshtein distance / the label's length (pix2tex's variant);
  exceeds 1 when the prediction is much longer (repetition loops). An empty label counts as 1.
- **bleu4**: corpus BLEU-4 (sacrebleu, 0-100, default 'exp' smoothing) over the tokens joined by
  spaces with ``tokenize='none'``. Per-row ``bleu4`` in `sample_scores` is sentence BLEU with
  ``effective_order=True``.
- **render_rate**: share of predictions KaTeX (the parser that normalised the labels) accepts.
- **truncated_rate**: share of predictions that hit the generation limit (MAX_NEW_TOKENS) before
  the end of turn: the repetition-loop signal. Only when the caller passes the flags.

Levenshtein comes from rapidfuzz (on token lists), BLEU from sacrebleu, the parser is KaTeX.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein
from sacrebleu.metrics import BLEU

from .latex import render_error
from .latex import tokenize as latex_tokens

__all__ = [
    "normalize",
    "tokenize",
    "exact_match",
    "edit_distance",
    "edit_distance_ref",
    "corpus_bleu",
    "sentence_bleu",
    "render_ok",
    "sample_scores",
    "summarize",
    "worst_first",
]

# tokenize='none': the text is already tokenised (split on single spaces by sacrebleu).
# smooth_method='exp' is sacrebleu's default for corpus BLEU (it changes nothing unless an
# n-gram order has zero matches, in which case BLEU is 0, as in the original definition).
_CORPUS_BLEU = BLEU(tokenize="none", smooth_method="exp", max_ngram_order=4)
# Sentence BLEU: sacrebleu's recommended setting for single segments.
_SENTENCE_BLEU = BLEU(tokenize="none", smooth_method="exp", max_ngram_order=4, effective_order=True)


def tokenize(text: str | None) -> list[str]:
    """The dataset's LaTeX tokens (see latexocr.latex.tokenize); None -> []."""
    return latex_tokens(text)


def normalize(text: str | None) -> str:
    """The formula in the labels' form: its tokens joined by single spaces; None -> ""."""
    return " ".join(tokenize(text))


def exact_match(pred: str | None, ref: str | None) -> float:
    """1.0 if the token sequences are equal, else 0.0."""
    return 1.0 if tokenize(pred) == tokenize(ref) else 0.0


def edit_distance(pred: str | None, ref: str | None) -> float:
    """Token Levenshtein(pred, ref) / max(len(pred), len(ref)) in tokens; 0.0 if both empty."""
    p, r = tokenize(pred), tokenize(ref)
    if not p and not r:
        return 0.0
    return Levenshtein.distance(p, r) / max(len(p), len(r))


def edit_distance_ref(pred: str | None, ref: str | None) -> float:
    """pix2tex's Levenshtein(pred, ref) / len(ref), in tokens; may exceed 1.

    An empty reference is taken as length 1: the result is then len(pred) (0.0 if both empty).
    """
    p, r = tokenize(pred), tokenize(ref)
    return Levenshtein.distance(p, r) / max(len(r), 1)


def render_ok(pred: str | None) -> bool:
    """True when KaTeX parses the prediction (an empty or failed one does not render)."""
    return render_error(pred) is None


_joined = normalize


def corpus_bleu(preds: Sequence[str | None], refs: Sequence[str | None]) -> float:
    """Corpus BLEU-4 on the 0-100 scale (sacrebleu) over LaTeX tokens.

    None / empty predictions are allowed (they contribute length 0). Raises ValueError on
    mismatched lengths; returns nan for an empty corpus.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if len(refs) == 0:
        return math.nan
    hyps = [_joined(p) for p in preds]
    refs_ = [_joined(r) for r in refs]
    return float(_CORPUS_BLEU.corpus_score(hyps, [refs_]).score)


def sentence_bleu(pred: str | None, ref: str | None) -> float:
    """Sentence BLEU-4 (0-100, sacrebleu, effective order) over LaTeX tokens.

    0.0 if exactly one side is empty, 100.0 if both are.
    """
    hyp, r = _joined(pred), _joined(ref)
    if not hyp or not r:
        return 100.0 if hyp == r else 0.0
    return float(_SENTENCE_BLEU.sentence_score(hyp, [r]).score)


def sample_scores(pred: str | None, ref: str | None) -> dict[str, float]:
    """Per-row scores: exact_match, edit_distance, edit_distance_ref, bleu4 (sentence BLEU, 0-100)."""
    return {
        "exact_match": exact_match(pred, ref),
        "edit_distance": edit_distance(pred, ref),
        "edit_distance_ref": edit_distance_ref(pred, ref),
        "bleu4": sentence_bleu(pred, ref),
    }


def _rate(flags: Sequence) -> float:
    return sum(bool(f) for f in flags) / len(flags) if len(flags) else math.nan


def summarize(preds: Sequence[str | None], refs: Sequence[str | None],
              truncated: Sequence[bool] | None = None,
              rendered: Sequence[bool] | None = None) -> dict[str, float]:
    """Dataset scores: exact_match, edit_distance, edit_distance_ref (means over rows),
    bleu4 (corpus BLEU-4, 0-100), render_rate, truncated_rate (when ``truncated`` flags are
    given) and n (rows). A None prediction counts as empty. ``rendered`` may pass render_ok
    flags already computed per row. An empty input gives n=0 and nan for every metric.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    n = len(refs)
    if n == 0:
        out = {"exact_match": math.nan, "edit_distance": math.nan, "edit_distance_ref": math.nan,
               "bleu4": math.nan, "render_rate": math.nan, "n": 0}
        return out if truncated is None else {**out, "truncated_rate": math.nan}
    pairs = list(zip(preds, refs))
    out = {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "edit_distance": sum(edit_distance(p, r) for p, r in pairs) / n,
        "edit_distance_ref": sum(edit_distance_ref(p, r) for p, r in pairs) / n,
        "bleu4": corpus_bleu(preds, refs),
        "render_rate": _rate(rendered if rendered is not None else [render_ok(p) for p in preds]),
    }
    if truncated is not None:
        if len(truncated) != n:
            raise ValueError(f"{len(truncated)} truncated flags for {n} rows")
        out["truncated_rate"] = _rate(truncated)
    out["n"] = n
    return out


def worst_first(rows: Sequence[dict]) -> list[dict]:
    """Rows carrying score columns (evaluation.score_row's), worst first: highest edit distance,
    then not rendered, then truncated. The one order of the HTML report and the dashboard."""
    return sorted(rows, key=lambda r: (-r["edit_distance"], r["render_ok"], not r["truncated"]))
