"""Saving figures: atomically (no half-written file after a crash) and closed afterwards (no leaks in long runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esa.store import atomic_path


def save_figure(fig: Any, path: str | Path, dpi: int = 130, close: bool = True) -> Path:
    """Write a matplotlib figure to `path`; the format follows the suffix (png, pdf, svg)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path
