"""A share of a tested set against a threshold: its Wilson interval, whether any test could pass, its verdict.

Week 15's criterion ("identified computational roles for >= 50% of top critical weights") is a share: k of
n top critical weights have a role that passed its test. Three pieces of statistics decide it, kept here
(out of the phases layer) so the phase only says what is counted:
- `wilson_interval(k, n)`: the 95% Wilson score interval of k / n (scipy's binomtest), NaN for n = 0;
- `holm_reachable(n_inputs, m_tests, alpha)`: whether any of m one-sided exact Wilcoxon tests on n inputs,
  Holm-adjusted, could pass at all (the smallest attainable p is 2^-n, which must be below Holm's first
  threshold alpha / m);
- `share_verdict`: FAIL when the share is below the threshold; PASS when it and the CI's lower bound are at
  least the threshold; underpowered when the CI reaches below, when fewer than `min_weights` were tested, or
  when no test could have passed; not estimable for an empty set; below the guide's budget a PASS or FAIL
  becomes machinery-only with the budget's reason (esa.stats.budget.budget_reason).
"""

from __future__ import annotations

import math
from typing import Any

from scipy import stats as sps


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """(lo, hi) of the Wilson score interval of k successes in n; (NaN, NaN) when n = 0."""
    if not n:
        return math.nan, math.nan
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def holm_reachable(n_inputs: int, m_tests: int, alpha: float) -> dict[str, Any]:
    """min_p (2^-n_inputs), holm_first_threshold (alpha / m_tests) and whether the first is below the second."""
    out = {"min_p": 2.0 ** -n_inputs if n_inputs else math.nan,
           "holm_first_threshold": alpha / m_tests if m_tests else math.nan}
    out["reachable"] = bool(m_tests and n_inputs and out["min_p"] < out["holm_first_threshold"])
    return out


def share_verdict(share: float, ci_lo: float, n: int, reachable: bool, min_weights: int,
                  budget: str | None = None, threshold: float = 0.5) -> tuple[bool | None, str, str]:
    """(passed, verdict, reason) of the share of top critical weights with an identified role (module docstring)."""
    if n == 0 or not math.isfinite(share):
        return None, "not estimable", "no top critical weights were tested"
    if not reachable:
        return None, "underpowered", ("too few inputs: the smallest attainable Wilcoxon p is not below Holm's "
                                      "first threshold, so no role could be identified")
    if n < min_weights:
        return None, "underpowered", f"only {n} weights tested (< {min_weights}): the share's CI is too wide"
    if share < threshold:
        passed, verdict, why = False, "FAIL", f"{share:.0%} of the top critical weights have an identified role"
    elif ci_lo < threshold:
        return None, "underpowered", (f"share {share:.0%} but its 95% CI reaches {ci_lo:.0%}, below "
                                      f"{threshold:.0%}: more weights are needed to call it")
    else:
        passed, verdict, why = True, "PASS", f"{share:.0%} (CI lower bound {ci_lo:.0%}) have an identified role"
    if budget:
        return None, "machinery-only", f"{budget} (the number alone reads {verdict})"
    return passed, verdict, why
