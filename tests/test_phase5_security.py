"""esa.phases.phase5_security: the profile section, esa-runner's --attack / --faults, the phase functions'
bit-exact restore, the backdoor twins, and the criterion's verdict logic on constructed inputs."""

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
from esa.apps.security.backdoor import loaded_state
from esa.apps.security.poison import encode, poison_windows
from esa.errors import EsaError
from esa.models import load
from esa.params import load_profile
from esa.perturb import weights_hash
from esa.phases import phase5_security as s5
from esa.sensitivity.metrics import batch_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def small(**kw) -> s5.Settings:
    base = dict(formats=["fp32", "int8"], collapse_samples=3, max_flips=2, layer_candidates=2, attack_seeds=[0, 1],
                attack_windows=1, attack_seqlen=24, heldout_windows=1, heldout_seqlen=32, random_flips=20,
                fault_formats=["int8"], fault_rates=[1e-5], fault_trials=2, set_fault_flips=3, set_fault_trials=4,
                protect_fractions=[0.01], protect_format="fp32", protect_rate=1e-5, protect_trials=2,
                guard_fraction=0.01, pgd_budgets=[0.1], pgd_steps=2, min_runs=2, n_boot=200)
    base.update(kw)
    return s5.Settings(**base).validate()


# ---------------------------------------------------------------- settings
def test_profiles_have_valid_sections():
    for name in ("smoke", "standard", "extended"):
        S = s5.settings(load_profile(name))
        assert S.criterion_goal in S.goals
    smoke = s5.settings(load_profile("smoke"))
    assert s5.budget_reason(smoke) is not None  # smoke verdicts are machinery checks
    assert s5.budget_reason(s5.settings(load_profile("standard"))) is None


@pytest.mark.parametrize("override,msg", [
    ({"formats": ["int4"]}, "unknown storage format in security.formats 'int4'"),
    ({"fault_rates": [0.0]}, "(0, 1)"),
    ({"fault_rates": [1.5]}, "(0, 1)"),
    ({"fault_trials": 0}, "security.fault_trials must be a positive integer"),
    ({"max_flips": -1}, "security.max_flips must be a positive integer"),
    ({"attack_sets": ["everything"]}, "unknown attack target set"),
    ({"criterion_goal": 50.0}, "criterion_goal 50 is not among security.goals"),
    ({"protect_mode": "tmr"}, "unknown protection in security.protect_mode 'tmr'"),
    ({"protect_mode": "bounded"}, "protection 'bounded' guards a float exponent"),  # smoke guards int8
    ({"attack_bits": "nibble"}, "unknown bit class"),
    ({"trials": 3}, "unknown setting(s) ['trials']"),
    ({"max_flips": "ten"}, "expected an integer"),
    ({"attack_seeds": [1, 1]}, "duplicates"),
])
def test_bad_settings_are_one_line(override, msg):
    with pytest.raises(EsaError) as e:
        s5.settings(load_profile("smoke", {"security": override}))
    assert msg in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- esa-runner
BAD_FLAGS = [
    (["--attack", "rowhammer"], "unknown attack 'rowhammer'"),
    (["--attack", "bfa", "--flips", "0"], "flip budget"),
    (["--attack", "bfa", "--flips", "-2"], "flip budget"),
    (["--attack", "bfa", "--format", "int4"], "unknown storage format 'int4'"),
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
    h0 = weights_hash(lm.model)
    runs = s5.attacks(lm, P, S, crit, wins)
    assert weights_hash(lm.model) == h0
    assert set(runs.results) == {"all", "critical", "random_k", "random_flips", "guard_critical", "guard_random"}
    assert all(len(v) == 2 for v in runs.results.values())
    crit_hist = runs.history[runs.history["set"] == "critical"]
    assert crit_hist["in_critical"].all()  # the restricted search stays inside its set
    sf = s5.set_faults(lm, S, crit, wins)
    assert weights_hash(lm.model) == h0
    assert (sf.groupby("set")["trial"].count() == 4).all() and (sf["n_flips"] == 3).all()
    adv = s5.adversarial(lm, P, S, crit, wins)
    assert weights_hash(lm.model) == h0
    assert set(adv["set"]) == {"critical", "random_k", "magnitude_k"} and adv["equal_size"].all()
    faults, trials = s5.fault_curves(lm, "tiny-llama", P, S, crit, wins)
    prot = s5.protection(lm, "tiny-llama", P, S, crit)
    assert weights_hash(lm.model) == h0
    assert len(trials) == 2 and list(prot["kind"]) == ["none", "critical", "random"]
    ratio = s5.attack_ratio(runs, S)
    assert ratio.verdict in ("PASS", "FAIL", "underpowered", "not estimable")


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
V = s5.vulnerability_verdict


def test_verdict_pass_fail_and_direction():
    r = V([2, 3, 2, 3], [10, 12, 11, 9], more_is_vulnerable=False, paired=True, n_boot=500)
    assert r.verdict == "PASS" and r.passed and r.value == pytest.approx(42 / 10) and r.lo > 1
    r = V([10, 12, 11, 9], [2, 3, 2, 3], more_is_vulnerable=False, paired=True, n_boot=500)
    assert r.verdict == "FAIL" and "random weights are the more vulnerable" in r.note and r.hi < 1
    r = V([5, 6, 5, 6], [5, 6, 6, 5], more_is_vulnerable=False, paired=True, n_boot=500)
    assert r.verdict == "FAIL" and "includes 1" in r.note
    r = V([0.9, 1.1, 1.0, 1.2], [0.1, 0.12, 0.09, 0.11], more_is_vulnerable=True, paired=False, n_boot=500)
    assert r.verdict == "PASS" and r.value == pytest.approx(4.2 / 0.42)


def test_verdict_not_judged_cases():
    r = V([2, 3], [10, 12], more_is_vulnerable=False, paired=True, min_runs=3)
    assert r.verdict == "underpowered" and r.passed is None and "needs 3" in r.note
    # damage: the random side's mean within noise of zero -> the ratio's denominator is noise
    r = V([1.0, 1.2, 0.9], [0.01, -0.02, 0.005], more_is_vulnerable=True, paired=False, n_boot=500)
    assert r.verdict == "not estimable" and "within noise" in r.note
    r = V([1.0, math.inf, 0.9], [0.2, 0.3, 0.25], more_is_vulnerable=True, paired=False, n_boot=500)
    assert r.verdict == "not estimable"
    # flips: a critical run that hit its budget makes a PASS unsafe; a random one makes a PASS a lower bound
    cens = V([2, 3, 11], [10, 12, 11], more_is_vulnerable=False, paired=True, n_boot=500,
             censored_critical=[False, False, True])
    assert cens.verdict in ("underpowered", "FAIL") and cens.passed is not True
    low = V([2, 3, 2], [10, 11, 11], more_is_vulnerable=False, paired=True, n_boot=500,
            censored_random=[False, True, True])
    assert low.verdict == "PASS" and "lower bound" in low.note
    both = V([11, 3, 2], [11, 11, 11], more_is_vulnerable=False, paired=True, n_boot=500,
             censored_critical=[True, False, False], censored_random=[True, True, True])
    assert both.verdict == "underpowered" and "both sides" in both.note


def test_criterion_rows_demote_below_budget():
    good = V([2, 3, 2, 3], [10, 12, 11, 9], more_is_vulnerable=False, paired=True, n_boot=500)
    S = dataclasses.replace(small(), attack_seeds=[0, 1, 2], set_fault_trials=20, heldout_windows=4,
                            heldout_seqlen=128)
    rows = s5.criterion_rows("m", S, good, None, {0.1: good}, "ev")
    assert [r.verdict for r in rows] == ["PASS", "not estimable", "PASS"]
    assert rows[0].measured == pytest.approx(good.value) and rows[0].threshold.startswith("> 1")
    smoke = s5.criterion_rows("m", small(), good, None, None, "ev")
    assert smoke[0].verdict == "machinery-only" and "budget below" in smoke[0].note
    assert smoke[2].verdict == "not estimable"


def test_fault_ratio_refuses_nonfinite_damage():
    t = pd.DataFrame({"set": ["critical"] * 3 + ["random_k"] * 3, "damage": [1.0, np.inf, 2.0, 0.1, 0.2, 0.3]})
    assert s5.fault_ratio(t, small()).verdict == "not estimable"
