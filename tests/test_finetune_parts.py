"""Fine-tuning's seed parts (esa.phases.phase5_training: one record part per seed of a model, esa.phases.parts) on
tiny-llama: a seed read from its part and a seed computed in the chunk combine into the grid of every seed run
in one go, number for number (criteria and findings too); a bad unit, and a part of other settings, are
refused in one line before any work; the chunk reads a recorded seed part; the powered seed parts fit 2 h."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_parts import RECORD_COSTS, _project
from test_runner_run import run_all

from esa.apps.training.grid import Result
from esa.errors import EsaError
from esa.params import load_profile
from esa.phases import costs, parts
from esa.phases import phase5_training as ft

pytestmark = pytest.mark.usefixtures("private_cache_shared_text", "one_thread")

NB = ft.NOTEBOOK
SECTION = {"steps": 2, "seqlen": 32, "densities": [0.3], "target_windows": 2, "source_windows": 2,
           "train_windows": 8, "seeds": [1, 2], "controls": ["random_k"], "baselines": ["lora", "full"],
           "protections": ["none", "freeze", "ewc"], "protect_method": "full"}
PROFILE = {"name": "smoke", "models": ["tiny-llama"], "seeds": [1, 2], "max_samples": 2, "seqlen": 32,
           "finetune": SECTION}
TIMING = ("seconds", "seconds_per_step")  # wall time: differs run to run by nature


def _tables_equal(a: Result, b: Result) -> None:
    for name in ("final", "steps", "evals", "drift"):
        x, y = getattr(a, name), getattr(b, name)
        pd.testing.assert_frame_equal(x.drop(columns=[c for c in TIMING if c in x]),
                                      y.drop(columns=[c for c in TIMING if c in y]), check_exact=True, obj=name)


def test_a_seed_from_its_part_and_a_computed_seed_equal_every_seed_in_one_go(tmp_path: Path) -> None:
    P = load_profile("smoke", PROFILE)
    S = ft.settings(P)
    plan = ft.plan(S, P, ["tiny-llama"])
    assert ft.part_units(P, ["tiny-llama"]) == ["tiny-llama@seed1", "tiny-llama@seed2"]
    whole = Result("tiny-llama", **parts.roundtrip(ft.as_result(ft.run_grid("tiny-llama", P, S))))
    assert whole.weights_restored and sorted(set(whole.final["seed"])) == [1, 2]

    spec = parts.specs()[NB]
    unit = "tiny-llama@seed1"
    parts.write(parts.folder(tmp_path, NB, unit), spec.compute(P, unit),
                {"notebook": NB, "unit": unit, "settings": spec.settings(P, unit)})
    results, origins = ft.run_parts(tmp_path, plan)
    assert origins[unit]["from"] == "part" and origins["tiny-llama@seed2"] == {"from": "computed in this chunk"}
    split = results["tiny-llama"]
    assert list(split.final["seed"]) == list(whole.final["seed"])  # stacked seed by seed, as one grid runs them
    _tables_equal(split, whole)
    assert split.data == whole.data and split.settings == whole.settings and split.weights_restored
    assert [c.as_dict() for c in ft.criteria(results, plan, "e")] == \
        [c.as_dict() for c in ft.criteria({"tiny-llama": whole}, plan, "e")]
    assert ft.findings(results, plan) == ft.findings({"tiny-llama": whole}, plan)


def test_seed_parts_that_disagree_on_their_data_are_refused() -> None:
    one = {"settings": {"a": 1}, "data": {"seeds": [1], "n_studied": 10}, "seconds": 1.0, "weights_restored": True,
           **{t: pd.DataFrame() for t in ("final", "steps", "evals", "drift")}}
    other = {**one, "data": {"seeds": [2], "n_studied": 11}}
    assert ft.combine("m", [1, 2], [one, {**one, "data": {"seeds": [2], "n_studied": 10}}]).data["seeds"] == [1, 2]
    with pytest.raises(EsaError, match=r"seed 2 of m was run on other settings or data than seed 1 \(data/n_studied: "
                       r"10 != 11"):
        ft.combine("m", [1, 2], [one, other])
    with pytest.raises(EsaError, match="settings/a: 1 != 2"):
        ft.combine("m", [1, 2], [one, {**one, "settings": {"a": 2}}])


def test_seeds_recorded_on_two_cpus_combine_when_only_a_measured_float_differs_in_its_last_digits() -> None:
    """The tracked super weight's activation read 496.92926 on one CPU and 496.92899 on another (the record's
    seeds 1337 and 999): the same weight, so the same data; a different weight, or a float off by more than
    MEASURED_RTOL, is refused."""
    def seed(s: int, out_max: float, row: int = 507) -> dict:
        tracked = [{"param": "model.layers.2.mlp.down_proj.weight", "row": row, "col": 90, "out_max": out_max,
                    "weight": 5.09375, "flagged": True}]
        return {"settings": {"lr": 1e-4}, "data": {"seeds": [s], "tracked": tracked, "note": float("nan")},
                "seconds": 1.0, "weights_restored": True, **{t: pd.DataFrame() for t in ("final", "steps", "evals", "drift")}}

    got = ft.combine("m", [1, 2], [seed(1, 496.92926025390625), seed(2, 496.9289855957031)])
    assert got.data["seeds"] == [1, 2] and got.data["tracked"][0]["out_max"] == 496.92926025390625
    with pytest.raises(EsaError, match=r"data/tracked\[0\]/row: 507 != 508"):
        ft.combine("m", [1, 2], [seed(1, 496.9), seed(2, 496.9, row=508)])
    with pytest.raises(EsaError, match="out_max"):
        ft.combine("m", [1, 2], [seed(1, 496.9), seed(2, 496.9 * (1 + 10 * ft.MEASURED_RTOL))])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = _project(tmp_path / "proj", NB, PROFILE, "profile")
    schedule = root / "params" / "schedule.yaml"
    (entry,) = yaml.safe_load(schedule.read_text())["notebooks"]
    schedule.write_text(yaml.safe_dump({"notebooks": [{**entry, "study": "finetune"}]}))  # its plan: the study's
    return root


def test_a_bad_unit_is_refused_in_one_line_naming_the_seed_parts(project: Path, capsys) -> None:
    for bad in ("tiny-llama@1", "tiny-llama", "tiny-llama@seed3", "tiny-qwen2@seed1"):
        rc, err = run_all(project, "--only", NB, "--record", "--part", bad, capsys=capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"has no part '{bad}' under profile smoke; its parts, one per seed (PART=<model>@seed<N>): " \
               "tiny-llama@seed1, tiny-llama@seed2" in err
    assert not (project / "reports" / "record").exists()


def test_a_seed_part_is_read_by_the_chunk_and_refused_once_the_settings_move(project: Path, capsys) -> None:
    rc, err = run_all(project, "--only", NB, "--record", "--part", "tiny-llama@seed2", capsys=capsys)
    assert rc == 0, err
    part = project / "reports" / "record" / "parts" / NB / "tiny-llama_seed2"
    made = json.loads((part / "part.json").read_text())
    assert made["unit"] == "tiny-llama@seed2" and made["settings"]["seed"] == 2
    assert made["settings"]["finetune.steps"] == 2 and "finetune.seeds" not in made["settings"]
    assert sorted(made["files"]) == ["drift.parquet", "evals.parquet", "final.parquet", "result.json", "steps.parquet"]

    rc, _ = run_all(project, "--only", NB, "--dry-run")
    out = capsys.readouterr().out
    assert rc == 0 and "parts: one per seed (make record CHUNK=phase5_week13_finetune PART=<model>@seed<N>" in out
    assert "tiny-llama@seed1: predicted" in out and "tiny-llama@seed2: predicted" in out
    assert "the chunk reads it" in out and "the full chunk computes tiny-llama@seed1 and reads 1 committed part" in out

    assert run_all(project, "--only", NB, "--record")[0] == 0
    rec = project / "reports" / "record"
    chunk = json.loads((rec / "chunks" / f"{NB}.json").read_text())
    assert chunk["parts"]["tiny-llama@seed2"]["digest"] == made["digest"]
    assert chunk["parts"]["tiny-llama@seed1"] == {"from": "computed in this chunk"}
    final = pd.read_parquet(rec / "data" / NB / "final_tiny-llama.parquet")
    assert list(dict.fromkeys(final["seed"])) == [1, 2]  # every seed, judged together
    pd.testing.assert_frame_equal(final[final.seed == 2].reset_index(drop=True),
                                  pd.read_parquet(part / "final.parquet"), check_exact=True)
    rows = json.loads((rec / "scorecard" / f"{NB}.json").read_text())
    assert any(r["id"].startswith("P5.ft.sparse_vs_random") for r in rows)
    assert "tiny-llama@seed2 from its committed part" in (rec / "html" / f"{NB}.nocode.html").read_text()

    path = project / "params" / "profiles" / "smoke.yaml"
    path.write_text(yaml.safe_dump({**PROFILE, "finetune": {**SECTION, "steps": 3}}))  # the profile moved on
    capsys.readouterr()  # the chunk's own log
    rc, err = run_all(project, "--only", NB, "--record", capsys=capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "part tiny-llama@seed2 of phase5_week13_finetune was recorded with other settings" in err
    assert "finetune.steps = 2, this run expects 3" in err and "PART=tiny-llama@seed2" in err


def test_powered_seed_parts_fit_two_hours() -> None:
    """At the record machine's measured costs, each seed part of the powered fine-tuning predicts a third of
    the notebook's grid, well under 2 h, where the whole chunk does not fit."""
    P = load_profile("powered")
    plan = ft.plan(ft.settings(P), P, None).predict(costs.Costs(256, RECORD_COSTS, {}))
    spec = parts.specs()[NB]
    units = spec.units(P, P.models)
    assert units == [ft.unit(m, s) for m in P.models for s in ft.seeds_of(ft.settings(P), P)] and len(units) >= 3
    each = {u: spec.seconds(plan, u) for u in units}
    assert all(s is not None and s <= 3600 for s in each.values()), each
    assert sum(each.values()) == pytest.approx(plan.seconds())  # type: ignore[arg-type]
    assert plan.seconds() > 6600  # type: ignore[operator] - why the notebook needs parts
