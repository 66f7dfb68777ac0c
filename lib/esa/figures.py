"""Saving figures: atomically (no half-written file after a crash) and closed afterwards (no leaks in long runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esa.store import atomic_path

# A run folder holding this file keeps its figures inside (<run>/figures/<notebook>/) instead of beside it
# (figures/<run>/): the committed record (esa.runner.record) is one self-contained folder.
FIGURES_INSIDE = ".figures-inside"


def run_figures(run_dir: Path, root: Path, run_id: str) -> Path:
    """The figures folder of run `run_id` whose folder is `run_dir`, under repo root `root`."""
    return run_dir / "figures" if (run_dir / FIGURES_INSIDE).exists() else root / "figures" / run_id


def save_figure(fig: Any, path: str | Path, dpi: int = 130, close: bool = True) -> Path:
    """Write a matplotlib figure to `path`; the format follows the suffix (png, pdf, svg)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path
