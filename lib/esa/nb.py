"""What every notebook does first: resolve its parameters and where its outputs go.

A notebook's parameters cell sets `profile`, `models`, `run_dir`, `overrides`; `context(...)` turns them
into a `NotebookContext` with the merged profile, the model list, and output folders:
`<run_dir>/data/<notebook>/` for tables and JSON, `figures/<run>/<notebook>/` for figures.
`save_table` writes parquet + CSV + LaTeX, `savefig` PNG + PDF with a numbered caption; both are listed
in the notebook's artefact registry (esa.report.artefacts), which the page renderer reads. `table` saves a
frame and shows it numbered as a people-table (esa.report.tables); `say` and `found` return computed
sentences as Markdown (a page shows no print()); `ref` gives "Table 5.2" / "Figure 5.1" for those sentences.

Under the runner (ESA_NOTEBOOK_LOG set), `headless_kernel()` runs in the kernel before the first cell:
progress bars off, logs and Python warnings into the notebook's log file, long tables shown capped, so the
rendered page holds results only. Imports nothing from Jupyter; matplotlib only when a figure is saved.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esa.figures import run_figures, save_figure
from esa.params import Profile, load_profile
from esa.progress import LOG_ENV, follow_cpu_share, quiet
from esa.report import artefacts, tables
from esa.store import REPO_ROOT, write_json

HEADLINE_ROWS = 10  # rows a page shows of a long table; the CSV has them all

_PathBase = type(Path())


class SavedTable(_PathBase):
    """The parquet path `save_table` returns; shown in a notebook as the headline rows with links."""

    def _repr_html_(self) -> str | None:
        view = getattr(self, "view", None)
        return view() if view else None


class Prose(str):
    """Computed sentences shown as Markdown (Jupyter calls `_repr_markdown_`; no IPython import needed)."""

    def _repr_markdown_(self) -> str:
        return str(self)


FOUND_MARK = artefacts.FOUND_MARK  # the page renderer (esa.runner.pages) moves this output under the title


def say(*sentences: str) -> Prose:
    """Sentences computed by a notebook, as one Markdown paragraph (never print())."""
    return Prose(" ".join(s.strip() for s in sentences if s and s.strip()))


def found(*sentences: str) -> Prose:
    """The page's "What this week found": at most three sentences, each naming its figure or table.

    Computed at the end of a notebook; the page shows it first, under the title."""
    kept = [s.strip() for s in sentences if s and s.strip()]
    if len(kept) > 3:
        raise ValueError(f"'What this week found' holds at most three sentences, got {len(kept)}")
    body = "\n".join(f"- {s}" for s in kept) or "- Nothing this run could state."
    return Prose(f"{FOUND_MARK}\n## What this week found\n\n{body}\n")


class SavedFigure(_PathBase):
    """The PNG path `savefig` returns; its caption is printed once, so it displays as nothing more."""

    def _repr_html_(self) -> str:
        return ""


@dataclass
class NotebookContext:
    notebook: str
    profile: Profile
    models: list[str]
    run_dir: Path
    data_dir: Path
    fig_dir: Path
    registry: artefacts.Registry = field(init=False)
    shown: list[str] = field(init=False)  # tables shown on the page, in order: "Table <week>.<i>"

    def __post_init__(self) -> None:
        # A fresh registry per execution: a rerun that saves fewer artefacts must not list stale ones.
        self.registry = artefacts.Registry(self.notebook)
        self.shown = []

    @property
    def page_dir(self) -> Path:
        """Where the rendered pages live (esa.runner.layout): links in outputs are relative to it."""
        return self.run_dir / "html"

    def save_table(self, df: Any, name: str, caption: str = "") -> SavedTable:
        """Write a DataFrame as parquet, CSV and LaTeX (booktabs) and return the parquet path.

        The returned path, when displayed, shows the table's headline rows and links the full files.
        """
        rec = artefacts.write_table(df, self.data_dir, name, caption)
        self.registry.tables = [t for t in self.registry.tables if t.name != name] + [rec]
        artefacts.write_registry(self.data_dir, self.registry)
        out = SavedTable(self.data_dir / rec.parquet)
        out.view = lambda: self.table_html(df, name)  # type: ignore[attr-defined]
        return out

    def _links(self, name: str) -> str:
        """Links from the page to a table's full CSV and LaTeX files."""
        return " · ".join(
            f'<a href="{html.escape(artefacts.relative(self.data_dir / f"{name}{ext}", self.page_dir))}">{label}</a>'
            for ext, label in ((".csv", "CSV"), (".tex", "LaTeX"), (".parquet", "parquet"))
            if (self.data_dir / f"{name}{ext}").is_file()  # a table too large for a CSV has none
        )

    def table_html(self, df: Any, name: str, rows: int = HEADLINE_ROWS) -> str:
        """The first `rows` rows of `df` as a people-table (esa.report.tables), and where the full one is."""
        links = self._links(name)
        head = f"first {min(rows, len(df))} of {len(df):,} rows" if len(df) > rows else f"{len(df):,} rows"
        return tables.html(df.head(rows), footer=f"{head}; full table: {links}")

    def table(
        self, df: Any, name: str, caption: str, columns: list[str] | None = None,
        headers: dict[str, str] | None = None, rows: int = HEADLINE_ROWS,
        ci: dict[str, tuple[str, str]] | None = None,
    ) -> tables.Table:
        """Save `df` in full (save_table) and show it numbered ("Table 5.2. caption") as a people-table:
        `columns` are the headline columns (all when None), the first `rows` rows; the CSV has the rest."""
        if any(n is not None for n in getattr(df.index, "names", [None])):
            df = df.reset_index()  # a groupby's keys are data: the parquet (which drops the index) keeps them
        self.save_table(df, name, caption)
        if name not in self.shown:
            self.shown.append(name)
        number = artefacts.figure_number(self.notebook, self.shown.index(name) + 1)
        links = self._links(name)
        head = df.head(rows) if hasattr(df, "head") else df
        n = len(df)
        more = f"first {rows} of {n:,} rows, " if n > rows else ""
        hidden = len(df.columns) - len(columns) if columns else 0
        cols = f"{hidden} more column{'s' if hidden != 1 else ''} in the files, " if hidden > 0 else ""
        return tables.Table(head, caption=f"Table {number}. {caption}", columns=columns, headers=headers,
                            footer=f"{more}{cols}full table: {links}", ci=ci)

    def ref(self, kind: str, name: str) -> str:
        """"Table 5.2" or "Figure 5.1": the number a shown table or saved figure of that name got, for prose."""
        if kind == "table" and name in self.shown:
            return f"Table {artefacts.figure_number(self.notebook, self.shown.index(name) + 1)}"
        if kind == "figure":
            rec = next((f for f in self.registry.figures if f.name == name), None)
            if rec is not None:
                return f"Figure {rec.number}"
        raise KeyError(f"no {kind} named {name!r} on this page yet")

    def save_json(self, obj: Any, name: str) -> Path:
        return write_json(self.data_dir / f"{name}.json", obj)

    def savefig(
        self, fig: Any, name: str, dpi: int = 130, caption: str | None = None, takeaway: str = ""
    ) -> SavedFigure:
        """Save a figure as PNG and PDF under figures/<run>/<notebook>/, numbered, with a caption.

        `caption` says what the figure shows (default: its title); `takeaway` is the one-line result,
        computed by the notebook. The caption line is printed; the page renderer sets it under the image.
        """
        png = save_figure(
            fig, self.fig_dir / f"{name}.png", dpi=dpi, close=False
        )  # the notebook still shows it
        pdf = save_figure(fig, self.fig_dir / f"{name}.pdf", close=False)
        previous = [f for f in self.registry.figures if f.name != name]
        rec = artefacts.FigureRecord(
            number=artefacts.figure_number(self.notebook, len(previous) + 1),
            name=name,
            caption=_one_line(caption or _title_of(fig) or name.replace("_", " ")),
            takeaway=_one_line(takeaway),
            png=str(png),
            pdf=str(pdf),
        )
        self.registry.figures = [*previous, rec]
        artefacts.write_registry(self.data_dir, self.registry)
        print(rec.label())
        return SavedFigure(png)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _title_of(fig: Any) -> str:
    """A figure's suptitle, else its first axes title: the default caption."""
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():
        return sup.get_text()
    for ax in getattr(fig, "axes", []):
        if ax.get_title():
            return ax.get_title()
    return ""


def headless_kernel() -> None:
    """Make a runner-executed kernel quiet (called by the runner before the first cell; idempotent).

    Logs of every library, and Python warnings, go to the file named by ESA_NOTEBOOK_LOG, not to the
    page; progress bars are off; long DataFrames display capped. Does nothing outside the runner.
    """
    log = os.environ.get(LOG_ENV)
    if not log:
        return
    quiet()
    root = logging.getLogger()
    if not any(
        isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(log) for h in root.handlers
    ):
        for h in list(root.handlers):
            root.removeHandler(h)
        handler = logging.FileHandler(log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the 'py.warnings' logger -> the log file
    _quiet_tqdm_auto()
    _transformers_logs_to_root()
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        return
    pd.set_option("display.max_rows", 2 * HEADLINE_ROWS)
    pd.set_option("display.min_rows", HEADLINE_ROWS)
    _people_tables(pd)


def _people_tables(pd: Any) -> None:
    # A DataFrame left as a cell's value shows as a people-table (no index column, no "rows x columns"
    # footer, headers in words), capped to its headline rows; the kernel's IPython is there when run.
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    shell.display_formatter.formatters["text/html"].for_type(
        pd.DataFrame, lambda df: tables.html(df.head(2 * HEADLINE_ROWS), footer=_capped(len(df)))
    )


def _capped(n: int) -> str:
    return f"first {2 * HEADLINE_ROWS} of {n:,} rows" if n > 2 * HEADLINE_ROWS else ""


def _quiet_tqdm_auto() -> None:
    # huggingface_hub and accelerate import tqdm.auto at import time; inside a kernel without ipywidgets
    # tqdm.autonotebook then warns (TqdmExperimentalWarning "IProgress not found") and falls back to the
    # text bar. Bars are off here, so the widget front end is never wanted: import it once, silently.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        with contextlib.suppress(ImportError):  # tqdm is a dependency; nothing to quiet without it
            import tqdm.auto  # noqa: F401


def _transformers_logs_to_root() -> None:
    # transformers gives its logger its own stderr handler and stops propagation; hand its records to the
    # root logger (the log file) instead.
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        return
    tlog.disable_default_handler()
    tlog.enable_propagation()


def context(
    notebook: str,
    profile: str = "smoke",
    models: list[str] | None = None,
    run_dir: str | os.PathLike[str] = "reports/interactive",
    overrides: dict[str, Any] | None = None,
    model_set: str = "models",
) -> NotebookContext:
    """Resolve a notebook's parameters. `model_set` names the profile list used when `models` is None."""
    headless_kernel()  # a no-op outside the runner, and when the runner already called it
    follow_cpu_share(interval_s=0.0)  # run_all --jobs on CPU: this notebook's share of the cores, from the start
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=False)
    prof = load_profile(profile, overrides)
    chosen = list(models) if models else list(getattr(prof, model_set))
    run = Path(run_dir)
    if not run.is_absolute():
        # The runner starts kernels in its root (the repo, or a test's project folder) and passes run_dir
        # relative to it; interactively the notebook's cwd is notebooks/, so the repo root is the base.
        run = (Path.cwd() if os.environ.get(LOG_ENV) else REPO_ROOT) / run
    data = run / "data" / notebook
    data.mkdir(parents=True, exist_ok=True)
    # figures/<run>/ beside reports/<run>/ (esa.runner.layout), under whichever root holds the run
    root = run.parent.parent if run.parent.name == "reports" else REPO_ROOT
    figs = run_figures(run, root, run.name) / notebook
    return NotebookContext(notebook, prof, chosen, run, data, figs)
