"""A notebook's paper-ready artefacts: tables as parquet + CSV + LaTeX, figures as PNG + PDF with captions.

Each notebook keeps one registry, `<run>/data/<notebook>/artefacts.json`, listing what it saved in order:
tables (name, rows, files) and figures (number, name, caption, takeaway, files). The page renderer
(esa.runner.notebook) uses it to caption figures and link the full tables; the index and the PDF read it
too, so a figure has the same number and caption everywhere.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esa.store import atomic_path, read_json, storable, write_json, write_parquet

REGISTRY = "artefacts.json"
# A LaTeX table is for a paper: beyond this many rows the .tex holds the first rows and says so (the CSV
# and parquet keep every row).
TEX_MAX_ROWS = 200
# Marks a notebook's "What this week found" output; the page renderer shows it under the title.
FOUND_MARK = "<!-- esa:found -->"
# Marks a page's criteria in words (esa.report.scorecard.in_words); the renderer shows it last.
CRITERIA_MARK = "<!-- esa:criteria -->"
# A CSV is for people opening a table in a spreadsheet: one over this size (week 1's top-k sets, 1.6 M rows,
# 25 MB) is not written, and the parquet alone holds the table (a committed record stays small).
CSV_MAX_BYTES = 4 << 20
LONGTABLE_ROWS = 40  # longer than a page: longtable, so LaTeX can break it


@dataclass
class TableRecord:
    name: str
    rows: int
    columns: list[str]
    parquet: str  # paths relative to the notebook's data folder
    csv: str  # "" when the table was too large for a CSV (CSV_MAX_BYTES): the parquet holds every row
    tex: str
    tex_rows: int


@dataclass
class FigureRecord:
    number: str  # "5.2": week 5, second figure of the notebook
    name: str
    caption: str
    takeaway: str
    png: str  # absolute paths (figures live outside the run folder), or relative to a record's folder
    pdf: str

    def label(self) -> str:
        """The caption line as the page and the PDF print it."""
        take = f" {self.takeaway}" if self.takeaway else ""
        return f"Figure {self.number}. {self.caption}{take}"


@dataclass
class Registry:
    notebook: str
    tables: list[TableRecord] = field(default_factory=list)
    figures: list[FigureRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "notebook": self.notebook,
            "tables": [asdict(t) for t in self.tables],
            "figures": [asdict(f) for f in self.figures],
        }


def week_of(notebook: str) -> str | None:
    """The week number in a notebook id such as phase3_week5_core_perturbation, else None."""
    m = re.search(r"week(\d+)", notebook)
    return m.group(1) if m else None


def figure_number(notebook: str, index: int) -> str:
    """Numbers figures per notebook, prefixed by its week so numbers stay unique across the report."""
    week = week_of(notebook)
    return f"{week}.{index}" if week is not None else str(index)


def _named_index(df: Any) -> bool:
    """A named index (a groupby or pivot result) carries data; an unnamed one is only row numbers."""
    return any(name is not None for name in df.index.names)


def write_table(df: Any, data_dir: Path, name: str, caption: str = "") -> TableRecord:
    """Write `df` as parquet (the store's format), CSV and LaTeX (booktabs); return what was written.

    The parquet is what later notebooks read, written as it always was (index dropped); the CSV and
    LaTeX, for people, keep a named index (a groupby result) as leading columns.
    """
    parquet = write_parquet(data_dir / f"{name}.parquet", storable(df))
    if _named_index(df):
        df = df.reset_index()
    csv = data_dir / f"{name}.csv"
    small = _write_csv(df, csv)
    tex = data_dir / f"{name}.tex"
    head = df.head(TEX_MAX_ROWS)
    note = (
        ""
        if len(df) <= TEX_MAX_ROWS
        else f" (first {TEX_MAX_ROWS} of {len(df)} rows; all rows in {(csv if small else parquet).name})"
    )
    with atomic_path(tex) as tmp:
        tmp.write_text(
            _latex(head, (caption or name.replace("_", " ")) + note, f"tab:{name}"), encoding="utf-8"
        )
    return TableRecord(
        name=name,
        rows=len(df),
        columns=[str(c) for c in df.columns],
        parquet=parquet.name,
        csv=csv.name if small else "",
        tex=tex.name,
        tex_rows=len(head),
    )


class _TooLarge(Exception):
    pass


def _write_csv(df: Any, csv: Path) -> bool:
    """Write `df` to `csv` unless that CSV would exceed CSV_MAX_BYTES; returns whether it was written."""
    try:
        with atomic_path(csv) as tmp:
            df.to_csv(tmp, index=False)
            if tmp.stat().st_size > CSV_MAX_BYTES:
                raise _TooLarge  # atomic_path drops the temporary file
    except _TooLarge:
        csv.unlink(missing_ok=True)  # an older CSV of the same name would contradict the parquet
        return False
    return True


def _latex(df: Any, caption: str, label: str) -> str:
    # Cells that hold lists or dicts become their str(); escape=True so _ % & in names compile.
    flat = df.copy()
    for col in flat.columns:
        if flat[col].dtype == object:
            flat[col] = flat[col].map(lambda v: v if isinstance(v, str) else str(v))
    return flat.to_latex(
        index=False,
        escape=True,
        float_format="%.4g",
        longtable=len(flat) > LONGTABLE_ROWS,
        caption=caption,
        label=label,
        na_rep="--",
    )


def write_registry(data_dir: Path, registry: Registry) -> Path:
    return write_json(data_dir / REGISTRY, registry.as_dict())


def read_registry(data_dir: Path) -> Registry | None:
    """The registry a notebook wrote, or None (notebooks executed before registries existed)."""
    path = Path(data_dir) / REGISTRY
    if not path.is_file():
        return None
    raw = read_json(path)
    run_dir = Path(data_dir).resolve().parent.parent  # <run>/data/<notebook>
    for f in raw.get("figures", []):  # a committed record keeps paths relative to its folder
        for key in ("png", "pdf"):
            if not Path(f[key]).is_absolute():
                f[key] = str(run_dir / f[key])
    return Registry(
        notebook=raw.get("notebook", Path(data_dir).name),
        tables=[TableRecord(**t) for t in raw.get("tables", [])],
        figures=[FigureRecord(**f) for f in raw.get("figures", [])],
    )


def relative(target: str | os.PathLike[str], start: str | os.PathLike[str]) -> str:
    """A relative URL from folder `start` to `target` (pages link artefacts, whichever machine opens them)."""
    return Path(os.path.relpath(target, start)).as_posix()
