"""Intervals over seeds and the verdict a per-seed quantity gets against a threshold.

`damage_contrast` judges "method damages > threshold less than baseline" (1 − Δm/Δb > t) as the paired
contrast (1 − t)·Δb − Δm > 0 over calibration seeds (esa.stats.contrasts), so a baseline that does no damage
decides the claim (no method can be 15% better than no damage) instead of leaving a ratio over noise.

`t_interval` is the Student-t interval of a mean over calibration seeds (the unit of replication).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as st

from esa.stats.contrasts import contrast


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval over seeds; lo = hi = NaN with fewer than 2 values."""
    x = np.asarray(x, dtype=float)
    mean = float(x.mean()) if x.size else math.nan
    if x.size < 2 or not np.isfinite(x).all():
        return mean, math.nan, math.nan
    half = float(st.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


@dataclass
class Verdict:
    measured: float | None
    lo: float
    hi: float
    n: int
    passed: bool | None
    verdict: str
    note: str


def damage_contrast(method_damage: list[float], baseline_damage: list[float], threshold: float = 0.15,
                    alpha: float = 0.01, machinery_only: bool = False) -> Verdict:
    """PASS / FAIL / underpowered / not estimable / machinery-only for "the method does more than `threshold`
    less damage than the baseline", from per-seed Δ log-PPL (paired by calibration seed): the contrast
    D = (1 − threshold)·Δbaseline − Δmethod, PASS when its one-sided (1 − alpha) lower bound is above 0.
    `measured` is the mean of D in nats/token; lo and hi are its one-sided bounds."""
    m = np.asarray(method_damage, dtype=float)
    b = np.asarray(baseline_damage, dtype=float)
    if m.size == 0:
        return Verdict(None, math.nan, math.nan, 0, None, "not estimable", "no matched (method, baseline) pair was run")
    if not (np.isfinite(m).all() and np.isfinite(b).all()):
        return Verdict(None, math.nan, math.nan, int(m.size), None, "not estimable", "a log-PPL is not finite")
    gain = f"mean gain 1 − Δm/Δb {1 - m.mean() / b.mean():.3f}; " if b.mean() > 0 else ""
    if m.size < 2:
        d = float((1 - threshold) * b[0] - m[0])
        return Verdict(d, math.nan, math.nan, 1, None, "machinery-only" if machinery_only else "underpowered",
                       f"one calibration seed: D = {d:.3g} nats, no bound; needs >= 2 seeds ({gain.rstrip('; ')})")
    k = contrast((1 - threshold) * b, m, 1.0, 0.0, alpha, "calibration seeds")
    note = (f"D = {1 - threshold:g}·Δbaseline − Δmethod = {k.estimate:.3g} [{k.lower:.3g}, {k.upper:.3g}] "
            f"(one-sided {1 - alpha:.0%} bounds), n = {k.n} seeds; {gain}{k.reason}")
    passed, verdict = {"PASS": (True, "PASS"), "FAIL": (False, "FAIL")}.get(k.decision, (None, "underpowered"))
    if machinery_only:
        return Verdict(k.estimate, k.lower, k.upper, k.n, None, "machinery-only",
                       f"smoke budget, the number is not evidence (would read {verdict}): {note}")
    return Verdict(k.estimate, k.lower, k.upper, k.n, passed, verdict, note)


def decision_verdict(rows: pd.DataFrame, machinery_only: bool = False) -> Verdict:
    """The Verdict of a sequential comparison (one row of a decisions table, esa.stats.sequential fields):
    PASS / FAIL as decided, underpowered when it reached its cap undecided, not estimable when it was not run."""
    if rows.empty:
        return Verdict(None, math.nan, math.nan, 0, None, "not estimable", "no matched (method, baseline) pair was run")
    r = rows.iloc[0]
    note = (f"sequential: D = {r['estimate']:.3g} [{r['lower']:.3g}, {r['upper']:.3g}] at n = {r['n']} of {r['n_max']} "
            f"{r['unit']} (one-sided alpha {r['alpha']:.3g} over the family); {r['reason']}; {r['design']}")
    passed, verdict = {"PASS": (True, "PASS"), "FAIL": (False, "FAIL")}.get(r["decision"], (None, "underpowered"))
    if machinery_only:
        return Verdict(float(r["estimate"]), float(r["lower"]), float(r["upper"]), int(r["n"]), None, "machinery-only",
                       f"smoke budget, the number is not evidence (would read {verdict}): {note}")
    return Verdict(float(r["estimate"]), float(r["lower"]), float(r["upper"]), int(r["n"]), passed, verdict, note)

