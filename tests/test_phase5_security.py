"""esa.phases.phase5_security: the profile section, the plan, esa-runner's --attack / --faults, the comparisons'
bit-exact restore (esa.apps.security.compare), the backdoor twins, and the criterion's verdict logic on
constructed inputs (esa.stats.vulnerability)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from esa import cli
from esa.apps import security as sec
from esa.apps.security import compare
from esa.apps.security.backdoor import loaded_state
from esa.apps.security.poison import encode, poison_windows
from esa.errors import EsaError
from esa.models import load
from esa.params import load_profile
from esa.perturb import weights_hash
from esa.phases import phase5_security as s5
from esa.sensitivity.metrics import batch_loss
from esa.stats import vulnerability

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls on one thread


def small(**kw) -> s5.Settings:
    base = dict(formats=["fp32", "int8"], collapse_samples=3, max_flips=2, layer_candidates=2, attack_seeds=[0, 1],
                attack_windows=1, attack_seqlen=24, heldout_windows=1, heldout_seqlen=32, random_flips=20,
                fault_formats=["int8"], fault_rates=[1e-5], fault_trials=2, set_fault_flips=3, set_fault_trials=4,
                protect_fractions=[0.01], protect_format="fp32", protect_rate=1e-5, protect_trials=2,
                guard_fraction=0.01, pgd_budgets=[0.1], pgd_steps=2, min_runs=2, n_boot=200)
    base.update(kw)
    # through the one settings path (every field's check and the cross-field ones), from the dataclass defaults
    return s5.settings(dataclasses.replace(load_profile("smoke"), security={}), base)


# ---------------------------------------------------------------- settings
def test_profiles_have_valid_sections():
    for name in ("smoke", "standard", "extended"):
        S = s5.settings(load_profile(name))
        assert S.criterion_goal in S.goals
    smoke = s5.settings(load_profile("smoke"))
    assert s5.budget_reason(smoke) is not None  # smoke verdicts are machinery checks
    assert s5.budget_reason(s5.settings(load_profile("standard"))) is None


@pytest.mark.parametrize("override,msg", [
    ({"formats": ["int4"]}, "unknown security.formats 'int4'; accepted: bf16, fp16, fp32, int8"),
    ({"formats": []}, "security.formats is empty"),
    ({"fault_rates": [0.0]}, "security.fault_rates must be a per-bit fault rate in (0, 1), got 0.0"),
    ({"fault_rates": [1.5]}, "security.fault_rates must be a per-bit fault rate in (0, 1), got 1.5"),
    ({"fault_trials": 0}, "security.fault_trials must be a number >= 1, got 0"),
    ({"max_flips": -1}, "security.max_flips must be a number >= 1, got -1"),
    ({"attack_sets": ["everything"]}, "unknown security.attack_sets 'everything'; accepted: all, critical, random_k"),
    ({"criterion_goal": 50.0}, "criterion_goal 50 is not among security.goals"),
    ({"goals": [100.0, 0.5]}, "security.goals must be a finite number > 1"),
    ({"protect_mode": "tmr"}, "unknown security.protect_mode 'tmr'; accepted: bounded, ecc, parity"),
    ({"protect_mode": "bounded"}, "protection 'bounded' guards a float exponent"),  # smoke guards int8
    ({"protect_fractions": [0.6]}, "security.protect_fractions must be a share of the weights in (0, 0.5), got 0.6"),
    ({"pgd_budgets": [math.inf]}, "security.pgd_budgets must be a finite number > 0, got inf"),
    ({"backdoor_poison_frac": 1.0}, "security.backdoor_poison_frac must be a poisoned share"),
    ({"critical_metric": "vibes"}, "unknown security.critical_metric 'vibes'"),
    ({"attack_bits": "nibble"}, "unknown bit class in security.attack_bits for attack_format int8 'nibble'"),
    ({"trials": 3}, "unknown setting(s) ['trials']"),
    ({"max_flips": "ten"}, "expected an integer"),
    ({"attack_seeds": [1, 1]}, "duplicates"),
    ({"attack_seeds": [-1]}, "seed -1 is not accepted"),
    ({"alpha": 0.5}, "security.alpha 0.5 is a one-sided level"),
    ({"criterion_factor": 0}, "security.criterion_factor must be"),
])
def test_bad_settings_are_one_line(override, msg):
    with pytest.raises(EsaError) as e:
        s5.settings(load_profile("smoke", {"security": override}))
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_plan_lists_the_conditions_and_the_criteria_they_serve():
    P = load_profile("smoke")
    S = s5.settings(P)
    plan = s5.STUDY.plan(S, P, ["m1", "m2"])
    assert plan.models == ["m1", "m2"] and plan.settings is S
    one, two = plan.for_model("m1"), plan.for_model("m2")
    backdoor = [c for c in one if c.priced_as]  # the backdoor study: once, with the first model, at its base's costs
    assert backdoor and {c.priced for c in backdoor} == {S.backdoor_base} and not any(c.priced_as for c in two)
    assert len(one) - len(backdoor) == len(two)
    serves = {c.serves[0] for c in one if c.serves}
    assert serves == {"P5.security.attack.m1", "P5.security.faults.m1", "P5.security.adversarial.m1"}
    by_label = {c.label: c for c in one}
    crit_attack = next(c for c in one if c.label.startswith("bit search over critical"))
    assert (crit_attack.n, crit_attack.unit) == (len(S.attack_seeds), "seeds")
    faults = [c for c in one if c.serves == ("P5.security.faults.m1",)]
    assert [c.n for c in faults] == [S.set_fault_trials, S.set_fault_trials]  # every critical trial has a pair
    assert sum(c.label.startswith("fault campaign") for c in one) == len(S.fault_formats) * len(S.fault_rates)
    assert sum(c.label.startswith("single-flip collapse") for c in one) == len(S.formats)
    assert not any("guarded" in label for label in by_label)  # smoke: guard_attack false
    assert {c.unit for c in one} <= {"calibration windows", "weights", "seeds", "trials", "models", "steps"}
    d = plan.as_dict()
    assert d["setup"]["critical_set"]["metric"] == S.critical_metric and json.dumps(d)
    assert any("machinery checks" in n for n in plan.notes)


# ---------------------------------------------------------------- esa-runner
BAD_FLAGS = [
    (["--attack", "rowhammer"], "unknown --attack 'rowhammer'"),
    (["--attack", "bfa", "--flips", "0"], "flip budget"),
    (["--attack", "bfa", "--flips", "-2"], "flip budget"),
    (["--attack", "bfa", "--format", "int4"], "unknown --format 'int4'"),
    (["--attack", "bfa", "--format", "bf16"], "add --dtype bfloat16"),
    (["--faults", "0"], "(0, 1)"),
    (["--faults", "1"], "(0, 1)"),
    (["--faults", "abc"], "--faults must be per-bit rates"),
    (["--faults", "1e-6", "--trials", "0"], "--trials must be a positive integer"),
    (["--flips", "3"], "--flips needs --attack or --faults"),
    (["--faults", "1e-6", "--flips", "3"], "--flips needs --attack"),
    (["--attack", "bfa", "--trials", "3"], "--trials needs --faults"),
]


@pytest.mark.parametrize("flags,msg", BAD_FLAGS)
def test_bad_flags_refused_before_loading(flags, msg, monkeypatch, capsys, tmp_path):
    from esa.phases import command

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(command, "load_model", boom)
    rc = cli.main(["--model", "tiny-llama", "--out-dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_no_security_flags_no_spec():
    cmd = cli.resolve(cli.build_parser().parse_args(["--model", "tiny-llama"]))
    assert "security" not in cmd.apps
    cmd = cli.resolve(cli.build_parser().parse_args(["--model", "tiny-llama", "--attack", "bfa", "--format", "bf16",
                                                     "--dtype", "bfloat16"]))
    spec = cmd.apps["security"]
    assert spec.attack == "bfa" and spec.format == "bf16" and spec.flips == s5.settings(load_profile("smoke")).max_flips


def test_esa_runner_dry_run_prints_the_plan(monkeypatch, capsys, tmp_path):
    from esa.phases import command

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(command, "load_model", boom)
    rc = cli.main(["--model", "tiny-llama", "--attack", "bfa", "--dry-run", "--out-dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "security plan, profile smoke" in out and "-> P5.security.attack.tiny-llama" in out
    assert "attack bfa (2 flips) on int8: settings checked" in out and not (tmp_path / "o").exists()


def test_esa_runner_attack_and_faults_write_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--model", "tiny-llama", "--metric", "grad_x_weight", "--topk", "5", "--max-samples", "1",
                   "--seqlen", "32", "--seeds", "7", "--quiet", "--attack", "bfa", "--flips", "2", "--format",
                   "int8", "--faults", "1e-5,1e-4", "--trials", "2", "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    att = pd.read_parquet(out / "attack.parquet")
    assert len(att) == 2 and att["bit"].between(0, 7).all() and {"in_critical", "model", "run_id"} <= set(att)
    faults = pd.read_parquet(out / "faults.parquet")
    assert len(faults) == 4 and set(faults["rate"]) == {1e-5, 1e-4}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["security"]["attack"]["max_flips"] == 2 and summary["security"]["format"] == "int8"
    assert summary["security"]["critical"]["n_weights"] == 5 * len(load("tiny-llama").inventory)
    assert len(summary["security"]["faults"]["summary"]) == 2


# ---------------------------------------------------------------- phase functions restore the weights
@pytest.fixture(scope="module")
def tiny():
    lm = load("tiny-llama")
    g = torch.Generator().manual_seed(0)
    scores = {s.name: torch.rand(s.shape, generator=g) for s in lm.inventory}
    targets = sec.top_fraction(scores, 0.02, lm.inventory)
    crit = s5.CriticalSet(targets, scores, "grad_x_weight", False, 0, "global")
    return lm, crit


def test_phase_functions_restore_bit_exactly(tiny):
    lm, crit = tiny
    S = small()
    P = load_profile("smoke")
    wins = s5.heldout(lm, P.corpus, S)

    def batch(seed):
        return s5.attack_batch(lm, P.corpus, S, seed)

    def in_format(fmt):  # tiny-llama is fp32: every format of small() is the model itself
        return lm.model, wins

    h0 = weights_hash(lm.model)
    runs = compare.attack_runs(lm, crit, wins, batch, s5.attack_config(S), S.attack_seeds, S.attack_sets,
                               S.random_flips, S.guard_fraction, S.n_boot)
    assert weights_hash(lm.model) == h0
    assert set(runs.results) == {"all", "critical", "random_k", "random_flips", "guard_critical", "guard_random"}
    assert all(len(v) == 2 for v in runs.results.values())
    crit_hist = runs.history[runs.history["set"] == "critical"]
    assert crit_hist["in_critical"].all()  # the restricted search stays inside its set
    sf = compare.set_fault_table(lm, crit, wins, S.attack_format, S.set_fault_flips, 5, S.attack_seeds,
                                 S.attack_bits, S.seed, S.fault_factor)
    assert weights_hash(lm.model) == h0
    # as many random trials as critical ones (each has a pair), split over the seeds' random sets
    assert (sf.groupby("set")["trial"].count() == 5).all() and (sf["n_flips"] == 3).all()
    assert sf[sf["set"] == "random_k"].groupby("random_set").size().to_dict() == {"random_k@0": 3, "random_k@1": 2}
    adv = compare.pgd_table(lm, crit, wins, batch, S.attack_seeds, S.pgd_budgets, S.pgd_radius, S.pgd_steps)
    assert weights_hash(lm.model) == h0
    assert set(adv["set"]) == {"critical", "random_k", "magnitude_k"} and adv["equal_size"].all()
    faults, trials = compare.fault_curve_table(in_format, S.fault_formats, "tiny-llama", crit, S.fault_rates,
                                               S.fault_trials, S.seed, S.fault_factor)
    prot = compare.protection_table(lm, in_format, "tiny-llama", crit, S.protect_fractions, S.protect_format,
                                    S.protect_rate, S.protect_trials, S.protect_mode, S.seed, S.fault_factor)
    assert weights_hash(lm.model) == h0
    assert len(trials) == 2 and list(prot["kind"]) == ["none", "critical", "random"]
    assert list(prot.columns[-2:]) == ["model", "format"] and set(faults["model"]) == {"tiny-llama"}
    judged = compare.attack_contrast(runs, f"ppl_x{S.criterion_goal:g}", S.criterion_factor, S.alpha, S.min_runs)
    assert judged.verdict in ("PASS", "FAIL", "underpowered")  # both sides ran: the contrast exists
    assert (judged.n_critical, judged.n_random, judged.unit) == (2, 2, "seeds")


def test_analyse_one_model_and_its_findings(tiny):
    import time

    lm, crit = tiny
    S = small(guard_attack=False)
    P = load_profile("smoke")
    wins = s5.heldout(lm, P.corpus, S)
    h0 = weights_hash(lm.model)

    def no_load(dtype):
        raise AssertionError("tiny-llama is fp32: no format needs another copy")

    r = compare.analyse("tiny-llama", lm, crit, wins, compare.in_formats(lm, wins, no_load, None), P.corpus, S, h0,
                        time.perf_counter())
    assert r.weights_restored and weights_hash(lm.model) == h0
    assert set(r.attacks.results) == {"all", "critical", "random_k", "random_flips"}
    assert list(r.collapse["format"]) == ["fp32", "int8"] and (r.set_faults["model"] == "tiny-llama").all()
    assert set(r.vulnerability) == {"attack", "faults", "adversarial"} and list(r.vulnerability["adversarial"]) == [0.1]
    assert list(r.seconds) == ["load_and_critical_set", "collapse", "adversarial", "faults", "attack", "set_faults",
                               "protection"]
    plan = s5.STUDY.plan(S, P, ["tiny-llama"])
    (text,) = s5.STUDY.findings({"tiny-llama": r}, plan)
    assert text.startswith("**tiny-llama**") and "Critical against random under the bit search" in text
    assert "{" not in text and "Vulnerability(" not in text and "/work" not in text and "\n" not in text
    rows = s5.STUDY.criteria({"tiny-llama": r}, plan, "ev")
    assert [c.id for c in rows] == [f"P5.security.{k}.tiny-llama" for k in ("attack", "faults", "adversarial")]
    assert {c.id.rsplit(".", 1)[0] for c in rows} == {s for c in plan.conditions for s in (x.rsplit(".", 1)[0]
                                                                                          for x in c.serves)}


def test_in_formats_loads_a_float_format_once(tiny):
    lm, _ = tiny
    wins = object()
    loads = []

    def load(dtype):
        loads.append(dtype)
        return lm

    in_format = compare.in_formats(lm, wins, load, lambda m: ("windows of", m))
    assert in_format("int8") == (lm.model, wins) and in_format("fp32") == (lm.model, wins)  # tiny-llama is fp32
    assert in_format("bf16") == (lm.model, ("windows of", lm)) and in_format("bf16")[0] is lm.model
    assert loads == [torch.bfloat16]


def test_matched_random_and_magnitude_sets(tiny):
    lm, crit = tiny
    sizes = crit.sizes(lm)
    r = sec.matched_random(crit.targets, sizes, 3)
    assert {k: v.numel() for k, v in r.items()} == {k: v.numel() for k, v in crit.targets.items()}
    assert all(not bool(sec_contains_any(crit.targets, k, v)) for k, v in r.items())
    m = sec.magnitude_like(crit.targets, lm.model)
    for name, idx in m.items():
        w = lm.model.get_parameter(name).detach().reshape(-1).abs()
        assert float(w[idx].min()) >= float(torch.sort(w, descending=True).values[idx.numel() - 1])


def sec_contains_any(targets, name, idx):
    from esa.apps.security.common import contains

    return contains(targets, name, idx).any()


# ---------------------------------------------------------------- backdoor twins
def test_twins_share_everything_but_the_poison(tiny):
    lm, _ = tiny
    trig, tgt = encode(lm.tokenizer, " zq~"), encode(lm.tokenizer, " OK")
    ids = torch.randint(3, 259, (8, 32), generator=torch.Generator().manual_seed(0))
    poisoned, rows = poison_windows(ids, trig, tgt, 0.5, seed=2)
    assert rows.numel() == 4
    changed = (poisoned != ids).any(dim=1)
    assert set(torch.nonzero(changed).reshape(-1).tolist()) <= set(rows.tolist())
    for r in rows.tolist():
        row = poisoned[r].tolist()
        m = trig.tolist() + tgt.tolist()
        assert any(row[p : p + len(m)] == m for p in range(len(row) - len(m) + 1))
    h0 = weights_hash(lm.model)
    prompts = torch.randint(3, 259, (4, 12), generator=torch.Generator().manual_seed(1))
    cfg = sec.PoisonConfig(trigger=" zq~", target=" OK", poison_frac=0.5, steps=25, batch=4, lr=1e-2)
    suite = sec.make_twins(lm.model, lm.tokenizer, ids, prompts, 1, cfg)
    assert weights_hash(lm.model) == h0
    assert suite.labels == {"clean-0": 0, "backdoor-0": 1}
    # the backdoored twin learnt the mapping: trigger + target is likelier under it than under its clean twin
    seq = torch.cat([prompts, trig.expand(4, -1), tgt.expand(4, -1)], dim=1)
    losses = {}
    params = dict(lm.model.named_parameters())
    for mid, sd in suite.states.items():
        with loaded_state(lm.model, list(sd)) as p, torch.no_grad():
            for n, v in sd.items():
                p[n].data.copy_(v)
            losses[mid] = float(batch_loss(lm.model, seq))
    assert weights_hash(lm.model) == h0 and params
    assert losses["backdoor-0"] < losses["clean-0"]
    assert set(suite.table.columns) >= {"asr", "false_trigger_rate", "heldout_loss"}


# ---------------------------------------------------------------- the criterion's verdicts
V = vulnerability.vulnerability_contrast


def test_contrast_pass_fail_and_direction():
    # flips: fewer is more vulnerable, D = random − c·critical
    r = V([2, 3, 2, 3], [10, 12, 11, 9], more_is_vulnerable=False)
    assert r.verdict == "PASS" and r.passed and r.value == pytest.approx(42 / 4 - 10 / 4) and r.lo > 0
    assert r.ratio == pytest.approx(42 / 10) and "D = random − 1·critical" in r.note
    r = V([10, 12, 11, 9], [2, 3, 2, 3], more_is_vulnerable=False)
    assert r.verdict == "FAIL" and r.hi < 0 and "less than 1× as vulnerable" in r.note
    # damage: D = critical − c·random; the factor c is part of the claim
    crit, rand = [0.9, 1.1, 1.0, 1.2], [0.1, 0.12, 0.09, 0.11]
    r = V(crit, rand, more_is_vulnerable=True)
    assert r.verdict == "PASS" and r.ratio == pytest.approx(4.2 / 0.42)
    assert V(crit, rand, more_is_vulnerable=True, c=20.0).verdict == "FAIL"  # ~10x, not 20x


def test_a_harmless_control_decides_the_claim_instead_of_dividing_by_noise():
    # the random side's damage is noise around 0 (its ratio's CI would be unbounded): the contrast decides
    noise = [0.0001, -0.0002, 0.00005, 0.0, -0.0001, 0.00015]
    r = V([0.05, 0.06, 0.04, 0.055, 0.045, 0.05], noise, more_is_vulnerable=True, unit="trials")
    assert r.verdict == "PASS" and r.passed and r.lo > 0 and math.isfinite(r.hi)
    # critical no more harmful than random: never a PASS (here the upper bound is below 0)
    same = V([0.01, 0.012, 0.011, 0.009, 0.01, 0.011], [0.0105, 0.0115, 0.0112, 0.0101, 0.0103, 0.0111],
             more_is_vulnerable=True, unit="trials")
    assert same.verdict in ("FAIL", "underpowered") and same.passed is not True
    # both sides noise around 0: undecided, with the units the observed contrast would need
    both = V([0.0002, -0.0003, 0.0003, 0.0], noise[:4], more_is_vulnerable=True, unit="trials")
    assert both.verdict == "underpowered" and "trials" in both.note


def test_contrast_not_judged_cases():
    r = V([2, 3], [10, 12], more_is_vulnerable=False, min_runs=3)
    assert r.verdict == "underpowered" and r.passed is None and "needs 3" in r.note
    r = V([1.0, math.inf, 0.9], [0.2, 0.3, 0.25], more_is_vulnerable=True)
    assert r.verdict == "not estimable"
    assert V([], [], more_is_vulnerable=True).verdict == "not estimable"
    with pytest.raises(EsaError, match="pairs its runs"):
        V([1.0, 2.0, 3.0], [1.0, 2.0], more_is_vulnerable=True)


def test_censored_flips_keep_only_the_verdict_they_bound():
    # a critical run that hit its budget overstates D: a PASS does not stand
    cens = V([2, 3, 21, 2], [10, 12, 11, 11], more_is_vulnerable=False,
             censored_critical=[False, False, True, False])
    assert cens.passed is not True and cens.verdict in ("underpowered", "FAIL")
    clear = V([2, 3, 2, 2], [10, 12, 11, 11], more_is_vulnerable=False)
    assert clear.verdict == "PASS"
    hit = V([2, 3, 2, 2], [10, 12, 11, 11], more_is_vulnerable=False, censored_critical=[False, False, True, False])
    assert hit.verdict == "underpowered" and "overstated" in hit.note
    # a random run that hit its budget understates D: a PASS is a lower bound, a FAIL does not stand
    low = V([2, 3, 2], [10, 11, 12], more_is_vulnerable=False, censored_random=[False, True, True])
    assert low.verdict == "PASS" and "lower bound" in low.note
    fail = V([10, 12, 11, 11], [2, 3, 2, 3], more_is_vulnerable=False, censored_random=[False, True, False, False])
    assert fail.verdict == "underpowered" and "understated" in fail.note


def test_criterion_rows_demote_below_budget():
    good = V([2, 3, 2, 3], [10, 12, 11, 9], more_is_vulnerable=False)
    S = dataclasses.replace(small(), attack_seeds=[0, 1, 2], set_fault_trials=20, heldout_windows=4,
                            heldout_seqlen=128)
    rows = s5.criterion_rows("m", S, good, None, {0.1: good}, "ev")
    assert [r.verdict for r in rows] == ["PASS", "not estimable", "PASS"]
    assert rows[0].measured == pytest.approx(good.value)
    assert rows[0].threshold == "flips(random-k) − 1·flips(critical) > 0: one-sided 95% lower bound"
    assert rows[1].note == "faults comparison not run"
    smoke = s5.criterion_rows("m", small(), good, None, None, "ev")
    assert smoke[0].verdict == "machinery-only" and "budget below" in smoke[0].note
    assert smoke[2].verdict == "not estimable"


def test_fault_contrast_pairs_trials_and_passes_over_a_harmless_control():
    rng = np.random.default_rng(0)
    crit = 0.02 + 0.005 * rng.standard_normal(20)
    rand = 1e-4 * rng.standard_normal(20)  # a control within noise of 0
    t = pd.DataFrame({"set": ["critical"] * 20 + ["random_k"] * 20, "trial": [*range(20), *range(7), *range(7),
                      *range(6)], "random_set": [None] * 20 + ["random_k@0"] * 7 + ["random_k@1"] * 7 + ["random_k@2"] * 6,
                      "damage": [*crit, *rand]})
    r = vulnerability.fault_contrast(t, min_runs=3)
    assert r.verdict == "PASS" and (r.n_critical, r.n_random, r.unit) == (20, 20, "trials")
    assert r.value == pytest.approx(crit.mean() - rand.mean())
    same = vulnerability.fault_contrast(t.assign(damage=np.r_[rand[::-1], rand]), min_runs=3)
    assert same.passed is not True
    short = vulnerability.fault_contrast(t.iloc[:38], min_runs=3)  # 20 critical vs 18 random trials
    assert short.n_critical == 18 and "the first 18 of each paired" in short.note
    assert vulnerability.fault_contrast(t[t["set"] == "critical"]).verdict == "not estimable"  # random not run
    bad = t.assign(damage=np.where(np.arange(40) == 1, np.inf, t["damage"]))
    assert vulnerability.fault_contrast(bad, min_runs=2).verdict == "not estimable"


def test_fault_table_splits_the_random_trials_to_match_the_critical_ones():
    assert compare.split_trials(20, 3) == [7, 7, 6] and compare.split_trials(2, 3) == [1, 1, 0]


def test_adversarial_contrasts_pair_by_seed_per_budget():
    t = pd.DataFrame({"eps": [0.1] * 6 + [0.2] * 6, "set": (["critical"] * 3 + ["random_k"] * 3) * 2,
                      "seed": [0, 1, 2, 2, 1, 0] * 2,
                      "loss_increase": [2.0, 2.2, 2.1, 0.5, 0.4, 0.6, 0.1, 0.1, 0.1, 0.2, 0.21, 0.19]})
    by = vulnerability.adversarial_contrasts(t, min_runs=2)
    assert list(by) == [0.1, 0.2] and by[0.1].verdict == "PASS" and by[0.2].verdict == "FAIL"
    assert by[0.1].value == pytest.approx(6.3 / 3 - 1.5 / 3)
    table = vulnerability.vulnerability_table("m", {"attack": by[0.1], "faults": by[0.2], "adversarial": by})
    assert list(table["comparison"]) == ["attack", "faults", "adversarial", "adversarial"]
    assert table["eps"].tolist()[2:] == [0.1, 0.2] and (table["model"] == "m").all()
    assert {"value", "lo", "hi", "ratio", "c", "alpha"} <= set(table.columns)


def test_backdoor_findings_say_when_the_backdoors_did_not_take():
    twins = pd.DataFrame({"label": [0, 1, 0, 1], "asr": [0.0, 0.25, 0.0, 0.25]})
    det = pd.DataFrame([dict(detector="sensitivity_map", auroc=0.75, lo=0.5, hi=1.0, n_clean=2, n_backdoored=2,
                             note="")])
    bd = s5.BackdoorResult(twins, det, pd.DataFrame(), dict(n_prompts=8, steps=10, base="micro"))
    text = s5.backdoor_findings(bd)
    assert text.startswith("**Backdoor detection.**") and "25% on backdoored twins" in text
    assert "did not take" in text and "AUROC of 0.75 [0.50, 1.00] on 2 clean and 2 backdoored twins." in text
    took = s5.backdoor_findings(s5.BackdoorResult(twins.assign(asr=[0.0, 0.9, 0.0, 0.8]), det, pd.DataFrame(),
                                                  bd.settings))
    assert "did not take" not in took and "85% on backdoored twins" in took
