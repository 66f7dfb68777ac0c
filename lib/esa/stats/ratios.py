"""Vulnerability ratios of a critical weight set against a matched random set, and their verdict.

Why here: the ratio V = vulnerability(critical) / vulnerability(random), its bootstrap CI and the rules
that turn it into PASS / FAIL / underpowered / not estimable are statistics of per-run numbers (flips
needed, damage per trial, loss increase); they know nothing of models, bits or profiles, so they sit with
the other inference code (esa.stats.inference) and are tested on constructed inputs.

`vulnerability_verdict`: PASS when the CI's lower bound exceeds 1 (critical weights measurably more
vulnerable); FAIL when it does not; underpowered with fewer than `min_runs` runs per side, or when
censoring (an attack that hit its flip budget: its count is a lower bound) leaves the direction open;
not estimable when the ratio or its CI is not finite or the random side's mean is within noise of zero
(its CI reaches 0). `fault_ratio` (damage per trial inside each set, unpaired) and `adversarial_ratios`
(PGD loss increase per attack seed, paired, one ratio per budget) apply it to their tables; `ratio_table`
is the ratios of one model as rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from esa.errors import EsaError
from esa.stats.inference import bootstrap_ci, ratio_ci


@dataclass
class Ratio:
    value: float
    lo: float
    hi: float
    n_critical: int
    n_random: int
    passed: bool | None
    verdict: str
    note: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def vulnerability_verdict(
    critical: Sequence[float], random: Sequence[float], more_is_vulnerable: bool, paired: bool,
    min_runs: int = 3, censored_critical: Sequence[bool] | None = None,
    censored_random: Sequence[bool] | None = None, n_boot: int = 2000, seed: int = 0,
) -> Ratio:
    """V = vulnerability(critical) / vulnerability(random) with a bootstrap CI, and its verdict.

    more_is_vulnerable: True for damage or loss (V = mean critical / mean random), False for flips needed
    (V = mean random / mean critical). Censored runs (an attack that hit its budget: its count is a lower
    bound) are flagged per run; see the module docstring for the rules."""
    c, r = np.asarray(critical, dtype=float), np.asarray(random, dtype=float)
    cc = np.zeros(c.size, bool) if censored_critical is None else np.asarray(censored_critical, bool)
    cr = np.zeros(r.size, bool) if censored_random is None else np.asarray(censored_random, bool)
    num, den = (c, r) if more_is_vulnerable else (r, c)
    if min(c.size, r.size) < min_runs:
        est = ratio_ci(num, den, paired=False, n_boot=n_boot, seed=seed)[0] if c.size and r.size else math.nan
        return Ratio(est, math.nan, math.nan, int(c.size), int(r.size), None, "underpowered",
                     f"{c.size} critical and {r.size} random runs; the ratio needs {min_runs} per side")
    if paired and c.size != r.size:
        raise EsaError(f"a paired ratio needs as many runs per side, got {c.size} and {r.size}")
    est, lo, hi = ratio_ci(num, den, paired=paired, n_boot=n_boot, seed=seed)
    base = dict(n_critical=int(c.size), n_random=int(r.size))
    if more_is_vulnerable and np.isfinite(r).all():
        _, dlo, dhi = bootstrap_ci(r, n_boot=n_boot, seed=seed)
        if not (dlo > 0):
            diff = c.mean() - r.mean()
            return Ratio(est, lo, hi, **base, passed=None, verdict="not estimable",
                         note=f"the random side's mean {r.mean():.3g} is within noise of 0 (95% CI [{dlo:.3g}, "
                              f"{dhi:.3g}]): the ratio's denominator is noise; difference critical - random "
                              f"= {diff:.3g}")
    if not all(math.isfinite(x) for x in (est, lo, hi)):
        return Ratio(est, lo, hi, **base, passed=None, verdict="not estimable",
                     note="the ratio or its CI is not finite (an infinite damage, or a side with no measurable harm)")
    # flips: a censored critical run undercounts the critical side (V overstated), a censored random run the
    # random side (V understated); bootstrapped values keep the budget + 1 as the run's count
    v_inflated, v_deflated = (False, False) if more_is_vulnerable else (bool(cc.any()), bool(cr.any()))
    if v_inflated and v_deflated:
        return Ratio(est, lo, hi, **base, passed=None, verdict="underpowered",
                     note=f"both sides hit the flip budget ({int(cc.sum())} critical, {int(cr.sum())} random "
                          "runs): counts are bounds; raise max_flips")
    if lo > 1:
        if v_inflated:
            return Ratio(est, lo, hi, **base, passed=None, verdict="underpowered",
                         note=f"{int(cc.sum())} critical-set run(s) hit the flip budget, so the ratio may be "
                              "overstated; raise max_flips")
        note = "CI above 1: critical weights are the more vulnerable"
        if v_deflated:
            note += f" (a lower bound: {int(cr.sum())} random-k run(s) hit the flip budget)"
        return Ratio(est, lo, hi, **base, passed=True, verdict="PASS", note=note)
    if v_deflated:
        return Ratio(est, lo, hi, **base, passed=None, verdict="underpowered",
                     note=f"{int(cr.sum())} random-k run(s) hit the flip budget: the ratio is only a lower "
                          "bound and its CI reaches 1; raise max_flips")
    note = ("CI below 1: random weights are the more vulnerable" if hi < 1 else
            "CI includes 1: no difference measured")
    return Ratio(est, lo, hi, **base, passed=False, verdict="FAIL", note=note)


def fault_ratio(table: pd.DataFrame, min_runs: int = 3, n_boot: int = 2000, seed: int = 0) -> Ratio:
    """Damage per trial inside the critical set / inside the matched random sets (column `set`: critical,
    random_k; column `damage`), unpaired; a non-finite damage is not estimable."""
    c = table.loc[table["set"] == "critical", "damage"].to_numpy(float)
    r = table.loc[table["set"] == "random_k", "damage"].to_numpy(float)
    if not (np.isfinite(c).all() and np.isfinite(r).all()):
        return Ratio(math.nan, math.nan, math.nan, c.size, r.size, None, "not estimable",
                     "a trial's damage is not finite (a bounded flip produced inf/NaN)")
    return vulnerability_verdict(c, r, more_is_vulnerable=True, paired=False, min_runs=min_runs,
                                 n_boot=n_boot, seed=seed)


def adversarial_ratios(table: pd.DataFrame, min_runs: int = 3, n_boot: int = 2000,
                       seed: int = 0) -> dict[float, Ratio]:
    """Per budget `eps`: PGD loss increase on the critical set / on random-k, paired over attack seeds."""
    out = {}
    for eps, g in table.groupby("eps"):
        c = g[g["set"] == "critical"].sort_values("seed")["loss_increase"].to_numpy(float)
        r = g[g["set"] == "random_k"].sort_values("seed")["loss_increase"].to_numpy(float)
        out[float(eps)] = vulnerability_verdict(c, r, more_is_vulnerable=True, paired=True, min_runs=min_runs,
                                                n_boot=n_boot, seed=seed)
    return out


def ratio_table(model: str, ratios: Mapping[str, Any]) -> pd.DataFrame:
    """One row per comparison of one model: attack and faults (a Ratio each), adversarial (eps -> Ratio)."""
    rows = [dict(model=model, comparison=k, eps=None, **ratios[k].as_dict()) for k in ("attack", "faults")]
    rows += [dict(model=model, comparison="adversarial", eps=e, **r.as_dict())
             for e, r in ratios["adversarial"].items()]
    return pd.DataFrame(rows)
