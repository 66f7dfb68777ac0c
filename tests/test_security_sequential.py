"""The security criterion's set faults decided sequentially (esa.apps.security.compare.sequential_set_faults
with esa.phases.phase5_security.fault_design): a clear effect stops at its first look, trials are the same
whichever looks run them, no effect never passes, and the weights come back bit-exactly."""

from __future__ import annotations

import copy
import dataclasses
import time

import pandas as pd
import pytest
import torch

from esa.apps import security as sec
from esa.apps.security import compare
from esa.errors import EsaError
from esa.models import load
from esa.params import load_profile
from esa.perturb import weights_hash
from esa.phases import phase5_security as s5
from esa.sensitivity.metrics import batch_loss
from esa.stats import vulnerability

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls on one thread


SEQUENTIAL = dataclasses.replace(load_profile("smoke"), sequential={"first_windows": 2})


def small(**kw) -> s5.Settings:
    base = dict(attack_seeds=[0, 1], heldout_windows=1, heldout_seqlen=32, set_fault_flips=3, set_fault_trials=32,
                set_fault_first=16, min_runs=3)
    return s5.settings(dataclasses.replace(load_profile("smoke"), security={}), {**base, **kw})


@pytest.fixture(scope="module")
def tiny():
    """tiny-llama, held-out windows and a critical set of random scores: critical is random, no effect."""
    lm = load("tiny-llama")
    g = torch.Generator().manual_seed(0)
    scores = {s.name: torch.rand(s.shape, generator=g) for s in lm.inventory}
    crit = s5.CriticalSet(sec.top_fraction(scores, 0.02, lm.inventory), scores, "grad_x_weight", False, 0, "global")
    return lm, crit, s5.heldout(lm, "shakespeare", small())


@pytest.fixture(scope="module")
def fragile(tiny):
    """A copy of tiny-llama with a real critical set: MLP hidden unit 0 of each layer amplified 1000x (its
    up_proj row), then fitted to the held-out window, so a flip of down_proj's column 0 (which reads that
    unit) moves the model far from its minimum, while a flip elsewhere barely moves it. The one-thread fixture
    keeps the fit deterministic."""
    lm, _, wins = tiny
    model = copy.deepcopy(lm.model)
    targets = {}
    with torch.no_grad():
        for s in lm.inventory:
            if "down_proj" in s.name:
                model.get_parameter(s.name.replace("down_proj", "up_proj"))[0] *= 1000.0
                targets[s.name] = torch.arange(s.shape[0]) * s.shape[1]  # column 0, flat indices
    model.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        batch_loss(model, wins.ids).backward()
        opt.step()
    model.requires_grad_(False).eval()
    crit = s5.CriticalSet(targets, None, "amplified unit", False, 0, "per_layer")
    return dataclasses.replace(lm, model=model), crit, wins


def sequential(lm, crit, wins, S, design):
    return compare.sequential_set_faults(lm, crit, wins, S.attack_format, S.set_fault_flips, design, S.attack_seeds,
                                         S.attack_bits, S.seed, S.fault_factor, S.criterion_factor)


# ---------------------------------------------------------------- the design
def test_fault_design_follows_the_profile():
    S = small()
    assert s5.fault_design(S, load_profile("smoke")) is None  # not sequential: every pair (fixed n)
    d = s5.fault_design(S, SEQUENTIAL)
    assert (d.looks, d.n_max, d.spending, d.alpha) == ((16, 32), 32, "obf", S.alpha)
    assert s5.fault_design(small(set_fault_first=2, min_runs=5), SEQUENTIAL).n0 == 5  # a first look of min_runs
    with pytest.raises(EsaError, match=r"set_fault_trials 1 cannot be run sequentially; accepted: 2 or more"):
        s5.fault_design(small(set_fault_trials=1), SEQUENTIAL)
    powered = load_profile("powered")
    P = s5.settings(powered)
    d = s5.fault_design(P, powered)
    assert d.looks == (30, 60, 120) and d.alphas[-1] > 0.95 * d.alpha  # O'Brien-Fleming: alpha kept for the cap
    lines = s5.STUDY.plan(P, powered, ["m"]).lines()
    faults = [x for x in lines if "bounded faults per trial" in x]
    assert len(faults) == 2 and all("looks at 30, 60, 120 pairs (n: the cap)" in x and "n = 120 trials" in x
                                    for x in faults)
    assert any(x.startswith("  set_faults: group-sequential paired t, O'Brien-Fleming") for x in lines)


# ---------------------------------------------------------------- (a) a clear effect stops at its first look
def test_a_clear_effect_stops_at_the_first_look(fragile):
    lm, crit, wins = fragile
    S = small(attack_bits="msb")  # every flip a sign-bit flip: a large move of every flipped weight
    design = s5.fault_design(S, SEQUENTIAL)
    table, result = sequential(lm, crit, wins, S, design)
    assert (result.decision, result.look, result.n) == ("PASS", 1, 16) and result.n < design.n_max
    assert result.lower > 0 and len(table) == 2 * 16 and sorted(table["pair"].unique()) == list(range(16))
    v = vulnerability.fault_contrast(table, alpha=design.alpha, min_runs=S.min_runs, result=result)
    assert (v.verdict, v.passed, v.n_critical, v.n_fixed) == ("PASS", True, 16, 32)
    assert "at n = 16 of 32 trial pairs" in v.note and v.value == pytest.approx(result.estimate)


# ---------------------------------------------------------------- (b) looks change nothing about the trials
def test_trials_across_looks_equal_the_trials_in_one_go(tiny):
    lm, crit, wins = tiny
    S = small()
    args = (lm, crit, wins, S.attack_format, S.set_fault_flips)
    rest = (S.attack_seeds, S.attack_bits, S.seed, S.fault_factor)
    whole = compare.set_fault_pairs(*args, range(12), *rest)
    looks = pd.concat([compare.set_fault_pairs(*args, range(a, b), *rest) for a, b in ((0, 3), (3, 7), (7, 12))])

    def order(t: pd.DataFrame) -> pd.DataFrame:
        return t.sort_values(["set", "pair"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(order(looks), order(whole), check_exact=True)
    rand = whole[whole["set"] == "random_k"].sort_values("pair")  # pair i: seed i % 2's set, its trial i // 2
    assert list(rand["random_set"]) == [f"random_k@{i % 2}" for i in range(12)]
    assert list(rand["trial"]) == [i // 2 for i in range(12)]
    # the sequential run's pairs are the fixed-n table's first pairs, bit for bit
    table, result = sequential(lm, crit, wins, S, s5.fault_design(small(set_fault_first=4, set_fault_trials=12),
                                                                  SEQUENTIAL))
    prefix = whole[whole["pair"] < result.n]
    pd.testing.assert_frame_equal(order(table), order(prefix), check_exact=True)


# ---------------------------------------------------------------- (c) no effect never passes
def test_no_effect_runs_to_the_cap_or_fails(tiny):
    lm, crit, wins = tiny
    S = small(set_fault_first=8)
    design = s5.fault_design(S, SEQUENTIAL)
    table, result = sequential(lm, crit, wins, S, design)
    assert result.decision in ("undecided", "FAIL") and result.decision != "PASS"
    assert result.decision == "FAIL" or result.n == design.n_max == 32
    assert len(table) == 2 * result.n
    v = vulnerability.fault_contrast(table, alpha=design.alpha, min_runs=S.min_runs, result=result)
    assert v.passed is not True and v.verdict in ("underpowered", "FAIL") and v.n_fixed == 32


# ---------------------------------------------------------------- (d) the weights come back
def test_sequential_campaign_restores_the_weights_bit_exactly(tiny, fragile):
    for lm, crit, wins in (tiny, fragile):
        h0 = weights_hash(lm.model)
        sequential(lm, crit, wins, small(), s5.fault_design(small(), SEQUENTIAL))
        assert weights_hash(lm.model) == h0


def test_analyse_judges_the_row_by_the_sequential_decision(fragile):
    lm, crit, wins = fragile
    S = small(attack_bits="msb", formats=["int8"], collapse_samples=2, max_flips=2, layer_candidates=2, attack_windows=1, attack_seqlen=24,
              random_flips=5, fault_formats=["int8"], fault_rates=[1e-5], fault_trials=2, protect_fractions=[0.01], protect_format="fp32",
              protect_rate=1e-5, protect_trials=2, pgd_budgets=[0.1], pgd_steps=1, n_boot=50, guard_attack=False)
    h0 = weights_hash(lm.model)

    def no_load(dtype):
        raise AssertionError("tiny-llama is fp32: no format needs another copy")

    r = compare.analyse("tiny", lm, crit, wins, compare.in_formats(lm, wins, no_load, None), "shakespeare", S, h0,
                        time.perf_counter(), s5.fault_design(S, SEQUENTIAL))
    assert r.weights_restored and weights_hash(lm.model) == h0
    seq = r.sequential["faults"]
    assert (seq.decision, seq.n, seq.n_max) == ("PASS", 16, 32) and len(r.set_faults) == 2 * seq.n
    plan = s5.STUDY.plan(S, SEQUENTIAL, ["tiny"])
    row = next(c for c in s5.STUDY.criteria({"tiny": r}, plan, "ev") if c.id == "P5.security.faults.tiny")
    assert row.verdict == "machinery-only" and "the number alone reads PASS" in row.note  # smoke budget
    assert "sequential: D =" in row.note and "at n = 16 of 32 trial pairs" in row.note
    assert "valid at the look that stopped it" in row.threshold
    (text,) = s5.STUDY.findings({"tiny": r}, plan)
    assert "16 trial pairs evaluated against 32 for the fixed-n plan (50% saved)" in text


def test_bad_first_trial_is_one_line(tiny):
    lm, crit, wins = tiny
    with pytest.raises(EsaError) as e:
        sec.set_faults(lm.model, wins, "int8", {"critical": crit.targets}, 1, 2, start=-1)
    assert str(e.value) == "first trial of set 'critical' is -1; accepted: an integer >= 0"
