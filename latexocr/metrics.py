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

Each row is tokenised once: :func:`score_pair` gives its four scores and its BLEU sufficient
statistics; :func:`aggregate` turns scored rows into the summary (means, and corpus BLEU from the
summed statistics, which is what sacrebleu's corpus_score computes) without scoring anything again.
Levenshtein comes from rapidfuzz (on token lists), BLEU from sacrebleu, the parser is KaTeX.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

from .latex import render_error, render_errors
from .latex import tokenize as latex_tokens

__all__ = [
    "normalize",
    "tokenize",
    "exact_match",
    "edit_distance",
    "edit_distance_ref",
    "corpus_bleu",
    "corpus_bleu_from_stats",
    "sentence_bleu",
    "render_ok",
    "render_flags",
    "score_pair",
    "sample_scores",
    "aggregate",
    "summarize",
    "worst_first",
]

MAX_NGRAM_ORDER = 4


def tokenize(text: str | None) -> list[str]:
    """The dataset's LaTeX tokens (see latexocr.latex.tokenize); None -> []."""
    return latex_tokens(text)


def normalize(text: str | None) -> str:
    """The formula in the labels' form: its tokens joined by single spaces; None -> ""."""
    return " ".join(tokenize(text))


def exact_match(pred: str | None, ref: str | None) -> float:
    """1.0 if the token sequences are equal, else 0.0."""
    return score_pair(pred, ref)[0]["exact_match"]


def edit_distance(pred: str | None, ref: str | None) -> float:
    """Token Levenshtein(pred, ref) / max(len(pred), len(ref)) in tokens; 0.0 if both empty."""
    return score_pair(pred, ref)[0]["edit_distance"]


def edit_distance_ref(pred: str | None, ref: str | None) -> float:
    """pix2tex's Levenshtein(pred, ref) / len(ref), in tokens; may exceed 1.

    An empty reference is taken as length 1: the result is then len(pred) (0.0 if both empty).
    """
    return score_pair(pred, ref)[0]["edit_distance_ref"]


def sentence_bleu(pred: str | None, ref: str | None) -> float:
    """Sentence BLEU-4 (0-100, sacrebleu, effective order) over LaTeX tokens.

    0.0 if exactly one side is empty, 100.0 if both are.
    """
    return score_pair(pred, ref)[0]["bleu4"]


# A model repeats itself (the same wrong formula for many images, or a label it has learnt), and
# KaTeX costs ~1 ms on a label but ~12 ms on a long looping output: each distinct string is parsed once.
@functools.lru_cache(maxsize=1 << 16)
def _renders(text: str) -> bool:
    return render_error(text) is None


def render_ok(pred: str | None) -> bool:
    """True when KaTeX parses the prediction (an empty or failed one does not render)."""
    return pred is not None and _renders(str(pred))


def render_flags(texts: Sequence[str], processes: int = 1) -> list[bool]:
    """render_ok of each text, KaTeX asked once for all of them, split over ``processes`` (scoring's
    chunks: ~0.1 s of parsing that the scoring process overlaps with score_pair)."""
    return [error is None for error in render_errors(texts, processes)]


def score_pair(pred: str | None, ref: str | None) -> tuple[dict[str, float], tuple[int, ...]]:
    """(the row's exact_match, edit_distance, edit_distance_ref, bleu4; its BLEU sufficient
    statistics) from one tokenisation of each side. The statistics are sacrebleu's per-segment
    ones (hyp length, ref length, matched 1..4-grams, hypothesis 1..4-grams): summed over rows
    they give corpus BLEU (see :func:`aggregate`)."""
    p = tokenize(pred)
    r = p if ref == pred else tokenize(ref)  # most rows of a good model: one string, tokenised once
    distance = Levenshtein.distance(p, r)
    stats = _bleu_statistics(p, r)
    scores = {
        "exact_match": 1.0 if p == r else 0.0,
        "edit_distance": distance / max(len(p), len(r)) if p or r else 0.0,
        "edit_distance_ref": distance / max(len(r), 1),
        # sacrebleu gives an empty side 0; both empty is a perfect answer to an empty label
        "bleu4": _sentence_bleu(stats) if p and r else (100.0 if p == r else 0.0),
    }
    return scores, stats


def _bleu_statistics(p: list[str], r: list[str]) -> tuple[int, ...]:
    """sacrebleu's segment statistics for one reference (what ``BLEU(tokenize="none")`` extracts
    from the tokens joined by spaces: no token holds a space), counted here without its n-gram helper,
    which built every n-gram of both sides (its public route, ``sentence_score``, cost twice that).
    An n-gram inside the tokens both sides begin with, or inside those they end with, is on both
    sides: only the n-grams touching the part between are compared (a wrong row of a good model
    differs in a token or two). tests/test_score.py checks the two agree."""
    if p == r:  # 60 % of a good model's rows: every n-gram matches
        counts = [max(0, len(p) - k) for k in range(MAX_NGRAM_ORDER)]
        return (len(p), len(p), *counts, *counts)
    prefix, suffix = _common_ends(p, r)
    correct, total = [], []
    for n in range(1, MAX_NGRAM_ORDER + 1):
        shared = max(0, prefix - n + 1) + max(0, suffix - n + 1)  # the n-grams inside the common ends
        correct.append(shared + _matched(_middle_ngrams(p, n, prefix, suffix), _middle_ngrams(r, n, prefix, suffix)))
        total.append(max(0, len(p) - n + 1))
    return (len(p), len(r), *correct, *total)


def _common_ends(p: list[str], r: list[str]) -> tuple[int, int]:
    """(tokens both begin with, tokens both end with after those): the two never overlap."""
    shortest, prefix = min(len(p), len(r)), 0
    while prefix < shortest and p[prefix] == r[prefix]:
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix and p[-1 - suffix] == r[-1 - suffix]:
        suffix += 1
    return prefix, suffix


def _middle_ngrams(tokens: list[str], n: int, prefix: int, suffix: int) -> list[tuple[str, ...]]:
    """The n-grams of ``tokens`` not inside its first ``prefix`` or last ``suffix`` tokens."""
    first, last = max(0, prefix - n + 1), min(len(tokens) - n, len(tokens) - suffix - 1)
    return [tuple(tokens[i:i + n]) for i in range(first, last + 1)]


def _matched(hyp: list[tuple[str, ...]], ref: list[tuple[str, ...]]) -> int:
    """Hypothesis n-grams found in the reference, each reference n-gram used once: sum(min(counts)). The
    lists are a few n-grams long: a dict of the reference's costs less than two Counters."""
    left: dict[tuple[str, ...], int] = {}
    for ngram in ref:
        left[ngram] = left.get(ngram, 0) + 1
    matched = 0
    for ngram in hyp:
        if left.get(ngram):
            left[ngram] -= 1
            matched += 1
    return matched


def _bleu(stats: Sequence[int], effective_order: bool) -> float:
    """BLEU-4 (0-100) from (summed) statistics, sacrebleu's 'exp' smoothing: effective order for a
    sentence (sacrebleu's recommendation), the full order for a corpus (``corpus_score``'s)."""
    from sacrebleu.metrics import BLEU  # here: infer.py --score imports it while KaTeX's children already parse

    n = MAX_NGRAM_ORDER
    return float(BLEU.compute_bleu(correct=list(stats[2:2 + n]), total=list(stats[2 + n:]), sys_len=stats[0],
                                   ref_len=stats[1], smooth_method="exp", effective_order=effective_order,
                                   max_ngram_order=n).score)


# Rows with the same statistics have the same sentence BLEU: exact predictions of the same length (most rows)
@functools.lru_cache(maxsize=1 << 16)
def _sentence_bleu(stats: tuple[int, ...]) -> float:
    return _bleu(stats, effective_order=True)


def sample_scores(pred: str | None, ref: str | None) -> dict[str, float]:
    """Per-row scores: exact_match, edit_distance, edit_distance_ref, bleu4 (sentence BLEU, 0-100)."""
    return score_pair(pred, ref)[0]


def corpus_bleu_from_stats(stats: Sequence[Sequence[int]]) -> float:
    """Corpus BLEU-4 (0-100, sacrebleu's default 'exp' smoothing) from per-row statistics
    (score_pair's): what ``BLEU.corpus_score`` computes from the same rows; nan for no rows.
    corpus_score itself is not called, nor its "you forgot to detokenize" warning (printed when
    100 lines end in " .": this text is tokenised on purpose)."""
    if not len(stats):
        return math.nan
    return _bleu([sum(column) for column in zip(*stats)], effective_order=False)


def corpus_bleu(preds: Sequence[str | None], refs: Sequence[str | None]) -> float:
    """Corpus BLEU-4 on the 0-100 scale (sacrebleu) over LaTeX tokens.

    None / empty predictions are allowed (they contribute length 0). Raises ValueError on
    mismatched lengths; returns nan for an empty corpus.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    return corpus_bleu_from_stats([score_pair(p, r)[1] for p, r in zip(preds, refs)])


def _rate(flags: Sequence) -> float:
    return sum(bool(f) for f in flags) / len(flags) if len(flags) else math.nan


def aggregate(scores: Sequence[dict], bleu_stats: Sequence[Sequence[int]], truncated: bool = False) -> dict[str, float]:
    """Dataset scores from scored rows (dicts with score_pair's four scores and render_ok, plus
    truncated when ``truncated``) and their BLEU statistics: the means over rows, corpus BLEU-4,
    render_rate, truncated_rate (when asked) and n. Nothing is re-scored. No rows: n=0, nan for
    every metric."""
    if len(scores) != len(bleu_stats):
        raise ValueError(f"{len(bleu_stats)} BLEU statistics for {len(scores)} rows")
    n = len(scores)
    out = {key: sum(s[key] for s in scores) / n if n else math.nan
           for key in ("exact_match", "edit_distance", "edit_distance_ref")}
    out["bleu4"] = corpus_bleu_from_stats(bleu_stats)
    out["render_rate"] = _rate([s["render_ok"] for s in scores])
    if truncated:
        out["truncated_rate"] = _rate([s["truncated"] for s in scores])
    out["n"] = n
    return out


def summarize(preds: Sequence[str | None], refs: Sequence[str | None],
              truncated: Sequence[bool] | None = None) -> dict[str, float]:
    """Dataset scores of raw predictions: exact_match, edit_distance, edit_distance_ref (means over
    rows), bleu4 (corpus BLEU-4, 0-100), render_rate, truncated_rate (when ``truncated`` flags are
    given) and n (rows). A None prediction counts as empty. An empty input gives n=0 and nan for
    every metric. Rows already scored (latexocr.scoring) are summarised by :func:`aggregate`.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if truncated is not None and len(truncated) != len(refs):
        raise ValueError(f"{len(truncated)} truncated flags for {len(refs)} rows")
    scores, stats = [], []
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        row, row_stats = score_pair(pred, ref)
        row["render_ok"] = render_ok(pred)
        if truncated is not None:
            row["truncated"] = bool(truncated[i])
        scores.append(row)
        stats.append(row_stats)
    return aggregate(scores, stats, truncated=truncated is not None)


def worst_first(rows: Sequence[dict]) -> list[dict]:
    """Rows carrying score columns (scoring.score_row's), worst first: highest edit distance,
    then not rendered, then truncated. The one order of the HTML report and the dashboard."""
    return sorted(rows, key=lambda r: (-r["edit_distance"], r["render_ok"], not r["truncated"]))
