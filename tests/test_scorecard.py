"""Honest verdicts: criteria that refuse degenerate statistics, power from observed effects, one row per id."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from esa.phases import criteria
from esa.report import scorecard
from esa.stats import power
from esa.stats.inference import analyze
from esa.stats.verdicts import Criterion, demote, verdict_of

SMOKE = dict(name="smoke", seeds=[1337, 123], max_samples=4, seqlen=256, eval_windows=8, perturb_eval_windows=2)
STANDARD = dict(name="standard", seeds=[1337, 123, 999], max_samples=200, seqlen=512, eval_windows=64,
                perturb_eval_windows=16)


def sweep(effects: dict[str, float], seeds=(1, 2), n_windows=2, perts=("sign_flip", "zero"), noise=0.02, seed=0,
          scales=(1.0,)):
    """Sweep-shaped (table, windows): each group adds `effects[group]` nats to every window, plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.3, n_windows)
    rows, wins = [], []
    for pert in perts:
        for scale in scales:
            for s in seeds:
                for group, eff in effects.items():
                    nll = base + eff * (scale if len(scales) > 1 else 1.0) + rng.normal(0, noise, n_windows)
                    lp = float(nll.mean())
                    rows.append(dict(perturbation=pert, scale=scale, prob=0.5, dose=scale, group=group, k=10, seed=s,
                                     ppl=math.exp(lp), log_ppl=lp, delta_ppl=math.exp(lp) - math.exp(base.mean()),
                                     delta_log_ppl=lp - base.mean(), accuracy=0.3, n_nonfinite_windows=0,
                                     n_inf_weights=0, n_nan_weights=0, seconds=0.1))
                    wins += [dict(perturbation=pert, scale=scale, prob=0.5, dose=scale, group=group, seed=s, window=w,
                                  nll=nll[w], base_nll=base[w], delta_nll=nll[w] - base[w]) for w in range(n_windows)]
    return pd.DataFrame(rows), pd.DataFrame(wins)


# ------------------------------------------------------------------ Criterion and verdicts
def test_criterion_verdicts_stay_backward_compatible():
    assert Criterion("x", 1, "t", 1.0, "> 0", True, "e").verdict == "PASS"
    assert Criterion("x", 1, "t", None, "> 0", None, "e").verdict == "not estimable"
    assert Criterion("x", 1, "t", 0.2, "> 0", None, "e", verdict="underpowered").verdict == "underpowered"
    with pytest.raises(ValueError, match="does not match"):
        Criterion("x", 1, "t", 1.0, "> 0", True, "e", verdict="underpowered")
    c = demote(Criterion("x", 1, "t", 1.0, "> 0", False, "e", "old note"), "machinery-only", "smoke budget")
    assert (c.passed, c.verdict, c.face_value) == (None, "machinery-only", "FAIL")
    assert c.note.startswith("smoke budget (the number alone reads FAIL). old note")
    assert verdict_of({"passed": True}) == "PASS" and verdict_of({"passed": None}) == "not estimable"


# ------------------------------------------------------------------ power
def test_power_floors_and_simulated_power():
    assert power.wilcoxon_min_p(4) == 0.0625
    assert power.wilcoxon_pairs_needed(1.0, 0.01) == 7  # 2^-7 < 0.01 <= 2^-6
    assert power.wilcoxon_pairs_needed(0.5, 0.01) > power.wilcoxon_pairs_needed(0.9, 0.01)
    assert power.wilcoxon_pairs_needed(-0.2, 0.01) is None and power.paired_t_seeds_needed(math.nan, 0.01) is None
    assert power.paired_t_seeds_needed(math.inf, 0.01) == 7
    n = power.paired_t_seeds_needed(1.0, 0.05)
    rng = np.random.default_rng(0)

    def simulated(n_: int) -> float:
        d = rng.normal(1.0, 1.0, size=(4000, n_))
        return float((sps.ttest_1samp(d, 0.0, axis=1, alternative="greater").pvalue < 0.05).mean())

    assert simulated(n) >= 0.77 and simulated(n - 1) < 0.8  # the smallest n with 80% power (Monte Carlo)
    assert power.split_pairs(12, 2) == "2 seeds × 6 windows"


# ------------------------------------------------------------------ Phase 2
def test_jaccard_with_two_seeds_is_underpowered_not_judged():
    r = criteria.p2_jaccard({"grad_x_weight": 0.23}, 2, "x")[0]
    assert r.verdict == "underpowered" and r.passed is None and "run 1 more seed" in r.note and "below 0.4" in r.note
    assert criteria.p2_jaccard({"grad_x_weight": float("nan")}, 2, "x")[0].verdict == "not estimable"
    assert criteria.p2_jaccard({"grad_x_weight": 0.5}, 3, "x")[0].verdict == "PASS"


# ------------------------------------------------------------------ Phase 3
def test_sign_flip_ratio_is_judged_by_the_contrast_when_the_control_does_nothing():
    # top_k hurts; random_k does nothing but noise around 0: a ratio over it is unbounded ("not estimable"
    # before), while the contrast Δtop − 5·Δrandom is large and decided
    table, wins = sweep({"top_k": 5.0, "random_k": 0.0, "bottom_k": 0.0}, noise=0.01)
    st = analyze(table, wins, n_boot=200)
    r = criteria.p3_sign_flip_ratio(st, "x")[0]
    assert r.verdict == "PASS" and r.measured == pytest.approx(5.0, rel=0.05)
    assert "(seed, window) pairs" in r.note and "Δtop − 5·Δrandom_k" in r.note
    # a real denominator: 2.0 vs 0.1 is 20x, D = 1.5 > 0
    table, wins = sweep({"top_k": 2.0, "random_k": 0.1, "bottom_k": 0.0}, seeds=(1, 2, 3, 4, 5, 6), n_windows=30,
                        noise=0.002)
    ok = criteria.p3_sign_flip_ratio(analyze(table, wins, n_boot=200), "x")[0]
    assert ok.verdict == "PASS" and ok.measured == pytest.approx(1.5, rel=0.1) and "6 seeds" in ok.note
    # 2x only: D = 0.2 − 5·0.1 = −0.3 < 0, decided against the claim
    table, wins = sweep({"top_k": 0.2, "random_k": 0.1, "bottom_k": 0.0}, seeds=(1, 2, 3, 4, 5, 6), n_windows=30,
                        noise=0.002)
    assert criteria.p3_sign_flip_ratio(analyze(table, wins, n_boot=200), "x")[0].verdict == "FAIL"


def test_sign_flip_contrast_straddling_0_says_how_many_units():
    cond = dict(perturbation="sign_flip", scale=1.0, prob=0.5)
    k = dict(decision="undecided", reason="bounds straddle 0", estimate=0.3, lower=-0.5, upper=1.1, n=4, sd=0.6,
             test="paired_t", unit="(seed, window) pairs")
    st = {"contrasts": [dict(cond, a="top_k", b="random_k", c=5.0, primary="window_level", window_level=k)],
          "summary": [dict(cond, group="top_k", mean=0.8, ci_lo=0.5, ci_hi=1.1, n_seeds=2),
                      dict(cond, group="random_k", mean=0.1, ci_lo=0.05, ci_hi=0.15, n_seeds=2)]}
    r = criteria.p3_sign_flip_ratio(st, "x")[0]
    assert r.verdict == "underpowered" and "(seed, window) pairs would decide it" in r.note
    assert "about" in r.note


def test_significance_underpowered_with_seeds_times_windows_needed():
    table, wins = sweep({"top_k": 5.0, "random_k": 0.0, "bottom_k": 0.0})  # 2 seeds x 2 windows
    r = criteria.p3_significance(analyze(table, wins, n_boot=200), "x", expected=["sign_flip", "zero"])[0]
    assert r.verdict == "underpowered" and r.passed is None
    assert "2 seeds × 2 windows = 4 (seed, window) pairs" in r.note and "2^-4" in r.note
    # m = 6 comparisons, alpha/m = 0.00167: 2^-n below it from n = 10 pairs (every difference positive)
    assert "≥ 10 (seed, window) pairs, e.g. 2 seeds × 5 windows" in r.note
    big, bwins = sweep({"top_k": 5.0, "random_k": 0.0, "bottom_k": 0.0}, seeds=(1, 2, 3, 4, 5, 6), n_windows=8)
    assert criteria.p3_significance(analyze(big, bwins, n_boot=200), "x")[0].verdict == "PASS"
    null, nwins = sweep({"top_k": 0.0, "random_k": 0.0, "bottom_k": 0.0}, seeds=(1, 2, 3, 4, 5, 6), n_windows=8)
    assert criteria.p3_significance(analyze(null, nwins, n_boot=200), "x")[0].verdict == "FAIL"


def test_significance_leaves_out_a_saturated_variant_but_not_a_whole_type():
    table, wins = sweep({"top_k": 5.0, "random_k": 0.0, "bottom_k": 0.0}, seeds=(1, 2, 3, 4, 5, 6), n_windows=8,
                        perts=("bit_flip[lsb-exponent]",))
    sat, swins = sweep({"top_k": 0.0, "random_k": 0.0, "bottom_k": 0.0}, seeds=(1, 2, 3, 4, 5, 6), n_windows=8,
                       perts=("bit_flip",), noise=0.0)
    for t in (sat, swins):  # both groups overflow identically: uniform exponent flips
        t.loc[t.group != "bottom_k", [c for c in ("log_ppl", "nll") if c in t.columns]] = math.inf
    st = analyze(pd.concat([table, sat]), pd.concat([wins, swins]), n_boot=200)
    r = criteria.p3_significance(st, "x", expected=["bit_flip"])[0]
    assert r.verdict == "PASS" and "identical damage" in r.note
    alone = analyze(sat, swins, n_boot=200)
    assert criteria.p3_significance(alone, "x", expected=["bit_flip"])[0].verdict == "not estimable"


def _dose_stats(top: list[float], rnd: list[float], bot: list[float]) -> dict:
    doses = [0.01, 0.1, 1.0]
    curves = [dict(perturbation="gauss_noise", group=g, n_doses=3, rho=0.0, monotonic=bool(np.all(np.diff(v) > 0)),
                   means=v, doses=doses) for g, v in (("top_k", top), ("random_k", rnd), ("bottom_k", bot))]
    hier = [dict(perturbation="gauss_noise", dose=d, groups=["top_k", "random_k", "bottom_k"], means=[t, r, b],
                 holds=t > r > b) for d, t, r, b in zip(doses, top, rnd, bot, strict=True)]
    summary = [dict(perturbation="gauss_noise", scale=d, prob=0.5, group="top_k", mean=t, ci_lo=t - 0.01, ci_hi=t + 0.01,
                    n_seeds=2) for d, t in zip(doses, top, strict=True)]
    return {"dose_response": {"curves": curves, "hierarchy": hier}, "summary": summary}


def test_dose_response_judged_on_top_k_with_control_order_reported():
    # random_k < bottom_k at noise level: the old rule FAILed; top-k above both and rising is what the guide asks
    r = criteria.p3_monotonic(_dose_stats([0.1, 1.0, 5.0], [-0.004, -0.003, -0.004], [0.0003, 0.0002, 0.0004]), "x")[0]
    assert r.verdict == "PASS" and "control ordering random_k > bottom_k holds at 0/3 doses" in r.note
    flat = criteria.p3_monotonic(_dose_stats([5.0, 4.9, 4.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]), "x")[0]
    assert flat.verdict == "FAIL" and "0/1 perturbations" in flat.note
    below = criteria.p3_monotonic(_dose_stats([0.1, 1.0, 5.0], [0.2, 0.3, 0.4], [0.0, 0.0, 0.0]), "x")[0]
    assert below.verdict == "FAIL" and "above every control at 2/3 doses" in below.note


def test_ranking_stability_from_identical_splits_is_underpowered():
    two = criteria.p3_ranking_stability({"rho_mean": 0.797, "rho_lo": 0.797, "rho_hi": 0.797, "n_windows": 2,
                                         "n_splits": 200}, "m", "x")[0]
    assert two.verdict == "underpowered" and "1 distinct half-split" in two.note and "≥ 7 windows" in two.note
    many = criteria.p3_ranking_stability({"rho_mean": 0.9, "rho_lo": 0.8, "rho_hi": 0.95, "n_windows": 16,
                                          "n_splits": 200}, "m", "x")[0]
    assert many.verdict == "PASS"
    assert criteria.distinct_half_splits(2) == 1 and criteria.distinct_half_splits(7) == 35


# ------------------------------------------------------------------ budgets and untrained suites
def test_budget_and_untrained_demotions():
    rows = [Criterion("P2.metric_overlap.m", 2, "t", 0.3, "> 0.6", False, "e"),
            Criterion("P1.finite.m", 1, "t", 0, "== 0", True, "e"),
            Criterion("P3.dose_monotonic.m", 3, "t", "1/2", "all", True, "e")]
    smoke = criteria.budgeted([Criterion(**vars(r)) for r in rows], SMOKE)
    assert [r.verdict for r in smoke] == ["machinery-only", "PASS", "machinery-only"]
    assert "4 calibration windows" in smoke[0].note and "2 evaluation windows" in smoke[2].note
    assert [r.verdict for r in criteria.budgeted([Criterion(**vars(r)) for r in rows], STANDARD)] == \
        ["FAIL", "PASS", "PASS"]
    suite = pd.DataFrame({"model": ["a", "b"], "eval_ppl": [30.0, 20.0], "unigram_ppl": [27.7, 27.7]})
    why = criteria.untrained_reason(suite)
    assert why.startswith("1 of 2 micro models do not beat the unigram baseline")
    assert criteria.untrained_reason(suite.assign(eval_ppl=[20.0, 10.0])) is None
    p4 = criteria.machinery_only([Criterion("P4.family_differences", 4, "t", -0.96, "p < 0.05", True, "e")], why)
    assert p4[0].verdict == "machinery-only" and p4[0].face_value == "PASS"


# ------------------------------------------------------------------ the stored scorecard
def test_rows_are_judged_once_and_counted_by_verdict(tmp_path):
    a = Criterion("P2.metric_overlap.m", 2, "t", 0.3, "> 0.6", False, "e")
    scorecard.write_rows(tmp_path, "phase2_week1_metric_validation", [a, Criterion(**vars(a))])  # repeated id
    assert len(scorecard.read_all(tmp_path)) == 1
    again = [Criterion(**vars(a)), Criterion("P2.jaccard.x.m2", 2, "t", 0.5, "> 0.4", True, "e")]
    fresh = scorecard.unseen(tmp_path, "phase2_week2_cross_model", again)
    assert [r.id for r in fresh] == ["P2.jaccard.x.m2"]
    scorecard.write_rows(tmp_path, "phase2_week2_cross_model", again)  # an old notebook that repeats week 1
    scorecard.write_rows(tmp_path, "phase4_week10_architecture_comparison", [Criterion("P4.b", 4, "t", 1, "", None, "e")])
    scorecard.write_rows(tmp_path, "phase4_week9_parameter_scaling", [Criterion("P4.a", 4, "t", 1, "", None, "e",
                                                                               verdict="underpowered")])
    rows = scorecard.read_all(tmp_path)
    assert [r["notebook"] for r in rows][-2:] == ["phase4_week9_parameter_scaling", "phase4_week10_architecture_comparison"]
    uniq = scorecard.unique(rows)
    assert len(uniq) == 4 and uniq[0]["also_in"] == ["phase2_week2_cross_model"]
    assert scorecard.counts(uniq) == {"PASS": 1, "FAIL": 1, "underpowered": 1, "not estimable": 1, "machinery-only": 0}
    judged = scorecard.judged(tmp_path, SMOKE)
    assert scorecard.counts(judged)["machinery-only"] == 2  # overlap and jaccard rest on 4 calibration windows
    assert list(scorecard.as_frame([]).columns)[-1] == "result"
