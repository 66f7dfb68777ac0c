"""Contrasts with one-sided bounds: known answers, degenerate inputs without verdicts, Holm at family level."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from esa.errors import EsaError
from esa.stats.contrasts import contrast, holm_contrasts, paired_stats, sign_check


def fieller_unbounded(b: np.ndarray, level: float) -> bool:
    """Fieller's interval for mean(a)/mean(b) is unbounded when mean(b) is not significantly non-zero
    (g = t^2 se_b^2 / mean_b^2 >= 1)."""
    t = sps.t.isf((1 - level) / 2, b.size - 1)
    g = (t * b.std(ddof=1) / math.sqrt(b.size)) ** 2 / b.mean() ** 2
    return g >= 1


def test_five_times_claim_passes_by_contrast_where_the_ratio_ci_is_unbounded():
    a = np.array([19.0, 20.0, 21.0])  # +20 ± 1 nats: the super weight's damage over 3 seeds
    b = np.array([3e-5, 4e-5, 5e-5])  # random_k doing (almost) nothing
    assert fieller_unbounded(b, 0.98)  # the ratio's CI has no upper end
    r = contrast(a, b, c=5.0)
    assert r.decision == "PASS" and r.test == "paired_t" and r.n == 3
    assert r.lower > 15 and math.isfinite(r.upper) and r.p < 0.01
    assert r.estimate == pytest.approx(20.0 - 5 * 4e-5)
    assert "one-sided 99% bounds" in r.describe() and "n=3 seeds" in r.describe()
    # the same with noise drawn at random
    rng = np.random.default_rng(0)
    assert contrast(rng.normal(20, 1, 3), rng.normal(4e-5, 1e-5, 3), c=5.0).decision == "PASS"


def test_bounds_match_the_paired_t_by_hand():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 12), rng.normal(0.0, 1.0, 12)
    d = a - 2.0 * b
    r = contrast(a, b, c=2.0, threshold=0.3, alpha=0.05)
    half = sps.t.isf(0.05, 11) * d.std(ddof=1) / math.sqrt(12)
    assert r.lower == pytest.approx(d.mean() - half) and r.upper == pytest.approx(d.mean() + half)
    t = sps.ttest_1samp(d, 0.3, alternative="greater")
    assert r.p == pytest.approx(t.pvalue) and r.p_opposite == pytest.approx(1 - t.pvalue)
    assert (r.decision == "PASS") == (r.lower > 0.3)


def test_clearly_false_claim_fails_and_weak_one_is_undecided():
    rng = np.random.default_rng(0)
    fail = contrast(rng.normal(1, 0.1, 5), np.ones(5), c=5.0)  # a ≈ 1 is nowhere near 5 × b = 5
    assert fail.decision == "FAIL" and fail.upper < 0
    weak = contrast(rng.normal(0.1, 1, 5), np.zeros(5))
    assert weak.decision == "undecided" and weak.lower < 0 < weak.upper


def test_pruning_claim_maps_to_a_contrast():
    # "method >15% better than magnitude": 0.85·Δmag − Δmethod > 0
    d_mag, d_method = np.array([10.0, 11.0, 9.5, 10.5, 10.2]), np.array([7.0, 7.9, 6.8, 7.4, 7.1])
    r = contrast(0.85 * d_mag, d_method)
    assert r.decision == "PASS" and r.estimate == pytest.approx(0.85 * d_mag.mean() - d_method.mean())
    worse = contrast(0.85 * d_mag, d_mag * 0.95)  # only 5% better
    assert worse.decision == "FAIL"


@pytest.mark.parametrize("n, value, decision", [
    (3, 1.0, "undecided"),  # 2^-3 = 0.125 > 0.01: the sign floor cannot clear alpha
    (7, 1.0, "PASS"),  # 2^-7 = 0.0078 <= 0.01
    (7, -1.0, "FAIL"),
    (10, 0.0, "undecided"),  # every difference on the threshold
])
def test_zero_variance_is_decided_by_the_exact_sign_test(n, value, decision):
    r = contrast(np.full(n, value + 2.0), np.full(n, 2.0))
    assert r.decision == decision and r.test == "sign (constant differences)"
    assert "sign test" in r.reason and "t undefined" in r.reason
    if value > 0:
        assert r.p == pytest.approx(0.5**n)
    assert not any(isinstance(v, float) and math.isnan(v) for v in (r.lower, r.upper))


def test_differences_equal_up_to_rounding_count_as_constant():
    a = np.array([1.1, 2.2, 3.3])
    r = contrast(a, a - 1.0)  # D = 1 in exact arithmetic, a few ulps apart in floating point
    assert r.test == "sign (constant differences)" and r.decision == "undecided"


@pytest.mark.parametrize("a, b", [([1.0], [0.0]), ([], [])])
def test_fewer_than_two_units_gives_no_verdict(a, b):
    r = contrast(a, b)
    assert r.decision == "undecided" and r.reason == "needs ≥ 2 paired units" and math.isnan(r.p)


@pytest.mark.parametrize("a, b", [
    ([1.0, np.inf, 2.0], [0.0, 0.0, 0.0]),
    ([1.0, 2.0, 3.0], [0.0, np.nan, 0.0]),
    ([np.inf, np.inf], [np.inf, np.inf]),  # inf − inf
])
def test_non_finite_values_give_no_verdict(a, b):
    r = contrast(a, b)
    assert r.decision == "undecided" and r.reason.startswith("not finite")
    assert math.isnan(r.p) and math.isnan(r.lower)
    json.dumps(r.as_dict())  # serialisable, non-finite as strings


def test_overflowing_variance_gives_no_verdict():
    r = contrast([1e308, -1e308, 1e308], [0.0, 0.0, 0.0])
    assert r.decision == "undecided" and "not finite" in r.reason


def test_bad_inputs_raise():
    with pytest.raises(EsaError, match="paired"):
        contrast([1.0, 2.0], [1.0])
    with pytest.raises(EsaError, match="alpha"):
        contrast([1.0, 2.0], [0.0, 0.0], alpha=0.7)
    with pytest.raises(EsaError, match="finite"):
        contrast([1.0, 2.0], [0.0, 0.0], c=math.inf)


def test_sign_check_is_exact_and_its_bounds_need_enough_units():
    p, lo, hi = sign_check(np.arange(1.0, 11.0), 0.0, 0.01)  # 10 positive of 10
    assert p == pytest.approx(2**-10) and lo == 1.0 and hi == 10.0  # P(Bin(10, .5) <= 1) = 0.0107 > 0.01
    _, lo, hi = sign_check(np.arange(1.0, 21.0), 0.0, 0.01)  # P(Bin(20, .5) <= 4) = 0.0059, <= 5: 0.0207
    assert lo == 5.0 and hi == 16.0
    p, lo, hi = sign_check(np.arange(1.0, 4.0), 0.0, 0.01)
    assert p == pytest.approx(1 / 8) and lo == -math.inf and hi == math.inf


def test_paired_stats_is_row_wise():
    rng = np.random.default_rng(0)
    d = rng.normal(0.5, 1.0, (4, 9))
    st = paired_stats(d, 0.2)
    for i in range(4):
        assert st["p"][i] == pytest.approx(sps.ttest_1samp(d[i], 0.2, alternative="greater").pvalue)


def test_holm_family_adjusts_and_redecides():
    rng = np.random.default_rng(0)
    strong = contrast(rng.normal(5, 1, 8), np.zeros(8))
    marginal = contrast(rng.normal(0.0, 1, 8) + [1.2, 0.9, 1.0, 1.1, 0.8, 1.3, 1.0, 1.0], np.zeros(8))
    false = contrast(rng.normal(-3, 1, 8), np.zeros(8))
    degenerate = contrast([1.0], [0.0])
    fam = holm_contrasts([strong, marginal, false, degenerate])
    assert [c.m_family for c in fam] == [4] * 4  # the degenerate one counts in m
    assert fam[0].decision == "PASS" and fam[2].decision == "FAIL" and fam[3].decision == "undecided"
    assert fam[3].reason == "needs ≥ 2 paired units"
    ps = sorted(c.p for c in (strong, marginal, false))
    assert fam[0].p_adjusted == pytest.approx(min(1, 4 * ps[0]))
    assert all(c.bound_alpha == pytest.approx(0.01 / 4) for c in fam)
    assert fam[0].lower < strong.lower  # Bonferroni bounds are wider
    assert "Holm over 4" in fam[0].describe()
    # a claim that passes alone at p just below alpha does not pass in a family of four
    alone = contrast(np.array([1.0, 1.2, 0.9, 1.1, 1.05, 0.3, 0.5]), np.zeros(7), threshold=0.45)
    assert alone.decision == "PASS" and 0.01 / 3 < alone.p < 0.01  # p = 0.0085
    assert holm_contrasts([alone, strong, false, degenerate])[0].decision == "undecided"
    with pytest.raises(EsaError, match="different alphas"):
        holm_contrasts([strong, contrast([1.0, 2.0], [0.0, 0.0], alpha=0.05)])
