"""Contrasts with one-sided bounds: how a judged record decides a claim "A ≥ c·B".

A ratio claim is judged by the paired contrast D_i = a_i − c·b_i over the units that pair a and b (seeds,
windows, (seed, window) pairs, trials, inputs), never by the ratio mean(a)/mean(b): the ratio's confidence
interval (Fieller 1954) is unbounded exactly when the control does nothing (mean(b) within noise of 0),
while the contrast's bound stays finite. How the research guide's ratio claims map to contrasts:

- "ΔPPL(super) ≥ 5 × ΔPPL(random)": D = Δtop − 5·Δrandom, H1: mean D > 0, i.e. `contrast(d_top, d_rand, c=5)`.
- "> 15% better than magnitude" (1 − Δmethod/Δmag > 0.15): D = 0.85·Δmag − Δmethod > 0, i.e.
  `contrast(0.85 * d_mag, d_method)` (lower is better for Δ, so the method's damage is the subtracted term).
- "critical weights are k× more vulnerable": D = Q_critical − k·Q_random > 0 on the measured quantity Q
  (collapse rate, loss increase, accuracy drop), paired by the trial or seed both conditions share.
- "within x% of dense" (lower is better): D = (1 + x)·PPL_dense − PPL_method > 0.

Per claim (`contrast`): a paired t over the D_i gives the estimate, a one-sided lower bound and a one-sided
upper bound, each at level 1 − alpha (together a two-sided 1 − 2·alpha interval). PASS when the lower bound
exceeds `threshold`, FAIL when the upper bound is below it (the opposite one-sided claim holds at alpha),
otherwise undecided. A wrong PASS and a wrong FAIL each have probability ≤ alpha. The t p-value is exact for
normal D, conservative for symmetric heavy tails, and anti-conservative in one tail for strongly skewed D
at small n (see `esa.stats.sequential`); an exact sign test (and its distribution-free order-statistic bounds on the median of D) is
reported alongside as the check that needs no normality, and decides when every D_i is equal (the t
statistic is then undefined: its floor 2^-n must clear alpha). Degenerate input gets no verdict: fewer
than 2 units, or any non-finite value (cap catastrophic values first, `esa.stats.inference.capped`).

Per family (`holm_contrasts`): Holm's (1979) step-down on the claims' p-values (and separately on the
opposite claims' p-values, which decide FAIL), with every contrast of the family counted in m, the
degenerate ones too (conservative). Decisions follow the Holm-adjusted p; the bounds shown are
Bonferroni bounds at alpha/m, simultaneous over the family and so never narrower than Holm's decisions
need (a Holm PASS can show a Bonferroni lower bound at or below the threshold; the note says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats as sps

from esa.errors import EsaError

DECISIONS = ("PASS", "FAIL", "undecided")
TESTS = ("paired_t", "sign (constant differences)", "none")
NEEDS_TWO = "needs ≥ 2 paired units"


# ------------------------------------------------------------------ the shared arithmetic
def paired_stats(d: np.ndarray, threshold: float = 0.0, scale: Any = None) -> dict[str, np.ndarray]:
    """Row-wise statistics of paired differences `d` (..., n) against `threshold`.

    Vectorised so the sequential simulation and the single contrast share one implementation. Keys: mean,
    sd, se, p (H1: mean > threshold), p_opposite (H1: mean < threshold), constant, n. A row whose values
    are equal is `constant`: its t is undefined (0/0 or x/0), so p is the exact sign-test value, 2^-n in
    the direction of the common value and 1 otherwise. "Equal" means a spread within rounding: max − min
    ≤ 16·eps·scale, with `scale` the magnitude of the terms D was computed from (default max |d|), since
    D_i = a_i − c·b_i that are equal in exact arithmetic differ in the last bits and would give an absurd t
    (sd 1e-16, t 1e15)."""
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    if n < 2:
        raise EsaError(f"paired_stats needs ≥ 2 values per row, got {n}")
    with np.errstate(all="ignore"):  # overflow (values near the float limit) gives inf, judged not finite
        scale = np.abs(d).max(axis=-1) if scale is None else np.asarray(scale, dtype=float)
        constant = np.ptp(d, axis=-1) <= 16 * np.finfo(float).eps * scale
        mean = d.mean(axis=-1)
        sd = np.where(constant, 0.0, d.std(axis=-1, ddof=1))
        se = sd / math.sqrt(n)
        t = np.where(constant, 0.0, (mean - threshold) / se)
    floor = 0.5**n
    p = np.where(constant, np.where(mean > threshold, floor, 1.0), sps.t.sf(t, n - 1))
    p_opp = np.where(constant, np.where(mean < threshold, floor, 1.0), sps.t.cdf(t, n - 1))
    return dict(mean=mean, sd=sd, se=se, p=p, p_opposite=p_opp, constant=constant, n=np.full(mean.shape, n))


def one_sided_bounds(stats: dict[str, np.ndarray], alpha_lower: Any, alpha_upper: Any) -> tuple[Any, Any]:
    """(lower, upper): t bounds mean ∓ t_(1−α)(n−1)·se at the given one-sided levels (scalars or arrays).

    A constant row has no t bound; its sign-based bound is the common value when 2^-n ≤ α (then every
    unit lies on one side of the median with probability ≤ α) and −inf / +inf otherwise. α = 0 gives an
    infinite bound (nothing spent on that side)."""
    n, mean, se, const = stats["n"], stats["mean"], stats["se"], stats["constant"]
    al, au = np.asarray(alpha_lower, dtype=float), np.asarray(alpha_upper, dtype=float)
    with np.errstate(all="ignore"):
        tl = np.where(al > 0, sps.t.isf(np.where(al > 0, al, 0.5), n - 1), np.inf)
        tu = np.where(au > 0, sps.t.isf(np.where(au > 0, au, 0.5), n - 1), np.inf)
        lower = np.where(const, np.where(0.5**n <= al, mean, -np.inf), mean - tl * se)
        upper = np.where(const, np.where(0.5**n <= au, mean, np.inf), mean + tu * se)
    return lower, upper


def sign_stats(d: np.ndarray, threshold: float = 0.0) -> dict[str, np.ndarray]:
    """Row-wise exact one-sided sign tests on `d` (..., n): p for H1 median > threshold, p_opposite for
    H1 median < threshold (ties with the threshold dropped). Exact whatever the distribution of D."""
    d = np.asarray(d, dtype=float)
    above, below = (d > threshold).sum(axis=-1), (d < threshold).sum(axis=-1)
    off = above + below
    p = np.where(off > 0, sps.binom.sf(above - 1, off, 0.5), 1.0)
    p_opp = np.where(off > 0, sps.binom.sf(below - 1, off, 0.5), 1.0)
    return dict(p=p, p_opposite=p_opp)


def sign_bounds(d: np.ndarray, alpha_lower: float, alpha_upper: float) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise distribution-free bounds on the median of D at one-sided levels 1 − α: the order statistic
    x_(r) with P(Bin(n, 1/2) ≤ r − 1) ≤ α, r as large as possible (upper: the mirror image x_(n+1−r));
    −inf / +inf when even 2^-n > α."""
    x = np.sort(np.asarray(d, dtype=float), axis=-1)
    n = x.shape[-1]
    cdf = sps.binom.cdf(np.arange(n), n, 0.5)
    out = []
    for a, pick, inf in ((alpha_lower, lambda r: x[..., r - 1], -np.inf), (alpha_upper, lambda r: x[..., n - r],
                                                                           np.inf)):
        r = int(np.searchsorted(cdf, a, side="right"))
        out.append(pick(r) if r >= 1 else np.full(x.shape[:-1], inf))
    return out[0], out[1]


def sign_check(d: np.ndarray, threshold: float, alpha: float) -> tuple[float, float, float]:
    """(p, lower, upper) of the exact sign test of one vector: the check that needs no normality."""
    lo, hi = sign_bounds(d, alpha, alpha)
    return float(sign_stats(d, threshold)["p"]), float(lo), float(hi)


# ------------------------------------------------------------------ one claim
@dataclass(frozen=True)
class Contrast:
    """One judged contrast D = a − c·b against `threshold`, with the arithmetic that decided it."""

    decision: str  # PASS / FAIL / undecided
    reason: str
    estimate: float  # mean D
    lower: float  # one-sided lower bound at level 1 − bound_alpha
    upper: float  # one-sided upper bound at level 1 − bound_alpha
    n: int  # paired units
    p: float  # H1: mean D > threshold (the claim)
    p_opposite: float  # H1: mean D < threshold (the claim is false)
    test: str  # which test gave p and the bounds (TESTS)
    sd: float
    c: float
    threshold: float
    alpha: float
    unit: str
    sign_p: float  # exact sign test of the claim on the median of D (needs no normality)
    sign_lower: float  # order-statistic bounds on the median of D at 1 − bound_alpha
    sign_upper: float
    bound_alpha: float = math.nan  # the level of the bounds: alpha, or alpha/m in a family
    m_family: int = 1
    p_adjusted: float = math.nan  # Holm, within the family
    p_opposite_adjusted: float = math.nan
    adjustment: str = "none"
    d: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False, compare=False)
    scale: float | None = field(default=None, repr=False, compare=False)  # magnitude of the terms of D

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (non-finite floats as strings, like `Criterion`; the differences left out)."""
        out = {k: v for k, v in asdict(replace(self, d=np.empty(0))).items() if k not in ("d", "scale")}
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    def describe(self) -> str:
        """One line: 'estimate [lo, hi] (one-sided 99% bounds, paired t), n=.. unit: DECISION'."""
        level = f"{100 * (1 - self.bound_alpha):.4g}%"
        fam = f", Holm over {self.m_family}" if self.m_family > 1 else ""
        return (f"{self.estimate:.4g} [{self.lower:.4g}, {self.upper:.4g}] (one-sided {level} bounds, "
                f"{self.test}{fam}), n={self.n} {self.unit}: {self.decision}"
                + ("" if self.decision != "undecided" else f" ({self.reason})"))


def _validate(alpha: float, c: float, threshold: float) -> None:
    if not 0 < alpha < 0.5:
        raise EsaError(f"alpha {alpha!r}; accepted: 0 < alpha < 0.5 (one-sided)")
    if not (math.isfinite(c) and math.isfinite(threshold)):
        raise EsaError(f"c={c!r} and threshold={threshold!r} must be finite numbers")


def _judge(d: np.ndarray, c: float, threshold: float, alpha: float, bound_alpha: float, unit: str,
           scale: float | None = None) -> Contrast:
    n = int(d.size)
    base = dict(c=float(c), threshold=float(threshold), alpha=float(alpha), bound_alpha=float(bound_alpha),
                unit=unit, n=n, d=d, scale=scale)
    nan = math.nan
    empty = dict(estimate=nan, lower=nan, upper=nan, p=nan, p_opposite=nan, sd=nan, sign_p=nan,
                 sign_lower=nan, sign_upper=nan, test="none")
    bad = int((~np.isfinite(d)).sum())
    if bad:
        return Contrast(decision="undecided", reason=f"not finite: {bad} of {n} paired units (cap "
                        "catastrophic values first)", **{**empty, **base})
    if n < 2:
        return Contrast(decision="undecided", reason=NEEDS_TWO,
                        **{**empty, **base, "estimate": float(d[0]) if n else nan})
    st = paired_stats(d, threshold, scale)
    lo, hi = (float(v) for v in one_sided_bounds(st, bound_alpha, bound_alpha))
    sp, slo, shi = sign_check(d, threshold, bound_alpha)
    mean, sd = float(st["mean"]), float(st["sd"])
    if not math.isfinite(sd):
        return Contrast(decision="undecided", reason="not finite: the differences' variance overflows",
                        **{**empty, **base, "estimate": mean})
    const = bool(st["constant"])
    if lo > threshold:
        decision, reason = "PASS", "lower bound > threshold"
    elif hi < threshold:
        decision, reason = "FAIL", "upper bound < threshold"
    elif const and mean == threshold:
        decision, reason = "undecided", "every difference equals the threshold"
    elif const:
        decision, reason = "undecided", f"the sign test's floor 2^-{n} = {0.5 ** n:.3g} > {bound_alpha:.3g}"
    else:
        decision, reason = "undecided", "the bounds straddle the threshold"
    if const:
        reason = f"zero variance, t undefined; decided by the exact sign test: {reason}"
    return Contrast(decision=decision, reason=reason, estimate=mean, lower=lo, upper=hi, p=float(st["p"]),
                    p_opposite=float(st["p_opposite"]), test=TESTS[1] if const else TESTS[0], sd=sd,
                    sign_p=sp, sign_lower=slo, sign_upper=shi, **base)


def contrast(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    c: float = 1.0,
    threshold: float = 0.0,
    alpha: float = 0.01,
    unit: str = "seeds",
) -> Contrast:
    """Judge "mean(a − c·b) > threshold" over paired units (a[i] and b[i] measured on the same unit).

    `unit` names the pairing (seeds, windows, (seed, window) pairs, trials) in `describe`."""
    _validate(alpha, c, threshold)
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_.ndim != 1 or a_.shape != b_.shape:
        raise EsaError(f"a and b must be paired 1-D arrays of equal length; got shapes {a_.shape} and {b_.shape}")
    with np.errstate(all="ignore"):
        d = a_ - c * b_
        scale = float(np.abs(a_).max() + abs(c) * np.abs(b_).max()) if a_.size else None
    return _judge(d, c, threshold, alpha, alpha, unit, scale if scale is not None and math.isfinite(scale) else None)


def holm_contrasts(contrasts: Sequence[Contrast], alpha: float | None = None) -> list[Contrast]:
    """The family's contrasts re-decided by Holm's step-down at family level `alpha` (default: theirs).

    PASS when the Holm-adjusted p of the claim is ≤ alpha, FAIL when that of the opposite claim is; every
    contrast counts in m (degenerate ones included, never decided). Bounds are recomputed at alpha/m
    (Bonferroni, simultaneous). Returns new Contrast objects in the input order."""
    cs = list(contrasts)
    if not cs:
        return []
    if alpha is None:
        alphas = {x.alpha for x in cs}
        if len(alphas) > 1:
            raise EsaError(f"contrasts at different alphas {sorted(alphas)}; pass the family's alpha")
        alpha = alphas.pop()
    m = len(cs)
    p_adj = _holm([x.p for x in cs])
    q_adj = _holm([x.p_opposite for x in cs])
    out = []
    for x, p, q in zip(cs, p_adj, q_adj, strict=True):
        y = _judge(x.d, x.c, x.threshold, alpha, alpha / m, x.unit, x.scale)
        fam = dict(m_family=m, p_adjusted=p, p_opposite_adjusted=q, alpha=float(alpha),
                   adjustment="Holm p (decisions); Bonferroni alpha/m bounds")
        if not math.isfinite(x.p):  # degenerate: keeps its reason, no verdict
            out.append(replace(y, **fam))
            continue
        if p <= alpha:
            decision, reason = "PASS", f"Holm-adjusted p {p:.3g} ≤ {alpha:g}"
            if not y.lower > y.threshold:
                reason += " (the Bonferroni lower bound is more conservative than Holm's step)"
        elif q <= alpha:
            decision, reason = "FAIL", f"Holm-adjusted p of the opposite claim {q:.3g} ≤ {alpha:g}"
            if not y.upper < y.threshold:
                reason += " (the Bonferroni upper bound is more conservative than Holm's step)"
        else:
            decision, reason = "undecided", f"Holm-adjusted p {p:.3g} (opposite {q:.3g}) > {alpha:g}"
        out.append(replace(y, decision=decision, reason=reason, **fam))
    return out


def _holm(pvals: Sequence[float]) -> list[float]:
    """Holm-adjusted p with every entry counted in m (NaN is treated as 1: it is never rejected)."""
    p = np.nan_to_num(np.asarray(pvals, dtype=float), nan=1.0)
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out.tolist()
