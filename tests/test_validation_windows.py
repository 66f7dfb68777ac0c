"""Week 1 scores every metric but hutchinson_diag on `validation_samples` calibration windows (so each resolves its
top-k held out), and a full map recomputed later uses the run's own windows."""

from __future__ import annotations

import pytest
import torch

from esa.params import load_profile
from esa.phases import phase2, plans

pytestmark = pytest.mark.usefixtures("private_cache_shared_text")

SETTINGS = {"metrics": ["grad_x_weight", "act_mag", "hutchinson_diag"], "seeds": [5, 6], "max_samples": 2,
            "validation_samples": 4, "seqlen": 32, "hutchinson_probes": 1}


def test_validation_runs_take_their_own_windows_and_keep_the_metric_order():
    P = load_profile("smoke", SETTINGS)
    lm = phase2.load_model("tiny-llama", P)
    runs = phase2.validation_runs(lm, "tiny-llama", P)
    assert list(runs) == [(m, s) for m in SETTINGS["metrics"] for s in SETTINGS["seeds"]]
    n = {k: len(r.extras["window_indices"]) for k, r in runs.items()}
    assert n == {k: 2 if k[0] == "hutchinson_diag" else 4 for k in runs}
    # the full map recomputed for a deep reader is the one of the run's 4 windows, not of max_samples = 2
    run = runs[("grad_x_weight", 5)]
    full = run.full()
    again = phase2.score_model(lm, "tiny-llama", P, ["grad_x_weight"], [5], n_samples=4)[("grad_x_weight", 5)]
    name, top = run.top.iloc[0]["param"], run.top.iloc[0]
    assert torch.equal(full[name], again.full()[name])
    assert float(full[name][int(top["row"]), int(top["col"])]) == pytest.approx(float(top["score"]), rel=1e-2)


def test_the_plan_prices_the_validation_windows():
    P = load_profile("smoke", SETTINGS)
    plan = plans.phase2_week1_metric_validation(P, ["tiny-llama"])
    by = {c.label: c.n for c in plan.conditions}
    assert by["gradient metrics seed 5"] == 4 and by["act_mag seed 5"] == 4
    assert by["hutchinson_diag seed 5 (1 probe(s))"] == 2
    assert by["held-out resolution check (every metric, one pass)"] == 4
    assert plan.setup["calibration"] == "4 x 32 tokens (2 for hutchinson_diag)"


def test_without_validation_samples_week_1_is_max_samples_everywhere():
    P = load_profile("smoke", {**SETTINGS, "validation_samples": None})
    assert {phase2.validation_windows(P, m) for m in P.metrics} == {2}
    assert phase2.validation_profile(P) is P


def test_a_zero_validation_sample_is_refused_in_one_line():
    with pytest.raises(Exception, match="validation_samples = 0.*must be >= 1"):
        load_profile("smoke", {"validation_samples": 0})
