"""Phase 5 week 15 (interpretability) in the phases layer: settings, the criterion, esa-runner --roles, restore."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import esa.cli
from esa.apps import interpret as interp
from esa.apps.interpret.roles import KEY, RoleReport
from esa.errors import EsaError
from esa.params import load_profile
from esa.perturb.apply import weights_hash
from esa.phases import command
from esa.phases import phase5_interpret as p5
from esa.stats.shares import holm_reachable, share_verdict, wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _settings(**interpret):
    return p5.settings(load_profile("smoke", {"interpret": interpret}))


# ------------------------------------------------------------------ settings
def test_every_profile_section_is_valid():
    for name in ("smoke", "standard", "extended"):
        S = p5.settings(load_profile(name))
        assert S.topk >= 1 and set(S.criterion_roles) <= set(interp.ABLATION_ROLES)


@pytest.mark.parametrize("bad, match", [
    ({"alpha": 2.0}, r"interpret.alpha must be a family-wise error rate in \(0, 1\), got 2.0"),
    ({"topk": 0}, r"interpret.topk = 0 .* must be >= 1"),
    ({"topk": "many"}, r"interpret.topk = 'many' .*expected an integer"),
    ({"roles": ["creates_massive", "superweight"]},
     r"unknown interpret.roles 'superweight'; accepted: .*feeds_sink"),
    ({"roles": []}, r"interpret.roles is empty"),
    ({"criterion_roles": ["bias_like"], "roles": ["creates_massive"]}, r"criterion role 'bias_like' is not among"),
    ({"criterion_roles": ["unexplained"]}, r"unknown interpret.criterion_roles 'unexplained'; accepted: bias_like"),
    ({"sink": "last"}, r"unknown interpret.sink 'last'; accepted: delimiters, first"),
    ({"sink_aggregate": "median"}, r"unknown interpret.sink_aggregate 'median'; accepted: max, mean, sum"),
    ({"metrics": ["grad_x_weight", "nope"]}, r"unknown interpret.metrics 'nope'; accepted: "),
    ({"localise_metric": "nope"}, r"unknown interpret.localise_metric 'nope'"),
    ({"score_seed": 5}, r"score_seed 5 is not one of the profile's seeds"),
    ({"model_topk": {"gemma3-270m": 0}}, r"interpret.model_topk\['gemma3-270m'\] = 0 must be a positive integer"),
    ({"n_inputs": 3}, r"interpret.n_inputs must be a number >= 6, got 3"),
    ({"probes_per_kind": 0}, r"interpret.probes_per_kind must be a number >= 1, got 0"),
    ({"chain_text": "  "}, r"interpret.chain_text = '  ' is empty"),
    ({"colour": "red"}, r"unknown setting\(s\) \['colour'\].*section interpret"),
])
def test_bad_settings_are_one_clear_error(bad, match):
    with pytest.raises(EsaError, match=match) as e:
        _settings(**bad)
    assert len(str(e.value).splitlines()) == 1


def test_settings_come_from_the_section_and_overrides():
    P = load_profile("smoke")
    S = p5.STUDY.settings(P, {"topk": 7, "sink": "delimiters"})
    assert (S.topk, S.sink, S.n_inputs) == (7, "delimiters", P.interpret["n_inputs"])
    assert p5.settings(P) == p5.settings(P, None) and p5.settings(P).topk == P.interpret["topk"]


# ------------------------------------------------------------------ the criterion's verdict
@pytest.mark.parametrize("args, passed, verdict", [
    ((0.39, 0.33, 300, True, 20), False, "FAIL"),  # below 50%: a plain FAIL
    ((0.62, 0.56, 300, True, 20), True, "PASS"),
    ((0.55, 0.45, 40, True, 20), None, "underpowered"),  # >= 50% but the CI reaches below
    ((0.9, 0.7, 10, True, 20), None, "underpowered"),  # too few weights
    ((0.2, 0.1, 300, False, 20), None, "underpowered"),  # no test could have passed
    ((math.nan, math.nan, 0, True, 20), None, "not estimable"),
])
def test_share_verdict(args, passed, verdict):
    got = share_verdict(*args)
    assert got[:2] == (passed, verdict) and got[2]


def test_share_verdict_below_the_guides_budget_is_machinery_only():
    passed, verdict, why = share_verdict(0.2, 0.1, 300, True, 20, budget="top-3 per metric")
    assert (passed, verdict) == (None, "machinery-only") and "reads FAIL" in why


def test_wilson_interval_and_holm_reachability():
    lo, hi = wilson_interval(3, 7)
    assert (round(lo, 2), round(hi, 2)) == (0.16, 0.75)  # the smoke run's 3/7
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert holm_reachable(16, 10, 0.05)["reachable"] and not holm_reachable(6, 8, 0.05)["reachable"]
    assert holm_reachable(0, 0, 0.05) == {"min_p": pytest.approx(math.nan, nan_ok=True),
                                          "holm_first_threshold": pytest.approx(math.nan, nan_ok=True),
                                          "reachable": False}


def test_budget_reason_text():
    S = _settings(n_inputs=12, input_seqlen=12)
    assert p5.budget_reason(S, 2) == ("top-2 per metric on 12 inputs of 12 tokens (the guide's: top-100 per "
                                      "metric, >= 16 inputs)")
    assert p5.budget_reason(_settings(n_inputs=16), 100) is None


def _report(roles: list[str], metrics: list[str], n_inputs: int = 16, m_pass: int = 0) -> RoleReport:
    """A constructed report: weight i has verified roles roles[i] and comes from metrics[i]."""
    keys = [("p.weight", -1, i, 0) for i in range(len(roles))]
    weights = pd.DataFrame([{**dict(zip(KEY, k, strict=True)), "roles": r or "unexplained", "n_roles": len(r.split(";"))
                             if r else 0} for k, r in zip(keys, roles, strict=True)])
    member = pd.DataFrame([{**dict(zip(KEY, k, strict=True)), "metric": m} for k, m in zip(keys, metrics, strict=True)])
    tests = pd.DataFrame({"p": [1e-4] * (len(roles) * 2), "n_inputs": n_inputs, "verdict": "fail"})
    return RoleReport(tests, weights, pd.DataFrame(), member,
                      {"roles": ["creates_massive", "feeds_sink", "suppresses_stopwords", "bias_like", "unexplained"]},
                      {})


def test_role_share_counts_ablation_roles_of_metric_weights_only():
    S = _settings()
    rep = _report(["creates_massive", "bias_like", "", "feeds_sink;bias_like", "creates_massive"],
                  ["m1", "m1", "m2", "m2", interp.DETECTOR])
    sh = interp.role_share(rep, S.criterion_roles, S.alpha)
    # the detector's own candidate is not a top weight; bias_like (baseline only) does not count
    assert (sh["n"], sh["explained"]) == (4, 2) and sh["share"] == 0.5
    assert sh["share_any_role"] == 0.75 and sh["ci_lo"] < 0.5 < sh["ci_hi"]
    assert sh["reachable"]  # 2^-16 < 0.05 / 10
    assert not interp.role_share(_report(["creates_massive"] * 4, ["m"] * 4, n_inputs=6), S.criterion_roles,
                                 S.alpha)["reachable"]  # 2^-6 > 0.05/8
    table = interp.share_table("m", rep, S.criterion_roles).set_index("metric")
    assert table.loc["all (criterion)", ["n", "explained"]].tolist() == [4, 2]
    assert table.loc["m1", "explained"] == 1 and table.loc[interp.DETECTOR, "explained"] == 1


# ------------------------------------------------------------------ the plan
def test_plan_lists_every_condition_and_loads_nothing(monkeypatch):
    monkeypatch.setattr(p5, "load_model", lambda *a, **k: pytest.fail("plan loaded a model"))
    P = load_profile("smoke")
    S = p5.settings(P)
    plan = p5.STUDY.plan(S, P, ["smollm2-135m", "tiny-llama"])
    assert plan.study == "interpret" and plan.models == ["smollm2-135m", "tiny-llama"]
    mine = plan.for_model("tiny-llama")
    scoring = [c for c in mine if c.unit == "calibration windows"]  # the scores, and full maps recomputed
    # roles, chain, sinks; probes, their calibration, 3 ablations, direct
    assert scoring and len(mine) - len(scoring) == 3 + (2 + 3 + 1 if S.localise else 0)
    roles = [c for c in mine if c.serves and c.unit == "inputs"]
    assert len(roles) == 1 and roles[0].serves == ("P5.interpret_roles.tiny-llama",)
    assert (roles[0].n, roles[0].unit) == (S.n_inputs, "inputs")
    assert {c.unit for c in mine} == {"calibration windows", "inputs", "windows", "trials"}
    assert all(c.n >= 1 for c in mine)
    assert plan.as_dict()["setup"]["scores"]["metrics"] == list(P.metrics)
    off = p5.plan(p5.settings(P, {"localise": False}), P, ["tiny-llama"])
    assert sum(c.unit != "calibration windows" for c in off.conditions) == 3 and "no localisation tests" in off.notes


# ------------------------------------------------------------------ esa-runner --roles
def _no_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(command, "load_model", boom)


@pytest.mark.parametrize("flags, match", [
    (["--roles", "creates_massive,superweight"], "unknown role 'superweight'"),
    (["--roles-topk", "5"], "--roles-topk needs --roles"),
    (["--roles", "--roles-topk", "0"], "--roles-topk must be at least 1, got 0"),
])
def test_cli_bad_roles_flags_fail_before_loading(flags, match, monkeypatch, capsys, tmp_path):
    _no_load(monkeypatch)
    rc = esa.cli.main(["--model", "tiny-llama", "--out-dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1


def test_cli_roles_writes_one_row_per_weight(tmp_path, capsys):
    out = tmp_path / "out"
    rc = esa.cli.main(["--model", "tiny-llama", "--metric", "act_mag,grad_x_weight", "--topk", "4", "--max-samples",
                       "1", "--seqlen", "32", "--seeds", "1", "--roles", "--roles-topk", "3", "--out-dir", str(out),
                       "--quiet"])
    assert rc == 0, capsys.readouterr().err
    wide = pd.read_parquet(out / "roles.parquet")
    assert not wide.duplicated(KEY).any() and 3 <= len(wide) <= 6 + 8  # 2 metrics x 3, deduplicated, + detector
    for role in ("creates_massive", "feeds_sink", "suppresses_stopwords", "bias_like", "reads_massive", "first_token"):
        assert {f"{role}_effect", f"{role}_p", f"{role}_p_holm", f"{role}_verdict"} <= set(wide)
        assert set(wide[f"{role}_verdict"]) <= {"pass", "fail", "not estimable", "not applicable"}
    assert set(wide["model"]) == {"tiny-llama"}
    tests = pd.read_parquet(out / "roles_tests.parquet")
    assert len(tests) == len(wide) * 6
    summary = json.loads((out / "summary.json").read_text())
    crit = summary["interpret"]["criterion"]
    assert crit["verdict"] in ("underpowered", "machinery-only", "not estimable") and crit["n"] >= 3
    assert summary["settings"]["apps"]["interpret"]["topk"] == 3


def test_cli_roles_dry_run_prints_the_plan(monkeypatch, capsys, tmp_path):
    _no_load(monkeypatch)
    assert esa.cli.main(["--model", "tiny-llama", "--roles", "--dry-run", "--out-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "interpret plan, profile smoke" in out and "-> P5.interpret_roles.tiny-llama" in out
    assert "esa-runner --roles" in out and not (tmp_path / "o").exists()


def test_cli_roles_subset(tmp_path):
    out = tmp_path / "out"
    assert esa.cli.main(["--model", "tiny-llama", "--metric", "act_mag", "--topk", "2", "--max-samples", "1",
                         "--seqlen", "32", "--seeds", "1", "--roles", "bias_like,creates_massive", "--roles-topk", "2",
                         "--out-dir", str(out), "--quiet"]) == 0
    tests = pd.read_parquet(out / "roles_tests.parquet")
    assert set(tests["role"]) == {"bias_like", "creates_massive"}


# ------------------------------------------------------------------ the phase function
def test_analyse_restores_the_model_bit_exactly():
    P = load_profile("smoke", {"metrics": ["act_mag", "grad_x_weight"], "seeds": [1], "max_samples": 1,
                               "seqlen": 32, "interpret": {"topk": 3, "n_inputs": 8, "input_seqlen": 12,
                                                           "n_boot": 200, "probes_per_kind": 2, "probe_seqlen": 32,
                                                           "localise_k": 5, "generic_windows": 2, "direct_top": 3,
                                                           "direct_random": 3}})
    S = p5.settings(P)
    lm = p5.load_model("tiny-llama", P)
    h0 = weights_hash(lm.model)
    res = p5.analyse_loaded(lm, "tiny-llama", P, S)
    assert weights_hash(lm.model) == h0
    assert res.share["n"] >= 3 and len(res.chain.depth) == lm.model.config.num_hidden_layers
    assert res.sinks is not None and res.sinks.overall["n"] > 0
    assert res.localisation is not None and len(res.localisation.selectivity.table) == 3
    plan = p5.plan(S, P, ["tiny-llama"])
    rows = p5.criteria({"tiny-llama": res}, plan, "test")
    assert [r.id for r in rows] == ["P5.interpret_roles.tiny-llama"]
    assert rows[0].verdict in ("underpowered", "machinery-only") and rows[0].passed is None
    assert len(interp.headline(res.report, 2)) <= 2
    text = p5.findings({"tiny-llama": res}, plan)
    assert len(text) == 4 and all(t.endswith((".", ".)")) and "{" not in t for t in text)
    assert text[0].startswith("**tiny-llama**") and f"{res.share['explained']} of {res.share['n']}" in text[0]
    assert set(interp.share_table("tiny-llama", res.report, S.criterion_roles)["metric"]) >= {
        "act_mag", "grad_x_weight", "all (criterion)"}


def test_catalogue_switches_an_sdpa_model_to_eager_and_back():
    from esa.apps.interpret.anatomy import anatomy
    from esa.models import load

    lm = load("tiny-llama")
    lm.model.set_attn_implementation("sdpa")  # as esa-runner loads a model whose metrics need no double backward
    assert anatomy(lm.model).attn_implementation == "sdpa"
    S = _settings(n_inputs=8, input_seqlen=12, n_boot=200, roles=["feeds_sink"], criterion_roles=["feeds_sink"])
    sel = pd.DataFrame([{"param": "model.layers.0.mlp.down_proj.weight", "row": 1, "col": 2, "metric": "m"}])
    ids = torch.randint(3, 259, (8, 12), generator=torch.Generator().manual_seed(0))
    rep = p5.catalogue(lm, sel, ids, S)
    assert rep.tests["verdict"].iloc[0] in ("pass", "fail")  # the sink role ran: it read attention probabilities
    assert anatomy(lm.model).attn_implementation == "sdpa"
