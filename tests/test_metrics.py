"""Hand-computed checks of latexocr.metrics (expected values derived by hand, not by the code)."""
import math

import pytest

from latexocr import metrics as M

REF = r"\frac { 1 } { 2 }"  # 17 characters, 7 tokens
SUB = r"\frac { 1 } { 3 }"  # one token (and one character) substituted
TOL = 1e-9

# One-token substitution, 7 tokens each side, BP = 1.
# matches: 1-grams 6/7, 2-grams 4/6, 3-grams 3/5, 4-grams 2/4  ->  product = 144/840 = 6/35
SUB_BLEU = 100 * (6 / 35) ** 0.25  # = 64.3458884...


def test_normalize_and_tokenize():
    assert M.normalize(None) == ""
    assert M.normalize("  a \t b\n c ") == "a b c"
    assert M.tokenize(REF) == ["\\frac", "{", "1", "}", "{", "2", "}"]
    assert M.tokenize(None) == []


def test_identical():
    assert M.exact_match(REF, REF) == 1.0
    assert M.edit_distance(REF, REF) == 0.0
    assert M.edit_distance_ref(REF, REF) == 0.0
    assert M.corpus_bleu([REF], [REF]) == pytest.approx(100.0, abs=1e-9)
    assert M.sample_scores(REF, REF)["bleu4"] == pytest.approx(100.0, abs=1e-9)


def test_one_token_substitution():
    assert len(REF) == 17 and len(M.tokenize(REF)) == 7
    assert M.exact_match(SUB, REF) == 0.0
    assert M.edit_distance(SUB, REF) == pytest.approx(1 / 17, abs=TOL)
    assert M.edit_distance_ref(SUB, REF) == pytest.approx(1 / 17, abs=TOL)
    assert SUB_BLEU == pytest.approx(64.3458884, abs=1e-6)
    assert M.corpus_bleu([SUB], [REF]) == pytest.approx(SUB_BLEU, abs=1e-6)
    s = M.sample_scores(SUB, REF)
    assert s == pytest.approx({"exact_match": 0.0, "edit_distance": 1 / 17,
                               "edit_distance_ref": 1 / 17, "bleu4": SUB_BLEU}, abs=1e-6)


@pytest.mark.parametrize("empty", ["", "   ", None])
def test_empty_prediction(empty):
    assert M.exact_match(empty, REF) == 0.0
    assert M.edit_distance(empty, REF) == 1.0
    assert M.edit_distance_ref(empty, REF) == 1.0
    assert M.corpus_bleu([empty], [REF]) == 0.0
    assert M.sample_scores(empty, REF) == {"exact_match": 0.0, "edit_distance": 1.0,
                                          "edit_distance_ref": 1.0, "bleu4": 0.0}


def test_both_empty():
    assert M.exact_match("", None) == 1.0
    assert M.edit_distance("", "") == 0.0
    assert M.edit_distance_ref(None, "") == 0.0
    assert M.sample_scores("", "")["bleu4"] == 100.0


def test_empty_reference_counts_as_length_one():
    assert M.edit_distance_ref("ab", "") == 2.0
    assert M.edit_distance("ab", "") == 1.0


def test_whitespace_only_difference():
    assert M.exact_match("a  b", " a b ") == 1.0
    assert M.edit_distance("a  b", " a b ") == 0.0
    assert M.edit_distance_ref("a\tb\n", "a b") == 0.0
    spaced = "a  b   c d\n"
    assert M.corpus_bleu([spaced], ["a b c d"]) == pytest.approx(100.0, abs=1e-9)


def test_unspaced_latex_is_not_whitespace_only():
    pred = r"\frac{1}{2}"  # 11 chars: REF with its 6 spaces removed; a single token
    assert M.exact_match(pred, REF) == 0.0
    assert M.edit_distance(pred, REF) == pytest.approx(6 / 17, abs=TOL)
    assert M.edit_distance_ref(pred, REF) == pytest.approx(6 / 17, abs=TOL)
    assert M.corpus_bleu([pred], [REF]) == 0.0


def test_edit_distance_ref_exceeds_one_for_long_garbage():
    pred = "x x x x x"  # 9 chars vs ref "x": 8 insertions
    assert M.edit_distance_ref(pred, "x") == pytest.approx(8.0, abs=TOL)
    assert M.edit_distance(pred, "x") == pytest.approx(8 / 9, abs=TOL)


def test_brevity_penalty():
    # all n-gram precisions 1, c = 4, r = 8  ->  BP = exp(1 - 8/4) = e^-1
    assert M.corpus_bleu(["a b c d"], ["a b c d e f g h"]) == pytest.approx(100 * math.exp(-1), abs=1e-6)


def test_summarize_mix():
    preds = [REF, SUB, None]
    refs = [REF, REF, REF]
    out = M.summarize(preds, refs)
    assert out["n"] == 3
    assert out["exact_match"] == pytest.approx(1 / 3, abs=TOL)
    assert out["edit_distance"] == pytest.approx((0 + 1 / 17 + 1) / 3, abs=TOL)
    assert out["edit_distance_ref"] == pytest.approx((0 + 1 / 17 + 1) / 3, abs=TOL)
    # corpus: hyp length 7+7+0 = 14, ref length 21 -> BP = exp(1 - 21/14) = exp(-0.5)
    # matches 1g (7+6)/14, 2g (6+4)/12, 3g (5+3)/10, 4g (4+2)/8 -> product 6240/13440 = 13/28
    expected = 100 * math.exp(-0.5) * (13 / 28) ** 0.25
    assert out["bleu4"] == pytest.approx(expected, abs=1e-6)
    # corpus BLEU is not the mean of sentence BLEUs
    assert out["bleu4"] != pytest.approx((100 + SUB_BLEU + 0) / 3, abs=1e-3)
    assert set(out) == {"exact_match", "edit_distance", "edit_distance_ref", "bleu4", "n"}


def test_summarize_edge_cases():
    out = M.summarize([], [])
    assert out["n"] == 0 and all(math.isnan(out[k]) for k in out if k != "n")
    with pytest.raises(ValueError):
        M.summarize(["a"], [])
    with pytest.raises(ValueError):
        M.corpus_bleu(["a"], ["a", "b"])
