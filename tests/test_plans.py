"""Plans: every notebook of the schedule says what it computes (studies and esa.phases.plans), from settings
alone, and predicts seconds from measured costs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from esa import store
from esa.apps.interpret.probes import BUILDERS as PROBE_KINDS
from esa.models import micro
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
    assert by["gradient metrics seed 1337"] == 2.0 * P.validation_samples  # week 1 validates on more windows
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


def test_week9_plans_the_training_of_the_suite_members_the_cache_lacks(private_cache):
    P = load_profile("powered")
    models = [m for m in P.phase4_models if micro.is_micro(m)]
    per_step = {name: {"train": 0.01 * (i + 1)} for i, name in enumerate(micro.MICRO_SUITE)}
    measured = costs.Costs(256, {"micro": {"eval": 0.04, "grad": 0.2, "act": 0.05, "hvp": 0.9, "load": 1.0},
                                 **per_step}, costs.machine())
    plan = PLANS["phase4_week9_parameter_scaling"](P, models).predict(measured)
    train = [c for c in plan.conditions if c.kind == "train"]
    assert [c.model for c in train] == models  # an empty cache: every member is trained here
    for c in train:
        name, budget = micro.parse_ref(c.model)
        b = micro.BUDGETS[budget]
        assert c.n == micro.planned_steps(name, budget) > 0 and c.unit == "steps"
        # each step is a batch of windows at the member's own measured cost, not the family's gradient pass
        assert c.seconds > 0 and c.seconds == pytest.approx(per_step[name]["train"] * c.n * b.batch_size * b.seqlen / 256)
    assert plan.seconds() == pytest.approx(sum(c.seconds for c in plan.conditions))
    assert plan.seconds() > sum(c.seconds for c in plan.conditions if c.kind != "train")
    # weeks 10-12 read the suite week 9 trained: they never plan its training
    for week in ("phase4_week10_architecture_comparison", "phase4_week11_scaling_validation",
                 "phase4_week12_architecture_patterns"):
        assert not any(c.kind == "train" for c in PLANS[week](P, models).conditions)
    # a member the cache holds (trained by this code) is not planned again; one of another recipe is
    name, budget = micro.parse_ref(models[0])
    for key, spec in (("old", {**micro.train_recipe(name, budget), "train_version": 0}),
                      ("this", micro.train_recipe(name, budget))):
        store.write_json(private_cache / "micro" / f"{name}-{budget}-{key}" / "train.json", {"spec": spec})
    again = [c.model for c in PLANS["phase4_week9_parameter_scaling"](P, models).conditions if c.kind == "train"]
    assert again == models[1:]


def test_a_measured_training_step_is_a_cost_per_window():
    measured = costs.measure([], train=["micro-llama-33k@smoke"])
    b = micro.BUDGETS["smoke"]
    per = measured.per_window["micro-llama-33k"]["train"]
    assert per > 0 and measured.seconds("micro-llama-33k@smoke", "train", 3 * b.batch_size, b.seqlen) == \
        pytest.approx(per * 3 * b.batch_size * b.seqlen / 256)
    assert measured.seconds("micro-llama-74k@smoke", "train", 1) is None  # not measured: no guess


def test_a_dry_run_plans_each_members_training_once(private_cache_shared_text, capsys):
    from esa.runner.cli import main

    # week 7 loads the micro MoE first, week 9 the whole suite: the MoE is trained (and planned) once
    only = "phase3_week7_cross_model,phase4_week9_parameter_scaling,phase4_week10_architecture_comparison"
    assert main(["--profile", "powered", "--dry-run", "--no-deps", "--only", only]) == 0
    out = capsys.readouterr().out
    assert out.count("[micro-mixtral-176k@standard] training") == 1
    assert all(out.count(f"[{m}] training") == 1 for m in load_profile("powered").phase4_models)


def test_every_pruning_condition_pays_its_zero_shot_items_and_none_without_the_task():
    """The pruning study scores the next-line task once per condition (dense included): the plan prices it
    per item (costs kind `zeroshot`), and without a measured zero-shot cost it predicts nothing."""
    from esa.phases import phase5_pruning as pp

    P = load_profile("powered")
    per = {"eval": 1.0, "grad": 2.0, "act": 0.5, "hvp": 10.0, "load": 3.0}
    measured = costs.Costs(256, {"smollm2-135m": {**per, "zeroshot": 0.5}}, costs.machine())
    S = pp.settings(P, None)
    with_zs = pp.plan(S, P, ["smollm2-135m"]).predict(measured)
    without = pp.plan(pp.settings(P, {"zeroshot_items": 0}), P, ["smollm2-135m"]).predict(measured)
    n = len(with_zs.conditions)
    assert n == len(without.conditions) and n > 1
    assert with_zs.seconds() - without.seconds() == pytest.approx(n * S.zeroshot_items * 0.5)
    assert any("zero-shot" in note for note in with_zs.notes) and not any("zero-shot" in x for x in without.notes)
    unmeasured = pp.plan(S, P, ["smollm2-135m"]).predict(costs.Costs(256, {"smollm2-135m": per}, costs.machine()))
    assert unmeasured.seconds() is None


def test_costs_measure_every_pass_a_plan_prices_on_a_tiny_model(private_cache):
    got = costs.measure(["tiny-llama"], seqlen=32, windows=1).per_window["tiny"]
    assert set(got) == set(costs.KINDS) - {"train"}
    assert all(v > 0 for v in got.values()), got


def test_every_criterion_a_plan_serves_is_one_its_notebook_judges_in_the_record():
    """A plan's "-> criterion" names rows its notebook writes: checked against the committed record's
    scorecard, so an analysis with no criterion behind it cannot be planned as if it served one."""
    rec = Path(__file__).resolve().parents[1] / "reports" / "record"
    P = load_profile("powered")
    checked = 0
    for nb, make in PLANS.items():
        card, chunk = rec / "scorecard" / f"{nb}.json", rec / "chunks" / f"{nb}.json"
        if not card.is_file() or not chunk.is_file():
            continue
        ids = [r["id"] for r in json.loads(card.read_text())]
        served = {s for c in make(P, json.loads(chunk.read_text())["models"]).conditions for s in c.serves}
        assert all(any(i == s or i.startswith(s + ".") for i in ids) for s in served), (nb, sorted(served), ids)
        checked += 1
    assert checked >= 10  # the record's notebooks with a week plan and a scorecard


# ------------------------------------------------------------------ weeks 14 and 15: priced by the passes they run
PER = {"eval": 1.0, "grad": 3.0, "act": 0.5, "hvp": 10.0, "load": 2.0}


def _study(name: str):
    return {s.name: s for s in STUDIES}[name]


def test_a_bit_search_costs_every_flip_of_its_budget():
    """Per flip the search runs a gradient and `layer_candidates` forwards on the attack batch, then one held-out
    evaluation (esa.apps.security.bfa); per seed also the held-out baseline and the attack batch's base loss."""
    P = load_profile("powered")
    study = _study("security")
    S = study.settings(P, None)
    plan = study.plan(S, P, ["smollm2-135m"]).predict(costs.Costs(256, {"smollm2-135m": PER}, costs.machine()))
    attack = S.attack_windows * S.attack_seqlen / 256  # one pass over the attack batch, in measured windows
    held = S.heldout_windows * S.heldout_seqlen / 256
    per_flip = PER["grad"] * attack + S.layer_candidates * PER["eval"] * attack + PER["eval"] * held
    searches = [c for c in plan.conditions if c.label.startswith("bit search")]
    assert len(searches) == len(S.attack_sets) + 2 * S.guard_attack
    for c in searches:
        assert c.seconds == pytest.approx(len(S.attack_seeds) * (S.max_flips * per_flip + PER["eval"] * (held + attack)))


def test_security_and_interpret_plans_price_their_scores_and_full_maps():
    """Both read scores of the score cache, which an earlier notebook may have filled; a fresh run computes them,
    and without keep_scores a reader of the full map recomputes it once (esa.recipes.Recipe._recompute)."""
    P = load_profile("powered")
    measured = costs.Costs(256, {"smollm2-135m": PER}, costs.machine())
    windows = P.max_samples

    def scoring(name: str, profile) -> float:
        study = _study(name)
        plan = study.plan(study.settings(profile, None), profile, ["smollm2-135m"]).predict(measured)
        return sum(c.seconds for c in plan.conditions if c.unit == "calibration windows")

    held = P.security["heldout_windows"] * P.security["heldout_seqlen"] / 256  # the base held-out evaluation
    # security: grad_x_weight scored, then its full map recomputed; the load and base evaluation ride along
    assert scoring("security", P) == pytest.approx(2 * PER["grad"] * windows + PER["load"] + PER["eval"] * held)
    assert scoring("security", replace(P, keep_scores=True)) == pytest.approx(
        PER["grad"] * windows + PER["load"] + PER["eval"] * held)
    # interpret: one fused gradient pass, act_mag, Hutchinson's products, then grad_x_weight's map again
    fresh = (PER["grad"] + PER["act"] + PER["hvp"] * P.hutchinson_probes) * windows
    assert scoring("interpret", P) == pytest.approx(fresh + PER["grad"] * windows)
    assert scoring("interpret", replace(P, keep_scores=True)) == pytest.approx(fresh)


def test_a_role_test_costs_a_baseline_and_two_ablation_passes_per_weight():
    P = load_profile("powered")
    study = _study("interpret")
    S = study.settings(P, None)
    plan = study.plan(S, P, ["smollm2-135m"]).predict(costs.Costs(256, {"smollm2-135m": PER}, costs.machine()))
    (roles,) = [c for c in plan.conditions if c.serves and c.unit == "inputs"]
    weights = len(P.metrics) * S.topk_for("smollm2-135m")
    assert roles.seconds == pytest.approx(S.n_inputs * (1 + 2 * weights) * PER["eval"] * S.input_seqlen / 256)
    (direct,) = [c for c in plan.conditions if c.label.startswith("direct test")]
    # each candidate zeroed: one answer-NLL pass over every probe item
    assert direct.n == S.direct_top + S.direct_random and direct.per_unit == S.probes_per_kind * len(PROBE_KINDS)


def test_the_backdoor_study_is_priced_at_its_micro_base_models_training_steps(private_cache):
    from esa.apps.security.poison import PoisonConfig

    P = load_profile("powered")
    study = _study("security")
    S = study.settings(P, None)
    name, budget = micro.parse_ref(S.backdoor_base)

    def plan(train: float):
        measured = costs.Costs(256, {"smollm2-135m": PER, "micro": {k: v / 100 for k, v in PER.items()},
                                     name: {"train": train}}, costs.machine())
        return study.plan(S, P, ["smollm2-135m"]).predict(measured)

    one, two = plan(0.01), plan(0.02)
    (twins,) = [c for c in one.conditions if c.label.startswith("backdoor study")]
    assert (twins.model, twins.priced, twins.n) == ("smollm2-135m", S.backdoor_base, 2 * S.backdoor_pairs)
    steps = 2 * S.backdoor_pairs * S.backdoor_steps * PoisonConfig().batch * S.backdoor_seqlen / 256
    suite = micro.planned_steps(name, budget) * micro.BUDGETS[budget].batch_size * micro.BUDGETS[budget].seqlen / 256
    # an empty cache: the base is trained first (the suite's training), then every twin fine-tuned
    assert two.seconds() - one.seconds() == pytest.approx(0.01 * (steps + suite))


def test_a_dry_run_plans_the_backdoor_bases_training_once_but_its_twins_every_time(private_cache_shared_text, capsys):
    from esa.runner.cli import main

    only = "phase4_week9_parameter_scaling,phase5_week14_security"
    assert main(["--profile", "powered", "--dry-run", "--no-deps", "--only", only]) == 0
    out = capsys.readouterr().out
    base = load_profile("powered").security["backdoor_base"]
    assert out.count(f"[{base}] training") == 1 and f"backdoor base {base}: training" not in out
    assert "backdoor study on twins of" in out


def test_a_gpu_is_planned_from_flops_or_its_launch_floor_whichever_is_longer(monkeypatch) -> None:
    from esa.phases import costs

    gpu = costs.Gpu("test GPU", peak_flops=1e12, utilisation=0.5, launch_s=1e-5, kernels_per_layer=10, load_s=3.0)
    monkeypatch.setattr(costs, "_shape", lambda model: {"big": (1e9, 10), "small": (1e5, 10)}.get(model))
    plan = costs.PlannedGpu(gpu, seqlen=256)
    floor = 10 * 10 * 1e-5  # blocks x launches per block x seconds per launch
    assert plan.seconds("big", "grad", 2) == 6 * 1e9 * 512 / (1e12 * 0.5)  # FLOP-bound: 6.1 s
    assert plan.seconds("small", "grad", 2) == 2 * 3 * floor  # launch-bound: two windows of three forwards' launches
    assert plan.seconds("small", "eval", 1, seqlen=128) == floor and plan.seconds("big", "load") == 3.0
    assert plan.seconds("small", "zeroshot", 5) == 5 * gpu.item_passes * floor
    assert plan.seconds("unknown", "eval") is None  # no config to plan from: no prediction, as with no measurement


def test_the_dry_run_plans_a_gpu_on_request_and_refuses_the_flag_elsewhere(capsys) -> None:
    from esa.runner import cli

    assert cli.main(["--profile", "powered", "--only", "phase3_week5_core_perturbation", "--dry-run",
                     "--gpu-plan", "h100"]) == 0
    out = capsys.readouterr().out
    assert "costs: planned for one H100 SXM, planned from FLOPs" in out and "on the planned H100" in out
    assert cli.main(["--profile", "powered", "--gpu-plan", "h100"]) == 2
    assert "--gpu-plan h100 only applies to --dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--dry-run", "--gpu-plan", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
