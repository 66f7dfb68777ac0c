"""Scaling analyzer on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esa.analysis import scaling
from esa.errors import EsaError


def synthetic(n: int, exponent: float, noise: float, seed: int = 0, prefactor: float = 3.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_params = np.geomspace(1e4, 1e9, n)
    y = prefactor * n_params**exponent * np.exp(rng.normal(0, noise, n))
    return pd.DataFrame({"model": [f"m{i}" for i in range(n)], "n_params": n_params.astype(int),
                         "n_params_active": n_params.astype(int), "dppl": y})


@pytest.mark.parametrize("exponent", [-0.35, 0.5])
def test_power_law_recovers_known_exponent_within_ci(exponent):
    df = synthetic(12, exponent, noise=0.1, seed=1)
    fit = scaling.fit_power_law(df["n_params"], df["dppl"], list(df["model"]), measure="dppl", n_boot=1000)
    lo, hi = fit.exponent_ci
    assert lo < exponent < hi
    assert hi - lo < 0.15  # informative, not vacuous
    assert fit.exponent_ci_t[0] < exponent < fit.exponent_ci_t[1]
    assert fit.r2 > 0.9 and not fit.descriptive_only
    assert abs(np.log(fit.prefactor / 3.0)) < 1.0


def test_noiseless_fit_is_exact_and_loo_error_zero():
    df = synthetic(6, 0.25, noise=0.0)
    fit = scaling.fit_power_law(df["n_params"], df["dppl"], list(df["model"]))
    assert fit.exponent == pytest.approx(0.25, abs=1e-9) and fit.r2 == pytest.approx(1.0)
    assert fit.loo_max_error < 1e-9 and fit.within_20pct


def test_loo_detects_an_outlier_model():
    df = synthetic(7, 0.3, noise=0.0)
    df.loc[3, "dppl"] *= 2.0  # one model far off the law
    loo = scaling.loo_predictions(df["n_params"].to_numpy(float), df["dppl"].to_numpy(float), list(df["model"]))
    assert loo.loc[loo["rel_error"].idxmax(), "model"] == "m3"
    assert loo["rel_error"].max() > 0.3
    fit = scaling.fit_power_law(df["n_params"], df["dppl"], list(df["model"]))
    assert fit.within_20pct is False


def test_few_models_are_descriptive_only():
    df = synthetic(4, 0.3, noise=0.05)
    fit = scaling.fit_power_law(df["n_params"], df["dppl"])
    assert fit.descriptive_only and "descriptive" in fit.note
    assert "Descriptive fit" in scaling.describe_fit(fit)


def test_segmented_regression_finds_planted_breakpoint():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e5, 1e9, 24)
    bp = 1e7
    t, c = np.log(x), np.log(bp)
    ly = 0.1 * t + 0.6 * np.maximum(0, t - c) + rng.normal(0, 0.02, len(x))
    seg = scaling.segmented_fit(x, np.exp(ly))
    assert seg.preferred == "two_segments"
    assert abs(np.log10(seg.breakpoint) - 7) < 0.25
    assert seg.slope_below == pytest.approx(0.1, abs=0.05) and seg.slope_above == pytest.approx(0.7, abs=0.05)
    # a straight line has no breakpoint worth the extra parameters
    straight = scaling.segmented_fit(x, np.exp(0.3 * t + rng.normal(0, 0.02, len(x))))
    assert straight.preferred == "one_line"
    assert scaling.segmented_fit(x[:4], np.exp(ly[:4])).preferred == "not_fitted"


def test_scaling_fits_counts_moe_by_total_and_active():
    df = synthetic(6, 0.4, noise=0.0)
    df.loc[5, "n_params"] = df.loc[5, "n_params_active"] * 4  # an MoE: 4x total, same active
    out = scaling.scaling_fits(df, ["dppl"], n_boot=200)
    assert set(out["x"]) == {"n_params", "n_params_active"}
    by_active = out.set_index("x").loc["n_params_active"]
    by_total = out.set_index("x").loc["n_params"]
    assert by_active["r2"] == pytest.approx(1.0) and by_total["r2"] < 1.0
    loo = scaling.loo_table(df, ["dppl"])
    assert len(loo) == 12


def test_bad_inputs_say_what_is_missing():
    df = synthetic(5, 0.3, noise=0.0)
    with pytest.raises(EsaError, match="at least two models"):
        scaling.scaling_fits(df.iloc[:1], ["dppl"])
    missing = df.copy()
    missing.loc[2, "dppl"] = np.nan
    with pytest.raises(EsaError, match=r"m2.*esa-runner --model m2"):
        scaling.scaling_fits(missing, ["dppl"])
    mixed = df.assign(metric=["grad_x_weight"] * 4 + ["act_mag"])
    with pytest.raises(EsaError, match="mixed metric"):
        scaling.scaling_fits(mixed, ["dppl"])
    with pytest.raises(EsaError, match="n_params_active"):
        scaling.scaling_fits(df.drop(columns="n_params_active"), ["dppl"])
    with pytest.raises(EsaError, match="no per-model results"):
        scaling.scaling_fits(pd.DataFrame(), ["dppl"])
    with pytest.raises(EsaError, match="two models of different size"):
        scaling.fit_power_law([1e6, 1e6], [1.0, 2.0])


def test_synthetic_recovery_is_unbiased_and_covers():
    r = scaling.synthetic_recovery(8, 0.4, noise=0.1, n_rep=40, n_boot=100, seed=3)
    assert abs(r["bias"]) < 0.03
    assert r["coverage_t"] >= 0.8
    assert r["median_r2"] > 0.9


def test_scaling_criteria_judged_from_fits():
    good = scaling.scaling_fits(synthetic(6, 0.3, noise=0.01), ["dppl"], n_boot=200)
    rows = {c.id: c for c in scaling.scaling_criteria(good, "dppl", evidence="test")}
    assert rows["P4.scaling_r2"].passed is True and rows["P4.loo_within_20pct"].passed is True
    bad = synthetic(6, 0.3, noise=0.0)
    bad.loc[2, "dppl"] *= 5
    rows = {c.id: c for c in scaling.scaling_criteria(scaling.scaling_fits(bad, ["dppl"], n_boot=200), "dppl", "t")}
    assert rows["P4.loo_within_20pct"].passed is False
    assert scaling.scaling_criteria(good, "other", "t")[0].passed is None


def test_unusable_values_are_left_out_per_measure():
    df = synthetic(6, 0.3, noise=0.0).assign(ratio=[1.0, 2.0, np.nan, 4.0, -1.0, 6.0], few=[np.nan] * 5 + [1.0])
    out = scaling.scaling_fits(df, ["dppl", "ratio", "few"], n_boot=100).set_index(["measure", "x"])
    r = out.loc[("ratio", "n_params")]
    assert r["n_models"] == 4 and set(r["dropped"].split(",")) == {"m2", "m4"}
    assert np.isnan(out.loc[("few", "n_params"), "exponent"]) and "at least two" in out.loc[("few", "n_params"), "note"]


def test_criteria_not_judged_with_too_few_models():
    fits = scaling.scaling_fits(synthetic(4, 0.3, noise=0.01), ["dppl"], n_boot=100)
    rows = scaling.scaling_criteria(fits, "dppl", "t")
    assert all(c.passed is None for c in rows) and "not judged" in rows[0].note


def test_criteria_basis_prefers_one_homogeneous_suite():
    micro = ["micro-llama-33k@standard", "micro-llama-74k@standard", "micro-llama-176k@standard",
             "micro-llama-480k@standard", "micro-mixtral-176k@standard"]
    df = pd.DataFrame({"model": [*micro, "smollm2-135m"], "n_params": [1, 2, 3, 4, 5, 6],
                       "n_params_active": [1, 2, 3, 4, 5, 6], "y": [1.0] * 6})
    judged, basis = scaling.criteria_basis(df)
    assert list(judged.model) == micro and "micro-suite alone" in basis
    judged, basis = scaling.criteria_basis(df.iloc[2:])  # 3 micro models + 1 other: all, with the confound
    assert len(judged) == 4 and "2 suites" in basis and "confound" in basis
    judged, basis = scaling.criteria_basis(df.iloc[:5])
    assert len(judged) == 5 and "one suite" in basis
