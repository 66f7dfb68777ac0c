"""Figure of the curvature reliability measurement (esa.sensitivity.curvature.reliability)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from esa.sensitivity.curvature import TARGET_JACCARD
from esa.sensitivity.plots import _plt


def reliability_plot(curve: pd.DataFrame, title: str = "") -> Any:
    """Two-stream top-k Jaccard and relative disagreement against the number of products, per estimator."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for est, d in curve.groupby("estimator", sort=False):
        a.semilogx(d["probes"], d["jaccard_median"], "o-", label=est, base=2)
        b.loglog(d["probes"], d["rel_error"], "o-", label=est, base=2)
    a.axhline(TARGET_JACCARD, color="grey", ls="--", lw=1, label=f"target {TARGET_JACCARD}")
    a.set_xlabel("products per stream (HVPs or sampled gradients)")
    a.set_ylabel("median per-matrix top-k Jaccard, stream A vs B")
    a.set_ylim(0, 1)
    b.set_xlabel("products per stream")
    b.set_ylabel("||A - B|| / (sqrt 2 ||mean||)")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title or "curvature diagonal: agreement of two independent probe streams")
    fig.tight_layout()
    return fig
