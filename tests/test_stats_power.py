"""Power planning: fixed-n and sequential plans reach the power they promise (simulated), and the
existing per-test helpers keep their answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from esa.stats import power
from esa.stats.sequential import Design


def brute_force_seeds(d_z: float, alpha: float, pw: float) -> int:
    n = 2
    while sps.nct.sf(sps.t.isf(alpha, n - 1), n - 1, d_z * math.sqrt(n)) < pw:
        n += 1
    return n


@pytest.mark.parametrize("d_z", [0.15, 0.5, 1.0, 3.0, 20.0])
def test_paired_t_seeds_needed_keeps_its_answers(d_z):
    assert power.paired_t_seeds_needed(d_z, 0.01) == brute_force_seeds(d_z, 0.01, 0.8)


def test_plan_n_is_the_paired_t_at_alpha_over_m_and_reaches_its_power():
    n = power.plan_n(0.5, 1.0, alpha=0.01, m_family=4)
    assert n == power.paired_t_seeds_needed(0.5, 0.01 / 4)
    rng = np.random.default_rng(0)
    d = rng.normal(0.5, 1.0, (4000, n))
    p = sps.ttest_1samp(d, 0.0, axis=1, alternative="greater").pvalue
    assert (p <= 0.01 / 4).mean() >= 0.8 - 3 * math.sqrt(0.16 / 4000)


@pytest.mark.parametrize("mean, sd", [(-1.0, 1.0), (0.0, 1.0), (math.nan, 1.0), (1.0, math.nan)])
def test_no_plan_for_an_effect_in_the_wrong_direction(mean, sd):
    assert power.plan_n(mean, sd) is None and power.plan_design(mean, sd) is None


def test_sequential_cap_reaches_the_power_and_costs_more_than_fixed_n():
    design = power.plan_design(0.5, 1.0, alpha=0.01, power=0.8, n0=4)
    n_fixed = power.plan_n(0.5, 1.0, alpha=0.01)
    assert design is not None and design.n_max > n_fixed and design.alpha == 0.01
    oc = power.operating_characteristics(design, 0.5, 1.0, n_sim=4000)
    assert oc["pass_rate"] >= 0.8 and oc["fail_rate"] <= 0.01
    assert oc["mean_n"] <= design.n_max
    assert power.plan_n(0.5, 1.0, alpha=0.01, design=Design(n0=4)) == design.n_max
    # heavy tails scaled to the same sd: still near the planned power
    assert power.operating_characteristics(design, 0.5, 1.0, n_sim=4000, df=3)["pass_rate"] >= 0.75


def test_huge_effects_need_one_look_and_constant_ones_the_sign_floor():
    design = power.plan_design(20.0, 1.0, alpha=0.01, m_family=10, n0=4)
    assert design.looks == (4,)
    const = power.plan_design(1.0, 0.0, alpha=0.01, n0=4)
    assert 0.5 ** const.n_max <= const.alphas[-1] and 0.5 ** (const.n_max - 1) > Design(
        n0=4, n_max=const.n_max - 1).alphas[-1]


def test_sign_design_plans_more_units():
    t_plan = power.plan_design(0.8, 1.0, n0=4)
    s_plan = power.plan_design(0.8, 1.0, n0=4, test="sign")
    assert s_plan.n_max > t_plan.n_max
    assert power.operating_characteristics(s_plan, 0.8, 1.0, n_sim=2000)["pass_rate"] >= 0.8


def test_pilot_effect_plans_on_an_upper_limit_of_the_sd():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 5), rng.normal(0.0, 0.1, 5)
    pe = power.pilot_effect(a, b, c=2.0)
    assert pe["n"] == 5 and pe["effect_sd"] > pe["sd_observed"] > 0
    assert pe["effect_mean"] == pytest.approx(float(np.mean(a - 2.0 * b)))
    assert math.isnan(power.pilot_effect([1.0], [0.0])["effect_sd"])


def test_plan_criteria_per_criterion():
    pilots = pd.DataFrame(dict(criterion=["super_vs_random", "prune_vs_mag", "wrong_way"],
                               effect_mean=[20.0, 0.6, -1.0], effect_sd=[1.0, 1.0, 1.0]))
    plan = power.plan_criteria(pilots, alpha=0.01, n0=4, n_sim=1000)
    assert plan.alpha_each.tolist() == pytest.approx([0.01 / 3] * 3)
    first, second, third = plan.to_dict(orient="records")
    assert first["n_max"] == 4 and first["expected_n"] == 4.0
    assert second["n_max"] > second["n_fixed"] > 4 and second["power_sequential"] >= 0.8
    assert pd.isna(third["n_max"]) and "direction" in third["note"]


def test_units_note_says_what_would_decide_an_undecided_contrast():
    n = power.plan_n(0.5, 1.0, 0.05)
    assert power.units_note(0.5, 1.0, "seeds", 0.05) == f"at the observed contrast about {n} seeds would decide it"
    # equal differences: the exact sign test decides once 2^-n <= alpha (n = 5 at 0.05)
    assert power.units_note(1.0, 0.0, "trials", 0.05) == "at the observed contrast about 5 trials would decide it"
    assert "not positive" in power.units_note(-0.2, 1.0, "seeds", 0.05)
    assert "too small to decide" in power.units_note(1e-9, 1.0, "seeds", 0.05)
    assert "about" in power.units_note("0.5", "1.0", "seeds", 0.05)  # stored contrasts hold strings
