"""Scoring once per row, in worker processes, and `infer.py --score`: the same metrics as before.

The reference is the scoring code as it was before (latexocr/metrics.py's functions and
evaluation.py's score_row / summarize_rows at commit c2454c7), copied below: it tokenised every
row up to 16 times and asked sacrebleu for a corpus score; the new code must give identical
numbers (to 1e-9) on varied rows. CPU only; the live run uses a tiny random-init model.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from PIL import Image, ImageDraw
from rapidfuzz.distance import Levenshtein
from sacrebleu.metrics import BLEU

from latexocr import metrics, scoring
from test_metrics import HAND_LABELS
from latexocr.latex import _SPACE, _TOKEN, render_error, strip_math

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-9


# ------------------------------------------------------------------ the old code (the reference)
def tokenize(text):  # latexocr/latex.py's tokenize at c2454c7
    return [_SPACE.sub("", t) for t in _TOKEN.findall(strip_math(text))]


_OLD_CORPUS = BLEU(tokenize="none", smooth_method="exp", max_ngram_order=4)
_OLD_SENTENCE = BLEU(tokenize="none", smooth_method="exp", max_ngram_order=4, effective_order=True)


def _old_joined(text):
    return " ".join(tokenize(text))


def old_score_row(pred, ref, truncated=False):
    p, r = tokenize(pred), tokenize(ref)
    hyp, rr = _old_joined(pred), _old_joined(ref)
    bleu = (100.0 if hyp == rr else 0.0) if not hyp or not rr else float(_OLD_SENTENCE.sentence_score(hyp, [rr]).score)
    return {"exact_match": 1.0 if p == r else 0.0,
            "edit_distance": 0.0 if not p and not r else Levenshtein.distance(p, r) / max(len(p), len(r)),
            "edit_distance_ref": Levenshtein.distance(p, r) / max(len(r), 1),
            "bleu4": bleu, "render_ok": render_error(pred) is None, "truncated": bool(truncated)}


def old_summary(preds, refs, truncated):
    n = len(refs)
    rows = [old_score_row(p, r, t) for p, r, t in zip(preds, refs, truncated)]
    return {"exact_match": sum(r["exact_match"] for r in rows) / n,
            "edit_distance": sum(r["edit_distance"] for r in rows) / n,
            "edit_distance_ref": sum(r["edit_distance_ref"] for r in rows) / n,
            "bleu4": float(_OLD_CORPUS.corpus_score([_old_joined(p) for p in preds], [[_old_joined(r) for r in refs]]).score),
            "render_rate": sum(r["render_ok"] for r in rows) / n,
            "truncated_rate": sum(bool(t) for t in truncated) / n, "n": n}


# ------------------------------------------------------------------------------- varied rows
LABELS = HAND_LABELS + [r"x", r"E = m c ^ { 2 } ."]  # test_metrics.py's hand-written labels, and two short ones


def varied_rows(n: int = 400, seed: int = 0) -> list[tuple[str | None, str, bool]]:
    """(prediction, label, truncated): exact, one token off, compact, wrapped, empty, None,
    whitespace, non-rendering, repetition loops (truncated), unicode, an empty label, a tokenised
    ' .' ending (sacrebleu's "forgot to detokenize" trigger)."""
    rng = random.Random(seed)
    vocab = sorted({t for label in LABELS for t in label.split()}) + ["\\foo", "}", "{", "^", "é", "∑"]
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        toks = label.split()
        kind = i % 12
        if kind in (0, 1, 2):
            pred = label
        elif kind == 3:
            toks[rng.randrange(len(toks))] = rng.choice(vocab)
            pred = " ".join(toks)
        elif kind == 4:
            pred = "".join(toks)  # compact (may merge control words: a different formula)
        elif kind == 5:
            pred = f"$${label}$$" if i % 2 else f"```latex\n{label}\n```"
        elif kind == 6:
            pred = [None, "", "   ", "\n"][i % 4]
        elif kind == 7:
            pred = label + " } } \\frac {"  # does not render
        elif kind == 8:
            pred = " ".join(toks * rng.randint(3, 9))  # a repetition loop
        elif kind == 9:
            del toks[rng.randrange(len(toks))]
            pred = " ".join(toks + [rng.choice(vocab)] * rng.randint(0, 3))
        elif kind == 10:
            pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 30))) + " ."
        else:
            pred = label.replace(" ", "\u00a0") if i % 2 else "x ^ { 2 } ."
        if i % 97 == 5:
            label = ""  # an empty label
        rows.append((pred, label, kind == 8 or i % 13 == 0))
    return rows


def test_rows_and_summary_equal_the_old_code():
    rows = varied_rows()
    new = scoring.score_items(rows)
    for (pred, label, cut), (columns, _) in zip(rows, new):
        assert columns == pytest.approx(old_score_row(pred, label, cut), abs=TOL), (pred, label)
        assert isinstance(columns["render_ok"], bool) and isinstance(columns["truncated"], bool)
    preds, labels, cuts = zip(*rows)
    reference = old_summary(preds, labels, cuts)
    summary = scoring.summarize_rows([c for c, _ in new], [s for _, s in new])
    assert list(summary) == list(reference)
    assert summary == pytest.approx(reference, abs=TOL)
    assert 0 < summary["render_rate"] < 1 and 0 < summary["exact_match"] < 1  # the rows really vary
    # metrics.summarize / corpus_bleu (raw predictions) agree too
    assert metrics.summarize(preds, labels, truncated=cuts) == pytest.approx(reference, abs=TOL)
    assert metrics.corpus_bleu(preds, labels) == pytest.approx(reference["bleu4"], abs=TOL)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_corpus_bleu_from_row_statistics_equals_sacrebleu_on_subsets(seed):
    """Any subset of rows: the summed per-row statistics give sacrebleu's corpus score."""
    rows = random.Random(seed).sample(varied_rows(), 150)
    stats = [s for _, s in scoring.score_items(rows)]
    hyps, refs = [_old_joined(p) for p, _, _ in rows], [_old_joined(r) for _, r, _ in rows]
    assert metrics.corpus_bleu_from_stats(stats) == pytest.approx(
        _OLD_CORPUS.corpus_score(hyps, [refs]).score, abs=TOL)
    assert math.isnan(metrics.corpus_bleu_from_stats([]))


def test_bleu_statistics_equal_sacrebleus_on_every_kind_of_difference():
    """metrics._bleu_statistics counts only the n-grams between the tokens both sides begin and end with:
    the same integers as sacrebleu's own extraction (BLEU(tokenize="none")), whatever the two sides share
    (one token changed, deleted or inserted, repeated n-grams, one side inside the other, nothing)."""
    rng = random.Random(0)
    vocab = ["a", "b", "c", "\\frac", "{", "}", "^", "\u00e9"]
    pairs = [([], ["a"]), (["a"], []), (["a", "a", "a"], ["a", "a"]), (["a", "b"], ["b", "a"])]
    for _ in range(3000):
        r = [rng.choice(vocab[:rng.randint(1, len(vocab))]) for _ in range(rng.randint(0, 12))]
        p = list(r)
        for _ in range(rng.randint(1, 3)):  # changes anywhere, also at the ends
            at = rng.randint(0, len(p))
            how = rng.random()
            if how < 0.4 and at < len(p):
                p[at] = rng.choice(vocab)
            elif how < 0.7 and at < len(p):
                del p[at]
            elif how < 0.9:
                p.insert(at, rng.choice(vocab))
            else:
                p = p[:at] * 2 + p[at:]  # a repetition
        pairs.append((p, r))
    pairs += [(tokenize(pred), tokenize(label)) for pred, label, _ in varied_rows()]
    expected = _OLD_CORPUS._extract_corpus_statistics([" ".join(p) for p, _ in pairs], [[" ".join(r) for _, r in pairs]])
    assert [list(metrics._bleu_statistics(p, r)) for p, r in pairs] == expected


@pytest.mark.parametrize("base", [Path("/tmp/data"), Path("/")])
def test_image_paths_resolve_as_pathlib_joins_them(base):
    """read_predictions joins a relative image to the file's folder by hand where it can: pathlib's result."""
    resolve = scoring._resolver(base)
    for image in ["a.png", "images/0.png", "./a.png", "a/./b.png", "a//b.png", "../a.png", "a/../b.png", "a/", ".",
                  "a/.", "/abs//x.png", "//x", "a/..", "\u00e9/\u00fc.png", "a\\b.png", " a.png", "a/ b", ""]:
        assert resolve(image) == (image if not image or Path(image).is_absolute() else str(base / image)), image


def test_no_detokenize_warning(caplog):
    """100+ predictions ending in ' .' made sacrebleu warn "you forgot to detokenize": the text
    is tokenised on purpose, so nothing is printed now."""
    rows = [("a b c .", "a b c .", False)] * 150
    with caplog.at_level(logging.WARNING, logger="sacrebleu"):
        scored = scoring.score_items(rows)
        scoring.summarize_rows([c for c, _ in scored], [s for _, s in scored])
        metrics.summarize([p for p, _, _ in rows], [r for _, r, _ in rows])
    assert not caplog.records


def workers_left() -> list:
    """Child processes still there (zombies included), but for the long-lived helpers a process starts
    once: multiprocessing's resource tracker (spawn's) and this process's own KaTeX child (latex.py)."""
    def helper(p):
        command = " ".join(p.cmdline())
        return "resource_tracker" in command or (p.ppid() == os.getpid() and "fast/katex.py" in command)
    return [p for p in psutil.Process().children(recursive=True) if not helper(p)]


def test_worker_processes_give_the_same_rows_and_leave_no_process():
    rows = varied_rows(300, seed=4)
    with scoring.Scorer(0) as here:
        here.submit(range(len(rows)), rows)
        expected = here.results()
    with scoring.Scorer(2) as pool:
        # batches arrive out of order (generation sorts by image size): keys restore the order
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        for start in range(0, len(order), 70):
            keys = order[start:start + 70]
            pool.submit(keys, [rows[k] for k in keys])
        got = pool.results()
    assert got == expected
    assert workers_left() == []


def test_interrupt_shuts_the_workers_down():
    """Ctrl-C while rows are being scored: pending chunks are cancelled, the workers joined."""
    rows = varied_rows(400, seed=5)
    with pytest.raises(KeyboardInterrupt):
        with scoring.Scorer(1) as scorer:
            scorer.submit(range(len(rows)), rows)
            raise KeyboardInterrupt
    assert workers_left() == []


def test_default_workers():
    assert scoring.default_workers(rows=10) == 0  # one chunk: scored in the process
    assert 1 <= scoring.default_workers() <= 4
    assert scoring.default_workers(processes_per_host=1000) == 1


# ------------------------------------------------------------------------------ distinct real labels
FULL_VAL = ROOT.parent / "shared" / "latex_ocr" / "full_val" / "formulas" / "val.formulas.norm.txt"


def real_rows(n: int = 300, seed: int = 0) -> list[tuple[str | None, str, bool]]:
    """(prediction, label, truncated) from ``n`` distinct real labels, as bench/bench_score.py
    builds them: 60 % exact, the rest one token changed, deleted or inserted; then a few rows
    repeating earlier ones (a label predicted exactly twice, a repeated wrong prediction) and a
    failed one (None), so that parsing each distinct prediction once is exercised."""
    if not FULL_VAL.is_file():
        pytest.skip(f"no real labels at {FULL_VAL} (../shared/ is only on the project's machines); "
                    "the hand-written rows above cover the same code")
    rng = random.Random(seed)
    labels = list(dict.fromkeys(FULL_VAL.read_text(encoding="utf-8").splitlines()))[:n]
    vocab = sorted({t for label in labels for t in label.split()})
    rows = []
    for label in labels:
        tokens = label.split()
        if rng.random() >= 0.6:
            at, how = rng.randrange(len(tokens)), rng.randrange(3)
            if how == 0:
                tokens[at] = rng.choice(vocab)
            elif how == 1:
                del tokens[at]
            else:
                tokens.insert(at, rng.choice(vocab))
        rows.append((" ".join(tokens), label, rng.random() < 0.05))
    return rows + rows[:40:3] + [(None, labels[0], False)]


def failed(prediction: str | None) -> str:
    return "boom" if prediction is None else ""


def test_real_labels_score_as_the_old_code_row_by_row(monkeypatch):
    """Distinct real labels: the Scorer's rows (workers, chunks, each distinct prediction parsed
    once) and scored_summary's summary equal the old code's, which renders every row."""
    rows = real_rows()
    monkeypatch.setattr(scoring, "CHUNK_ROWS", 16)  # many chunks, over both workers: repeats cross chunks
    with scoring.Scorer(2) as scorer:
        scorer.submit(range(len(rows)), rows)
        scored, summary = scoring.scored_summary(scorer, [{"prediction": p, "label": r, "error": failed(p)}
                                                          for p, r, _ in rows])
    for (pred, label, cut), row in zip(rows, scored):
        assert row == pytest.approx({"prediction": pred, "label": label, "error": failed(pred),
                                     **old_score_row(pred, label, cut)}, abs=TOL), (pred, label)
    preds, labels, cuts = zip(*rows)
    reference = old_summary(preds, labels, cuts)
    assert summary.pop("errors") == 1
    assert list(summary) == list(reference) and summary == pytest.approx(reference, abs=TOL)
    assert 0 < reference["render_rate"] < 1 and 0.5 < reference["exact_match"] < 0.7  # the rows really vary


def test_each_distinct_prediction_is_parsed_once_per_scorer(monkeypatch):
    """KaTeX is most of the cost: a prediction equal to its label, or to an earlier prediction,
    costs no second parse, across chunks too; the verdicts are still every row's."""
    rows = real_rows(120)
    calls = []

    def counting(texts, processes):
        calls.extend(texts)
        return metrics.render_flags(texts, processes)

    monkeypatch.setattr(scoring, "render_flags", counting)
    from latexocr.verdicts import LabelVerdicts
    with scoring.Scorer(0, kept=LabelVerdicts(None)) as scorer:  # no verdicts kept by earlier tests: all parsed here
        for start in range(0, len(rows), 16):  # in this process, one chunk per submit: 16 rows each
            scorer.submit(range(start, min(start + 16, len(rows))), rows[start:start + 16])
        columns, _ = scorer.results()
    assert sorted(calls) == sorted({p for p, _, _ in rows if p is not None})
    assert [c["render_ok"] for c in columns] == [p is not None and render_error(p) is None for p, _, _ in rows]


def test_score_on_real_labels_prints_the_old_summary(tmp_path, capsys):
    """infer.py --score on a predictions file of distinct real labels: the old code's metrics."""
    import infer

    rows = real_rows()
    path = tmp_path / "preds.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "prediction", "error", "label", "truncated"])
        writer.writeheader()
        writer.writerows({"image": f"{i}.png", "prediction": p or "", "error": failed(p), "label": r,
                          "truncated": cut} for i, (p, r, cut) in enumerate(rows))
    infer.main(["--score", str(path)])
    printed = printed_summary(capsys.readouterr().out)
    preds, labels, cuts = zip(*[(p or "", r, cut) for p, r, cut in rows])  # CSV: a failed row reads back as ""
    reference = old_summary(preds, labels, cuts)
    assert printed.pop("predictions") == str(path) and printed.pop("errors") == 1
    assert printed == pytest.approx(reference, abs=TOL)


# ------------------------------------------------------------------------------ infer.py --score
def draw(path: Path, text: str, size) -> str:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((4, 4), text, fill=(0, 0, 0))
    img.save(path)
    return str(path)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A labelled CSV of 10 images (one unreadable: an error row with no prediction)."""
    folder = tmp_path_factory.mktemp("score_data")
    rows = []
    for i in range(9):
        rows.append({"image_path": Path(draw(folder / f"{i}.png", LABELS[i % 8], (80 + 30 * i, 30))).name,
                     "text": LABELS[i % 8]})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    rows.append({"image_path": "broken.png", "text": "y"})
    with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image_path", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "data.csv"


def printed_summary(stdout: str) -> dict:
    text = stdout.split("\nreport: ")[0]
    return json.loads(text[text.rfind("\n{") + 1:])  # the JSON summary is the last thing printed


def page_without_title(path: Path) -> str:
    import re
    return re.sub(r"<title>.*?</title>|<h1>.*?</h1>", "", path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_score_equals_the_live_run(labelled, tiny_model_dir, tmp_path, capsys, monkeypatch, suffix):
    import infer

    monkeypatch.setattr(scoring, "CHUNK_ROWS", 3)  # several chunks: the live run scores in a worker process
    out = tmp_path / f"preds{suffix}"
    infer.main([str(labelled), "--output", str(out), "--report", str(tmp_path / "live.html"),
                "--model-id", str(tiny_model_dir), "--model-source", "local", "--adapter", "none",
                "--num-workers", "0", "--max-new-tokens", "6", "--batch-size", "4"])
    live = printed_summary(capsys.readouterr().out)
    assert live.pop("adapter") == "none" and live["n"] == 10 and live["errors"] == 1
    assert live["truncated_rate"] > 0  # six new tokens cut most random outputs

    infer.main(["--score", str(out), "--report", str(tmp_path / "again.html")])
    again = printed_summary(capsys.readouterr().out)
    assert again.pop("predictions") == str(out)
    assert again == live  # exactly: the same rows scored by the same code
    assert page_without_title(tmp_path / "again.html") == page_without_title(tmp_path / "live.html")


def test_score_does_not_import_torch(tmp_path):
    preds = tmp_path / "p.csv"
    preds.write_text("image,prediction,error,label\na.png,x ^ 2,,x ^ 2\nb.png,,boom,y\n", encoding="utf-8")
    code = ("import sys, infer; infer.main(['--score', sys.argv[1]]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code, str(preds)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["n"] == 2 and summary["exact_match"] == 0.5 and summary["errors"] == 1
    assert "truncated_rate" not in summary  # the file has no truncated column: nothing to report
    assert done.stderr == ""


@pytest.mark.parametrize("name,text,expected", [
    ("missing.csv", None, "predictions file not found"),
    ("p.csv", "image,prediction\na.png,x\n", "line 2 has no 'label' or 'text' column"),
    ("p.csv", "image,label\na.png,x\n", "line 2 has no 'prediction' column"),
    ("p.csv", "", "no rows"),
    ("p.jsonl", '{"image": "a", "prediction": "x", "label": "x"}\nnot json\n', "line 2 is not JSON"),
    ("p.jsonl", '[1, 2]\n', "line 1 is a JSON list"),
    ("p.jsonl", '{"image": "a", "prediction": 3, "label": "x"}\n', "line 1: label and prediction must be text"),
    ("p.csv", "image,prediction,label,truncated\na.png,x,x,maybe\n", "line 2: truncated is 'maybe'"),
    ("p.txt", "x", "expected a .csv or .jsonl"),
])
def test_bad_predictions_file_is_one_line(tmp_path, capsys, name, text, expected):
    import infer

    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        infer.main(["--score", str(path)])
    message = str(exc.value.code)
    assert message.startswith("error: ") and str(path) in message and expected in message, message
    assert "\n" not in message


def test_evaluate_scores_in_workers_as_in_process(labelled, tiny_model_dir):
    """train.py's evaluation: batches scored in a worker process while the next one generates give
    the rows and summary of in-process scoring, in input order, the unreadable image included."""
    import infer
    from latexocr.batching import SampleEncoder
    from latexocr.cli import parse_settings
    from latexocr.evaluation import evaluate
    from latexocr.records import read_labelled
    from latexocr.sample import sizing_for

    args = parse_settings(infer.SETTINGS, None, ["--model-id", str(tiny_model_dir), "--model-source", "local",
                                                 "--adapter", "none"])
    model, processor, _ = infer.load_for_inference(args)
    encoder = SampleEncoder(processor, sizing_for(processor))
    pairs = read_labelled(labelled)
    runs = [evaluate(model, encoder, pairs, batch_size=3, max_new_tokens=5, num_workers=0, progress=False,
                     score_workers=workers) for workers in (0, 1)]
    (here, here_rows), (pooled, pooled_rows) = runs
    assert pooled == here and pooled_rows == here_rows
    assert [r["index"] for r in here_rows] == list(range(10)) and here["errors"] == 1
    preds, labels, cuts = zip(*[(r["prediction"], r["label"], r["truncated"]) for r in here_rows])
    assert {k: v for k, v in here.items() if k != "errors"} == pytest.approx(old_summary(preds, labels, cuts), abs=TOL)


def test_label_verdicts_kept_for_the_next_run_give_the_same_scores(tmp_path, monkeypatch, capsys):
    """latexocr/verdicts.py: a Scorer keeps the verdicts of labels predicted exactly; the next Scorer (the
    same validation set scored again) takes them from the file instead of parsing them, with the same
    rows and summary. A non-rendering label's False is kept too; a cut file is started again; off keeps
    nothing."""
    from latexocr.verdicts import LabelVerdicts
    rows = varied_rows(200) + [("x } {", "x } {", False)]  # a label KaTeX rejects, predicted exactly
    exact_labels = {label for pred, label, _ in rows if pred == label}
    path = tmp_path / "kept.json"

    def score(kept):
        with scoring.Scorer(0, kept=kept) as scorer:
            scorer.submit(range(len(rows)), rows)
            return scorer.results()

    first = score(LabelVerdicts(path))
    assert len(LabelVerdicts(path)) == len(exact_labels)
    asked = []
    plain = scoring.render_flags
    monkeypatch.setattr(scoring, "render_flags", lambda strings, processes=1: asked.extend(strings) or plain(strings, processes))
    assert score(LabelVerdicts(path)) == first
    assert asked and not exact_labels & set(asked)  # only the predictions that are no label were parsed
    assert first[0][-1]["render_ok"] is False  # the kept False

    path.write_text('{"cut in the mid')
    assert score(LabelVerdicts(path)) == first and len(LabelVerdicts(path)) == len(exact_labels)
    monkeypatch.setenv("LATEXOCR_VERDICT_CACHE", "off")
    assert LabelVerdicts().path is None
    monkeypatch.setenv("LATEXOCR_VERDICT_CACHE", str(tmp_path / "folder"))
    score(None)  # the default: the file under $LATEXOCR_VERDICT_CACHE
    assert [p.name for p in (tmp_path / "folder").iterdir()] == [LabelVerdicts().path.name]
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_predictions_holding_line_separators_read_back_as_written(tmp_path, suffix):
    """A random model's output held \\x1d: `infer.py --score` on infer.py's own CSV stopped at "line 2: label and
    prediction must be text", since str.splitlines also ends a line at \\x1c-\\x1e, \\x85, \\u2028/9 (and
    universal newlines turned a \\r into \\n). Every such character, in predictions and labels, reads back as
    infer.py wrote it; a labelled CSV (latexocr/records.py) too."""
    import infer
    from latexocr.records import read_labelled
    odd = ["a\x1db", "c\x1cd\x1e", "e\x85f", "g\u2028h\u2029i", "j\rk", "l\r\nm", "n\x0bo\x0cp"]
    rows = [{"image": f"{i}.png", "prediction": text, "error": "", "label": text[::-1], "truncated": False}
            for i, text in enumerate(odd)]
    infer.write_rows(rows, tmp_path / f"preds{suffix}")
    back = scoring.read_predictions(tmp_path / f"preds{suffix}")
    assert [(r["prediction"], r["label"]) for r in back] == [(t, t[::-1]) for t in odd]
    if suffix == ".csv":
        with open(tmp_path / "labelled.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image_path", "text"])
            writer.writerows([[f"{i}.png", text] for i, text in enumerate(odd)])
        assert [label for _, label in read_labelled(tmp_path / "labelled.csv")] == odd
