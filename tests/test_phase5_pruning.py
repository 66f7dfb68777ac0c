"""Phase 5 pruning in the phases layer: the profile section, esa-runner's --prune flags (bad input refused before
any load), an end-to-end run writing its outputs, the criterion's verdicts, and bit-exact restore after
`run_model`."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest

from esa import cli
from esa.errors import EsaError
from esa.models import load
from esa.params import load_profile
from esa.perturb.apply import weights_hash
from esa.phases import command
from esa.phases import phase5_pruning as pp
from esa.stats.intervals import damage_contrast


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch, module_cache):
    """One cache for the module (tests/conftest.py; the corpus is tokenised once); each test in its tmp_path."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: bad input must be refused before it."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(command, "load_model", boom)
    monkeypatch.setattr("esa.recipes.load", boom)


def smoke(**pruning):
    base = load_profile("smoke")
    return load_profile("smoke", {"pruning": pruning}) if pruning else base


# ---------------------------------------------------------------- settings
def test_profiles_sections_validate():
    for name in ("smoke", "standard", "extended"):
        P = load_profile(name)
        S = pp.settings(P)
        assert pp.conditions(S, P)
    ext = pp.settings(load_profile("extended"))
    assert ext.reference["unstructured"] == {"dense": 5.12, "magnitude": 14.89, "sparsegpt": 6.51, "wanda": 6.42}
    assert ext.calib_windows == 128 and ext.calib_corpus == "c4" and ext.eval_corpus == "wikitext2"


@pytest.mark.parametrize("pruning, match", [
    ({"methods": ["nope"]}, "nope"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sweep": [0.0]}, "sweep"),
    ({"patterns": ["4:2"]}, "4:2"),
    ({"patterns": ["unstructured"]}, "N:M"),
    ({"calib_seeds": []}, "calib_seeds"),
    ({"calib_seeds": [1, 1]}, "duplicates"),
    ({"protect_metric": "bogus"}, "bogus"),
    ({"bogus_key": 1}, "bogus_key"),
    ({"calib_windows": "8"}, "calib_windows"),
    ({"calibration": "twice"}, "twice"),
])
def test_bad_settings_one_line(pruning, match):
    with pytest.raises(EsaError, match=match) as e:
        pp.settings(smoke(**pruning))
    assert "\n" not in str(e.value)


def test_conditions_seed_free_once_and_deduplicated():
    P = smoke(calib_seeds=[0, 1], methods=["magnitude", "wanda", "random"], sweep=[0.5], patterns=[],
              owl_methods=[], protect=False)
    conds = pp.conditions(pp.settings(P), P)
    by = pd.Series([c.spec.method for c in conds]).value_counts().to_dict()
    assert by == {"magnitude": 1, "wanda": 2, "random": 2}  # magnitude ignores the seed; 0.5 sweep = main table


# ---------------------------------------------------------------- esa-runner: bad input before any load
BASE = ["--model", "tiny-llama", "--metric", "grad_x_weight", "--topk", "5", "--max-samples", "2", "--seeds", "1337",
        "--quiet"]


@pytest.mark.parametrize("extra, match", [
    (["--prune", "wanda", "--sparsity", "1.5"], "1.5"),
    (["--prune", "wanda", "--sparsity", "0"], "(0, 1)"),
    (["--prune", "wanda", "--sparsity", "half"], "half"),
    (["--prune", "wanda", "--pattern", "4:4"], "4:4"),
    (["--prune", "wanda", "--pattern", "3:7"], "7"),  # tiny-llama's rows (32, 64 inputs) are not split in 7s
    (["--prune", "nope"], "nope"),
    (["--prune", "wanda", "--pattern", "diagonal"], "diagonal"),
    (["--prune", "wanda", "--allocation", "lumpy"], "lumpy"),
    (["--prune", "wanda", "--calibration", "twice"], "twice"),
    (["--prune", "wanda", "--sparsity", "0.99", "--protect-critical"], "protect"),
    (["--sparsity", "0.5"], "--prune"),
    (["--prune", "wanda", "--zeroshot-items", "-1"], "-1"),
    (["--prune", "wanda", "--zeroshot-items", "many"], "many"),
])
def test_cli_bad_input_one_line_before_any_load(extra, match, capsys, no_load):
    assert cli.main(BASE + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("esa-runner: error:") and match in err, err


def test_cli_uncomputable_scorer_refused_before_load(tmp_path, monkeypatch, capsys, no_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "empty"))
    assert cli.main(BASE + ["--prune", "wanda", "--corpus", "c4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prune wanda needs text from 'c4'" in err and "data-free method" in err and err.count("\n") == 0


def test_cli_hub_zeroshot_task_refused_offline_in_one_line(monkeypatch, capsys, no_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(BASE + ["--prune", "wanda", "--zeroshot-tasks", "hellaswag,arc_easy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--zeroshot-tasks: lm-eval task 'hellaswag' needs its data set" in err, err


def test_dry_run_of_the_gpu_reproduction_loads_nothing(capsys, no_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["--profile", "extended", "--prune", "wanda", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "meta-llama/Llama-2-7b-hf" in out and "14.89" in out and "6.42" in out and "c4" in out
    assert "wanda 50% unstructured row uniform seed=0 calib=sequential" in out
    assert "nothing loaded" in out
    # a bad setting is caught by the dry run too
    with pytest.raises(EsaError, match="lumpy"):
        cli.resolve(cli.build_parser().parse_args(["--profile", "extended", "--prune", "wanda", "--allocation",
                                                   "lumpy", "--dry-run"]))


# ---------------------------------------------------------------- esa-runner end to end
def test_cli_prune_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    export = tmp_path / "pruned"
    argv = BASE + ["--prune", "wanda", "--sparsity", "0.5", "--protect-critical", "--out-dir", str(out),
                   "--export-pruned", str(export)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    table = pd.read_parquet(out / "pruning.parquet")
    assert list(table["method"]) == ["dense", "wanda"] and set(table["model"]) == {"tiny-llama"}
    assert table["ppl"].iloc[1] != table["ppl"].iloc[0] and table["ppl"].map(math.isfinite).all()  # random init
    masks = pd.read_parquet(out / "pruning_masks.parquet")
    assert len(masks) and ((masks["sparsity"] - 0.5).abs() < 0.05).all() and set(masks["model"]) == {"tiny-llama"}
    summary = json.loads((out / "summary.json").read_text())["prune"]
    assert abs(summary["achieved_sparsity"] - 0.5) < 0.02 and summary["protected"]["n_protected"] > 0
    assert summary["calibration"] == "sequential"
    # zero-shot: the profile's next-line items (smoke: 2), scored by lm-eval on the dense and the pruned model
    zs = summary["zeroshot"]
    assert zs["engine"].startswith("lm-eval 0.4") and zs["task"]["n_items"] == 2
    assert zs["zs_items"] == {"dense": 2, "pruned": 2} and set(zs["zs_accuracy"]) == {"dense", "pruned"}
    assert list(table["zs_accuracy"].map(lambda a: a in (0.0, 0.5, 1.0))) == [True, True]
    assert "zero-shot next_line (lm-eval 0.4" in capsys.readouterr().out
    assert (export / "pruning.json").is_file() and (export / "config.json").is_file()
    manifest = json.loads((out / cli.MANIFEST).read_text())
    assert {"pruning.parquet", "pruning_masks.parquet", "pruning.json"} <= set(manifest["files"])


def test_cli_nm_pattern_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(BASE + ["--prune", "magnitude", "--pattern", "2:4", "--out-dir", str(out)]) == 0, \
        capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())["prune"]
    assert s["spec"]["pattern"] == "2:4" and abs(s["achieved_sparsity"] - 0.5) < 1e-9 and s["calibration"] == "none"


# ---------------------------------------------------------------- the criterion's verdicts
def _damage(gains: list[float], db: list[float]) -> list[float]:
    return [(1 - g) * d for g, d in zip(gains, db, strict=True)]  # the method's damage at gain 1 - dm/db = g


@pytest.mark.parametrize("dm, db, kw, verdict", [
    (_damage([0.30, 0.32, 0.31], [1.0] * 3), [1.0] * 3, {}, "PASS"),
    (_damage([0.02, 0.05, 0.03], [1.0] * 3), [1.0] * 3, {}, "FAIL"),
    (_damage([-0.5, -0.4, -0.45], [1.0] * 3), [1.0] * 3, {}, "FAIL"),  # worse than the baseline
    (_damage([0.0, 0.3, 0.6], [1.0] * 3), [1.0] * 3, {}, "underpowered"),  # the bounds straddle 0.15
    ([0.6], [1.0], {}, "underpowered"),  # one seed: no bound
    # a baseline doing ~no damage decides the claim (no method is 15% better than no damage): never 'noise'
    ([0.01, 0.011, 0.012], [0.001, 0.0011, 0.0009], {}, "FAIL"),
    ([math.nan, 0.6], [1.0, 1.0], {}, "not estimable"),
    ([], [], {}, "not estimable"),
    (_damage([0.30, 0.32, 0.31], [1.0] * 3), [1.0] * 3, {"machinery_only": True}, "machinery-only"),
])
def test_damage_contrast(dm, db, kw, verdict):
    v = damage_contrast(dm, db, 0.15, 0.01, **kw)
    assert v.verdict == verdict, v
    assert (v.passed is not None) == (verdict in ("PASS", "FAIL"))


def _table(gains_by_seed: dict[int, float], base_lp: float = 3.0, dense_lp: float = 2.0) -> pd.DataFrame:
    common = {"model": "m", "pattern": "unstructured", "group": "row", "allocation": "uniform", "protected": "none",
              "sparsity": 0.5, "accuracy": 0.1, "achieved_sparsity": 0.5}
    rows = [{**common, "method": "dense", "sparsity": 0.0, "pattern": "dense", "allocation": "none", "calib_mode": "none",
             "calib_seed": -1, "log_ppl": dense_lp},
            {**common, "method": "magnitude", "calib_mode": "none", "calib_seed": 0, "log_ppl": base_lp}]
    for seed, g in gains_by_seed.items():  # log_ppl so that 1 - dm/db = g
        rows.append({**common, "method": "obd", "calib_mode": "one-shot", "calib_seed": seed,
                     "log_ppl": dense_lp + (1 - g) * (base_lp - dense_lp)})
    return pd.DataFrame(rows)


def test_criterion_rows_from_a_constructed_table():
    S = pp.Settings(methods=["magnitude", "obd"], esa_methods=["obd"], protect=False)
    rows, detail = pp.criterion_rows(_table({0: 0.40, 1: 0.42, 2: 0.41}), S, "test")
    main = [r for r in rows if r.id.endswith("vs_magnitude.m")][0]
    assert main.verdict == "PASS" and abs(main.measured - (0.85 - 0.59)) < 1e-6  # D = 0.85 Δmag − Δobd, Δmag = 1
    assert sorted(detail["calib_seed"]) == [0, 1, 2]
    assert {r.verdict for r in rows if "vs_wanda" in r.id} == {"not estimable"}  # wanda was not run
    rows, _ = pp.criterion_rows(_table({0: 0.05, 1: 0.06, 2: 0.04}), S, "test")
    assert [r for r in rows if r.id.endswith("vs_magnitude.m")][0].verdict == "FAIL"
    rows, _ = pp.criterion_rows(_table({0: 0.4}), S, "test")  # one seed: no bound
    assert [r for r in rows if r.id.endswith("vs_magnitude.m")][0].verdict == "underpowered"


# ---------------------------------------------------------------- the notebook-level function
def test_run_model_restores_bit_exactly_and_builds_tables():
    lm = load("tiny-llama")
    before = weights_hash(lm.model)
    P = load_profile("smoke", {"seqlen": 32, "max_samples": 2, "seeds": [1337], "topk": 3, "eval_windows": 2,
                               "pruning": {"methods": ["magnitude", "wanda", "sparsegpt", "obd"], "sweep": [0.3],
                                           "sweep_methods": ["magnitude"], "patterns": ["2:4"],
                                           "pattern_methods": ["wanda"], "owl_methods": ["wanda"],
                                           "protect_methods": ["obd"], "calib_seeds": [0, 1], "calib_windows": 2,
                                           "calib_seqlen": 32, "eval_windows": 2, "eval_seqlen": 32,
                                           "zeroshot_items": 4, "superweights": False, "esa_methods": ["obd"]}})
    S = pp.settings(P)
    mp = pp.run_model("tiny-llama", P, S, lm=lm)
    assert mp.restored and weights_hash(lm.model) == before
    main = mp.tables["main"]
    assert set(main["method"]) == {"dense", "magnitude", "wanda", "sparsegpt", "obd"}
    assert main.set_index("method").loc["wanda", "n_seeds"] == 2 and main.set_index("method").loc["magnitude", "n_seeds"] == 1
    assert (main["zs_chance"] == 0.25).all() and mp.critical["n_protected"] > 0
    assert set(mp.tables["owl"]["allocation"]) >= {"uniform", "owl"}
    assert "2:4" in set(mp.tables["patterns"]["pattern"])
    prot = mp.tables["protection"]
    assert set(prot[prot["method"] == "obd"]["protected"]) == {"none", mp.critical["label"]}
    rows, detail = pp.criterion_rows(mp.rows, replace(S, machinery_only=True), "t")
    assert rows and all(r.verdict in ("machinery-only", "not estimable") for r in rows)
    plan = pp.plan(S, P, ["tiny-llama"])
    text = pp.findings({"tiny-llama": mp}, plan)
    assert len(text) == 1 and text[0].startswith("**tiny-llama** has a dense perplexity of")


def test_sequential_run_decides_the_criterion_on_fewer_windows_and_restores():
    lm = load("tiny-llama")
    before = weights_hash(lm.model)
    section = {"methods": ["magnitude", "obd"], "sweep": [0.3], "sweep_methods": ["magnitude"], "patterns": [],
               "owl_methods": [], "protect": False, "calib_seeds": [0, 1], "calib_windows": 2, "calib_seqlen": 32,
               "eval_windows": 16, "eval_seqlen": 32, "zeroshot_items": 0, "superweights": False,
               "esa_methods": ["obd"], "machinery_only": False}
    P = load_profile("smoke", {"seqlen": 32, "max_samples": 2, "seeds": [1337], "topk": 3, "eval_windows": 16,
                               "pruning": section, "sequential": {"first_windows": 2}})
    S = pp.settings(P)
    mp = pp.run_model("tiny-llama", P, S, lm=lm)
    assert mp.restored and weights_hash(lm.model) == before
    d = mp.decisions.set_index("comparison")
    assert list(d.index) == ["obd.vs_magnitude"] and d.loc["obd.vs_magnitude", "n_seeds"] == 2
    rows = mp.rows.set_index(["method", "sparsity", "calib_seed"])
    # what was not compared is measured on the first look's windows; dense on as many as any condition
    assert rows.loc[("magnitude", 0.3, 0), "eval_windows"] == 2
    assert rows["eval_windows"].max() == rows.loc[("dense", 0.0, -1), "eval_windows"] <= 16
    crit, _ = pp.criterion_rows(mp.rows, S, "t", mp.decisions.assign(model="tiny-llama"))
    main = [c for c in crit if c.id == "P5.prune_gain.obd.vs_magnitude.tiny-llama"][0]
    assert main.verdict in ("PASS", "FAIL", "underpowered") and "sequential: D =" in main.note
    # the numbers on the windows both saw equal the fixed-n run's (window order is one fixed prefix)
    fixed = pp.run_model("tiny-llama", P.__class__(**{**P.as_dict(), "sequential": {}}), S, lm=lm)
    n = int(rows.loc[("magnitude", 0.3, 0), "eval_windows"])
    assert fixed.rows["eval_windows"].min() == 16 and n < 16
