"""The report as an advisor sees it: headless Chromium (Debian's `chromium`, driven by playwright).

For the index and notebook pages without code, at a 1400 px wide window: no horizontal overflow, every
image loads, every link resolves (files and anchors; the report links nothing outside itself), no
console errors, and no stderr, warning, progress-bar or bare-path text. Then the run's PDF is built
and timed. A fixture run (two tiny notebooks that do what noisy real notebooks did: tqdm.auto in a
kernel without ipywidgets, a progress bar, library warnings, an overflow RuntimeWarning, a 50-row table,
figures in a loop) checks the machinery in seconds; the slow test checks the real smoke run that
tests/test_notebooks_smoke.py makes (the runner skips notebooks already up to date, so the schedule
executes once per session whichever module asks first).

Without Chromium or playwright the tests skip locally, and fail in CI (CI set), where .ci/run installs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from test_notebooks_smoke import RUN_ID as SMOKE_RUN_ID
from test_notebooks_smoke import smoke_run  # noqa: F401 - the shared fixture of the smoke schedule

from esa.errors import EsaError
from esa.report import artefacts
from esa.runner import cli, docs
from esa.runner.layout import outputs

PDF_SECONDS = 60  # the limit for building the whole report's PDF
PROGRESS = re.compile(r"\d+%\|[^|\n]*\|\s*\d+/\d+|it/s\]|s/it\]")
INDEX_FOOTER = re.compile(r"\d+ rows × \d+ columns")
FIGURE_REF = re.compile(r"\bFigure (\d+(?:\.\d+)?)\b")
NOISE = ("TqdmWarning", "RuntimeWarning", "UserWarning", "IProgress not found", "PosixPath(", "Traceback")


def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401

        return docs.chromium_path()
    except (ImportError, EsaError) as err:
        msg = f"the browser test needs Debian's chromium and playwright (make env installs both): {err}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=exe)
        yield chrome
        chrome.close()


def inspect_page(browser, page_path: Path, width: int = docs.VIEWPORT_WIDTH) -> dict:
    """What a reader would find wrong with one page, as lists of problems (empty lists: none)."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(page_path.resolve().as_uri(), wait_until="load")
    # Lazy images below the fold load only when scrolled to: load them all, and wait until each has
    # decoded or failed, so "does not load" means broken, not merely off-screen.
    page.evaluate(
        """async () => {
        for (const i of document.images) { i.loading = 'eager'; }
        await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
    }"""
    )
    found = page.evaluate(
        """() => ({
        scrollWidth: document.documentElement.scrollWidth,
        innerWidth: window.innerWidth,
        images: [...document.images].map(i => ({src: i.src.slice(0, 80), ok: i.complete && i.naturalWidth > 0})),
        links: [...document.querySelectorAll('a[href]')].map(a => a.href),
        ids: [...document.querySelectorAll('[id]')].map(e => e.id),
        stderr: document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]').length,
        text: document.body.innerText,
        captions: [...document.querySelectorAll('p.esa-caption')].map(p => p.innerText),
        // an output that scrolls sideways inside itself: wider content than the box that shows it
        sideways: [...document.querySelectorAll('.jp-OutputArea-output, .jp-RenderedMarkdown, table')]
            .filter(e => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== 'visible')
            .map(e => `${e.tagName}.${e.className} ${e.scrollWidth}>${e.clientWidth}`.slice(0, 120)),
        // a pandas index: row headers in a table's body
        index_cells: [...document.querySelectorAll('table tbody th')].length,
    })"""
    )
    page.close()
    broken, external = [], []
    for href in found["links"]:
        url = urlparse(href)
        if url.scheme == "file":
            target = Path(unquote(url.path))
            if target.resolve() == page_path.resolve() and url.fragment:
                if url.fragment not in found["ids"]:
                    broken.append(href)
            elif not target.exists():
                broken.append(href)
        elif url.scheme in ("http", "https"):
            external.append(href)
        elif url.scheme not in ("mailto", "data"):
            broken.append(href)
    noise = [w for w in NOISE if w in found["text"]] + PROGRESS.findall(found["text"])[:3]
    figure_ids = {i.removeprefix("figure-") for i in found["ids"] if i.startswith("figure-")}
    refs = set(FIGURE_REF.findall(found["text"]))
    return {
        "overflow_px": max(0, found["scrollWidth"] - found["innerWidth"]),
        "broken_images": [i["src"] for i in found["images"] if not i["ok"]],
        "n_images": len(found["images"]),
        "broken_links": broken,
        "external_links": external,
        "n_links": len(found["links"]),
        "console_errors": errors,
        "stderr_outputs": found["stderr"],
        "noise": noise,
        "captions": found["captions"],
        "sideways": found["sideways"],
        "index_cells": found["index_cells"],
        "shape_footers": INDEX_FOOTER.findall(found["text"]),
        "missing_figures": sorted(refs - figure_ids),
    }


def assert_clean(report: dict, page: Path, nocode: bool) -> None:
    where = page.name
    assert report["overflow_px"] == 0, (
        f"{where}: {report['overflow_px']} px of horizontal overflow at 1400 px"
    )
    assert not report["broken_images"], f"{where}: images that do not load: {report['broken_images']}"
    assert not report["broken_links"], f"{where}: links that do not resolve: {report['broken_links']}"
    assert not report["external_links"], f"{where}: links outside the report: {report['external_links']}"
    assert not report["console_errors"], f"{where}: console errors: {report['console_errors']}"
    if nocode:
        assert report["stderr_outputs"] == 0, (
            f"{where}: {report['stderr_outputs']} stderr output(s) on the page"
        )
        assert not report["noise"], f"{where}: terminal noise on the page: {report['noise']}"
        assert not report["sideways"], f"{where}: outputs that scroll sideways at 1400 px: {report['sideways']}"
        assert report["index_cells"] == 0, f"{where}: {report['index_cells']} pandas index cell(s) on the page"
        assert not report["shape_footers"], f"{where}: DataFrame footers on the page: {report['shape_footers']}"
        assert not report["missing_figures"], f"{where}: figures named in prose but not on the page: " \
                                              f"{report['missing_figures']}"


# ------------------------------------------------------------------------------------ the checker can fail


def test_the_checker_sees_overflow_stderr_broken_images_and_links(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<html><body><div style='width:2000px'>wide</div>"
        '<div data-mime-type="application/vnd.jupyter.stderr">TqdmWarning: IProgress not found</div>'
        "<pre>Loading weights:  40%|████      | 109/272 [00:00<00:00, 12588.28it/s]</pre>"
        "<img src='missing.png'><a href='nowhere.csv'>csv</a><a href='#no-such-id'>anchor</a>"
        "<div class='jp-OutputArea-output' style='overflow-x:auto;width:300px'><table><thead><tr><th></th>"
        "<th>a_rather_long_column</th></tr></thead><tbody><tr><th>0</th><td style='white-space:nowrap'>"
        + "x" * 200 + "</td></tr></tbody></table></div><p>50 rows × 12 columns</p>"
        "<p>As Figure 9.9 shows, and Figure 9.1 too.</p><p class='esa-caption' id='figure-9.1'>Figure 9.1.</p>"
        "<script>console.error('boom')</script></body></html>"
    )
    r = inspect_page(browser, bad)
    assert r["overflow_px"] >= 500
    assert r["stderr_outputs"] == 1 and "TqdmWarning" in r["noise"]
    assert any("109/272" in n for n in r["noise"])
    assert len(r["broken_images"]) == 1 and len(r["broken_links"]) == 2
    assert any("boom" in e for e in r["console_errors"])
    assert r["sideways"] and r["index_cells"] == 1 and r["shape_footers"] == ["50 rows × 12 columns"]
    assert r["missing_figures"] == ["9.9"]


# ------------------------------------------------------------------------------------ a fixture run

HEADER = """\
# %% [markdown]
# # {title}

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {{}}

"""

NOISY = """\
# %%
import logging
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from tqdm.auto import tqdm  # in a kernel without ipywidgets: TqdmWarning, unless the runner quiets it

import esa.nb

ctx = esa.nb.context("phase3_week5_noisy", profile, models, run_dir, overrides)
for _ in tqdm(range(200), desc="dequantising", mininterval=0):
    pass
logging.getLogger("esa.perturb.sweep").warning("bit_flip made every evaluation window non-finite")
np.exp(np.array([1000.0]))  # overflow RuntimeWarning
from transformers.utils import logging as tlog
tlog.get_logger("transformers.demo").error("a transformers error")  # conftest sets verbosity=error
big = pd.DataFrame({"param": [f"model.layers.{i}.mlp.down_proj.weight" for i in range(50)], "score": np.arange(50.0)})
ctx.save_table(big, "big_table")
big

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(big.score)
ax.set_title("score by rank")
ctx.savefig(fig, "score", caption="Score by rank.", takeaway=f"The top score is {big.score.max():.0f}.")

# %%
from esa.report import scorecard

esa.nb.say(scorecard.in_words([]))

# %%
ctx.table(big.assign(ci_lo=big.score - 1, ci_hi=big.score + 1, mean=big.score * 1.1e7), "ranked", "Scores by rank.")

# %%
esa.nb.found(f"The top score is {big.score.max():.0f} ({ctx.ref('figure', 'score')}, {ctx.ref('table', 'ranked')}).")
"""

LOOP = """\
# %%
import matplotlib.pyplot as plt
import pandas as pd

import esa.nb

ctx = esa.nb.context("phase3_week6_loop", profile, models, run_dir, overrides)
wide = pd.DataFrame({f"a_rather_long_column_name_{i}": [1.2345678] * 3 for i in range(40)})
ctx.save_table(wide, "wide")
display(wide)
for m in ["small", "large"]:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(["top_k", "random_k"], [3.0, 0.1])
    ctx.savefig(fig, f"damage_{m}", caption=f"{m}: damage per group")
"""


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    from test_runner_run import KERNEL

    root = tmp_path_factory.mktemp("browser_project")
    (root / "params" / "profiles").mkdir(parents=True)
    (root / "notebooks").mkdir()
    profile = {"name": "smoke", "models": ["tiny-llama"], "phase1_models": ["tiny-llama"]}
    (root / "params" / "profiles" / "smoke.yaml").write_text(yaml.safe_dump(profile))
    entries = [
        {"id": "phase3_week5_noisy", "phase": 3, "week": 5, "title": "Noisy", "models": "profile"},
        {"id": "phase3_week6_loop", "phase": 3, "week": 6, "title": "Loop", "models": "profile"},
    ]
    (root / "params" / "schedule.yaml").write_text(yaml.safe_dump({"notebooks": entries}))
    for e, body in zip(entries, (NOISY, LOOP), strict=True):
        (root / "notebooks" / f"{e['id']}.py").write_text(HEADER.format(title=e["title"]) + body)
    before = os.environ.get("ESA_PARAMS_DIR")
    try:
        rc = cli.main(["--root", str(root), "--kernel", KERNEL, "--run-id", "browser"])
    finally:
        if before is None:
            os.environ.pop("ESA_PARAMS_DIR", None)
        else:
            os.environ["ESA_PARAMS_DIR"] = before
    run_dir = root / "reports" / "browser"
    assert rc == 0, (run_dir / "manifest.json").read_text()
    return run_dir


def test_fixture_run_pages_are_clean_in_a_browser(browser, fixture_run):
    run_dir = fixture_run
    assert_clean(inspect_page(browser, run_dir / "index.html"), run_dir / "index.html", nocode=False)
    for nb, n_fig in (("phase3_week5_noisy", 1), ("phase3_week6_loop", 2)):
        out = outputs(run_dir, nb)
        r = inspect_page(browser, out.html_nocode)
        assert_clean(r, out.html_nocode, nocode=True)
        assert len(r["captions"]) == n_fig, r["captions"]
        assert r["n_images"] >= n_fig
        with_code = inspect_page(browser, out.html)
        assert not with_code["broken_links"] and not with_code["console_errors"]
    noisy = inspect_page(browser, outputs(run_dir, "phase3_week5_noisy").html_nocode)
    assert noisy["captions"] == ["Figure 5.1. Score by rank. The top score is 49. (PDF · PNG)"]
    page = outputs(run_dir, "phase3_week5_noisy").html_nocode.read_text(encoding="utf-8")
    # "What this week found" sits under the title, before the first table; the table is numbered and typeset
    assert page.index("What this week found") < page.index("model.layers.0.")
    # and the criteria in words close the page, after the last figure and before the artefacts
    assert page.index("<caption>Table 5.1.") < page.index("judges no criterion") < page.index("id=\"Artefacts\"")
    assert "Table 5.1. Scores by rank." in page and "Mean [95% CI]" in page and "1.10 × 10⁷ [0, 2.00]" in page
    loop = inspect_page(browser, outputs(run_dir, "phase3_week6_loop").html_nocode)
    assert [c.split(".")[0] + "." + c.split(".")[1] for c in loop["captions"]] == ["Figure 6.1", "Figure 6.2"]


def test_fixture_run_logs_and_artefacts(fixture_run):
    out = outputs(fixture_run, "phase3_week5_noisy")
    log = out.log.read_text()
    for expected in (
        "WARNING esa.perturb.sweep: bit_flip made every evaluation window non-finite",
        "RuntimeWarning: overflow encountered in exp",
        "ERROR transformers.demo: a transformers error",
    ):
        assert expected in log
    assert "IProgress" not in log  # quieted at its source, not merely moved
    page = out.html_nocode.read_text()
    assert "../logs/phase3_week5_noisy.log" in page and "../data/phase3_week5_noisy/big_table.csv" in page
    # the 50-row table shows its headline rows only (pandas display capped in runner kernels)
    # (20 rows as the cell's value, 10 in the numbered table), each saying how many rows the CSV holds
    assert page.count("model.layers.") <= 30 and "first 20 of 50 rows" in page and "first 10 of 50 rows" in page
    assert len((out.data / "big_table.csv").read_text().splitlines()) == 51
    reg = artefacts.read_registry(out.data)
    assert reg is not None and [f.number for f in reg.figures] == ["5.1"]
    assert Path(reg.figures[0].pdf).read_bytes().startswith(b"%PDF")


def test_fixture_run_pdf(fixture_run):
    pytest.importorskip("typst")
    from pypdf import PdfReader

    # As make runs it: its own process, on the run folder of a root.
    root = fixture_run.parent.parent
    cmd = [sys.executable, "-m", "esa.runner.docs", "pdf", "--root", str(root), "--run-id", fixture_run.name]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0 and "printing the HTML pages" not in proc.stderr, proc.stderr
    reader = PdfReader(str(fixture_run / "report.pdf"))
    outline = [[x.title for x in o] if isinstance(o, list) else o.title for o in reader.outline]
    titles = [t for t in outline if isinstance(t, str)]
    # a document: a section per phase, the fixture's two notebooks under phase 3, the scorecard last
    i = titles.index("4. Phase 3: Causal validation by perturbation")
    assert outline[outline.index(titles[i]) + 1] == ["Week 5: Noisy", "Week 6: Loop"], outline
    assert titles[-1] == "Appendix: the scorecard" and seconds < PDF_SECONDS, f"PDF took {seconds:.1f} s"
    text = "".join(p.extract_text() for p in reader.pages)
    assert "Figure 5.1." in text and "TqdmWarning" not in text and "it/s]" not in text
    assert "Run browser" in reader.pages[0].extract_text()


# ------------------------------------------------------------------------------------ the real smoke run


@pytest.mark.slow
def test_smoke_report_in_a_browser_and_its_pdf(browser, smoke_run):  # noqa: F811 - the imported fixture
    proc, run_dir = smoke_run
    assert run_dir.name == SMOKE_RUN_ID and (run_dir / "index.html").is_file(), proc.stderr[-3000:]
    assert_clean(inspect_page(browser, run_dir / "index.html"), run_dir / "index.html", nocode=False)
    for nb in ("phase1_week0_baselines", "phase3_week5_core_perturbation"):
        page = outputs(run_dir, nb).html_nocode
        r = inspect_page(browser, page)
        assert_clean(r, page, nocode=True)
        assert r["captions"], f"{nb}: no numbered figure caption on the page"
    # every no-code page: no stderr output and no terminal noise (a static read; the browser saw two)
    noisy = {}
    for page in sorted((run_dir / "html").glob("*.nocode.html")):
        text = page.read_text(encoding="utf-8")
        hits = [w for w in NOISE if w in text] + PROGRESS.findall(text)[:2]
        # an output element, not the stylesheet's [data-mime-type='application/vnd.jupyter.stderr'] rule
        if 'data-mime-type="application/vnd.jupyter.stderr"' in text or hits:
            noisy[page.name] = hits or ["stderr output"]
    assert not noisy, f"no-code pages with terminal noise: {noisy}"
    # every page shows people-tables (no raw DataFrame: its class, its index, its shape footer); every phase page
    # (weeks 0-15; the synthesis has its own shape) opens with what its week found
    raw, unfound = {}, []
    for page in sorted((run_dir / "html").glob("*.nocode.html")):
        text = page.read_text(encoding="utf-8")
        if 'class="dataframe' in text or INDEX_FOOTER.search(text):
            raw[page.name] = INDEX_FOOTER.findall(text) or ["a raw DataFrame"]
        if "synthesis" not in page.name and "What this week found" not in text:
            unfound.append(page.name)
    assert not raw, f"no-code pages with raw DataFrames: {raw}"
    assert not unfound, f"phase pages without 'What this week found': {unfound}"
    started = time.perf_counter()
    pdf = docs.build_pdf(run_dir, chrome=browser)
    seconds = time.perf_counter() - started
    assert pdf.stat().st_size > 0 and seconds < PDF_SECONDS, f"PDF took {seconds:.1f} s"
