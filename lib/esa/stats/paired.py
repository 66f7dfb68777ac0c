"""Paired-by-seed comparisons of two arms of a study, and the verdict "a beats b" they support.

Where the seed is the unit of replication (it draws the calibration sample, the random controls, the batch
order, an adapter's initialisation), two arms run with the same seed are a pair: the per-seed difference
value(a) - value(b) is the datum, not each arm's mean. `compare` forms those differences from a table with
one row per (arm, seed) (columns `arm`, `seed`, the value, and `error` where an arm could not run) and tests
H1: mean difference > 0 (one-sided paired t, esa.stats.inference.paired_test; the reverse test says a
significant loss). `with_holm` adjusts a family's p-values (Holm); `judge_comparison` turns one comparison
into a verdict: not estimable (an arm missing, no finite pair, identical arms, an undefined test),
underpowered (fewer than `min_seeds` seeds, with the seeds the observed effect would need, esa.stats.power),
else PASS when the Holm-adjusted p is below `alpha` and the mean difference is positive, FAIL otherwise.
`comparison_row` is that verdict as a scorecard row, machinery-only when the run is below its budget.

They live here, not in a phase module, because they are statistics: any study whose arms share seeds
judges them the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from esa.stats import power
from esa.stats.contrasts import Contrast, contrast
from esa.stats.inference import holm, paired_test
from esa.stats.verdicts import Criterion, demote

ALPHA = 0.05
MIN_SEEDS = 3  # the guide's seeds; a one-sided paired t at alpha 0.05 can pass with 3 consistent seeds


@dataclass
class Comparison:
    """A paired-by-seed comparison: diff = value(a) - value(b) per seed (sign flips it), H1: mean diff > 0."""

    key: str
    a: str
    b: str
    value: str
    n: int = 0
    mean_diff: float = math.nan
    d_z: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    test: str = ""
    reverse_p: float = math.nan  # H1: mean diff < 0 (a significant loss)
    diffs: list[float] = field(default_factory=list)
    missing: str = ""  # why the comparison could not be made


def ran(final: pd.DataFrame) -> pd.DataFrame:
    """The rows of arms that ran (an `error` column names why the others could not)."""
    return final[final["error"] == ""] if "error" in final else final


def compare(final: pd.DataFrame, key: str, a: str, b: str, value: str, sign: float = 1.0) -> Comparison:
    """Arm `a` against arm `b` on `value`, paired by seed (one row per arm and seed in `final`)."""
    c = Comparison(key, a, b, value)
    ok = ran(final)
    runs = set(final["arm"])
    for arm in (a, b):
        if arm not in runs:
            c.missing = f"{arm} was not run"
            return c
        errs = final[(final["arm"] == arm) & (final["error"] != "")]["error"] if "error" in final else []
        if len(errs) and arm not in set(ok["arm"]):
            c.missing = f"{arm} could not run: {errs.iloc[0]}"
            return c
    va, vb = seed_pairs(final, a, b, value)
    d = sign * (va - vb)
    c.n, c.diffs = int(d.size), [float(x) for x in d]
    if d.size == 0:
        c.missing = "no seed has finite values for both arms"
        return c
    c.mean_diff = float(d.mean())
    # differences equal up to float rounding are constant (scipy's t would divide by a rounding-noise sd)
    d = np.where(np.isclose(d, c.mean_diff, rtol=1e-9, atol=1e-12), c.mean_diff, d)
    t = paired_test(d, np.zeros_like(d), alternative="greater")
    c.d_z, c.p, c.test = float(t["effect_size"]), float(t["p"]), str(t["test"])
    if d.size >= 2:
        c.reverse_p = float(paired_test(d, np.zeros_like(d), alternative="less")["p"])
    return c


def seed_pairs(final: pd.DataFrame, a: str, b: str, value: str) -> tuple[np.ndarray, np.ndarray]:
    """`value` of arm `a` and of arm `b` on the seeds where both ran and both are finite, aligned by seed."""
    ok = ran(final)
    pa = ok[ok["arm"] == a].set_index("seed")[value]
    pb = ok[ok["arm"] == b].set_index("seed")[value]
    both = pa.index.intersection(pb.index)
    va, vb = pa.loc[both].to_numpy(float), pb.loc[both].to_numpy(float)
    keep = np.isfinite(va) & np.isfinite(vb)
    return va[keep], vb[keep]


def share_kept(final: pd.DataFrame, a: str, b: str, value: str, share: float, alpha: float = ALPHA) -> Contrast | None:
    """The claim "arm `a` keeps at least `share` of arm `b`'s value" as the contrast value(a) − share·value(b)
    > 0, paired by seed and judged by its one-sided bounds (esa.stats.contrasts): decided also where b's value
    is within noise of zero, where the share a/b would have no denominator. None when no seed has both."""
    va, vb = seed_pairs(final, a, b, value)
    return contrast(va, vb, share, 0.0, alpha, "seeds") if va.size else None


def with_holm(comps: list[Comparison]) -> list[Comparison]:
    """The family's comparisons with their Holm-adjusted p-values set."""
    ps = holm([c.p for c in comps])
    for c, p in zip(comps, ps, strict=True):
        c.p_holm = p
    return comps


def mean_ratio(final: pd.DataFrame, a: str, b: str, value: str) -> float:
    """mean(a) / mean(b) over the runs of each arm; NaN when b's mean is not above zero."""
    ok = ran(final)
    va, vb = ok[ok["arm"] == a][value], ok[ok["arm"] == b][value]
    if not len(va) or not len(vb) or not float(vb.mean()) > 0:
        return math.nan
    return float(va.mean() / vb.mean())


def judge_comparison(c: Comparison, n_family: int, alpha: float = ALPHA,
                     min_seeds: int = MIN_SEEDS) -> tuple[bool | None, str, str]:
    """(passed, verdict, note) of "a beats b" from a Holm-adjusted comparison."""
    if c.missing:
        return None, "not estimable", c.missing
    base = (f"mean diff {c.mean_diff:+.4f} nats over {c.n} seed(s) (per seed {', '.join(f'{x:+.4f}' for x in c.diffs)}); "
            f"{c.test} one-sided p = {c.p:.3g}, Holm over {n_family}: {c.p_holm:.3g}")
    if c.n >= 2 and not math.isnan(c.reverse_p):
        base += f"; reverse test (b better) p = {c.reverse_p:.3g}"
    if all(x == 0 for x in c.diffs):
        return None, "not estimable", f"every seed gives exactly the same value for both arms. {base}"
    if c.n < min_seeds:
        need = power.paired_t_seeds_needed(c.d_z, alpha) if c.n >= 2 else None
        need = max(need, min_seeds) if need else None
        want = (f"the observed effect (d_z {c.d_z:.2f}) would need {need} seeds" if need else
                "the observed effect points the other way or is not estimable" if c.n >= 2 else
                f"a paired test needs >= {min_seeds} seeds")
        return None, "underpowered", f"only {c.n} seed(s) (verdicts need >= {min_seeds}); {want}. {base}"
    if math.isnan(c.p_holm):
        return None, "not estimable", f"the test is not defined. {base}"
    passed = bool(c.p_holm < alpha and c.mean_diff > 0)
    return passed, ("PASS" if passed else "FAIL"), base


def comparison_row(cid: str, phase: int, text: str, c: Comparison, n_family: int, threshold: str, evidence: str,
                   extra: str = "", why: str | None = None,
                   judged: tuple[bool | None, str, str] | None = None) -> Criterion:
    """The scorecard row of "a beats b" (`extra` appended to the note; `judged`: a verdict the caller derived
    from `judge_comparison`, else that one); a PASS or FAIL becomes machinery-only with `why` when the run is
    below its budget."""
    passed, verdict, note = judged or judge_comparison(c, n_family)
    crit = Criterion(cid, phase, text, None if math.isnan(c.mean_diff) else c.mean_diff, threshold, passed, evidence,
                     f"{note}{'; ' + extra if extra else ''}", verdict=verdict)
    return demote(crit, "machinery-only", why) if why and crit.verdict in ("PASS", "FAIL") else crit
