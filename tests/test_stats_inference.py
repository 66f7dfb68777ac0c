"""Inference on synthetic data with known answers: effects found, nulls not, Holm by hand, caps, dose-response."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from esa.stats.inference import (
    LOG_PPL_CAP,
    analyze,
    bootstrap_ci,
    capped,
    comparisons_frame,
    dose_response,
    holm,
    log_ppl_cap,
    paired_test,
    ratio_ci,
    unpaired_test,
    window_test,
)


def test_holm_matches_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.2, math.nan, 0.01])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8 * 2 capped at 1, then the running max


def test_bootstrap_ci_covers_known_mean():
    x = np.random.default_rng(0).normal(3.0, 1.0, 200)
    est, lo, hi = bootstrap_ci(x)
    assert lo < 3.0 < hi and lo < est < hi and hi - lo < 0.5
    assert math.isnan(bootstrap_ci([1.0])[1])


def test_ratio_ci_known_ratio_and_zero_denominator():
    rng = np.random.default_rng(1)
    den = rng.normal(2.0, 0.1, 50)
    num = 5 * den + rng.normal(0, 0.05, 50)
    r, lo, hi = ratio_ci(num, den, paired=True)
    assert r == pytest.approx(5.0, rel=0.02) and lo < 5.0 < hi
    assert ratio_ci([1.0, 2.0], [0.0, -0.5], paired=True)[0] == math.inf


def test_paired_test_detects_effect_and_not_null():
    rng = np.random.default_rng(2)
    b = rng.normal(0, 1, 12)
    eff = paired_test(b + 2.0 + rng.normal(0, 0.3, 12), b)
    assert eff["test"] == "paired_t" and eff["p"] < 0.01 and eff["p_wilcoxon"] < 0.01 and eff["effect_size"] > 2
    null = paired_test(b + rng.normal(0, 1, 12), b)
    assert null["p"] > 0.05
    small = paired_test([3.0, 4.0, 5.0], [1.0, 1.5, 1.0])
    assert small["underpowered"] and small["test"] == "paired_t" and "underpowered" in small["note"]


def test_unpaired_test_detects_effect_and_not_null():
    rng = np.random.default_rng(3)
    eff = unpaired_test(rng.normal(3, 1, 20), rng.normal(0, 1, 20))
    assert eff["p"] < 0.001 and eff["p_welch"] < 0.001 and eff["effect_size"] > 1.5
    null = unpaired_test(rng.normal(0, 1, 20), rng.normal(0, 1, 20))
    assert null["p"] > 0.05


def test_window_test_detects_effect_and_not_null():
    rng = np.random.default_rng(4)
    base = rng.normal(0, 0.2, (3, 40))
    eff = window_test(base + 0.3, base + rng.normal(0, 0.05, (3, 40)))
    assert eff["n"] == 120 and eff["p"] < 1e-6 and eff["effect_size"] > 0.9
    # under the null the false-positive rate at 0.05 is near 0.05 (300 independent null data sets)
    null_p = []
    for s in range(300):
        r = np.random.default_rng(10_000 + s)
        null_p.append(window_test(base + r.normal(0, 0.1, (3, 40)), base + r.normal(0, 0.1, (3, 40)))["p"])
    assert 0.01 <= np.mean(np.asarray(null_p) < 0.05) <= 0.10


def test_cap_is_stated_and_above_all_finite():
    assert log_ppl_cap([1.0, 2.0, math.inf]) == LOG_PPL_CAP
    assert log_ppl_cap([1.0, 70.0, math.nan]) == 71.0
    assert capped([1.0, math.nan, math.inf, -math.inf], 9.0).tolist() == [1.0, 9.0, 9.0, -9.0]


def synthetic_table(effect: float, seeds=(1, 2, 3, 4, 5, 6), n_windows=30, catastrophic=False, seed=0):
    """Sweep-shaped tables: top_k hurts by `effect` nats more than random_k; bottom_k hurts least."""
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.3, n_windows)
    rows, wins = [], []
    shift = {"top_k": effect, "random_k": 0.05, "bottom_k": 0.0}
    for pert in ("sign_flip", "zero"):
        for s in seeds:
            for group, sh in shift.items():
                nll = base + sh + rng.normal(0, 0.02, n_windows)
                if catastrophic and group == "top_k" and pert == "zero" and s == seeds[0]:
                    nll = np.full(n_windows, np.nan)
                lp = float(np.mean(nll))
                rows.append(dict(perturbation=pert, scale=1.0, prob=0.5, dose=1.0, group=group, k=10, seed=s,
                                 ppl=math.exp(lp) if np.isfinite(lp) else math.nan, log_ppl=lp,
                                 delta_ppl=(math.exp(lp) if np.isfinite(lp) else math.nan) - math.exp(base.mean()),
                                 delta_log_ppl=lp - base.mean(), accuracy=0.3,
                                 n_nonfinite_windows=int(np.isnan(nll).sum()), n_inf_weights=0, n_nan_weights=0,
                                 seconds=0.1))
                for w in range(n_windows):
                    wins.append(dict(perturbation=pert, scale=1.0, prob=0.5, dose=1.0, group=group, seed=s, window=w,
                                     nll=nll[w], base_nll=base[w], delta_nll=nll[w] - base[w]))
    return pd.DataFrame(rows), pd.DataFrame(wins)


def test_analyze_finds_planted_effect_with_holm():
    table, wins = synthetic_table(effect=1.0)
    res = analyze(table, wins, n_boot=500)
    comps = comparisons_frame(res)
    # 2 perturbations x (top vs random, top vs bottom, random vs bottom) = 6 comparisons, all Holm-adjusted
    assert len(comps) == 6 and (comps["seed_level_p_holm"] >= comps["seed_level_p"]).all()
    assert set(comps["primary"]) == {"seed_level"}  # 6 seeds
    assert comps["significant"].all()
    r = [x for x in res["ratios"] if x["numerator"] == "top_k" and x["denominator"] == "random_k"]
    assert all(x["ratio_delta_log_ppl"] == pytest.approx(20.0, rel=0.2) for x in r)
    assert "Holm" in " ".join(res["notes"])


def test_analyze_null_is_not_significant():
    table, wins = synthetic_table(effect=0.05)  # top_k == random_k
    res = analyze(table, wins, n_boot=500)
    comps = comparisons_frame(res)
    tv = comps[(comps.a == "top_k") & (comps.b == "random_k")]
    assert not tv["significant"].any()


def test_few_seeds_use_window_level_and_say_underpowered():
    table, wins = synthetic_table(effect=1.0, seeds=(1, 2))
    res = analyze(table, wins, n_boot=200)
    c = res["comparisons"][0]
    assert c["primary"] == "window_level" and c["seed_level"]["underpowered"]
    assert c["window_level"]["n"] == 60 and c["significant"]


def test_catastrophic_rows_are_capped_not_dropped():
    table, wins = synthetic_table(effect=1.0, catastrophic=True)
    res = analyze(table, wins, n_boot=200)
    s = [x for x in res["summary"] if x["perturbation"] == "zero" and x["group"] == "top_k"][0]
    assert s["n_seeds"] == 6 and s["n_capped"] == 1 and s["n_nonfinite_windows"] == 30
    assert s["mean"] > 1.0 and math.isfinite(s["mean"])  # the capped row pulls the mean up, is not dropped
    assert "capped at" in res["notes"][0]


def test_dose_response_monotonic_and_hierarchy():
    rows = []
    for dose in (0.01, 0.1, 1.0):
        for s in (1, 2, 3):
            for group, mult in (("top_k", 3.0), ("random_k", 1.0), ("bottom_k", 0.2)):
                v = mult * dose + 0.001 * s
                rows.append(dict(perturbation="sign_flip", group=group, dose=dose, seed=s, log_ppl=3 + v,
                                 delta_log_ppl=v))
    out = dose_response(pd.DataFrame(rows))
    top = [c for c in out["curves"] if c["group"] == "top_k"][0]
    assert top["monotonic"] and top["rho"] > 0.9
    assert all(h["holds"] for h in out["hierarchy"])
    flat = pd.DataFrame(rows).assign(delta_log_ppl=lambda d: np.where(d.dose == 0.1, 0.0, d.delta_log_ppl))
    assert not [c for c in dose_response(flat)["curves"] if c["group"] == "top_k"][0]["monotonic"]


def test_unchanged_share_enters_the_statistics():
    """bf16 leaves more top-k weights unchanged: equal totals from fewer moved weights are a larger effect per
    changed weight, and the comparison says the doses were not matched."""
    table, wins = synthetic_table(effect=0.05)  # equal totals for top_k and random_k
    table["n_changed"] = np.where(table["group"] == "top_k", 4, 10)  # of k = 10: 60% of top_k stayed put
    res = analyze(table, wins, n_boot=200)
    top = [s for s in res["summary"] if s["group"] == "top_k"]
    assert all(s["unchanged_share"] == pytest.approx(0.6) for s in top)
    c = next(c for c in res["comparisons"] if (c["a"], c["b"]) == ("top_k", "random_k"))
    assert (c["unchanged_share_a"], c["unchanged_share_b"], c["dose_matched"]) == (pytest.approx(0.6), 0.0, False)
    assert not c["significant"]  # in total, no difference
    assert c["per_changed_weight"]["p"] < 0.01 and c["per_changed_weight"]["mean_diff"] > 0  # per moved weight: more
    assert comparisons_frame(res)["dose_matched"].tolist().count(False) == 4  # top_k against both controls
    assert "unchanged_share" in " ".join(res["notes"])
    old = analyze(synthetic_table(effect=0.05)[0], None, n_boot=50)  # tables without n_changed: as before
    assert "per_changed_weight" not in old["comparisons"][0] and math.isnan(old["summary"][0]["unchanged_share"])


def test_groups_evaluated_on_different_windows_pair_on_the_shared_ones():
    """A sequential sweep stops a decided control early while an undecided one gets more windows: the
    window-level comparison pairs only the (seed, window) pairs both groups have."""
    table, wins = synthetic_table(effect=1.0, seeds=(1, 2))
    short = wins[(wins.group == "random_k") & (wins.window >= 10)].index
    res = analyze(table, wins.drop(short), n_boot=200)
    c = next(x for x in res["comparisons"] if x["a"] == "top_k" and x["b"] == "random_k")
    assert c["window_level"]["n"] == 2 * 10 and c["significant"]
    d = next(x for x in res["comparisons"] if x["a"] == "top_k" and x["b"] == "bottom_k")
    assert d["window_level"]["n"] == 2 * 30
