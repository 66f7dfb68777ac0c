"""Figures of pruning: perplexity against sparsity per method, with CI bands over calibration seeds.

Each function returns a matplotlib Figure; the caller saves it. The input is a summary table with one row
per (method, sparsity): `ppl` (geometric mean over seeds), `ppl_lo`/`ppl_hi` (95% CI, NaN with one seed),
and the dense row (sparsity 0) drawn as a horizontal reference line.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "tk", "qt", "macosx")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sparsity_curve(summary: pd.DataFrame, title: str = "", cap: float = 1e5):
    """PPL vs sparsity (log y), one line per method, CI band where >= 2 seeds; PPL above `cap` is drawn at it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = summary[summary["method"] == "dense"]
    for method, g in summary[summary["method"] != "dense"].groupby("method", sort=False):
        g = g.sort_values("sparsity")
        x = g["sparsity"].to_numpy(dtype=float)
        y = np.minimum(g["ppl"].to_numpy(dtype=float), cap)
        (line,) = ax.plot(x, y, marker="o", label=f"{method} ({g['calib_mode'].iloc[0]})")
        lo, hi = g["ppl_lo"].to_numpy(dtype=float), g["ppl_hi"].to_numpy(dtype=float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(x[ok], np.minimum(lo[ok], cap), np.minimum(hi[ok], cap), alpha=0.2, color=line.get_color())
    if len(dense) and math.isfinite(float(dense["ppl"].iloc[0])):
        ax.axhline(float(dense["ppl"].iloc[0]), color="k", ls="--", lw=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (share of block linear weights pruned)")
    ax.set_ylabel("perplexity (eval split)")
    ax.set_title(title or "perplexity vs sparsity (bands: 95% CI over calibration seeds)")
    ax.legend(fontsize=8, loc="upper left")  # perplexity rises with sparsity: the top left stays clear
    fig.tight_layout()
    return fig
