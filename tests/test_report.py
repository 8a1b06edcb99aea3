"""infer.py --report: one offline HTML page, opened in a real headless Chromium (selenium + the
distribution's chromium-driver; .ci/run installs both). Checks the browser laid the formulas out
as math (not raw LaTeX), loaded every image, and shows a formula KaTeX rejects as a failure."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from latexocr.scoring import score_row, summarize_rows
from latexocr.metrics import worst_first
from latexocr.report import write_report

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / ".test-artifacts"  # git-ignored; CI keeps the screenshot here
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _rows(tmp_path: Path) -> list[dict]:
    cases = [  # (prediction, label)
        (r"\frac{1}{2}", r"\frac { 1 } { 2 }"),                    # compact, exact
        (r"$$x^{2}+y_{1}$$", r"x ^ { 2 } + y _ { 1 }"),              # wrapped, exact
        (r"\sqrt{a} + \frac{b}{", r"\sqrt { a } + \frac { b } { c }"),  # broken: does not render
        (r"\alpha \beta", r"\alpha + \beta"),                        # one token missing
    ]
    rows = []
    for i, (pred, label) in enumerate(cases):
        path = tmp_path / f"{i}.png"
        img = Image.new("RGB", (160 + 20 * i, 40), "white")
        ImageDraw.Draw(img).text((4, 12), label[:24], fill=(0, 0, 0))
        img.save(path)
        rows.append({"image": str(path), "prediction": pred, "label": label, "error": "",
                     **score_row(pred, label, truncated=(i == 3))})
    return rows


def _summary(rows: list[dict]) -> dict:
    """What infer.py passes: every metric of the rows, and the error count."""
    from latexocr.metrics import score_pair
    stats = [score_pair(r["prediction"], r["label"])[1] for r in rows]
    return {**summarize_rows(rows, stats), "errors": 0}


def test_report_is_self_contained_and_sorted_worst_first(tmp_path):
    rows = worst_first(_rows(tmp_path))
    summary = _summary(rows)
    page = write_report(rows, tmp_path / "report.html", summary).read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not fetch anything"
    assert "<script" not in page
    assert page.count("<img src=\"data:image/png;base64,") == 4
    assert page.count("<math") == 7  # 4 labels + 3 predictions that render
    assert "does not render" in page and r"\frac{b}{" in page
    assert [r["edit_distance"] for r in rows] == sorted((r["edit_distance"] for r in rows), reverse=True)
    assert rows[0]["label"] == r"\alpha + \beta" and rows[-1]["edit_distance"] == 0.0
    assert page.index(rows[0]["label"]) < page.index(rows[-1]["label"])  # the page keeps that order
    # the header: every metric of the summary with its value, not only exact match and n
    header = page[page.index('<table class="summary">'):page.index("<thead>")]
    assert {"exact_match", "edit_distance", "edit_distance_ref", "bleu4", "render_rate", "truncated_rate", "n",
            "errors"} <= set(summary)
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        assert f"<th>{key}</th>" in header and f"<td>{shown}</td>" in header, (key, shown, header)
    assert re.findall(r"<th>(\w+)</th>", header) == list(summary)  # in the summary's order


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs chromium + chromedriver (Debian: apt-get install chromium chromium-driver; "
                           ".ci/run installs them)")
def test_report_renders_in_a_real_browser(tmp_path, capsys):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    rows = worst_first(_rows(tmp_path))
    summary = _summary(rows)
    report = write_report(rows, tmp_path / "report.html", summary)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,900", "--blink-settings=imagesEnabled=true",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # Chromium puts its singleton socket folder in TMPDIR and leaves it there: keep it in tmp_path
    service = Service(CHROMEDRIVER, env={**os.environ, "TMPDIR": str(tmp_path)})
    driver = webdriver.Chrome(service=service, options=options)  # no driver download
    try:
        driver.set_page_load_timeout(60)
        driver.get(report.as_uri())
        state = driver.execute_script("""
            const rendered = [...document.querySelectorAll('td.formula[data-rendered="1"]')];
            const fracs = [...document.querySelectorAll('td.formula mfrac')].map(f => {
                const [num, den] = [...f.children].map(c => c.getBoundingClientRect());
                return {stacked: num.bottom <= den.top + 1, h: f.getBoundingClientRect().height};
            });
            return {
                images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth})),
                cells: rendered.map(td => {
                    const m = td.querySelector('math'), r = m.getBoundingClientRect();
                    return {display: getComputedStyle(m).display, w: r.width, h: r.height,
                            text: td.innerText};
                }),
                fracs: fracs,
                failed: [...document.querySelectorAll('td.formula[data-rendered="0"]')].map(td => td.innerText),
                header: [...document.querySelectorAll('table.summary tr')].map(
                    tr => [...tr.children].map(c => c.innerText)),
            };
        """)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "report.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    with capsys.disabled():
        print(f"\n[report screenshot] {shot}")

    assert len(state["images"]) == 4 and all(i["ok"] for i in state["images"]), state["images"]
    assert len(state["cells"]) == 7
    for cell in state["cells"]:
        # laid out by the browser's MathML engine, with a size, showing no LaTeX source
        assert "math" in cell["display"] and cell["w"] > 0 and cell["h"] > 0, cell
        assert "\\" not in cell["text"], cell
    assert state["fracs"] and all(f["stacked"] for f in state["fracs"]), state["fracs"]
    assert len(state["failed"]) == 1 and "does not render" in state["failed"][0]
    assert r"\frac{b}{" in state["failed"][0]
    assert shot.stat().st_size > 1000
    # the header a person reads: every metric of the summary above its value
    assert state["header"] == [list(summary), [f"{v:.4g}" if isinstance(v, float) else str(v)
                                               for v in summary.values()]], state["header"]
