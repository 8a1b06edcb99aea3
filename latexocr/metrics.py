"""Metrics for LaTeX OCR (formula image -> LaTeX), defined as the field does.

Every string is first whitespace-normalised (runs of whitespace -> one space, ends stripped);
a failed sample (prediction ``None``) counts as an empty prediction, so it scores EM 0,
ED 1 and adds no n-gram matches to BLEU while still counting in the brevity penalty.

- **Exact match (EM)**: 1 if the normalised prediction equals the normalised label, else 0;
  reported as the mean over rows (a fraction in [0, 1]).
- **Edit distance (ED)**: character Levenshtein distance divided by the length of the longer of
  the two normalised strings (UniMERNet's normalised edit distance), in [0, 1], lower is better;
  0 when both are empty. Reported as the mean over rows.
- **Edit distance / ref (ED_ref)**: pix2tex's variant, Levenshtein distance divided by the
  length of the label; it can exceed 1 when the prediction is much longer than the label
  (e.g. repetition loops). An empty label is treated as length 1 (so the value is the number
  of inserted characters, and 0 when both are empty). Mean over rows.
- **BLEU-4**: corpus BLEU (sacrebleu, 0-100 scale, uniform 1-4-gram weights, brevity penalty,
  default 'exp' smoothing which only matters for zero counts) over the dataset's LaTeX tokens:
  labels are KaTeX-normalised with one space between tokens (``\\frac { 1 } { 2 }``), so both
  sides are split on whitespace and passed with ``tokenize='none'``. A prediction written
  without those spaces (``\\frac{1}{2}``) is one token and matches nothing: BLEU measures the
  dataset's token convention, ED only characters. Per-row ``bleu4`` in `sample_scores` is
  sacrebleu's sentence BLEU with ``effective_order=True`` (orders a short pair lacks are skipped).

Levenshtein comes from rapidfuzz and BLEU from sacrebleu; nothing here is hand-rolled.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein
from sacrebleu.metrics import BLEU

__all__ = [
    "normalize",
    "tokenize",
    "exact_match",
    "edit_distance",
    "edit_distance_ref",
    "corpus_bleu",
    "sentence_bleu",
    "sample_scores",
    "summarize",
]

# tokenize='none': the text is already tokenised (split on single spaces by sacrebleu).
# smooth_method='exp' is sacrebleu's default for corpus BLEU (it changes nothing unless an
# n-gram order has zero matches, in which case BLEU is 0, as in the original definition).
_CORPUS_BLEU = BLEU(tokenize="none", smooth_method="exp", max_ngram_order=4)
# Sentence BLEU: sacrebleu's recommended setting for single segments.
_SENTENCE_BLEU = BLEU(tokenize="none", smooth_method="exp", max_ngram_order=4, effective_order=True)


def normalize(text: str | None) -> str:
    """Collapse every run of whitespace to one space and strip the ends; None -> ""."""
    if text is None:
        return ""
    return " ".join(str(text).split())


def tokenize(text: str | None) -> list[str]:
    """The dataset's LaTeX tokens: labels have one space between tokens, so split on whitespace."""
    return normalize(text).split()


def exact_match(pred: str | None, ref: str | None) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return 1.0 if normalize(pred) == normalize(ref) else 0.0


def edit_distance(pred: str | None, ref: str | None) -> float:
    """Levenshtein(pred, ref) / max(len(pred), len(ref)) on normalised strings; 0.0 if both empty."""
    p, r = normalize(pred), normalize(ref)
    if not p and not r:
        return 0.0
    return Levenshtein.distance(p, r) / max(len(p), len(r))


def edit_distance_ref(pred: str | None, ref: str | None) -> float:
    """pix2tex's Levenshtein(pred, ref) / len(ref) on normalised strings; may exceed 1.

    An empty reference is taken as length 1: the result is then len(pred) (0.0 if both empty).
    """
    p, r = normalize(pred), normalize(ref)
    return Levenshtein.distance(p, r) / max(len(r), 1)


def _joined(text: str | None) -> str:
    return " ".join(tokenize(text))


def corpus_bleu(preds: Sequence[str | None], refs: Sequence[str | None]) -> float:
    """Corpus BLEU-4 on the 0-100 scale (sacrebleu) over whitespace-separated LaTeX tokens.

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


def summarize(preds: Sequence[str | None], refs: Sequence[str | None]) -> dict[str, float]:
    """Dataset scores: exact_match, edit_distance, edit_distance_ref (means over rows),
    bleu4 (corpus BLEU-4, 0-100) and n (rows). A None prediction counts as empty.
    An empty input gives n=0 and nan for every metric.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    n = len(refs)
    if n == 0:
        return {"exact_match": math.nan, "edit_distance": math.nan,
                "edit_distance_ref": math.nan, "bleu4": math.nan, "n": 0}
    pairs = list(zip(preds, refs))
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "edit_distance": sum(edit_distance(p, r) for p, r in pairs) / n,
        "edit_distance_ref": sum(edit_distance_ref(p, r) for p, r in pairs) / n,
        "bleu4": corpus_bleu(preds, refs),
        "n": n,
    }
