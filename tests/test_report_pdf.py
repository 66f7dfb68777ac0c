"""The synthesis as a results section (tables for people, outcome paragraphs, contradictions) and the report
PDF as a document (title page, abstract, one section per phase, scorecard appendix), on synthetic runs."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from test_findings import MODEL, make_run
from test_scorecard import SMOKE

from esa.report import artefacts, document, synthesis
from esa.report.tables import markdown, people, with_ci
from esa.runner import docs
from esa.store import read_json, write_json

PDF_SECONDS = 60  # as tests/test_browser.py


def test_tables_for_the_synthesis_and_the_pdf():
    """The synthesis and the PDF use the pages' table helper (esa.report.tables), as Markdown."""
    assert with_ci(117.2, 105.4, 130.1) == "117 [105, 130]" and with_ci(4.0, float("nan"), 2) == "4.00"
    df = pd.DataFrame({"model": ["a"], "dlogppl_top_k": [22.04], "lo": [20.0], "hi": [24.5], "odd_name": [1.5]},
                      index=[7])
    t = people(df, ci={"dlogppl_top_k": ("lo", "hi")})
    assert list(t.columns) == ["Model", "Top-k Δ log-PPL (nats/token) [95% CI]", "Odd name"]
    assert t.iloc[0].tolist() == ["a", "22.0 [20.0, 24.5]", "1.50"]
    auto = people(df.rename(columns={"lo": "dlogppl_top_k_lo", "hi": "dlogppl_top_k_hi"}))
    assert auto.equals(t)  # X_lo / X_hi beside X are its interval without being asked
    md = markdown(t)
    assert md.splitlines()[0] == "| Model | Top-k Δ log-PPL (nats/token) [95% CI] | Odd name |" and "7" not in md


def _phase3(top: float, magnitude: float, random: float = 0.1) -> pd.DataFrame:
    return pd.DataFrame([{"model": "smollm2-135m", "perturbation": "sign_flip", "scale": 1.0, "k": 100,
                          "dlogppl_top_k": top, "dlogppl_random_k": random, "dlogppl_magnitude_k": magnitude,
                          "dlogppl_top_k_lo": top - 1, "dlogppl_top_k_hi": 99.0}])  # CI bounds are no control


def test_contradictions_are_computed_from_the_tables():
    found = synthesis.contradictions(_phase3(22.0, 52.0), [])
    assert len(found) == 1
    assert found[0].startswith("On smollm2-135m, sign_flip (scale 1) of the magnitude_k (per matrix, the top-k's "
                               "count of largest |w|) does more damage")
    assert "52.0 vs 22.0 nats/token" in found[0]
    assert synthesis.contradictions(_phase3(52.0, 22.0), []) == []  # the top-k wins: nothing against it
    assert synthesis.contradictions(None, []) == []
    rows = [{"id": "P3.sign_flip_ratio.m", "phase": 3, "verdict": "FAIL", "measured": 1.234, "threshold": "> 10"},
            {"id": "P3.other.m", "phase": 3, "verdict": "PASS", "measured": 20, "threshold": "> 10"}]
    found = synthesis.contradictions(None, rows)
    assert found == [f"P3.sign_flip_ratio.m failed: measured 1.23 against > 10 (table {synthesis.TABLE_CLAIMS})."]


def _answers(rows: list[dict]) -> pd.DataFrame:
    return synthesis.answers(rows, {"phases": [4, 5]})


def test_outcome_paragraphs_say_answer_evidence_and_what_would_change_it():
    rows = [{"id": "P1.finite.m", "phase": 1, "verdict": "PASS", "measured": 0, "threshold": "== 0"},
            {"id": "P2.overlap.m", "phase": 2, "verdict": "FAIL", "measured": 0.3, "threshold": "> 0.6",
             "notebook": "nb2"},
            {"id": "P2.tail.m", "phase": 2, "verdict": "PASS", "measured": 40, "threshold": ">= 10"},
            {"id": "P3.ratio.m", "phase": 3, "verdict": "underpowered", "measured": 9, "threshold": "> 10",
             "note": "only 2 seed(s) run. The rest of the note"}]
    figs = {1: ["0.1"], 2: ["1.1", "1.2"], 3: [], 4: [], 5: []}
    paras = synthesis.outcome_paragraphs(rows, _answers(rows), figs)
    assert len(paras) == len(synthesis.OUTCOMES)
    p1, p2, p3, p4, _ = paras
    assert "is supported (1 PASS of 1 criteria)" in p1 and "Evidence: figure 0.1 and table 16.2." in p1
    assert "A FAIL on any of its 1 passing criteria" in p1
    assert "is contradicted" in p2 and "figures 1.1, 1.2 and table 16.3" in p2
    assert "It would change if P2.overlap.m (0.300 against > 0.6) passed" in p2
    assert "is not established at this budget" in p3 and "Judging 1 underpowered criteria" in p3
    assert "power-planned profile" in p3 and "was not tested: the phase did not run" in p4
    claims = synthesis.claims_table(rows, figs, {"nb2": (2, ["2.1"])})
    assert claims["id"].tolist() == [r["id"] for r in rows]
    assert claims["evidence"].tolist() == ["figure 0.1 and table 16.2", "figure 2.1 and table 16.3",
                                           "figures 1.1, 1.2 and table 16.3", "table 16.4"]
    assert claims["why"].tolist() == ["", "", "", "only 2 seed(s) run"]


def _with_registry_and_commit(run: Path, figs: Path) -> None:
    """What a real run adds to the synthetic folder: a figure registry and the manifest's environment."""
    png = figs / "phase3_week5_core_perturbation" / f"damage_{MODEL}.png"
    data = run / "data" / "phase3_week5_core_perturbation"
    artefacts.write_registry(data, artefacts.Registry(data.name, figures=[artefacts.FigureRecord(
        "5.1", png.stem, "Damage per group", "Top-k 5 nats/token.", str(png), str(png.with_suffix(".pdf")))]))
    Image.open(png).save(png)  # make_run drew it; the registry names it
    man = read_json(run / "manifest.json")
    write_json(run / "manifest.json", {**man, "run_id": run.name, "status": "ok",
                                       "environment": {"git_commit": "abc123def456", "git_dirty": False}})


def _pdf_pages(path: Path) -> list[str]:
    """Page texts: pdftotext (poppler) when installed, else pypdf; zero-width break hints removed."""
    if shutil.which("pdftotext"):
        out = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True)
        pages = out.stdout.split("\f")
    else:
        from pypdf import PdfReader

        pages = [p.extract_text() for p in PdfReader(str(path)).pages]
    return [p.replace("\u200b", "") for p in pages]


def test_report_pdf_is_a_document(tmp_path):
    pytest.importorskip("typst")
    run, figs = make_run(tmp_path, SMOKE, magnitude=8.0, phase5=True)
    _with_registry_and_commit(run, figs)
    started = time.perf_counter()
    pdf = docs.build_pdf(run)
    seconds = time.perf_counter() - started
    assert pdf == run / "report.pdf" and seconds < PDF_SECONDS
    pages = _pdf_pages(pdf)
    title = " ".join(pages[0].split())
    assert document.TITLE in title and "Run r" in title and "Commit abc123def456" in title and "Profile smoke" in title
    text = " ".join(" ".join(pages).split())
    assert "Abstract" in text and text.index("Abstract") < text.index("Phase 1: Baselines")
    # the abstract's numbers are the scorecard's
    n = len(synthesis.synthesize(run, figs)["rows"])
    assert f"Of {n} criteria" in text
    abstract = text[text.index("Abstract"):text.index("Contents")]
    assert f"On {MODEL}: The strongest critical weight is" in abstract and "result(s) against the hypothesis" in abstract
    heads = [f"Phase {p}: {name}" for p, name in synthesis.PHASE_NAMES.items()]
    starts = [next((i for i, pg in enumerate(pages) if h in " ".join(pg.split())), None) for h in heads]
    assert None not in starts and starts == sorted(starts), starts  # one section per phase, in order
    assert "Figure 5.1. Damage per group" in text  # the figure sits in its phase's section
    assert "magnitude_k" in text and "does more damage than the same perturbation of the sensitivity top-k" in text
    assert "Appendix: the scorecard" in text and "P5.prune_beats_magnitude" in text
    assert text.index("Appendix: the scorecard") > max(text.index(h) for h in heads)


def test_key_figures_are_cited_by_their_page_numbers(tmp_path):
    run, figs = make_run(tmp_path, SMOKE)
    _with_registry_and_commit(run, figs)
    keys = synthesis.key_figures(figs, [MODEL])
    assert synthesis.key_figure_numbers(run, keys) == {1: None, 2: None, 3: "5.1", 4: None, 5: None}
    assert synthesis.key_figure_takeaway(run, keys).startswith("Phase 1: baselines. Phase 2: no figure. Phase 3: "
                                                               "figure 5.1.")


def test_report_pdf_falls_back_to_printing_without_typst(tmp_path, monkeypatch):
    run, figs = make_run(tmp_path, SMOKE)
    called = []
    monkeypatch.setitem(__import__("sys").modules, "typst", None)  # import typst -> ImportError
    monkeypatch.setattr(docs, "print_pdf", lambda run_dir, dest, chrome: called.append(dest) or dest)
    assert docs.build_pdf(run) == run / "report.pdf" and called == [run / "report.pdf"]


def test_phase5_paragraph_is_sentences_with_ids_apart():
    from esa.report import findings

    rows = [{"id": "P5.ft.sparse_vs_random.grad_x_weight@0.01.m", "phase": 5, "verdict": "underpowered",
             "measured": 0.1391, "threshold": "gain diff > 0", "text": "sparse FT beats random-k"},
            {"id": "P5.ft.gap.m", "phase": 5, "verdict": "underpowered", "measured": 0.2, "threshold": "> 0"},
            {"id": "P5.security.attack.m", "phase": 5, "verdict": "PASS", "measured": 3.0, "threshold": "> 1"},
            {"id": "P5.security.faults.m", "phase": 5, "verdict": "FAIL", "measured": 0.5, "threshold": "> 1",
             "text": "faults on critical weights hurt more"},
            {"id": "P3.other", "phase": 3, "verdict": "PASS"}]
    (ft, ft_ids), (sec, sec_ids) = findings._phase5(rows)
    assert ft == ("Sparse fine-tuning of critical weights: 0 of 2 criteria could be judged (2 underpowered). "
                  "For example: “sparse FT beats random-k”, measured 0.139 against gain diff > 0, underpowered.")
    assert sec.startswith("Attacks on critical weights: 2 of 2 criteria could be judged (1 PASS, 1 FAIL). Failed: "
                          "“faults on critical weights hurt more”, measured 0.5 against > 1.")
    assert ft_ids == [r["id"] for r in rows[:2]] and sec_ids == [r["id"] for r in rows[2:4]]
    assert "P5." not in ft + sec  # the ids go apart, in small type on the index
