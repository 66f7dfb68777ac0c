"""Rank correlation with a bootstrap CI, shared by the sink analysis (over heads) and the localisation test
(over weights)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as sps

MIN_PAIRS = 8  # below this many pairs a rank correlation and its bootstrap CI are too coarse to read


def spearman_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Spearman's rho with a percentile bootstrap CI over pairs, and its two-sided p; degenerate cases say so."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    out: dict[str, Any] = {"rho": math.nan, "ci_lo": math.nan, "ci_hi": math.nan, "p": math.nan, "n": n, "note": ""}
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = f"not estimable: {n} pairs" + ("" if n < 4 else ", one side constant")
        return out
    r = sps.spearmanr(x, y)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    rx, ry = sps.rankdata(x[idx], axis=1), sps.rankdata(y[idx], axis=1)  # (n_boot, n) ranks, ties averaged
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    good = den > 0  # a resample with one side constant has no rank correlation: left out
    boots = (rx * ry).sum(1)[good] / den[good]
    lo, hi = (np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2]) if good.sum() >= n_boot // 2
              else (math.nan, math.nan))
    out.update(rho=float(r.statistic), ci_lo=float(lo), ci_hi=float(hi), p=float(r.pvalue))
    if n < MIN_PAIRS:
        out["note"] = f"underpowered: {n} pairs"
    return out
