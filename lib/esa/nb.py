"""What every notebook does first: resolve its parameters and where its outputs go.

A notebook's parameters cell sets `profile`, `models`, `run_dir`, `overrides`; `context(...)` turns them
into a `NotebookContext` with the merged profile, the model list, and output folders:
`<run_dir>/data/<notebook>/` for tables and JSON, `figures/<run>/<notebook>/` for figures.
Imports nothing from Jupyter; matplotlib is imported only when a figure is saved.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esa.figures import save_figure
from esa.params import Profile, load_profile
from esa.store import REPO_ROOT, write_json, write_parquet


@dataclass
class NotebookContext:
    notebook: str
    profile: Profile
    models: list[str]
    run_dir: Path
    data_dir: Path
    fig_dir: Path

    def save_table(self, df: Any, name: str) -> Path:
        """Write a DataFrame as parquet (atomic) and return its path."""
        return write_parquet(self.data_dir / f"{name}.parquet", df)

    def save_json(self, obj: Any, name: str) -> Path:
        return write_json(self.data_dir / f"{name}.json", obj)

    def savefig(self, fig: Any, name: str, dpi: int = 130) -> Path:
        """Save a matplotlib figure as PNG (and PDF for papers) under figures/<run>/<notebook>/."""
        png = save_figure(fig, self.fig_dir / f"{name}.png", dpi=dpi, close=False)  # the notebook still shows it
        save_figure(fig, self.fig_dir / f"{name}.pdf", close=False)
        return png


def context(
    notebook: str,
    profile: str = "smoke",
    models: list[str] | None = None,
    run_dir: str | os.PathLike[str] = "reports/interactive",
    overrides: dict[str, Any] | None = None,
    model_set: str = "models",
) -> NotebookContext:
    """Resolve a notebook's parameters. `model_set` names the profile list used when `models` is None."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=False)
    prof = load_profile(profile, overrides)
    chosen = list(models) if models else list(getattr(prof, model_set))
    run = Path(run_dir)
    if not run.is_absolute():
        run = REPO_ROOT / run
    data = run / "data" / notebook
    data.mkdir(parents=True, exist_ok=True)
    figs = REPO_ROOT / "figures" / run.name / notebook
    return NotebookContext(notebook, prof, chosen, run, data, figs)
