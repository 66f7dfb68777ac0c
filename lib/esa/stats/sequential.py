"""Sequential evaluation of a contrast: add paired units in stages, stop once decided, cap otherwise.

Any evaluation loop that yields paired values (windows of a perturbation sweep or a pruning condition,
fault trials, fine-tuning seeds, role-ablation inputs) can ask for more units until its claim
D = a − c·b > threshold is decided. "Test after every batch at alpha and stop at p < alpha" is not valid:
its false-positive rate grows with the number of looks (the tests show it). This module keeps the
type-I error at alpha under that optional stopping.

Design: a group-sequential plan (Pocock 1977; O'Brien and Fleming 1979) with looks at doubling sample sizes
n0, 2·n0, 4·n0, ... and a final look at n_max, the one-sided alpha spread over the looks by a Lan–DeMets
(1983) spending function α(t) of the information fraction t = n/n_max. Look k may spend
α_k = α(t_k) − α(t_(k−1)). The per-look statistic is a paired t on the D_i seen so far; at n0 = 4 it has
3 df, far from the normal that the classical boundaries (Jennison and Turnbull 2000) assume, so instead of
their correlated-normal boundaries we use the union bound: reject at look k when the look's one-sided t
p-value is ≤ α_k. Then P(any false rejection) ≤ Σ α_k = α whatever the dependence between looks
(conservative, since the looks share data: 0.8-0.9% simulated at α = 1% for normal D). The same argument makes the lower
bounds at level α_k a confidence sequence: they hold at every look at once with probability ≥ 1 − α, so
the bound reported at the stopping look is valid whatever stopped the run. An unplanned last look
(`close`, the units ran out) spends α(n/n_max) − spent so far and keeps the guarantee.

The t p-value is exact for normal D and conservative for symmetric heavy tails (Student t with 3 df:
0.6% false PASS at alpha = 1%), but for skewed D one tail is anti-conservative, and more so at the small
per-look levels α_k: with D = 1 − Exp(1) (mean 0, a long lower tail) the design gives 7.6% false PASS at
alpha = 1% with looks at 4..64, still 3.9% with looks at 32..128; a lognormal tail doubles that. No test
of a mean is exact without assumptions on the tails (Bahadur and Savage 1956): check the skewness of a
pilot's D (`esa.stats.power.pilot_effect`), cap or transform (log-PPL, not PPL), and where the claim can
be "D > threshold in most units" use `test="sign"`, the exact sign test of the median of D at each look
(valid for any distribution; order-statistic bounds; 2^-n ≤ α_k means it cannot stop before n ≈ 10-17
at alpha = 0.01).

A claim that is clearly false stops early too: the opposite claim (mean D < threshold) is tested at each
look with its own spending of `alpha_fail` (default alpha; 0 turns it off) and stops with FAIL. Each side
keeps its own guarantee: P(wrong PASS) ≤ alpha, P(wrong FAIL) ≤ alpha_fail.

Why Pocock-type spending, α(t) = α·ln(1 + (e − 1)·t), by default: our comparisons either have huge effects
(a super weight's +20 nats against a random control's 4e-5: d_z in the tens) that should stop at the first
look, or marginal ones that need the cap. With looks at 4, 8, 16, 32, 64 and α = 0.01, Pocock spends
α_1 = 0.10·α at n = 4: the t (3 df) must exceed 10.2, i.e. an observed d_z > 5.1, which such effects clear.
O'Brien–Fleming-type spending, α(t) = 2 − 2Φ(z_(1−α/2)/√t), spends 7e-25 at t = 1/16 (a t of 3 df would
have to exceed ~1e8; at n = 8 a t of 122), so in practice nothing stops before n = 16; it keeps 0.97·α for
the final look where Pocock keeps 0.38·α, which costs marginal effects 1.3-1.4× the units of a fixed-n
plan at the cap (`esa.stats.power.plan_design` sizes n_max for that). O'Brien–Fleming stays available
(`spending="obf"`) for comparisons whose first look is already large (n0 of several dozen windows).

Families: run each member's design at alpha/m (Bonferroni). A group-sequential Holm procedure (Ye, Li,
Jiang and Wang 2013) would be less conservative; it is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from esa.errors import EsaError, unknown
from esa.stats.contrasts import one_sided_bounds, paired_stats, sign_bounds, sign_stats

SPENDING = ("pocock", "obf")
LOOK_TESTS = ("t", "sign")
SampleFn = Callable[[int], tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]]


def spend(t: Any, alpha: float, kind: str = "pocock") -> np.ndarray:
    """Cumulative alpha spent by information fraction t ∈ [0, 1] (Lan and DeMets 1983): α(0) = 0, α(1) = α."""
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)
    if alpha == 0:
        return np.zeros_like(t)
    if kind == "pocock":
        return alpha * np.log1p((math.e - 1.0) * t)
    if kind == "obf":
        z = sps.norm.isf(alpha / 2)
        with np.errstate(divide="ignore"):
            return np.where(t > 0, 2.0 * sps.norm.sf(z / np.sqrt(t)), 0.0)
    raise unknown("spending function", kind, SPENDING)


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Design:
    """Looks at n0, 2·n0, 4·n0, ... < n_max, then n_max; one-sided alpha spread by `spending`."""

    alpha: float = 0.01  # one-sided level of the claim (PASS side); a family's members use alpha/m
    n0: int = 4  # first look: ≥ 2 for a t; 3-4 for seeds, 8 or more for cheap units like windows
    n_max: int = 64  # the cap: the fixed-n plan this design replaces
    spending: str = "pocock"  # "pocock" (stops huge effects at look 1) or "obf" (keeps α for the end)
    alpha_fail: float | None = None  # the FAIL side's total level; None: = alpha; 0: never stop for FAIL
    test: str = "t"  # per-look test: "t" (paired t, the mean of D) or "sign" (exact, the median of D)

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise EsaError(f"alpha {self.alpha!r}; accepted: 0 < alpha < 0.5 (one-sided)")
        if self.alpha_fail is not None and not 0 <= self.alpha_fail < 0.5:
            raise EsaError(f"alpha_fail {self.alpha_fail!r}; accepted: None or 0 <= alpha_fail < 0.5")
        if not (isinstance(self.n0, int | np.integer) and isinstance(self.n_max, int | np.integer)):
            raise EsaError(f"n0 and n_max must be integers; got {self.n0!r}, {self.n_max!r}")
        if self.n0 < 2 or self.n_max < self.n0:
            raise EsaError(f"need 2 <= n0 <= n_max; got n0={self.n0}, n_max={self.n_max}")
        if self.spending not in SPENDING:
            raise unknown("spending function", self.spending, SPENDING)
        if self.test not in LOOK_TESTS:
            raise unknown("per-look test", self.test, LOOK_TESTS)

    @property
    def fail_level(self) -> float:
        return self.alpha if self.alpha_fail is None else float(self.alpha_fail)

    @property
    def looks(self) -> tuple[int, ...]:
        """Sample sizes at which the contrast is evaluated."""
        out, n = [], int(self.n0)
        while n < self.n_max:
            out.append(n)
            n *= 2
        return (*out, int(self.n_max))

    def spent(self, n: Any, side: str = "pass") -> np.ndarray:
        """Cumulative alpha spent once n units are in (side 'pass' or 'fail')."""
        level = self.alpha if side == "pass" else self.fail_level
        return spend(np.asarray(n, dtype=float) / self.n_max, level, self.spending)

    @property
    def alphas(self) -> np.ndarray:
        """Incremental one-sided alpha per look (PASS side); they sum to alpha."""
        return np.diff(self.spent(np.array((0, *self.looks))))

    @property
    def alphas_fail(self) -> np.ndarray:
        """Incremental alpha per look for the opposite claim (FAIL side)."""
        return np.diff(self.spent(np.array((0, *self.looks)), side="fail"))

    def describe(self) -> str:
        name = {"pocock": "Pocock", "obf": "O'Brien-Fleming"}[self.spending]
        per = ", ".join(f"{a:.3g}" for a in self.alphas)
        test = {"t": "paired t", "sign": "exact sign test"}[self.test]
        return (f"group-sequential {test}, {name}-type alpha spending (Lan-DeMets), one-sided alpha={self.alpha:g} "
                f"(FAIL side {self.fail_level:g}), looks at n = {', '.join(map(str, self.looks))}; alpha per "
                f"look {per} (union bound across looks)")

    def as_dict(self) -> dict[str, Any]:
        return dict(alpha=self.alpha, alpha_fail=self.fail_level, n0=int(self.n0), n_max=int(self.n_max),
                    spending=self.spending, test=self.test, looks=list(self.looks), alphas=self.alphas.tolist(),
                    alphas_fail=self.alphas_fail.tolist())


# ------------------------------------------------------------------ one look
def _evaluate(d: np.ndarray, threshold: float, a_k: float, f_k: float, test: str, scale: Any = None,
              ) -> dict[str, np.ndarray]:
    """One look on rows of d (..., n): statistics, bounds at (α_k, FAIL side's α_k), and the decisions.
    The one rule both `SequentialContrast` and `simulate` apply."""
    st = paired_stats(d, threshold, scale)
    if test == "sign":
        sg = sign_stats(d, threshold)
        p, q = sg["p"], sg["p_opposite"]
        lower, upper = sign_bounds(d, a_k, f_k)
    else:
        p, q = st["p"], st["p_opposite"]
        lower, upper = one_sided_bounds(st, a_k, f_k)
    passed = p <= a_k
    failed = ~passed & (q <= f_k) & (f_k > 0)
    return dict(mean=st["mean"], sd=st["sd"], constant=st["constant"], p=p, p_opposite=q, lower=lower,
                upper=upper, **{"pass": passed, "fail": failed})


# ------------------------------------------------------------------ one sequential comparison
@dataclass(frozen=True)
class SequentialResult:
    """How a sequential contrast ended: the decision, where, on how many units, and every look."""

    decision: str  # PASS / FAIL / undecided
    reason: str
    look: int | None  # 1-based look that decided; None if undecided
    n: int  # units used (the stopping look's n)
    n_max: int
    estimate: float  # mean D at the stop
    lower: float  # lower bound at the stop, level α_k: valid at any stopping time (confidence sequence)
    upper: float  # upper bound at the stop, level of the FAIL side's α_k
    p: float
    p_opposite: float
    alpha_look: float  # α_k spent at the stopping look (PASS side)
    c: float
    threshold: float
    unit: str
    design: str
    history: pd.DataFrame = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "history"}
        out = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
        out["history"] = self.history.to_dict(orient="records")
        return out

    def describe(self) -> str:
        where = f"at look {self.look}" if self.look else "without a decision"
        return (f"{self.decision} {where} (n={self.n} {self.unit} of max {self.n_max}): {self.estimate:.4g} "
                f"[{self.lower:.4g}, {self.upper:.4g}] (per-look bounds, valid at any stop)"
                + ("" if self.look else f"; {self.reason}"))


HISTORY = ["look", "n", "estimate", "sd", "p", "p_opposite", "alpha", "alpha_fail", "lower", "upper",
           "decision"]


class SequentialContrast:
    """Feed paired values with `update`; it evaluates each look of `design` as the units arrive.

    `needed` says how many more units reach the next look; `done` says whether to stop. Values fed past a
    deciding look are kept but not used. Non-finite values stop the run undecided (cap catastrophic values
    before feeding them)."""

    def __init__(self, design: Design, c: float = 1.0, threshold: float = 0.0, unit: str = "windows") -> None:
        if not (math.isfinite(c) and math.isfinite(threshold)):
            raise EsaError(f"c={c!r} and threshold={threshold!r} must be finite numbers")
        self.design, self.c, self.threshold, self.unit = design, float(c), float(threshold), unit
        self._d = np.empty(0)
        self._scale = np.empty(0)  # |a_i| + |c|·|b_i|: the rounding scale of each D_i
        self._rows: list[dict[str, Any]] = []
        self._decision: str | None = None
        self._reason = ""
        self._n_looked = 0  # n of the last evaluated look

    @property
    def n(self) -> int:
        return int(self._d.size)

    @property
    def done(self) -> bool:
        return self._decision is not None

    @property
    def next_look(self) -> int | None:
        k = len(self._rows)
        return None if self.done or k >= len(self.design.looks) else self.design.looks[k]

    @property
    def needed(self) -> int:
        """Units still to feed before the next look (0 when done)."""
        nxt = self.next_look
        return 0 if nxt is None else max(0, nxt - self.n)

    def update(self, a_new: Any, b_new: Any) -> str:
        """Append paired values; evaluate every look they reach. Returns the decision or 'continue'."""
        if self.done:
            raise EsaError(f"this comparison already stopped ({self._decision}); start a new one")
        a, b = np.atleast_1d(np.asarray(a_new, dtype=float)), np.atleast_1d(np.asarray(b_new, dtype=float))
        if a.ndim != 1 or a.shape != b.shape:
            raise EsaError(f"a and b must be paired 1-D arrays of equal length; got {a.shape} and {b.shape}")
        with np.errstate(all="ignore"):
            self._d = np.concatenate([self._d, a - self.c * b])
            self._scale = np.concatenate([self._scale, np.abs(a) + abs(self.c) * np.abs(b)])
        while (nxt := self.next_look) is not None and self.n >= nxt:
            k = len(self._rows)
            last = k == len(self.design.looks) - 1
            self._look(nxt, float(self.design.alphas[k]), float(self.design.alphas_fail[k]), last)
        return self._decision or "continue"

    def close(self, reason: str = "no more units") -> SequentialResult:
        """Stop before the cap. Units fed past the last look get one unplanned look that spends
        α(n/n_max) − what was spent, so the guarantee holds (the stop must not depend on the D values)."""
        if not self.done:
            n = min(self.n, self.design.n_max)
            if n > self._n_looked and n >= 2:
                a_k = float(self.design.spent(n) - self.design.spent(self._n_looked))
                f_k = float(self.design.spent(n, "fail") - self.design.spent(self._n_looked, "fail"))
                self._look(n, a_k, f_k, last=False)
            if not self.done:
                self._decision, self._reason = "undecided", f"{reason} at n={self.n}"
        return self.result()

    def _look(self, n: int, a_k: float, f_k: float, last: bool) -> None:
        d = self._d[:n]
        self._n_looked = n
        row: dict[str, Any] = dict(look=len(self._rows) + 1, n=n, alpha=a_k, alpha_fail=f_k)
        if not np.isfinite(d).all():
            row.update(estimate=math.nan, sd=math.nan, p=math.nan, p_opposite=math.nan, lower=math.nan,
                       upper=math.nan, decision="undecided")
            self._rows.append(row)
            self._decision = "undecided"
            self._reason = f"not finite: {int((~np.isfinite(d)).sum())} of {n} units (cap them first)"
            return
        lk = _evaluate(d, self.threshold, a_k, f_k, self.design.test, float(self._scale[:n].max()))
        p, q = float(lk["p"]), float(lk["p_opposite"])
        decision = "PASS" if lk["pass"] else "FAIL" if lk["fail"] else "continue"
        row.update(estimate=float(lk["mean"]), sd=float(lk["sd"]), p=p, p_opposite=q, lower=float(lk["lower"]),
                   upper=float(lk["upper"]), decision=decision)
        self._rows.append(row)
        if decision != "continue":
            self._decision = decision
            side = f"p {p:.3g} ≤ α_k {a_k:.3g}" if decision == "PASS" else f"opposite p {q:.3g} ≤ {f_k:.3g}"
            self._reason = f"{side} at look {row['look']}" + (" (sign test: constant differences)"
                                                               if bool(lk["constant"]) and self.design.test == "t"
                                                               else "")
        elif last:
            self._decision, self._reason = "undecided", f"reached the cap n_max={self.design.n_max} undecided"

    def result(self) -> SequentialResult:
        """The result so far (decision 'continue' while running)."""
        hist = pd.DataFrame(self._rows, columns=HISTORY)
        last = self._rows[-1] if self._rows else {}
        decided = self._decision in ("PASS", "FAIL")
        nan = math.nan
        return SequentialResult(
            decision=self._decision or "continue", reason=self._reason, look=last.get("look") if decided else None,
            n=int(last.get("n", 0)), n_max=int(self.design.n_max), estimate=last.get("estimate", nan),
            lower=last.get("lower", nan), upper=last.get("upper", nan), p=last.get("p", nan),
            p_opposite=last.get("p_opposite", nan), alpha_look=last.get("alpha", nan), c=self.c,
            threshold=self.threshold, unit=self.unit, design=self.design.describe(), history=hist)


def run(
    design: Design, sample_fn: SampleFn, c: float = 1.0, threshold: float = 0.0, unit: str = "windows",
) -> SequentialResult:
    """Ask `sample_fn(k)` for k more paired units (a, b) until the design decides or reaches its cap.

    `sample_fn` may return fewer than asked (the pool is running out); an empty return closes the run with
    an unplanned last look (`SequentialContrast.close`)."""
    seq = SequentialContrast(design, c=c, threshold=threshold, unit=unit)
    while not seq.done:
        a, b = sample_fn(seq.needed)
        if np.asarray(a).size == 0:
            return seq.close("sample_fn returned no more units")
        seq.update(a, b)
    return seq.result()


# ------------------------------------------------------------------ many comparisons at once
def simulate(design: Design, d: np.ndarray, threshold: float = 0.0) -> pd.DataFrame:
    """The design applied to each row of `d` (N, ≥ n_max) of finite paired differences, vectorised: the
    same per-look statistics and rule as `SequentialContrast`. Columns: decision, look (0: none), n."""
    d = np.asarray(d, dtype=float)
    if d.ndim != 2 or d.shape[1] < design.n_max:
        raise EsaError(f"simulate needs an (N, >= {design.n_max}) array; got shape {d.shape}")
    if not np.isfinite(d).all():
        raise EsaError("simulate needs finite differences")
    N = d.shape[0]
    decision = np.full(N, "undecided", dtype=object)
    look, n_used = np.zeros(N, dtype=int), np.full(N, design.n_max)
    open_ = np.ones(N, dtype=bool)
    for k, (n_k, a_k, f_k) in enumerate(zip(design.looks, design.alphas, design.alphas_fail, strict=True), 1):
        idx = np.flatnonzero(open_)
        if not idx.size:
            break
        lk = _evaluate(d[idx, :n_k], threshold, a_k, f_k, design.test)
        pas, fail = lk["pass"], lk["fail"]
        decision[idx[pas]], decision[idx[fail]] = "PASS", "FAIL"
        stop = idx[pas | fail]
        look[stop], n_used[stop], open_[stop] = k, n_k, False
    return pd.DataFrame(dict(decision=decision, look=look, n=n_used))


def fixed_n_equivalent(results: Sequence[SequentialResult], n_fixed: int | Sequence[int] | None = None,
                       ) -> dict[str, Any]:
    """Units evaluated sequentially against the fixed-n plan (default: every comparison run to its cap,
    which reaches its decisions with at least the sequential power), for the report."""
    rs = list(results)
    fixed = ([r.n_max for r in rs] if n_fixed is None else
             [int(n_fixed)] * len(rs) if isinstance(n_fixed, int | np.integer) else [int(x) for x in n_fixed])
    if len(fixed) != len(rs):
        raise EsaError(f"n_fixed has {len(fixed)} entries for {len(rs)} results")
    n_seq, n_fix = sum(r.n for r in rs), sum(fixed)
    counts = {k: sum(r.decision == k for r in rs) for k in ("PASS", "FAIL", "undecided")}
    saved = 1.0 - n_seq / n_fix if n_fix else math.nan
    text = (f"{n_seq} units evaluated sequentially against {n_fix} for the fixed-n plan "
            f"({100 * saved:.0f}% saved) over {len(rs)} comparisons: "
            + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return dict(comparisons=len(rs), n_sequential=n_seq, n_fixed=n_fix, saved_fraction=saved, **counts, text=text)
