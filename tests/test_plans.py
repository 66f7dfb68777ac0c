"""Plans: every notebook of the schedule says what it computes (studies and esa.phases.plans), from settings
alone, and predicts seconds from measured costs."""

from __future__ import annotations

import pytest

from esa.params import load_profile
from esa.phases import costs
from esa.phases.command import STUDIES
from esa.phases.plans import PLANS
from esa.runner import schedule


@pytest.fixture
def no_load(monkeypatch):
    import esa.models

    def boom(*a, **k):
        raise AssertionError("a plan loaded a model")

    monkeypatch.setattr(esa.models, "load", boom)
    monkeypatch.setattr("esa.models.loader.load", boom)


@pytest.mark.parametrize("profile", ["smoke", "powered"])
def test_every_notebook_but_the_synthesis_has_a_plan_that_loads_nothing(profile, no_load):
    P = load_profile(profile)
    studies = {s.name: s for s in STUDIES}
    for e in schedule.entries():
        models = schedule.resolve_models(e, P, None)
        if e.study:
            s = studies[e.study]
            plan = s.plan(s.settings(P, None), P, models)
        elif e.id in PLANS:
            plan = PLANS[e.id](P, models)
        else:
            assert e.id == "phase5_week16_synthesis", f"{e.id} has no plan"
            continue
        assert plan.models and all(c.n >= 0 and c.unit for c in plan.conditions)
        assert all(c.model in plan.models for c in plan.conditions)


def test_plans_predict_seconds_from_measured_costs():
    P = load_profile("powered")
    measured = costs.Costs(256, {"smollm2-135m": {"eval": 1.0, "grad": 2.0, "act": 0.5, "hvp": 10.0, "load": 3.0}},
                           costs.machine())
    plan = PLANS["phase2_week1_metric_validation"](P, ["smollm2-135m"]).predict(measured)
    by = {c.label: c.seconds for c in plan.conditions}
    assert by["gradient metrics seed 1337"] == 2.0 * P.max_samples
    assert by[f"hutchinson_diag seed 1337 ({P.hutchinson_probes} probe(s))"] == 10.0 * P.max_samples * P.hutchinson_probes
    assert plan.seconds() == pytest.approx(sum(by.values()))
    # a model nobody measured has no prediction, and the plan's total says so (None), never a guess
    other = PLANS["phase1_week0_baselines"](P, ["gemma3-270m"]).predict(measured)
    assert other.seconds() is None and "predicted" not in other.lines()[0]


def test_a_fine_tuning_seed_costs_its_training_steps_and_its_evaluations():
    P = load_profile("powered")
    study = {s.name: s for s in STUDIES}["finetune"]
    S = study.settings(P, None)
    measured = costs.Costs(128, {"smollm2-135m": {"eval": 1.0, "grad": 3.0, "act": 0.5, "hvp": 10.0, "load": 3.0}},
                           costs.machine())
    plan = study.plan(S, P, ["smollm2-135m"]).predict(measured)
    per_seed = 3.0 * S.n_steps() * S.batch_size * S.seqlen / 128 + 1.0 * (S.target_windows + S.source_windows) * S.seqlen / 128
    assert all(c.seconds == pytest.approx(per_seed * c.n) for c in plan.conditions)
