"""The report PDF as a document: title page, computed abstract, one section per phase, scorecard appendix.

Typeset with Typst through its Python bindings (the `typst` wheel on PyPI). Why Typst, of the
publishing tools that render Markdown or notebooks to PDF:
- `typst` is one self-contained wheel (compiler and default fonts inside, about 34 MB): it installs from
  the registry like any dependency and never touches the network when it runs; a document compiles in
  well under a second.
- `quarto-cli` on PyPI is a 5 kB source package whose build downloads the Quarto bundle from GitHub, so
  it cannot install on a machine that reaches only the package registry (checked: `pip download
  quarto-cli` gives quarto_cli-1.10.19.tar.gz, nothing to run offline).
- `jupyter-book` prints PDF either through LaTeX (a TeX distribution, not on PyPI) or by printing its HTML
  with a browser, which is the path this replaces.
The document is data (`document_model`: plain JSON of strings and tables) rendered by one Typst template
(`TEMPLATE`), so no text is ever spliced into markup: Typst reads the JSON and every string stays a string.
The old path (Chromium printing the HTML pages, esa.runner.docs) remains as the fallback.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from esa.params import load_schedule
from esa.report import artefacts, synthesis
from esa.report import findings as fd
from esa.report.tables import people
from esa.stats.verdicts import VERDICTS, verdict_of

TITLE = "Critical weights in small transformer language models"
QUESTION = ("Does a transformer language model depend on a small fraction (under 1%) of its weights, so that "
            "perturbing them does far more damage than perturbing as many others, in a way that scales with "
            "size and architecture and can be put to use?")

TEMPLATE = r"""
#let d = json("doc.json")
#set document(title: d.title)
#set page(paper: "a4", margin: (x: 1.8cm, y: 2cm), numbering: "1")
#set text(size: 10pt)
#set par(justify: true)
#set heading(numbering: "1.")
#show heading.where(level: 1): it => { pagebreak(weak: true); it }
#let grid-table(t) = block(breakable: true, width: 100%)[
  #set par(justify: false)
  #text(size: 9pt)[*#t.caption*]
  #v(0.3em)
  #text(size: 7pt, table(columns: t.header.len(), inset: 3pt, stroke: 0.4pt + luma(180),
    ..t.header.map(h => strong(h)), ..t.rows.flatten()))
]
#page(numbering: none, align(center + horizon)[
  #text(20pt, weight: "bold", d.title)
  #v(0.8em)
  #text(12pt, d.subtitle)
  #v(2em)
  #table(columns: 2, stroke: none, align: (right, left), ..d.facts.flatten())
])
#heading(numbering: none, outlined: false)[Abstract]
#for p in d.abstract { par(p) }
#outline(depth: 2)
#for s in d.sections {
  heading(level: 1, numbering: if s.appendix { none } else { "1." }, s.title)
  for p in s.paragraphs { par(p) }
  for t in s.tables { grid-table(t) }
  for sub in s.notebooks {
    heading(level: 2, numbering: none, sub.title)
    for f in sub.figures { figure(image(f.path, width: 92%), caption: f.caption, numbering: none) }
    if sub.figures.len() == 0 { emph("This notebook drew no figure in this run.") }
  }
}
"""


def _plain(text: str) -> str:
    """Markdown emphasis and code marks off: the PDF sets these sentences as plain text."""
    return re.sub(r"\*\*|`", "", text)


def _breakable(cell: str) -> str:
    """Long identifiers (P2.jaccard.grad_x_weight.smollm2-135m) may wrap after . _ @ - (a zero-width space):
    Typst breaks only at spaces, and an unbroken id would run into the next column."""
    return re.sub(r"([._@/-])(?=\S)", "\\1\u200b", cell) if len(cell) > 16 and " " not in cell else cell


def _table(df: pd.DataFrame | None, caption: str) -> dict[str, Any] | None:
    if df is None or df.empty:
        return None
    t = people(df)
    return {"caption": caption, "header": [str(c) for c in t.columns],
            "rows": [[_breakable(str(v)) for v in row] for row in t.itertuples(index=False)]}


def abstract(syn: Mapping[str, Any], run_id: str, profile: str, f: fd.Findings | None = None) -> list[str]:
    """The abstract, computed: the question, the run, what was judged, each outcome's answer, the first
    model's leading finding, the contradictions."""
    rows = syn["rows"]
    c = Counter(verdict_of(r) for r in rows)
    judged_n = c["PASS"] + c["FAIL"]
    ans = syn["answers"]
    outcomes = "; ".join(f"phase {int(r['phase'])} ({synthesis.PHASE_NAMES[int(r['phase'])].lower()}) "
                         f"{r['answer']}" for r in ans.to_dict("records"))
    out = [f"{QUESTION} We answer it from run {run_id} ({profile} profile). {syn['size']}",
           f"Of {len(rows)} criteria, {judged_n} could be judged ({c['PASS']} passed, {c['FAIL']} failed); "
           + ", ".join(f"{c[v]} {v}" for v in VERDICTS[2:] if c[v]) + (". " if len(rows) > judged_n else ". ")
           + f"By expected outcome: {outcomes}."]
    lead = next((m for m in (f.models if f else []) if m.sentences and m.model != "Phase 5"), None)
    if lead is not None:
        out.append(f"On {lead.model}: {_plain(lead.sentences[0])}")
    found = syn["contradictions"]
    if found:
        out.append(f"The runs found {len(found)} result(s) against the hypothesis; the first: {_plain(found[0])}")
    return out


def _notebooks(run_dir: Path, phase: int, tmp: Path) -> list[dict[str, Any]]:
    """The phase's notebooks that left a registry in the run, by week: title and figures (copied beside
    the Typst source). Read from the run folder, so a run of another schedule still gets its figures."""
    titles = {e["id"]: e.get("title", "") for e in load_schedule()}
    found = []
    for data in sorted((run_dir / "data").glob(f"phase{phase}_week*")):
        reg = artefacts.read_registry(data)
        week = artefacts.week_of(data.name)
        if reg is not None and week is not None and data.name != synthesis.SELF:  # this document is the synthesis
            found.append((int(week), data.name, reg))
    out = []
    for week, name, reg in sorted(found, key=lambda x: (x[0], x[1])):
        figs = []
        for f in reg.figures:
            if Path(f.png).is_file():
                copy = f"fig_{len(list(tmp.glob('fig_*')))}.png"
                shutil.copyfile(f.png, tmp / copy)
                figs.append({"path": copy, "caption": f.label()})
        stamp = fd._json(run_dir / "state" / f"{name}.json") or {}  # the runner's record of the notebook
        out.append({"title": f"Week {week}: {stamp.get('title') or titles.get(name) or name}", "figures": figs})
    return out


def document_model(run_dir: Path, fig_dir: Path | None, tmp: Path) -> dict[str, Any]:
    """Everything the PDF says, as plain JSON (figures copied into `tmp`)."""
    man = fd._json(run_dir / "manifest.json") or {}
    settings = fd._settings(run_dir, None)
    syn = synthesis.synthesize(run_dir, fig_dir, settings)
    env = man.get("environment") or {}
    profile = str(man.get("profile") or settings.get("name") or "?")
    commit = str(env.get("git_commit") or "?") + (" (uncommitted changes)" if env.get("git_dirty") else "")
    facts = [["Run", run_dir.name], ["Commit", commit], ["Profile", profile],
             ["Status", str(man.get("status", "?"))], ["Finished", str(man.get("finished") or man.get("started") or "?")]]
    paragraphs = dict(zip((o.phase for o in synthesis.OUTCOMES), syn["paragraphs"], strict=True))
    sections = []
    f = fd.collect(run_dir, fig_dir, settings, syn["rows"])
    sections.append({"title": "Findings", "appendix": False, "tables": [], "notebooks": [],
                     "paragraphs": [fd.profile_banner(settings, fd.holm_m(run_dir)) + "."]
                     + [f"{m.model}: {' '.join(m.sentences)}" for m in f.models]})
    for phase, name in synthesis.PHASE_NAMES.items():
        table = _table(syn["tables"].get(phase), f"Table {synthesis.phase_table_number(phase)}. Phase {phase} in this run.")
        sections.append({"title": f"Phase {phase}: {name}", "appendix": False,
                         "paragraphs": [_plain(paragraphs[phase])] if phase in paragraphs else [],
                         "tables": [table] if table else [], "notebooks": _notebooks(run_dir, phase, tmp)})
    found = syn["contradictions"]
    sections.append({"title": "Against the hypothesis", "appendix": False, "tables": [], "notebooks": [],
                     "paragraphs": [_plain(x) for x in found] or ["No control did more damage than the sensitivity "
                                                                  "top-k, and no criterion failed as judged."]})
    sections.append({"title": "Limitations", "appendix": False, "tables": [], "notebooks": [],
                     "paragraphs": [_plain(x) for x in syn["limitations"]]})
    card = _table(syn["claims"], f"Table {synthesis.TABLE_CLAIMS}. Every criterion: its value against its "
                                 "threshold, its verdict, why it could not be judged, and its evidence.")
    sections.append({"title": "Appendix: the scorecard", "appendix": True, "notebooks": [], "tables": [card] if card else [],
                     "paragraphs": [] if card else ["The run wrote no scorecard."]})
    return {"title": TITLE, "subtitle": f"Results of run {run_dir.name}", "facts": facts,
            "abstract": abstract(syn, run_dir.name, profile, f), "sections": sections}


def build(run_dir: Path, fig_dir: Path | None, dest: Path) -> Path:
    """Compile the run's document to `dest` with Typst (ImportError when the typst wheel is missing)."""
    import typst

    with tempfile.TemporaryDirectory(prefix="esa-typst-") as tmp_name:
        tmp = Path(tmp_name)
        model = document_model(run_dir, fig_dir, tmp)
        (tmp / "doc.json").write_text(json.dumps(model), encoding="utf-8")
        (tmp / "report.typ").write_text(TEMPLATE, encoding="utf-8")
        pdf = typst.compile(str(tmp / "report.typ"), root=str(tmp), format="pdf")
    Path(dest).write_bytes(pdf)
    return dest
