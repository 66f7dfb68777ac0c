"""Power from an observed effect: how many seeds or (seed, window) pairs a test needs to reach alpha.

Used by the scorecard to turn "underpowered" into a number. Each test family of esa.stats.inference has
its own floor: the exact one-sided Wilcoxon signed-rank p over n pairs cannot go below 2^-n, whatever the
effect; a paired t over n seeds needs the observed standardised effect d_z to clear a noncentral-t bar.
Holm's first step compares the smallest p with alpha / m, so `alpha` here is that per-comparison level.

For the contrasts of `esa.stats.contrasts` (D = a − c·b against a threshold) `plan_n` gives the units of a
fixed-n one-sided paired t, `plan_design` the cap of a sequential design (`esa.stats.sequential`) with the
same power, `operating_characteristics` what that design does at a given effect (simulated), and
`plan_criteria` both for every criterion of a record from its pilot effect (`pilot_effect`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from esa.stats.sequential import Design, simulate

POWER = 0.8
MAX_N = 100_000


def wilcoxon_min_p(n_pairs: int) -> float:
    """The smallest one-sided exact Wilcoxon signed-rank p over `n_pairs` pairs (every difference positive)."""
    return 0.5 ** n_pairs if n_pairs > 0 else 1.0


def wilcoxon_pairs_needed(rank_biserial: float, alpha: float, power: float = POWER) -> int | None:
    """Smallest n of pairs with 2^-n < alpha and, at the observed matched-pairs rank-biserial r (held fixed),
    an expected z = r * sqrt(3n(n+1) / (2(2n+1))) >= z_(1-alpha) + z_power (normal approximation of the
    signed-rank statistic); with r = 1 (every difference positive) the exact floor alone. None when the effect is not in the tested direction (r <= 0 or NaN)."""
    if not (isinstance(rank_biserial, int | float) and math.isfinite(rank_biserial)) or rank_biserial <= 0:
        return None
    floor = math.floor(math.log2(1.0 / alpha)) + 1  # 2^-n < alpha
    if rank_biserial >= 1.0:
        return floor  # every difference positive: the exact p is 2^-n
    bar = sps.norm.ppf(1 - alpha) + sps.norm.ppf(power)
    n = max(floor, 2)
    while n <= MAX_N:
        if rank_biserial * math.sqrt(3 * n * (n + 1) / (2 * (2 * n + 1))) >= bar:
            return n
        n += 1
    return None


def paired_t_seeds_needed(d_z: float, alpha: float, power: float = POWER) -> int | None:
    """Smallest n of seeds for a one-sided paired t at level `alpha` to have `power` at effect d_z
    (noncentral t, noncentrality d_z * sqrt(n)). An infinite d_z (identical differences) needs the
    smallest n whose sign-exact p = 2^-n is below alpha. None for a non-positive or NaN effect."""
    if not isinstance(d_z, int | float) or math.isnan(d_z) or d_z <= 0:
        return None
    if math.isinf(d_z):
        return math.floor(math.log2(1.0 / alpha)) + 1
    # the t test needs more units than a z test with known sd: start just below the z test's n
    n_z = ((sps.norm.isf(alpha) + sps.norm.ppf(power)) / d_z) ** 2
    for n in range(max(2, int(0.9 * n_z)), MAX_N):
        df = n - 1
        crit = sps.t.ppf(1 - alpha, df)
        if sps.nct.sf(crit, df, d_z * math.sqrt(n)) >= power:
            return n
    return None


def split_pairs(n_pairs: int, n_seeds: int) -> str:
    """'S seeds x W windows' covering `n_pairs` (seed, window) pairs at the run's seed count S."""
    s = max(1, n_seeds)
    return f"{s} seeds × {math.ceil(n_pairs / s)} windows"


# ------------------------------------------------------------------ planning a contrast (fixed or sequential)
def pilot_effect(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, c: float = 1.0, threshold: float = 0.0,
    sd_confidence: float = 0.8,
) -> dict[str, float]:
    """The effect a pilot measured on the contrast D = a − c·b: effect_mean = mean(D) − threshold and, for
    planning, effect_sd = the upper `sd_confidence` confidence limit of sd(D) (Browne 1995, Stat Med 14:
    1933): a pilot of a few units underestimates the sd often enough that planning on it underpowers.
    `skewness` (from 3 units; noisy below ~20) hints whether the t on the mean can be trusted at small n
    (|skew| ≳ 1: no; see `esa.stats.sequential`)."""
    d = np.asarray(a, dtype=float) - c * np.asarray(b, dtype=float)
    n = int(d.size)
    if n < 2 or not np.isfinite(d).all():
        return dict(effect_mean=math.nan, effect_sd=math.nan, sd_observed=math.nan, skewness=math.nan, n=n)
    sd = float(d.std(ddof=1))
    ucl = sd * math.sqrt((n - 1) / sps.chi2.ppf(1 - sd_confidence, n - 1))
    skew = float(sps.skew(d, bias=False)) if n >= 3 and sd > 0 else math.nan
    return dict(effect_mean=float(d.mean()) - threshold, effect_sd=ucl, sd_observed=sd, skewness=skew, n=n)


def _d_z(effect_mean: float, effect_sd: float) -> float | None:
    """Standardised effect, or None when no n can decide it (NaN, or not in the claimed direction)."""
    if not all(isinstance(x, int | float) and not math.isnan(x) for x in (effect_mean, effect_sd)):
        return None
    if effect_mean <= 0 or math.isinf(effect_mean) or effect_sd < 0:
        return None
    return math.inf if effect_sd == 0 else effect_mean / effect_sd


def _final_look_power(d_z: float, n: int, alpha_k: float, test: str) -> float:
    """Power of the last look alone at its own α_k (noncentral t; for the sign test, the binomial at
    P(D > threshold) = Φ(d_z), i.e. normal D)."""
    if math.isinf(d_z):
        return 1.0 if 0.5**n <= alpha_k else 0.0
    if test == "sign":
        ks = np.arange(n + 1)
        ok = sps.binom.sf(ks - 1, n, 0.5) <= alpha_k  # P(Bin(n, 1/2) >= k) <= alpha_k
        return float(sps.binom.sf(ks[ok][0] - 1, n, sps.norm.cdf(d_z))) if ok.any() else 0.0
    return float(sps.nct.sf(sps.t.isf(alpha_k, n - 1), n - 1, d_z * math.sqrt(n)))


def plan_design(
    effect_mean: float, effect_sd: float, alpha: float = 0.01, m_family: int = 1, power: float = POWER,
    n0: int = 4, spending: str = "pocock", alpha_fail: float | None = None, test: str = "t",
) -> Design | None:
    """The sequential design (at alpha/m_family) whose cap n_max decides `effect_mean` ± `effect_sd` (of D
    minus the threshold) with at least `power`. None when the effect is not positive or too small.

    Conservative and deterministic: the smallest n_max whose LAST look alone, at its own α_K, has power
    ≥ `power` + the FAIL side's level (a false FAIL, probability ≤ that level, is the only way an earlier
    stop can cost a PASS). The earlier looks only add power; `operating_characteristics` gives the real one."""
    d_z = _d_z(effect_mean, effect_sd)
    if d_z is None:
        return None
    level = alpha / m_family
    fail = level if alpha_fail is None else alpha_fail / m_family
    def enough(n: int) -> Design | None:
        design = Design(alpha=level, n0=n0, n_max=n, spending=spending, alpha_fail=fail, test=test)
        return design if _final_look_power(d_z, n, float(design.alphas[-1]), test) >= power + fail else None

    start = max(n0, paired_t_seeds_needed(d_z, level, power) or n0)
    step = max(1, start // 200)  # scan in steps of 0.5%, then back to the first n in the step that suffices
    for n in range(start, MAX_N + step, step):
        if enough(n) is not None:
            return next(d for m in range(max(start, n - step + 1), n + 1) if (d := enough(m)) is not None)
    return None


def plan_n(
    effect_mean: float, effect_sd: float, alpha: float = 0.01, m_family: int = 1, power: float = POWER,
    design: Design | None = None,
) -> int | None:
    """Units for a one-sided paired t on the contrast at alpha/m_family (Holm's first step: conservative
    for the rest of the family) to reach `power`. With `design` (its n0, spending, FAIL side and test
    are used; its alpha and n_max are replaced): the cap n_max of the sequential design (`plan_design`).
    None when the effect is not positive or too small for MAX_N units."""
    if design is None:
        d_z = _d_z(effect_mean, effect_sd)
        return None if d_z is None else paired_t_seeds_needed(d_z, alpha / m_family, power)
    fail = None if design.alpha_fail is None else design.alpha_fail * m_family
    planned = plan_design(effect_mean, effect_sd, alpha, m_family, power, n0=design.n0,
                          spending=design.spending, alpha_fail=fail, test=design.test)
    return None if planned is None else planned.n_max


def units_note(estimate: float, sd: float, unit: str, alpha: float) -> str:
    """What would decide an undecided one-sided contrast (esa.stats.contrasts) at level `alpha`: the units a
    paired t needs at the observed mean and sd of D, or why more units would not make it pass (stored
    contrasts hold non-finite numbers as strings, hence the conversion)."""
    estimate, sd = float(estimate), float(sd)
    need = plan_n(estimate, sd, alpha) if math.isfinite(sd) else None
    if need:
        return f"at the observed contrast about {need} {unit} would decide it"
    if 0 < estimate < math.inf:
        return f"the observed contrast is too small to decide within {MAX_N:,} {unit}"
    return "the observed contrast is not positive, so more units would not make it pass"


def operating_characteristics(
    design: Design, effect_mean: float, effect_sd: float, n_sim: int = 4000, seed: int = 0,
    df: float | None = None,
) -> dict[str, float]:
    """Simulated PASS / FAIL / undecided rates and units used by `design` when D − threshold has this mean
    and sd (normal; or Student t with `df` scaled to that sd, for heavy tails)."""
    rng = np.random.default_rng(seed)
    shape = (n_sim, design.n_max)
    if df is None:
        z = rng.standard_normal(shape)
    else:
        z = rng.standard_t(df, shape) * (math.sqrt((df - 2) / df) if df > 2 else 1.0)
    out = simulate(design, effect_mean + effect_sd * z)
    n = out["n"].to_numpy()
    return dict(pass_rate=float((out.decision == "PASS").mean()), fail_rate=float((out.decision == "FAIL").mean()),
                undecided_rate=float((out.decision == "undecided").mean()), mean_n=float(n.mean()),
                median_n=float(np.median(n)), p90_n=float(np.quantile(n, 0.9)), n_sim=n_sim)


SIMULATE_MAX_CELLS = 20_000_000  # n_sim x n_max above this: expected_n is not simulated (memory)


def plan_criteria(
    pilots: pd.DataFrame, alpha: float = 0.01, power: float = POWER, m_family: int | None = None,
    n0: int = 4, spending: str = "pocock", n_sim: int = 2000, seed: int = 0,
) -> pd.DataFrame:
    """Per criterion (rows of `pilots` with columns criterion, effect_mean, effect_sd; e.g. from
    `pilot_effect`): d_z, the fixed n at alpha/m, the sequential cap n_max and the expected units the
    sequential design uses at the pilot effect. m_family defaults to the number of criteria."""
    m = len(pilots) if m_family is None else m_family
    rows = []
    for r in pilots.itertuples(index=False):
        mean, sd = float(r.effect_mean), float(r.effect_sd)
        d_z = _d_z(mean, sd)
        design = plan_design(mean, sd, alpha, m, power, n0=n0, spending=spending)
        n_fixed = plan_n(mean, sd, alpha, m, power)
        oc: dict[str, float] = {}
        if design is not None and n_sim * design.n_max <= SIMULATE_MAX_CELLS:
            oc = operating_characteristics(design, mean, sd, n_sim=n_sim, seed=seed)
        rows.append(dict(criterion=r.criterion, effect_mean=mean, effect_sd=sd, d_z=d_z, alpha_each=alpha / m,
                         n_fixed=n_fixed, n_max=None if design is None else design.n_max,
                         expected_n=oc.get("mean_n", math.nan), power_sequential=oc.get("pass_rate", math.nan),
                         note="" if d_z is not None else "effect not in the claimed direction: no n decides it"))
    out = pd.DataFrame(rows)
    for col in ("n_fixed", "n_max"):
        out[col] = out[col].astype("Int64")
    return out
