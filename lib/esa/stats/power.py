"""Power from an observed effect: how many seeds or (seed, window) pairs a test needs to reach alpha.

Used by the scorecard to turn "underpowered" into a number. Each test family of esa.stats.inference has
its own floor: the exact one-sided Wilcoxon signed-rank p over n pairs cannot go below 2^-n, whatever the
effect; a paired t over n seeds needs the observed standardised effect d_z to clear a noncentral-t bar.
Holm's first step compares the smallest p with alpha / m, so `alpha` here is that per-comparison level.
"""

from __future__ import annotations

import math

from scipy import stats as sps

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
    for n in range(2, MAX_N):
        df = n - 1
        crit = sps.t.ppf(1 - alpha, df)
        if sps.nct.sf(crit, df, d_z * math.sqrt(n)) >= power:
            return n
    return None


def split_pairs(n_pairs: int, n_seeds: int) -> str:
    """'S seeds x W windows' covering `n_pairs` (seed, window) pairs at the run's seed count S."""
    s = max(1, n_seeds)
    return f"{s} seeds × {math.ceil(n_pairs / s)} windows"
