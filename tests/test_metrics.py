"""Hand-computed checks of latexocr.metrics (expected values derived by hand, not by the code)."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from latexocr import metrics as M
from latexocr.latex import render_error, strip_math, tokenize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "latex_ocr"

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
    assert M.edit_distance(SUB, REF) == pytest.approx(1 / 7, abs=TOL)  # tokens, not characters
    assert M.edit_distance_ref(SUB, REF) == pytest.approx(1 / 7, abs=TOL)
    assert SUB_BLEU == pytest.approx(64.3458884, abs=1e-6)
    assert M.corpus_bleu([SUB], [REF]) == pytest.approx(SUB_BLEU, abs=1e-6)
    s = M.sample_scores(SUB, REF)
    assert s == pytest.approx({"exact_match": 0.0, "edit_distance": 1 / 7,
                               "edit_distance_ref": 1 / 7, "bleu4": SUB_BLEU}, abs=1e-6)


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
    assert M.edit_distance_ref("ab", "") == 2.0  # two tokens inserted
    assert M.edit_distance("ab", "") == 1.0


def test_whitespace_only_difference():
    assert M.exact_match("a  b", " a b ") == 1.0
    assert M.edit_distance("a  b", " a b ") == 0.0
    assert M.edit_distance_ref("a\tb\n", "a b") == 0.0
    spaced = "a  b   c d\n"
    assert M.corpus_bleu([spaced], ["a b c d"]) == pytest.approx(100.0, abs=1e-9)


def test_edit_distance_ref_exceeds_one_for_long_garbage():
    pred = "x x x x x"  # 5 tokens vs ref "x": 4 insertions
    assert M.edit_distance_ref(pred, "x") == pytest.approx(4.0, abs=TOL)
    assert M.edit_distance(pred, "x") == pytest.approx(4 / 5, abs=TOL)


def test_brevity_penalty():
    # all n-gram precisions 1, c = 4, r = 8  ->  BP = exp(1 - 8/4) = e^-1
    assert M.corpus_bleu(["a b c d"], ["a b c d e f g h"]) == pytest.approx(100 * math.exp(-1), abs=1e-6)


def test_summarize_mix():
    preds = [REF, SUB, None]
    refs = [REF, REF, REF]
    out = M.summarize(preds, refs)
    assert out["n"] == 3
    assert out["exact_match"] == pytest.approx(1 / 3, abs=TOL)
    assert out["edit_distance"] == pytest.approx((0 + 1 / 7 + 1) / 3, abs=TOL)
    assert out["edit_distance_ref"] == pytest.approx((0 + 1 / 7 + 1) / 3, abs=TOL)
    # corpus: hyp length 7+7+0 = 14, ref length 21 -> BP = exp(1 - 21/14) = exp(-0.5)
    # matches 1g (7+6)/14, 2g (6+4)/12, 3g (5+3)/10, 4g (4+2)/8 -> product 6240/13440 = 13/28
    expected = 100 * math.exp(-0.5) * (13 / 28) ** 0.25
    assert out["bleu4"] == pytest.approx(expected, abs=1e-6)
    # corpus BLEU is not the mean of sentence BLEUs
    assert out["bleu4"] != pytest.approx((100 + SUB_BLEU + 0) / 3, abs=1e-3)
    assert set(out) == {"exact_match", "edit_distance", "edit_distance_ref", "bleu4", "render_rate", "n"}
    assert out["render_rate"] == pytest.approx(2 / 3, abs=TOL)  # the failed sample does not render


def test_summarize_edge_cases():
    out = M.summarize([], [])
    assert out["n"] == 0 and all(math.isnan(out[k]) for k in out if k != "n")
    with pytest.raises(ValueError):
        M.summarize(["a"], [])
    with pytest.raises(ValueError):
        M.corpus_bleu(["a"], ["a", "b"])


# ------------------------------------------------------------------ the dataset's LaTeX tokens
# Hand-written labels in the dataset's form, covering its fused tokens (\left( \right. \begin{array})
HAND_LABELS = [
    r"\frac { 1 } { 2 }",
    r"\mathrm { h o p f } \simeq \sum _ { n > 0 } \widetilde { G } _ { n }",
    r"\left( x \right) + \left[ y \right] + \left\{ z \right\} + \left\{ w \right.",
    r"\begin{array} { l l } { a } & { b } \\ { c } & { d } \end{array}",
    r"a \, b \! c \: d \; e \{ f \} \leftarrow \rightarrow g ^ { \prime }",
    r"{ \cal L } _ { a } g = 0 , \; \; \mathbf { x } \in \mathbb { R } ^ { 3 } .",
    r"D _ { -- } + \Psi ^ { --- } - - x",  # KaTeX's dash ligatures are one token; spaced dashes two
]


def _shared_labels() -> list[str]:
    files = sorted(SHARED.glob("*/formulas/*.formulas.norm.txt"))
    return [line.rstrip("\n") for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("label", HAND_LABELS)
def test_tokenizer_reproduces_hand_written_labels(label):
    assert tokenize(label) == label.split()


def test_tokenizer_skips_the_space_pass_only_where_no_token_holds_a_space():
    """tokenize returns findall's tokens as they are unless a token may hold a space: the same tokens as
    dropping the spaces of every token, on random strings of the fused constructs, with spaces of all kinds."""
    from latexocr.latex import _SPACE, _TOKEN

    rng = random.Random(2)
    pieces = ["\\begin", "\\end", "\\left", "\\right", "\\", "{", "}", "array", "matrix*", "(", ".", "\\{",
              "\\langle", "a", "--", "---", " ", "  ", "\t", "\n", "\u00a0", "\u2003", "\x1c", "x", "*", "^"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(20000)]
    texts += list(HAND_LABELS) + [r"\begin {array} { l }", r"\left ( x \right )", r"\begin{ array }", "\\ x"]
    for text in texts:
        assert tokenize(text) == [_SPACE.sub("", t) for t in _TOKEN.findall(strip_math(text))], text


def test_tokenizer_reproduces_every_shared_label():
    labels = _shared_labels()
    if not labels:
        pytest.skip(f"no LaTeX_OCR labels at {SHARED} (../shared/ is only on the project's machines)")
    wrong = [label for label in labels if tokenize(label) != label.split()]
    assert not wrong, f"{len(wrong)} of {len(labels)} labels tokenised differently, e.g. {wrong[:3]}"


COMPACT = [  # (compact LaTeX a model may write, the label)
    (r"\frac{1}{2}", r"\frac { 1 } { 2 }"),
    (r"\mathrm{hopf}", r"\mathrm { h o p f }"),
    (r"\left(x\right)^{2}", r"\left( x \right) ^ { 2 }"),
    (r"\left (x\right )", r"\left( x \right)"),
    (r"\begin{array}{ll}a&b\\c&d\end{array}", r"\begin{array} { l l } a & b \\ c & d \end{array}"),
    (r"x_{12}\leq\alpha\,y", r"x _ { 1 2 } \leq \alpha \, y"),
    (r"a\ b", r"a \ b"),  # a control space: the labels write it as a lone "\"
    (r"D_{--}-x", r"D _ { -- } - x"),
]


@pytest.mark.parametrize("compact,label", COMPACT)
def test_compact_and_spaced_forms_score_as_equal(compact, label):
    assert M.sample_scores(compact, label) == pytest.approx(
        {"exact_match": 1.0, "edit_distance": 0.0, "edit_distance_ref": 0.0, "bleu4": 100.0}, abs=1e-9)


def test_compact_corpus_scores_perfectly():
    out = M.summarize([c for c, _ in COMPACT], [label for _, label in COMPACT])
    assert out["exact_match"] == 1.0 and out["edit_distance"] == 0.0
    assert out["bleu4"] == pytest.approx(100.0, abs=1e-9)


@pytest.mark.parametrize("wrapped", [
    "$$\\frac{1}{2}$$", "$\\frac{1}{2}$", "\\[ \\frac{1}{2} \\]", "\\(\\frac{1}{2}\\)",
    "```latex\n\\frac{1}{2}\n```", "```\n$$\\frac { 1 } { 2 }$$\n```",
    "\\begin{equation*}\\frac{1}{2}\\end{equation*}",
])
def test_delimiters_and_fences_are_stripped(wrapped):
    assert strip_math(wrapped).replace(" ", "") == r"\frac{1}{2}"
    assert M.exact_match(wrapped, REF) == 1.0
    assert M.sample_scores(wrapped, REF)["bleu4"] == pytest.approx(100.0, abs=1e-9)
    assert M.render_ok(wrapped)


def test_a_dollar_inside_a_formula_is_kept():
    assert strip_math(r"\text{\$} 5") == r"\text{\$} 5"


@pytest.mark.parametrize("broken", [r"\frac { 1 } { 2", r"x } + 1", r"\foo { x }", r"\left( x", r"x ^ ^ 2", ""])
def test_broken_formulas_do_not_render_and_lower_render_rate(broken):
    assert render_error(broken) is not None
    assert not M.render_ok(broken)
    out = M.summarize([REF, broken], [REF, REF])
    assert out["render_rate"] == 0.5


def test_labels_render():
    for label in HAND_LABELS:
        assert render_error(label) is None, label


def test_truncated_rate_counts_predictions_that_hit_the_limit():
    out = M.summarize([REF, SUB, "x x x x"], [REF] * 3, truncated=[False, False, True])
    assert out["truncated_rate"] == pytest.approx(1 / 3, abs=TOL)
    assert "truncated_rate" not in M.summarize([REF], [REF])
    with pytest.raises(ValueError):
        M.summarize([REF], [REF], truncated=[True, False])


def test_each_distinct_prediction_is_parsed_once(monkeypatch):
    """A model repeats itself: KaTeX (~1-12 ms a formula) runs once per distinct string."""
    calls = []

    def counting(text):
        calls.append(text)
        return render_error(text)

    monkeypatch.setattr(M, "render_error", counting)
    M._renders.cache_clear()  # earlier tests parsed some of these strings already
    preds = [r"\frac { 7 } { 9 } + \omega", r"\frac { 7 } { 9 } + \omega", r"\frac { 7 } { 9 ", None, ""] * 3
    flags = [M.render_ok(p) for p in preds]
    assert flags == [True, True, False, False, False] * 3
    assert sorted(calls) == sorted([r"\frac { 7 } { 9 } + \omega", r"\frac { 7 } { 9 ", ""])


def test_katex_internal_errors_cannot_take_the_process_down():
    """pykatex 0.1.1's renderToString corrupts its heap on each KaTeX internal error (not a ParseError): a few
    of them in one process aborted it. latexocr/fast/katex.py catches them in JavaScript: every verdict comes."""
    internal = r"\begin{array} \\ x \end{array}"  # KaTeX: "Expected node of symbol group type ..."
    for _ in range(6):
        assert render_error(internal).startswith("KaTeX internal error")
        assert render_error(r"\frac { 1 } { 2 }") is None
        assert render_error(r"\frac { 1 } {").startswith("Unexpected end of input")


def test_a_crashing_katex_costs_only_its_formula(monkeypatch):
    """A child that dies on a request is replaced, and the request's formulas are asked one by one:
    only the culprit gets the crash as its verdict, in either of two parallel children."""
    from latexocr import latex

    real_send = latex._Child.send

    def dying(child, request):
        if "CRASH" not in str(request):
            return real_send(child, request)
        child.stop()  # a child that dies on this request (as pykatex's double free made it), unanswered
        child.process = subprocess.Popen([sys.executable, "-c", ""], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return True

    monkeypatch.setattr(latex._Child, "send", dying)
    texts = ["x", "CRASH", r"\frac { 1 } {", None, "y ^ 2", "z"]
    expected = [None, "KaTeX crashed on this formula", "Unexpected end of input in a macro argument, expected '}' "
                "at end of input: \\frac { 1 } {", "empty formula", None, None]
    assert latex.render_errors(texts) == expected
    assert latex.render_errors(texts, processes=2) == expected
    assert latex.render_error("x") is None
    # a long list: shrinking parts handed to two children as each answers, the crash in one of them
    many = [f"x ^ {{ {i} }}" for i in range(200)]
    many[150] = "CRASH"
    parts = latex._shrinking_parts([t for t in many], 2)
    assert len(parts) > 4 and sum(parts, []) == many and len(parts[0]) > len(parts[-2]) >= latex.MIN_PART
    assert latex.render_errors(many, processes=2) == [None] * 150 + ["KaTeX crashed on this formula"] + [None] * 49


def test_a_hanging_katex_costs_only_its_formula(monkeypatch):
    """A child that does not answer in time is stopped and replaced: only the formula it hung on gets the
    timeout as its verdict, the other child's parts are answered meanwhile."""
    from latexocr import latex

    real_send = latex._Child.send

    def hanging(child, request):
        if "HANG" not in str(request):
            return real_send(child, request)
        child.stop()  # a child that never answers this request
        child.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE)
        return True

    monkeypatch.setattr(latex._Child, "send", hanging)
    monkeypatch.setattr(latex, "KATEX_TIMEOUT", 0.3)
    texts = [f"x ^ {{ {i} }}" for i in range(40)]
    texts[30] = "HANG"
    expected = [None] * 30 + ["KaTeX took more than 0 s on this formula"] + [None] * 9
    assert latex.render_errors(texts, processes=2) == expected


# KaTeX's verdict comes from its parser alone (fast/katex.py): every error renderToString raises must be
# raised while parsing. Checked on every shared label and perturbations of them by
# bench/bench_score.py --check-parse; here on the hand-written labels, real ones and a few perturbed.
PERTURBATIONS = [r"\begin{array} \\ x \end{array}", r"\rule { 1 e m } { 2 e m }", r"\kern 1 q q", r"x \over y \over z",
                 r"\left( x", r"\sqrt [ ] { }", r"\hspace { 1 e m }", r"a ^ b ^ c", r"\char 9999999", "\u00e9 \u4e2d",
                 r"\mathrm { \frac 1 2 }", r"\text { $ x $ }", r"\verb|x|", r"\color { nope } x", r"\\ \\ &",
                 r"\begin{matrix} a & b \\ \end{matrix}", r"\operatorname { } x", r"\big", r"\not", r"\def\a{\a} \a"]


def test_katex_parse_verdict_equals_render_verdict_and_pykatex():
    from latexocr.fast.katex import Engine

    engine = Engine()
    labels = list(HAND_LABELS) + list(dict.fromkeys(_shared_labels()))[::60]  # ~150 real ones, when here
    rng = random.Random(0)
    vocab = sorted({t for label in labels for t in label.split()}) + ["}", "{", "^", "_", "&", "\\\\"]
    perturbed = []
    for label in labels:
        tokens = label.split()
        tokens[rng.randrange(len(tokens))] = rng.choice(vocab)
        perturbed.append(" ".join(tokens))
    strings = labels + perturbed + PERTURBATIONS
    parsed = engine.check(strings)
    rendered = [engine.render(s)[1] for s in strings]
    assert [e is None for e in parsed] == [e is None for e in rendered]
    assert parsed == rendered  # the same error, too
    assert 0.2 < sum(e is None for e in parsed) / len(parsed) < 0.95  # both verdicts really occur
    # the same KaTeX as pykatex's renderToString: its MathML and ParseError text
    import pykatex
    options = dict(output="mathml", displayMode=True, throwOnError=True, strict="ignore")
    for label in HAND_LABELS:
        assert engine.render(label) == (pykatex.renderToString(label, **options), None)
    with pytest.raises(pykatex.ParseError) as error:
        pykatex.renderToString(r"\frac { 1 } {", **options)
    assert engine.check([r"\frac { 1 } {"]) == [str(error.value)]


def test_katex_fast_paths_give_katex_own_verdicts_errors_and_mathml():
    """fast/katex.py's lexer and macro-expander fast paths: the same verdict, error text (which names the
    token and its position) and MathML as KaTeX's own methods, on real labels, perturbed ones, and random
    strings of the characters each path tells apart (spaces, control words, \verb, comments, combining
    marks, surrogates, control characters, macros)."""
    from latexocr.fast.katex import Engine

    fast, own = Engine(), Engine(fast=False)
    assert fast.fast and not own.fast  # KaTeX's sources are the checked ones: the fast paths are on
    labels = list(HAND_LABELS) + list(dict.fromkeys(_shared_labels()))[::40]
    rng = random.Random(1)
    pieces = list(" \t\n\r{}^_&#@%~$|*!.,;:'0123456789abxyzAZ[]()<>=+-/") + [
        "\\", "\\\\", "\\ ", "\\\n", "\\frac", "\\verb", "\\verb*", "\\verbatim", "\\mathrm", "\\text", "\\left(",
        "\\right)", "\\def", "\\gdef", "\\a", "\\@x", "\\begin{array}{c}", "\\end{array}", "\\ne", "\\neq", "\\tfrac",
        "\u0301", "\u0308", "\u00e9", "\u2027", "\u2028", "\u202a", "\ud7ff", "\ue000", "\uf900", "\uffff", "\ud83d\ude00",
        "\ud83d", "\x01", "\x7f", "\u4e2d"]
    fuzz = ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 25))) for _ in range(3000)]
    perturbed = [label.replace(" ", rng.choice(["", "  ", "\n", " % c\n"]), 3) for label in labels]
    strings = labels + perturbed + fuzz + PERTURBATIONS
    assert fast.check(strings) == own.check(strings)
    assert [fast.render(s) for s in strings[::7]] == [own.render(s) for s in strings[::7]]


def test_pykatex_public_api_fallback_gives_the_same_verdicts():
    """Where the engine cannot be set up (another pykatex build, a platform without exported symbols), the
    child serves with pykatex's renderToString: the same verdicts (run in a process of its own, as pykatex
    may corrupt its heap on an internal error; the child then exits after answering)."""
    formulas = list(HAND_LABELS) + PERTURBATIONS
    script = ("import json, runpy, sys; k = runpy.run_path(sys.argv[1]); f = json.loads(sys.stdin.read()); "
              "print(json.dumps([k['Engine']().check(f), k['_PublicApi']().check(f)]))")
    done = subprocess.run([sys.executable, "-c", script, str(Path(M.__file__).parent / "fast" / "katex.py")],
                          input=json.dumps(formulas), capture_output=True, text=True, timeout=120)
    engine, public = json.loads(done.stdout)
    assert [e is None for e in engine] == [e is None for e in public]
    # an error that names no position reads as internal through pykatex (as latex.py used to say); others alike
    assert [(a, b) for a, b in zip(engine, public) if b and "internal" not in b and a != b] == []
    assert any(b and "internal" in b for b in public)
