"""Phase 5 week 15 (interpretability) in the phases layer: settings, the criterion, esa-runner --roles, restore."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import esa.cli
from esa.apps.interpret.roles import KEY, RoleReport
from esa.errors import EsaError
from esa.params import load_profile
from esa.perturb.apply import weights_hash
from esa.phases import command
from esa.phases import phase5_interpret as p5

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _settings(**interpret):
    return p5.settings(load_profile("smoke", {"interpret": interpret}))


# ------------------------------------------------------------------ settings
def test_every_profile_section_is_valid():
    for name in ("smoke", "standard", "extended"):
        S = p5.settings(load_profile(name))
        assert S.topk >= 1 and set(S.criterion_roles) <= set(p5.ABLATION_ROLES)


@pytest.mark.parametrize("bad, match", [
    ({"alpha": 2.0}, r"alpha = 2.0 must lie in \(0, 1\)"),
    ({"topk": 0}, r"interpret.topk = 0 .* must be >= 1"),
    ({"topk": "many"}, r"interpret.topk = 'many' .*expected an integer"),
    ({"roles": ["creates_massive", "superweight"]}, r"unknown role 'superweight'.*accepted: .*feeds_sink"),
    ({"criterion_roles": ["bias_like"], "roles": ["creates_massive"]}, r"criterion role 'bias_like' is not among"),
    ({"criterion_roles": ["unexplained"]}, r"unknown criterion role 'unexplained'"),
    ({"sink": "last"}, r"unknown sink 'last'; accepted: delimiters, first"),
    ({"metrics": ["grad_x_weight", "nope"]}, r"unknown metric 'nope'"),
    ({"score_seed": 5}, r"score_seed 5 is not one of the profile's seeds"),
    ({"model_topk": {"gemma3-270m": 0}}, r"model_topk\['gemma3-270m'\] = 0 must be a positive integer"),
    ({"n_inputs": 3}, r"n_inputs = 3 must be >= 6"),
    ({"colour": "red"}, r"unknown setting\(s\) \['colour'\].*section interpret"),
])
def test_bad_settings_are_one_clear_error(bad, match):
    with pytest.raises(EsaError, match=match):
        _settings(**bad)


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
    got = p5.share_verdict(*args)
    assert got[:2] == (passed, verdict) and got[2]


def test_share_verdict_below_the_guides_budget_is_machinery_only():
    passed, verdict, why = p5.share_verdict(0.2, 0.1, 300, True, 20, budget="top-3 per metric")
    assert (passed, verdict) == (None, "machinery-only") and "reads FAIL" in why


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
                  ["m1", "m1", "m2", "m2", p5.DETECTOR])
    sh = p5.role_share(rep, S)
    # the detector's own candidate is not a top weight; bias_like (baseline only) does not count
    assert (sh["n"], sh["explained"]) == (4, 2) and sh["share"] == 0.5
    assert sh["share_any_role"] == 0.75 and sh["ci_lo"] < 0.5 < sh["ci_hi"]
    assert sh["reachable"]  # 2^-16 < 0.05 / 10
    assert not p5.role_share(_report(["creates_massive"] * 4, ["m"] * 4, n_inputs=6), S)["reachable"]  # 2^-6 > 0.05/8


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
    rows = p5.criterion_rows("tiny-llama", res.share, S, res.k, "test")
    assert rows[0].verdict in ("underpowered", "machinery-only") and rows[0].passed is None
    assert len(p5.headline(res, 2)) <= 2 and p5.prose(res, S)
    assert set(p5.share_table(res, S)["metric"]) >= {"act_mag", "grad_x_weight", "all (criterion)"}


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
