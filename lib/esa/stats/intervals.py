"""Intervals over seeds and the verdict a per-seed quantity gets against a threshold.

`t_interval` is the Student-t interval of a mean over calibration seeds (the unit of replication).
`gain_verdict` judges a per-seed relative gain 1 - Delta_method / Delta_baseline against a threshold by its
95% t-interval: PASS when the interval lies above, FAIL when below, underpowered when it straddles the
threshold or rests on one seed, not estimable when a value is not finite or the baseline's damage (the
denominator) is within `min_damage` of zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as st


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


def gain_verdict(gains: list[float], baseline_damage: list[float], threshold: float = 0.15,
                 min_damage: float = 0.01, machinery_only: bool = False) -> Verdict:
    """PASS / FAIL / underpowered / not estimable / machinery-only from per-seed gains (module docstring)."""
    g = np.asarray(gains, dtype=float)
    d = np.asarray(baseline_damage, dtype=float)
    if g.size == 0:
        return Verdict(None, math.nan, math.nan, 0, None, "not estimable", "no matched (method, baseline) pair was run")
    if not (np.isfinite(g).all() and np.isfinite(d).all()):
        return Verdict(None, math.nan, math.nan, int(g.size), None, "not estimable",
                       "a log-PPL is not finite or the baseline did no positive damage")
    if (d <= min_damage).any():
        return Verdict(float(g.mean()), math.nan, math.nan, int(g.size), None, "not estimable",
                       f"baseline damage {d.min():.3g} nats <= {min_damage:g}: the denominator is within noise")
    mean, lo, hi = t_interval(g)
    ci = f"mean over {g.size} calibration seed(s) {mean:.3f}, 95% t-CI [{lo:.3f}, {hi:.3f}]"
    if g.size < 2:
        passed, verdict, note = None, "underpowered", f"one calibration seed (gain {mean:.3f}): no CI; needs >= 2"
    elif lo > threshold:
        passed, verdict, note = True, "PASS", ci
    elif hi < threshold:
        passed, verdict, note = False, "FAIL", ci
    else:
        passed, verdict, note = None, "underpowered", f"{ci} contains the threshold {threshold:g}"
    if machinery_only:
        return Verdict(mean, lo, hi, int(g.size), None, "machinery-only",
                       f"smoke budget, the number is not evidence (would read {verdict}): {note}")
    return Verdict(mean, lo, hi, int(g.size), passed, verdict, note)
