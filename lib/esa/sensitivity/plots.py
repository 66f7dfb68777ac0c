"""Figures of Phase 2: survival curves of scores, layer x component hotspots, attention vs FFN shares.

Each function returns a matplotlib Figure; the caller saves it (notebooks with ctx.savefig, the CLI
with `save`). matplotlib is imported lazily with the Agg backend when no display is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from esa.figures import save_figure


def _plt():
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "tk", "qt", "macosx")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def survival_plot(curves: Mapping[str, pd.DataFrame], title: str = ""):
    """Log-log survival P(score >= t) per label (metric or model)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, df in curves.items():
        d = df[df["survival"] > 0]
        ax.loglog(d["threshold"], d["survival"], label=label)
    ax.set_xlabel("score threshold t")
    ax.set_ylabel("fraction of weights with score >= t")
    ax.set_title(title or "score survival (log-log)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def hotspot_plot(counts: pd.DataFrame, title: str = "", n_layers: int | None = None):
    """Heatmap of selected weights per layer (rows) and component (columns).

    Layers holding none of the selection stay in the map as zero rows (a pivot drops them): every layer
    from 0 to `n_layers - 1` (default: the largest layer seen) is shown, and the title says how many are empty.
    """
    plt = _plt()
    if len(counts.index) and pd.api.types.is_integer_dtype(counts.index):
        last = max(int(counts.index.max()) + 1, n_layers or 0)
        counts = counts.reindex(range(last), fill_value=0)
    empty = int((counts.sum(axis=1) == 0).sum())
    fig, ax = plt.subplots(
        figsize=(1.6 + 0.6 * max(1, counts.shape[1]), 1.0 + 0.18 * max(1, counts.shape[0]))
    )
    im = ax.imshow(counts.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(counts.shape[1]), counts.columns, rotation=45)
    ax.set_yticks(range(counts.shape[0]), counts.index)
    ax.set_xlabel("component")
    ax.set_ylabel("layer")
    note = f"\n{empty} of {counts.shape[0]} layers hold none" if empty else ""
    ax.set_title((title or "global top-k: count per layer and component") + note, fontsize=9)
    fig.colorbar(im, ax=ax, label="selected weights (count)")
    return fig


def architecture_plot(table: pd.DataFrame, title: str = ""):
    """Attention vs FFN share of the score mass per layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for col in [c for c in table.columns if c.startswith("mass_")]:
        ax.plot(table["layer"], table[col], marker="o", label=col.removeprefix("mass_"))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of total score")
    ax.set_title(title or "score mass by layer: attention vs FFN")
    ax.legend()
    return fig


def save(fig, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=120)
