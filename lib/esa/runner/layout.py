"""Where a run puts things: one place, so the runner, the index and the tests agree.

reports/<run>/
  index.html                      the run's front page (esa.runner.index)
  manifest.json                   git commit, package versions, parameters, timings, status
  input/<id>.ipynb                unexecuted notebook written by jupytext (papermill's input)
  notebooks/<id>.ipynb            executed notebook
  html/<id>.html, <id>.nocode.html  renderings with and without code
  state/<id>.json                 stamp of the last execution (key, status, timings, failure)
  logs/<id>.log                   the kernel's logs and Python warnings (linked from the pages)
  report.pdf                      the whole report: index, then each notebook without code (esa.runner.pdf)
  data/<id>/, scorecard/<id>.json  written by the notebook itself (esa.nb, esa.report.scorecard)
  submitit/                       submitit's job files when --executor local|slurm
figures/<run>/<id>/*.png, *.pdf   figures (esa.nb.NotebookContext.savefig); data/<id>/*.csv, *.tex tables
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from esa.figures import run_figures


@dataclass(frozen=True)
class Outputs:
    input: Path
    executed: Path
    html: Path
    html_nocode: Path
    log: Path
    data: Path


def outputs(run_dir: Path, notebook: str) -> Outputs:
    return Outputs(
        input=run_dir / "input" / f"{notebook}.ipynb",
        executed=run_dir / "notebooks" / f"{notebook}.ipynb",
        html=run_dir / "html" / f"{notebook}.html",
        html_nocode=run_dir / "html" / f"{notebook}.nocode.html",
        log=run_dir / "logs" / f"{notebook}.log",
        data=run_dir / "data" / notebook,
    )


def report_pdf(run_dir: Path) -> Path:
    return run_dir / "report.pdf"


def figures_dir(root: Path, run_id: str) -> Path:
    return run_figures(root / "reports" / run_id, root, run_id)
