"""Scaling analyzer: how a sensitivity measure changes with model size, and how far to trust the fit.

Input is a tidy per-model table, one row per model: `model, n_params, n_params_active` and one column
per measure (e.g. `dppl_topk_zero`, `frac_weights_90pct_damage`, `tail_ratio`, `top_score`,
`super_weight`). A measure y is fitted as a power law y = A * N^b by least squares on log-log axes,
against total parameters and, separately, active parameters (they differ only for MoE models).

What each fit reports, and why:
- exponent b, prefactor A, R^2 on the log-log axes;
- a pairs-bootstrap percentile CI of b (models resampled with replacement) and the t-based CI of the
  OLS slope; with 4-6 models neither is tight, and the bootstrap has few distinct resamples;
- leave-one-model-out (LOO) relative prediction error |y_hat - y| / y in the original scale (the guide's
  "within 20%" criterion is `max_loo_error <= 0.2`);
- `descriptive_only` = fewer than MIN_MODELS_FOR_LAW models: the numbers describe these models and
  are not offered as a law.
Threshold detection (`segmented_fit`) fits a continuous two-segment line in log-log space and compares
it to one line by BIC; with few models it is exploratory by construction and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from esa.errors import EsaError
from esa.models.micro import is_micro
from esa.stats.verdicts import Criterion, judge

MIN_MODELS_FOR_LAW = 5  # below this a fit is reported as descriptive only
SIZE_COLUMNS = ("n_params", "n_params_active")
RESERVED = {"model", "family", "arch", "source", "metric", "k", "seed", "moe", "instruct", *SIZE_COLUMNS}


@dataclass
class PowerLawFit:
    measure: str
    x: str  # which size column: n_params | n_params_active
    n_models: int
    exponent: float
    prefactor: float
    r2: float
    exponent_ci: tuple[float, float]  # bootstrap percentile CI
    exponent_ci_t: tuple[float, float]  # OLS t-interval (assumes iid normal log-residuals)
    ci_level: float
    loo_mean_error: float  # mean |relative error| of leave-one-model-out predictions (NaN if < 3 models)
    loo_max_error: float
    within_20pct: bool | None  # max LOO error <= 20%; None when LOO is not possible
    descriptive_only: bool
    dropped: list[str] = field(default_factory=list)  # models left out (non-positive or missing y)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ols(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of ly on lx."""
    slope, intercept = np.polyfit(lx, ly, 1)
    return float(intercept), float(slope)


def _r2(lx: np.ndarray, ly: np.ndarray, intercept: float, slope: float) -> float:
    ss_res = float(((ly - (intercept + slope * lx)) ** 2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def bootstrap_exponent(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0,
                       ci: float = 0.95) -> tuple[float, float, np.ndarray]:
    """Pairs bootstrap of the log-log slope.

    A resample needs at least min(3, distinct sizes) distinct sizes, sizes within ~1% counting as one: a
    resample of two near-equal sizes (a dense model and an MoE of the same active size) has an
    arbitrarily steep slope that says nothing about scaling.
    """
    lx, ly = np.log(x), np.log(y)
    rng = np.random.default_rng(seed)
    n = len(lx)
    bins = np.round(lx / 0.01)  # log-size bins of ~1%
    need = min(3, np.unique(bins).size)
    idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n)
    slopes = []
    for row in idx:
        if np.unique(bins[row]).size < max(2, need):
            continue
        slopes.append(_ols(lx[row], ly[row])[1])
    s = np.asarray(slopes)
    if s.size == 0:
        return float("nan"), float("nan"), s
    alpha = (1 - ci) / 2
    return float(np.quantile(s, alpha)), float(np.quantile(s, 1 - alpha)), s


def loo_predictions(x: np.ndarray, y: np.ndarray, names: list[str] | None = None) -> pd.DataFrame:
    """Leave-one-model-out: fit on the others, predict the held-out model's y in the original scale."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    names = names or [str(i) for i in range(len(x))]
    if len(x) < 3:
        return pd.DataFrame(columns=["model", "x", "actual", "predicted", "rel_error"])
    lx, ly = np.log(x), np.log(y)
    rows = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        if np.unique(lx[keep]).size < 2:
            continue
        a, b = _ols(lx[keep], ly[keep])
        pred = float(np.exp(a + b * lx[i]))
        rows.append(dict(model=names[i], x=float(x[i]), actual=float(y[i]), predicted=pred,
                         rel_error=abs(pred - y[i]) / abs(y[i])))
    return pd.DataFrame(rows)


def fit_power_law(x: Any, y: Any, names: list[str] | None = None, measure: str = "y", x_name: str = "n_params",
                  n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> PowerLawFit:
    """Fit y = A * x^b on log-log axes; see the module docstring for what is reported."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    names = list(names) if names is not None else [str(i) for i in range(len(x))]
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    dropped = [n for n, k in zip(names, ok, strict=True) if not k]
    x, y, names = x[ok], y[ok], [n for n, k in zip(names, ok, strict=True) if k]
    if np.unique(x).size < 2:
        raise EsaError(f"cannot fit {measure!r} against {x_name}: need at least two models of different size "
                       f"with a positive, finite value (have {len(x)}; left out: {dropped or 'none'})")
    lx, ly = np.log(x), np.log(y)
    a, b = _ols(lx, ly)
    n = len(x)
    lo, hi, _ = bootstrap_exponent(x, y, n_boot=n_boot, seed=seed, ci=ci)
    if n > 2:
        resid = ly - (a + b * lx)
        se = float(np.sqrt((resid**2).sum() / (n - 2) / ((lx - lx.mean()) ** 2).sum()))
        tq = float(stats.t.ppf(1 - (1 - ci) / 2, n - 2))
        ci_t = (b - tq * se, b + tq * se)
    else:
        ci_t = (float("nan"), float("nan"))
    loo = loo_predictions(x, y, names)
    mean_err = float(loo["rel_error"].mean()) if len(loo) else float("nan")
    max_err = float(loo["rel_error"].max()) if len(loo) else float("nan")
    descriptive = n < MIN_MODELS_FOR_LAW
    notes = []
    if descriptive:
        notes.append(f"{n} models < {MIN_MODELS_FOR_LAW}: descriptive only, not a scaling law")
    if dropped:
        notes.append(f"left out (non-positive or missing {measure}): {', '.join(dropped)}")
    if n <= 6:
        notes.append(f"bootstrap over {n} models has few distinct resamples; CIs are rough")
    return PowerLawFit(
        measure=measure, x=x_name, n_models=n, exponent=b, prefactor=float(np.exp(a)), r2=_r2(lx, ly, a, b),
        exponent_ci=(lo, hi), exponent_ci_t=ci_t, ci_level=ci, loo_mean_error=mean_err, loo_max_error=max_err,
        within_20pct=(bool(max_err <= 0.2) if len(loo) else None), descriptive_only=descriptive,
        dropped=dropped, note="; ".join(notes),
    )


@dataclass
class SegmentedFit:
    measure: str
    x: str
    n_models: int
    breakpoint: float  # in parameters (original scale); NaN when not fitted
    slope_below: float
    slope_above: float
    bic_one_line: float
    bic_two_segments: float
    preferred: str  # "two_segments" | "one_line" | "not_fitted"
    exploratory: bool
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bic(sse: float, n: int, k: int) -> float:
    return n * np.log(max(sse, 1e-300) / n) + k * np.log(n)


def segmented_fit(x: Any, y: Any, measure: str = "y", x_name: str = "n_params", min_side: int = 2,
                  exploratory_below: int = 10) -> SegmentedFit:
    """Continuous two-segment fit in log-log space, breakpoint chosen by least squares over a grid.

    Model: log y = a + b1 * t + b2 * max(0, t - c), t = log x; the slope above c is b1 + b2. Candidate
    breakpoints c lie between sorted sizes with at least `min_side` models on each side. One line vs two
    segments is decided by BIC (the breakpoint counts as a parameter). Fewer than `exploratory_below`
    models: flagged exploratory (a breakpoint from a handful of points is a hypothesis, not a finding).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    n = len(x)
    nan = float("nan")
    if n < 2 * min_side + 1:
        return SegmentedFit(measure, x_name, n, nan, nan, nan, nan, nan, "not_fitted", True,
                            f"{n} models: a breakpoint needs at least {2 * min_side + 1}")
    order = np.argsort(x)
    t, ly = np.log(x[order]), np.log(y[order])
    a, b = _ols(t, ly)
    sse1 = float(((ly - a - b * t) ** 2).sum())
    # candidate breakpoints: a fine grid between the min_side-th and the (n-min_side)-th model
    grid = np.linspace(t[min_side - 1], t[n - min_side], 200)[1:-1]
    best = (np.inf, nan, nan, nan)
    for c in grid:
        design = np.column_stack([np.ones(n), t, np.maximum(0.0, t - c)])  # (n, 3)
        coef, *_ = np.linalg.lstsq(design, ly, rcond=None)
        sse = float(((ly - design @ coef) ** 2).sum())
        if sse < best[0]:
            best = (sse, float(c), float(coef[1]), float(coef[1] + coef[2]))
    sse2, c, s1, s2 = best
    bic1, bic2 = _bic(sse1, n, 2), _bic(sse2, n, 4)
    exploratory = n < exploratory_below
    note = f"exploratory: {n} models" if exploratory else ""
    return SegmentedFit(measure, x_name, n, float(np.exp(c)), s1, s2, float(bic1), float(bic2),
                        "two_segments" if bic2 < bic1 else "one_line", exploratory, note)


# ---------------------------------------------------------------- tidy tables in, tidy tables out
def validate_results(df: pd.DataFrame, measures: list[str] | None = None, command: str | None = None) -> list[str]:
    """Check a per-model results table; return the measure columns. Raise EsaError saying what is missing."""
    hint = command or "esa-runner --model <model> --metric grad_x_weight (Phase 2) and the Phase 3 perturbation runs"
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise EsaError(f"no per-model results to analyse; produce them with `{hint}` for each model")
    missing = [c for c in ("model", *SIZE_COLUMNS) if c not in df.columns]
    if missing:
        raise EsaError(f"results table lacks column(s) {missing}; sizes come from esa.models.load(ref).info "
                       "(n_params, n_params_active)")
    if df["model"].duplicated().any():
        dup = sorted(df.loc[df["model"].duplicated(), "model"].unique())
        raise EsaError(f"one row per model expected; duplicated: {dup} (aggregate seeds first)")
    for col in ("metric", "k", "mode"):
        if col in df.columns and df[col].nunique(dropna=False) > 1:
            by = df.groupby(col, dropna=False)["model"].apply(list).to_dict()
            raise EsaError(f"mixed {col} across models ({by}); rerun the odd ones out with one {col}, e.g. `{hint}`")
    if df["model"].nunique() < 2:
        raise EsaError(f"scaling needs at least two models, got {df['model'].nunique()} "
                       f"({list(df['model'])}); run `{hint}` for more models")
    if measures is None:
        measures = [c for c in df.columns if c not in RESERVED and pd.api.types.is_numeric_dtype(df[c])]
    absent = [m for m in measures if m not in df.columns]
    if absent:
        raise EsaError(f"measure(s) {absent} not in the results table (columns: {list(df.columns)})")
    if not measures:
        raise EsaError("the results table has no numeric measure column besides model sizes")
    # A model with no value for any requested measure has no results at all: that is an input error. A NaN
    # in one derived measure (e.g. a ratio with a non-positive denominator) is left out of that fit only.
    no_result = list(df.loc[df[list(measures)].isna().all(axis=1), "model"])
    if no_result:
        cmd = hint.replace("<model>", no_result[0])
        raise EsaError(f"model(s) {no_result} have no result for {list(measures)}; produce them with `{cmd}`")
    return list(measures)


def scaling_fits(df: pd.DataFrame, measures: list[str] | None = None, x_cols: tuple[str, ...] = SIZE_COLUMNS,
                 n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (measure, size column): power-law fit, CIs, LOO errors, and the segmented fit."""
    measures = validate_results(df, measures)
    rows = []
    for m in measures:
        for xc in x_cols:
            try:
                f = fit_power_law(df[xc], df[m], list(df["model"]), measure=m, x_name=xc, n_boot=n_boot, ci=ci,
                                  seed=seed)
            except EsaError as e:  # too few usable models for this measure: say so in the table, go on
                rows.append(dict(measure=m, x=xc, n_models=int((df[m] > 0).sum()), note=str(e),
                                 descriptive_only=True, segmented_preferred="not_fitted"))
                continue
            s = segmented_fit(df[xc], df[m], measure=m, x_name=xc)
            row = f.as_dict()
            row["exponent_ci_lo"], row["exponent_ci_hi"] = row.pop("exponent_ci")
            row["exponent_ci_t_lo"], row["exponent_ci_t_hi"] = row.pop("exponent_ci_t")
            row["dropped"] = ",".join(row["dropped"])
            row.update(breakpoint=s.breakpoint, slope_below=s.slope_below, slope_above=s.slope_above,
                       segmented_preferred=s.preferred, segmented_note=s.note)
            rows.append(row)
    return pd.DataFrame(rows)


def loo_table(df: pd.DataFrame, measures: list[str] | None = None, x_cols: tuple[str, ...] = SIZE_COLUMNS) -> pd.DataFrame:
    """Every leave-one-model-out prediction, tidy: measure, x, model, actual, predicted, rel_error."""
    measures = validate_results(df, measures)
    parts = []
    for m in measures:
        for xc in x_cols:
            sub = df[np.isfinite(df[m]) & (df[m] > 0)]
            t = loo_predictions(sub[xc].to_numpy(float), sub[m].to_numpy(float), list(sub["model"]))
            parts.append(t.assign(measure=m, x_name=xc))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def suite_of(model: str) -> str:
    """The training suite a model belongs to: `micro-suite` (one tokenizer, corpus and recipe) or `other`."""
    return "micro-suite" if is_micro(model) else "other"


def criteria_basis(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The models a scaling law is judged on, and why.

    Models from different suites differ in tokenizer, data, training budget and (with per-layer k) the
    fraction of weights selected, so a fit across suites can reach a high R^2 from two clusters alone.
    The law is judged on one homogeneous suite when it has MIN_MODELS_FOR_LAW models or more; otherwise
    on every model, and the basis says so.
    """
    suites = df["model"].map(suite_of)
    micro = df[suites == "micro-suite"]
    if suites.nunique() == 1:
        return df, f"judged on all {len(df)} models (one suite: {suites.iloc[0]})"
    if len(micro) >= MIN_MODELS_FOR_LAW:
        return micro, (f"judged on the micro-suite alone ({len(micro)} models, one tokenizer, corpus and recipe); "
                       f"the fit over all {len(df)} models mixes suites")
    if suites.nunique() > 1:
        return df, (f"judged on all {len(df)} models of {suites.nunique()} suites (tokenizer, data and training "
                    "differ between suites: a confound of the fit)")
    return df, f"judged on all {len(df)} models"


def describe_fit(row: pd.Series | PowerLawFit) -> str:
    """One sentence per fit, numbers from the fit, honest about sample size."""
    r = row.as_dict() if isinstance(row, PowerLawFit) else dict(row)
    if not np.isfinite(r.get("exponent", np.nan)):
        return f"No fit of {r['measure']} vs {r['x']}: {r.get('note', '')}"
    lo = r.get("exponent_ci_lo", (r.get("exponent_ci") or (np.nan, np.nan))[0])
    hi = r.get("exponent_ci_hi", (r.get("exponent_ci") or (np.nan, np.nan))[1])
    head = "Descriptive fit" if r["descriptive_only"] else "Power law"
    loo = (f"; leave-one-model-out error mean {r['loo_mean_error']:.0%}, max {r['loo_max_error']:.0%}"
           if np.isfinite(r["loo_max_error"]) else "")
    return (f"{head} of {r['measure']} vs {r['x']} over {r['n_models']} models: exponent {r['exponent']:.3f} "
            f"({r['ci_level']:.0%} bootstrap CI {lo:.3f} to {hi:.3f}), R^2 {r['r2']:.3f}{loo}."
            + (f" Note: {r['note']}." if r.get("note") else ""))


# ---------------------------------------------------------------- validation and scorecard
def synthetic_recovery(n_models: int, exponent: float, noise: float, n_rep: int = 200, n_boot: int = 300,
                       ci: float = 0.95, seed: int = 0, size_range: tuple[float, float] = (3e4, 3e8)) -> dict[str, Any]:
    """How well the fit recovers a known exponent: bias, CI coverage, LOO error, over `n_rep` synthetic suites.

    Sizes are geometric over `size_range`; y = N^exponent * lognormal(0, noise).
    """
    rng = np.random.default_rng(seed)
    x = np.geomspace(*size_range, n_models)
    est, cover_b, cover_t, loo_max, r2 = [], [], [], [], []
    for rep in range(n_rep):
        y = x**exponent * np.exp(rng.normal(0, noise, n_models))
        f = fit_power_law(x, y, n_boot=n_boot, ci=ci, seed=seed + rep)
        est.append(f.exponent)
        cover_b.append(f.exponent_ci[0] <= exponent <= f.exponent_ci[1])
        cover_t.append(f.exponent_ci_t[0] <= exponent <= f.exponent_ci_t[1])
        loo_max.append(f.loo_max_error)
        r2.append(f.r2)
    est_a = np.asarray(est)
    return dict(n_models=n_models, true_exponent=exponent, noise=noise, n_rep=n_rep,
                mean_estimate=float(est_a.mean()), bias=float(est_a.mean() - exponent), sd_estimate=float(est_a.std()),
                coverage_bootstrap=float(np.mean(cover_b)), coverage_t=float(np.mean(cover_t)), nominal=ci,
                median_loo_max_error=float(np.nanmedian(loo_max)), median_r2=float(np.median(r2)))


def scaling_criteria(fits: pd.DataFrame, measure: str, evidence: str, x: str = "n_params", basis: str = "") -> list[Any]:
    """The guide's Phase 4 scaling criteria for one measure, judged from `scaling_fits` output.

    `basis`: which models the fits cover and why (see `criteria_basis`), appended to every note.
    """
    sel = fits[(fits["measure"] == measure) & (fits["x"] == x)]
    if sel.empty:
        return [Criterion("P4.scaling_r2", 4, "Power-law fit of sensitivity vs size has R^2 > 0.8", None, "> 0.8",
                          None, evidence, f"no fit of {measure!r} against {x}")]
    r = sel.iloc[0]
    # with fewer than MIN_MODELS_FOR_LAW models a fit describes those models; it cannot pass or fail a law
    caveat = (f"not judged: {r['n_models']} models < {MIN_MODELS_FOR_LAW}, the fit is descriptive only"
              if r["descriptive_only"] else "")
    caveat = f"{caveat} {basis}".strip()

    def verdict(value: float, op: str, threshold: float) -> bool | None:
        return None if r["descriptive_only"] else judge(value, op, threshold)

    seg = ("not fitted" if r["segmented_preferred"] == "not_fitted" else
           f"{r['segmented_preferred']}, breakpoint {r['breakpoint']:.3g} params (exploratory)")
    return [
        Criterion("P4.scaling_r2", 4, f"Power-law fit of {measure} vs {x} has R^2 > 0.8", round(float(r["r2"]), 3),
                  "> 0.8", verdict(float(r["r2"]), ">", 0.8), evidence,
                  f"exponent {r['exponent']:.3f} [{r['exponent_ci_lo']:.3f}, {r['exponent_ci_hi']:.3f}], "
                  f"{r['n_models']} models. {caveat}"),
        Criterion("P4.loo_within_20pct", 4, "Leave-one-model-out predictions within 20%",
                  round(float(r["loo_max_error"]), 3), "max rel. error <= 0.2",
                  verdict(float(r["loo_max_error"]), "<=", 0.2), evidence,
                  f"mean LOO error {r['loo_mean_error']:.1%}. {caveat}"),
        Criterion("P4.threshold", 4, "Threshold (breakpoint) in sensitivity vs size identified", seg,
                  "segmented fit preferred by BIC", None if r["segmented_preferred"] == "not_fitted" or r["descriptive_only"] else
                  bool(r["segmented_preferred"] == "two_segments"), evidence, f"exploratory with few models. {basis}".strip()),
    ]
