"""Inference for perturbation experiments: CIs, ratios, tests, effect sizes, Holm, dose-response.

The plan (README, "Methods", statistics):
- Unit of replication = the seed (calibration sample of the top-k, and the random controls' draw).
  Conditions with the same seeds are compared *paired by seed* (paired t, primary; Wilcoxon signed-rank
  alongside from 6 seeds: its exact one-sided p is at least 2^-n, too coarse for p < 0.01); otherwise
  unpaired (Mann-Whitney U and Welch's t). With 2-3 seeds every seed-level test is underpowered and
  says so.
- A second, many-observation test runs over evaluation windows: every condition is evaluated on the
  same windows, so (seed, window) pairs give per-window paired delta NLLs (Wilcoxon signed-rank).
  It tests "this set hurts more than that one on this text" for the given top-k sets; it does not
  generalise over calibration samples the way the seed-level test does. Both are reported; the
  criterion uses the seed-level test when there are >= 5 seeds, else the window-level one (stated).
- Holm's step-down correction is applied across *every* comparison passed to `analyze` (one call per
  notebook), separately within the seed-level and the window-level family; both adjusted p are reported.
- Catastrophic damage is never dropped: a non-finite log-PPL (inf/NaN, every window overflowed) is
  replaced by a stated cap, `cap = max(LOG_PPL_CAP, largest finite log-PPL observed + 1)` nats, so it
  ranks above every finite observation; the number of capped values is reported with each result.
- Statistics are computed on delta log-PPL (nats/token, what damage adds to the loss); delta-PPL and its
  ratios are reported too because the research guide states its criteria in PPL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from esa.stats.contrasts import contrast

LOG_PPL_CAP = 50.0  # nats per token; exp(50) ~ 5e21 perplexity, far beyond any functioning model
SEED_TEST_MIN_FOR_PRIMARY = 5
WILCOXON_MIN_N = 6
CONDITION = ["perturbation", "scale", "prob"]


# ------------------------------------------------------------------ catastrophic values
def log_ppl_cap(log_ppl: Sequence[float] | np.ndarray) -> float:
    """The stated cap for non-finite log-PPL values: max(LOG_PPL_CAP, largest finite + 1)."""
    x = np.asarray(log_ppl, dtype=float)
    finite = x[np.isfinite(x)]
    return float(max(LOG_PPL_CAP, (finite.max() + 1.0) if finite.size else LOG_PPL_CAP))


def capped(x: Sequence[float] | np.ndarray, cap: float) -> np.ndarray:
    """Replace +inf / NaN by `cap` (catastrophic), -inf by -cap."""
    a = np.asarray(x, dtype=float).copy()
    a[np.isnan(a) | (a == np.inf)] = cap
    a[a == -np.inf] = -cap
    return a


# ------------------------------------------------------------------ CIs
def bootstrap_ci(
    x: Sequence[float] | np.ndarray, stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 5000,
    level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, lo, hi): percentile bootstrap CI of `stat`. With n < 2 the CI is (nan, nan)."""
    a = np.asarray(x, dtype=float)
    est = float(stat(a)) if a.size else math.nan
    if a.size < 2:
        return est, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    boots = np.array([stat(a[i]) for i in idx]) if stat is not np.mean else a[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2], method="nearest")
    return est, float(lo), float(hi)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


def ratio_ci(
    num: Sequence[float] | np.ndarray, den: Sequence[float] | np.ndarray, paired: bool, n_boot: int = 5000,
    level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """Ratio of means mean(num)/mean(den) with a bootstrap CI (paired: resample pairs together).

    A non-positive denominator (the control did no harm) gives inf when the numerator is positive."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    est = _ratio(float(a.mean()), float(b.mean())) if a.size and b.size else math.nan
    if a.size < 2 or b.size < 2:
        return est, math.nan, math.nan
    rng = np.random.default_rng(seed)
    if paired:
        idx = rng.integers(0, a.size, size=(n_boot, a.size))
        na, nb = a[idx].mean(1), b[idx].mean(1)
    else:
        na = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(1)
        nb = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(1)
    r = np.array([_ratio(x, y) for x, y in zip(na, nb, strict=True)])
    r = r[~np.isnan(r)]
    if not r.size:
        return est, math.nan, math.nan
    lo, hi = np.quantile(r, [(1 - level) / 2, 1 - (1 - level) / 2], method="nearest")
    return est, float(lo), float(hi)


# ------------------------------------------------------------------ tests
def paired_test(a: Sequence[float], b: Sequence[float], alternative: str = "greater") -> dict[str, Any]:
    """H1: a > b (alternative='greater'), paired. Paired t (and Wilcoxon when n >= 6); Cohen's d_z."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a - b
    n = int(d.size)
    out: dict[str, Any] = dict(design="paired", n=n, mean_diff=float(d.mean()) if n else math.nan,
                               underpowered=n <= 3)
    sd = float(d.std(ddof=1)) if n >= 2 else math.nan
    out["effect_size"] = float(d.mean() / sd) if n >= 2 and sd > 0 else (math.inf * np.sign(d.mean())
                                                                         if n >= 2 and d.mean() != 0 else math.nan)
    out["effect_name"] = "cohen_dz"
    if n < 2:
        out.update(test="none", p=math.nan, note="fewer than 2 paired observations: no test")
        return out
    if sd == 0:
        # every pair differs by the same amount: t is infinite; report the sign-test-exact p instead
        p = 0.5 ** n if (d.mean() > 0) == (alternative == "greater") and d.mean() != 0 else 1.0
        out.update(test="sign(constant differences)", statistic=math.nan, p=float(p))
    else:
        t = sps.ttest_rel(a, b, alternative=alternative)
        out.update(test="paired_t", statistic=float(t.statistic), p=float(t.pvalue))
    if n >= WILCOXON_MIN_N and np.any(d != 0):
        # reported alongside, not primary: with n seeds its exact one-sided p cannot go below 2^-n, so with
        # fewer than ~10 seeds it cannot pass p < 0.01 after a Holm correction however large the effect
        out["p_wilcoxon"] = float(sps.wilcoxon(a, b, alternative=alternative).pvalue)
    if out["underpowered"]:
        out["note"] = f"only {n} seeds: the seed-level test is underpowered; see the window-level test"
    return out


def unpaired_test(a: Sequence[float], b: Sequence[float], alternative: str = "greater") -> dict[str, Any]:
    """H1: a > b, independent samples: Mann-Whitney U (primary) and Welch's t; Hedges' g."""
    import pingouin as pg

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    out: dict[str, Any] = dict(design="unpaired", n=int(min(a.size, b.size)), n_a=int(a.size), n_b=int(b.size),
                               mean_diff=float(a.mean() - b.mean()) if a.size and b.size else math.nan,
                               underpowered=min(a.size, b.size) <= 3, effect_name="hedges_g")
    if a.size < 2 or b.size < 2:
        out.update(test="none", p=math.nan, effect_size=math.nan, note="fewer than 2 observations per group")
        return out
    u = sps.mannwhitneyu(a, b, alternative=alternative)
    w = sps.ttest_ind(a, b, equal_var=False, alternative=alternative)
    out.update(test="mann_whitney", statistic=float(u.statistic), p=float(u.pvalue), p_welch=float(w.pvalue),
               effect_size=float(pg.compute_effsize(a, b, paired=False, eftype="hedges")))
    if out["underpowered"]:
        out["note"] = "3 or fewer observations per group: underpowered"
    return out


def window_test(delta_a: np.ndarray, delta_b: np.ndarray, alternative: str = "greater") -> dict[str, Any]:
    """Per-window paired test: arrays of the same shape (seeds x windows) of delta NLL; Wilcoxon signed-rank
    over all pairs, matched-pairs rank-biserial correlation as the effect size."""
    d = (np.asarray(delta_a, dtype=float) - np.asarray(delta_b, dtype=float)).ravel()
    n = int(d.size)
    out: dict[str, Any] = dict(design="paired_windows", n=n, mean_diff=float(d.mean()) if n else math.nan,
                               effect_name="rank_biserial")
    nz = d[d != 0]
    if nz.size < 2:
        out.update(test="none", p=math.nan if nz.size == 0 else 0.5, effect_size=math.nan,
                   note="fewer than 2 non-zero window differences")
        return out
    w = sps.wilcoxon(d, alternative=alternative, zero_method="wilcox")
    ranks = sps.rankdata(np.abs(nz))
    rbc = float((ranks[nz > 0].sum() - ranks[nz < 0].sum()) / ranks.sum())
    out.update(test="wilcoxon_windows", statistic=float(w.statistic), p=float(w.pvalue), effect_size=rbc)
    return out


def holm(pvals: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN stays NaN and does not count toward m)."""
    p = np.asarray(pvals, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out.tolist()
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out.tolist()


# ------------------------------------------------------------------ dose-response
def dose_response(table: pd.DataFrame, value: str = "delta_log_ppl", hierarchy: Sequence[str] = ("top_k", "random_k",
                  "bottom_k")) -> dict[str, Any]:
    """Per (perturbation, group): Spearman(dose, value) over rows, and whether the mean rises with every
    dose step; per (perturbation, dose): whether mean(top) > mean(random) > mean(bottom) holds."""
    cap = log_ppl_cap(table["log_ppl"])
    t = table.assign(_v=_capped_value(table, value, cap))
    curves, hier = [], []
    for (pert, group), g in t.groupby(["perturbation", "group"], sort=True):
        means = g.groupby("dose")["_v"].mean().sort_index()
        n_doses = int(means.size)
        if n_doses < 2:
            curves.append(dict(perturbation=pert, group=group, n_doses=n_doses, rho=math.nan, p=math.nan,
                               monotonic=None, note="fewer than 2 doses"))
            continue
        rho, p = sps.spearmanr(g["dose"], g["_v"])
        steps = np.diff(means.to_numpy())
        curves.append(dict(perturbation=pert, group=group, n_doses=n_doses, rho=float(rho), p=float(p),
                           monotonic=bool((steps > 0).all()), means=[float(v) for v in means],
                           doses=[float(d) for d in means.index]))
    present = [h for h in hierarchy if h in set(t["group"])]
    for (pert, dose), g in t.groupby(["perturbation", "dose"], sort=True):
        m = g.groupby("group")["_v"].mean()
        chain = [float(m[h]) for h in present if h in m]
        holds = bool(all(x > y for x, y in zip(chain, chain[1:], strict=False))) if len(chain) >= 2 else None
        hier.append(dict(perturbation=pert, dose=float(dose), groups=present, means=chain, holds=holds))
    return dict(value=value, cap=cap, curves=curves, hierarchy=hier)


# ------------------------------------------------------------------ the whole analysis
def _capped_value(table: pd.DataFrame, value: str, cap: float) -> np.ndarray:
    """`value` with catastrophic rows capped: delta_log_ppl uses capped log_ppl; delta_ppl uses exp(cap)."""
    lp = capped(table["log_ppl"], cap)
    base = (table["log_ppl"] - table["delta_log_ppl"]).to_numpy()
    base = np.where(np.isfinite(base), base, np.nanmedian(np.where(np.isfinite(base), base, np.nan))
                    if np.isfinite(base).any() else 0.0)
    if value == "delta_log_ppl":
        return lp - base
    if value == "delta_ppl":
        return np.exp(lp) - np.exp(base)
    return capped(table[value], cap)


def analyze(
    table: pd.DataFrame,
    windows: pd.DataFrame | None = None,
    top: str = "top_k",
    value: str = "delta_log_ppl",
    n_boot: int = 5000,
    level: float = 0.95,
    alpha: float = 0.01,
    seed: int = 0,
    contrast_c: float = 5.0,
    sequential: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Everything stats.json holds for one sweep table (and, optionally, its per-window table).

    `contrasts`: for each compared pair (a, b), the contrast D = a − contrast_c·b (the guide's "ΔPPL(top) ≥
    5× ΔPPL(random)") judged by its one-sided bound (esa.stats.contrasts) over seeds (paired by seed) and
    over (seed, window) pairs; `primary` follows the comparisons' rule."""
    if table.empty:
        return dict(notes=["empty table: nothing to analyse"])
    cap = log_ppl_cap(table["log_ppl"])
    t = table.assign(_v=_capped_value(table, value, cap), _dppl=_capped_value(table, "delta_ppl", cap),
                     _cap=~np.isfinite(table["log_ppl"].to_numpy(dtype=float)))
    wcap = None
    if windows is not None and not windows.empty:
        # per-window cap: also above every finite window NLL, so a capped window ranks above all finite ones
        wc = max(cap, log_ppl_cap(windows["nll"]))
        wcap = windows.assign(_d=capped(windows["nll"], wc) - windows["base_nll"])
    summary, ratios, comps, contrasts = [], [], [], []
    for cond, g in t.groupby(CONDITION, sort=True):
        key = dict(zip(CONDITION, cond, strict=True))
        for group, gg in g.groupby("group", sort=True):
            est, lo, hi = bootstrap_ci(gg["_v"], n_boot=n_boot, level=level, seed=seed)
            pe, plo, phi = bootstrap_ci(gg["_dppl"], n_boot=n_boot, level=level, seed=seed)
            summary.append(dict(**key, group=group, n_seeds=int(gg["seed"].nunique()), k=int(gg["k"].iloc[0]),
                                mean=est, ci_lo=lo, ci_hi=hi, mean_delta_ppl=pe, delta_ppl_ci_lo=plo,
                                delta_ppl_ci_hi=phi, n_capped=int(gg["_cap"].sum()),
                                n_nonfinite_windows=int(gg["n_nonfinite_windows"].sum()),
                                n_inf_weights=int(gg["n_inf_weights"].sum()),
                                n_nan_weights=int(gg["n_nan_weights"].sum()),
                                unchanged_share=_unchanged(gg)))
        groups = set(g["group"])
        pairs = [(top, c) for c in sorted(groups - {top})] if top in groups else []
        if {"random_k", "bottom_k"} <= groups:
            pairs.append(("random_k", "bottom_k"))
        for a, b in pairs:
            ga, gb = g[g.group == a].set_index("seed"), g[g.group == b].set_index("seed")
            paired = set(ga.index) == set(gb.index) and len(ga) > 0
            if paired:
                gb = gb.loc[ga.index]
            seed_res = (paired_test if paired else unpaired_test)(ga["_v"].to_numpy(), gb["_v"].to_numpy())
            r, rlo, rhi = ratio_ci(ga["_dppl"], gb["_dppl"], paired, n_boot, level, seed)
            rl, rllo, rlhi = ratio_ci(ga["_v"], gb["_v"], paired, n_boot, level, seed)
            ratios.append(dict(**key, numerator=a, denominator=b, ratio_delta_ppl=r, ci_lo=rlo, ci_hi=rhi,
                               ratio_delta_log_ppl=rl, log_ci_lo=rllo, log_ci_hi=rlhi, paired=paired))
            comp = dict(**key, a=a, b=b, alternative=f"{a} > {b}", seed_level=seed_res,
                        **_per_changed_weight(ga, gb, paired))
            con = dict(**key, a=a, b=b, c=contrast_c)
            if paired and len(ga) >= 2:
                con["seed_level"] = contrast(ga["_v"].to_numpy(), gb["_v"].to_numpy(), contrast_c, 0.0, alpha,
                                             "seeds").as_dict()
            if wcap is not None:
                comp["window_level"] = _window_comparison(wcap, key, a, b)
                pair = _window_pairs(wcap, key, a, b)
                if pair is not None and pair[0].size >= 2:
                    con["window_level"] = contrast(*pair, contrast_c, 0.0, alpha, "(seed, window) pairs").as_dict()
            comps.append(comp)
            contrasts.append(con)
    _holm_family(comps, "seed_level")
    _holm_family(comps, "window_level")
    for c in comps:
        n_seeds = c["seed_level"].get("n", 0)
        use = "seed_level" if n_seeds >= SEED_TEST_MIN_FOR_PRIMARY or "window_level" not in c else "window_level"
        c["primary"] = use
        c["p_primary_holm"] = c[use].get("p_holm", math.nan)
        c["significant"] = bool(c["p_primary_holm"] < alpha) if np.isfinite(c["p_primary_holm"]) else None
    for c in contrasts:
        n_seeds = c.get("seed_level", {}).get("n", 0)
        c["primary"] = ("seed_level" if n_seeds >= SEED_TEST_MIN_FOR_PRIMARY or "window_level" not in c
                        else "window_level")
    notes = [
        f"value: {value} (nats/token); non-finite log-PPL capped at {cap:.3g} nats "
        f"({int(t['_cap'].sum())} of {len(t)} rows capped)",
        "seed-level tests paired by seed where both groups share their seeds (paired t; Wilcoxon alongside "
        f"from {WILCOXON_MIN_N} seeds), else Mann-Whitney U (Welch's t alongside)",
        "window-level tests: Wilcoxon signed-rank over (seed, window) pairs of delta NLL; they condition on "
        "the given top-k sets",
        f"Holm correction across all {len(comps)} comparisons of this analysis, separately per family; "
        f"primary = seed-level with >= {SEED_TEST_MIN_FOR_PRIMARY} seeds, else window-level; alpha = {alpha}",
        f"CIs: {int(level * 100)}% percentile bootstrap over seeds ({n_boot} resamples)",
    ]
    if "n_changed" in table:
        notes.append(f"unchanged_share: selected weights whose stored value did not change (bf16 rounds noise below "
                     f"half an ulp of |w| back to w, more often for large weights); per_changed_weight compares "
                     f"{value} / n_changed (to leading order the loss change is a sum over the weights that moved, "
                     f"and an unmoved weight adds nothing); dose_matched: unchanged shares within "
                     f"{DOSE_MATCH:.0%} of each other, else read per_changed_weight first")
    notes.append(f"contrasts: D = a − {contrast_c:g}·b per seed and per (seed, window) pair, one-sided "
                 f"{1 - alpha:.0%} t bounds (esa.stats.contrasts); PASS when the lower bound is above 0")
    out = dict(value=value, cap=cap, alpha=alpha, summary=summary, ratios=ratios, comparisons=comps,
               contrasts=contrasts, dose_response=dose_response(table, value), notes=notes)
    if sequential is not None and len(sequential):
        # the decisions of a sequential sweep: what its criteria are judged on (its stopping made the fixed-n
        # tests above, computed on whatever windows were evaluated, descriptive only)
        out["sequential"] = json.loads(sequential.to_json(orient="records"))
        per_seed = int(sequential["n_max"].iloc[0]) // max(1, table["seed"].nunique())  # the cap, in windows
        n_used, n_fixed = int(table["n_windows"].sum()), per_seed * len(table)
        out["sequential_windows"] = {"evaluated": n_used, "fixed_n_plan": n_fixed}
        notes.append(f"sequential evaluation: {n_used} condition-windows evaluated against {n_fixed} for the fixed-n "
                     f"plan; decisions from {sequential['design'].iloc[0]}")
    return out


DOSE_MATCH = 0.05  # unchanged shares further apart than this: the groups did not receive the same perturbation


def _unchanged(g: pd.DataFrame) -> float:
    """Mean share of selected weights left unchanged over a group's seeds (NaN for tables without n_changed)."""
    if "n_changed" not in g:
        return math.nan
    k = g["k"].to_numpy(dtype=float)
    return float(np.mean(1.0 - g["n_changed"].to_numpy(dtype=float) / np.where(k > 0, k, np.nan)))


def _per_changed_weight(ga: pd.DataFrame, gb: pd.DataFrame, paired: bool) -> dict[str, Any]:
    """The comparison of effects per changed weight, with both groups' unchanged shares (empty without n_changed)."""
    if "n_changed" not in ga:
        return {}
    ua, ub = _unchanged(ga), _unchanged(gb)
    out: dict[str, Any] = dict(unchanged_share_a=ua, unchanged_share_b=ub,
                               dose_matched=bool(abs(ua - ub) <= DOSE_MATCH) if np.isfinite(ua - ub) else None)
    na, nb = ga["n_changed"].to_numpy(dtype=float), gb["n_changed"].to_numpy(dtype=float)
    if len(na) and len(nb) and (na > 0).all() and (nb > 0).all():
        test = paired_test if paired else unpaired_test
        out["per_changed_weight"] = test(ga["_v"].to_numpy() / na, gb["_v"].to_numpy() / nb)
    else:
        out["per_changed_weight"] = {"note": "a seed changed no weight: no effect per changed weight"}
    return out


def _window_matrices(w: pd.DataFrame, key: dict[str, Any], a: str, b: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The capped per-window deltas of groups a and b, (seeds, windows) each, on the seeds and windows both
    have (a sequential sweep gives a group more windows than another once their comparison is decided)."""
    sel = w
    for col, v in key.items():
        sel = sel[sel[col] == v]
    pa = sel[sel.group == a].pivot_table(index="seed", columns="window", values="_d")
    pb = sel[sel.group == b].pivot_table(index="seed", columns="window", values="_d")
    seeds, wins = pa.index.intersection(pb.index), pa.columns.intersection(pb.columns)
    if len(seeds) == 0 or len(wins) == 0:
        return None
    return pa.loc[seeds, wins].to_numpy(), pb.loc[seeds, wins].to_numpy()


def _window_comparison(w: pd.DataFrame, key: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    mats = _window_matrices(w, key, a, b)
    if mats is None:
        return dict(test="none", p=math.nan, n=0, note="no shared (seed, window) pairs")
    return window_test(*mats)


def _window_pairs(w: pd.DataFrame, key: dict[str, Any], a: str, b: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The same deltas flattened over the (seed, window) pairs."""
    mats = _window_matrices(w, key, a, b)
    return None if mats is None else (mats[0].ravel(), mats[1].ravel())


def _holm_family(comps: list[dict[str, Any]], family: str) -> None:
    idx = [i for i, c in enumerate(comps) if family in c]
    adj = holm([comps[i][family].get("p", math.nan) for i in idx])
    for i, p in zip(idx, adj, strict=True):
        comps[i][family]["p_holm"] = p
        comps[i][family]["m_holm"] = len(idx)


def comparisons_frame(result: dict[str, Any]) -> pd.DataFrame:
    """A flat table of `analyze(...)["comparisons"]` for notebooks."""
    rows = []
    for c in result.get("comparisons", []):
        row = {k: c[k] for k in (*CONDITION, "a", "b", "primary", "p_primary_holm", "significant")}
        for fam in ("seed_level", "window_level"):
            if fam in c:
                f = c[fam]
                row.update({f"{fam}_{k}": f.get(k) for k in ("test", "n", "p", "p_holm", "effect_size",
                                                              "mean_diff")})
        for k in ("unchanged_share_a", "unchanged_share_b", "dose_matched"):
            if k in c:
                row[k] = c[k]
        if "p" in c.get("per_changed_weight", {}):
            row["per_changed_weight_p"] = c["per_changed_weight"]["p"]
        rows.append(row)
    return pd.DataFrame(rows)
