"""Per-model parts of the judged record (esa.phases.parts, esa.runner.record.run_part) on tiny models: a part is
recorded and read by its notebook's chunk, a damaged part or one of other settings is refused in one line,
an interrupted part leaves nothing, and the powered plans fit the record's 2-hour chunks."""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_runner_run import REPO, run_all

from esa.errors import EsaError
from esa.params import load_profile
from esa.phases import parts, phase3, plans
from esa.runner import record

pytestmark = pytest.mark.usefixtures("private_cache_shared_text")

NB = "phase3_week7_cross_model"
PROFILE = {"name": "smoke", "models": ["tiny-llama"], "cross_model_extra": ["tiny-qwen2"], "seeds": [1, 2],
           "max_samples": 2, "seqlen": 32, "eval_windows": 2, "perturb_eval_windows": 2, "sequential": {},
           "controls": ["random_k", "bottom_k"], "zero_alone_windows": {"tiny-qwen2": 1}}


def _project(root: Path, nb: str, profile: dict, models: str) -> Path:
    """A project holding one of the repository's notebooks, scheduled alone, under a tiny profile."""
    (root / "params" / "profiles").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "params" / "profiles" / "smoke.yaml").write_text(yaml.safe_dump(profile))
    entry = {"id": nb, "phase": 3, "week": 7, "title": nb, "models": models, "depends_on": []}
    (root / "params" / "schedule.yaml").write_text(yaml.safe_dump({"notebooks": [entry]}))
    shutil.copy(REPO / "notebooks" / f"{nb}.py", root / "notebooks" / f"{nb}.py")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return _project(tmp_path / "proj", NB, PROFILE, "profile")


def _part(root: Path, model: str = "tiny-qwen2") -> Path:
    return root / "reports" / "record" / "parts" / NB / model


def _profile(root: Path, monkeypatch) -> object:
    monkeypatch.setenv("ESA_PARAMS_DIR", str(root / "params"))
    return load_profile("smoke")


def test_a_part_is_recorded_then_read_by_its_chunk(project: Path, capsys, monkeypatch) -> None:
    rc, err = run_all(project, "--only", NB, "--record", "--part", "tiny-qwen2", capsys=capsys)
    assert rc == 0, err
    made = json.loads((_part(project) / "part.json").read_text())
    assert {"commit", "code_hash", "profile", "settings", "machine", "seconds", "files", "digest"} <= set(made)
    assert made["settings"]["zero_alone_windows"] == 1 and made["settings"]["windows"] == 2
    assert sorted(made["files"]) == ["result.json", "table.parquet", "zero_alone.parquet"]
    assert not (project / "reports" / "record" / "chunks").exists()  # a part is no chunk

    rc, _ = run_all(project, "--only", NB, "--dry-run")
    out = capsys.readouterr().out
    assert rc == 0 and "tiny-qwen2: predicted" in out and "the chunk reads it" in out
    assert "the full chunk computes tiny-llama and reads 1 committed part(s)" in out

    assert run_all(project, "--only", NB, "--record")[0] == 0
    rec = project / "reports" / "record"
    chunk = json.loads((rec / "chunks" / f"{NB}.json").read_text())
    assert chunk["parts"]["tiny-qwen2"]["from"] == "part" and chunk["parts"]["tiny-qwen2"]["digest"] == made["digest"]
    assert chunk["parts"]["tiny-llama"] == {"from": "computed in this chunk"}
    manifest = json.loads((rec / "manifest.json").read_text())
    assert manifest["parts"][NB]["tiny-qwen2"]["digest"] == made["digest"]
    assert any(f"{NB} part tiny-qwen2" in x for made_at in manifest["code_versions"].values() for x in made_at)
    # the chunk's rows of the part's model are the part's, number for number
    table = pd.read_parquet(rec / "data" / NB / "cross_model.parquet")
    pd.testing.assert_frame_equal(table[table.model == "tiny-qwen2"].reset_index(drop=True),
                                  pd.read_parquet(_part(project) / "table.parquet"), check_exact=True)
    alone = pd.read_parquet(rec / "data" / NB / "zero_alone.parquet")
    assert set(alone[alone.model == "tiny-qwen2"]["windows"]) == {1} and set(alone[alone.model == "tiny-llama"]["windows"]) == {2}
    page = (rec / "html" / f"{NB}.nocode.html").read_text()
    assert "tiny-qwen2 from its committed part (commit" in page and "Computed on this page: tiny-llama" in page
    index = (rec / "index.html").read_text()  # the part's own time counts in the record's compute
    assert f"Committed parts (1, {made['seconds']:.1f} s):</b> {NB} tiny-qwen2" in index and "read by its chunk" in index

    # a part recorded after a chunk adds a piece to the record: README's block (which counts code versions) follows
    (project / "README.md").write_text("# p\n\n<!-- record:begin -->\nstale\n<!-- record:end -->\n")
    assert run_all(project, "--only", NB, "--record", "--part", "tiny-qwen2")[0] == 0
    assert record.readme_block(project) in (project / "README.md").read_text()


def test_week2_chunk_reads_a_part_and_saves_the_top_k_only_of_what_it_computed(tmp_path: Path) -> None:
    week2 = "phase2_week2_cross_model"
    profile = {"name": "smoke", "models": ["tiny-llama"], "several_models": ["tiny-llama", "tiny-qwen2"],
               "metrics": ["grad_x_weight", "grad_squared"], "several_metrics": ["grad_x_weight"], "seeds": [1, 2],
               "max_samples": 2, "seqlen": 32}
    root = _project(tmp_path / "w2", week2, profile, "several")
    assert run_all(root, "--only", week2, "--record", "--part", "tiny-qwen2")[0] == 0
    assert run_all(root, "--only", week2, "--record")[0] == 0
    rec = root / "reports" / "record"
    assert json.loads((rec / "chunks" / f"{week2}.json").read_text())["parts"]["tiny-qwen2"]["from"] == "part"
    data = rec / "data" / week2
    assert (data / "topk_tiny-llama.parquet").is_file() and not (data / "topk_tiny-qwen2.parquet").exists()
    tails = pd.read_parquet(data / "tails.parquet")
    assert set(tails[tails.model == "tiny-qwen2"]["metric"]) == {"grad_x_weight"}
    rows = json.loads((rec / "scorecard" / f"{week2}.json").read_text())
    assert any(r["id"].endswith(".tiny-qwen2") for r in rows)
    assert "grad_squared runs on tiny-llama only" in (rec / "html" / f"{week2}.nocode.html").read_text()  # the plan's note


def test_verify_record_recomputes_a_committed_part(project: Path, capsys, monkeypatch) -> None:
    assert run_all(project, "--only", NB, "--record", "--part", "tiny-qwen2")[0] == 0
    rc, err = run_all(project, "--verify-record", NB, "--part", "tiny-qwen2")
    assert rc == 0 and "part tiny-qwen2 of phase3_week7_cross_model: numbers equal" in capsys.readouterr().out
    # a recomputation that differs in one number is found (the part itself is intact)
    real = parts.spec(NB)

    def shifted(P, unit):
        out = real.compute(P, unit)
        out["table"] = out["table"].assign(ppl=out["table"]["ppl"] * (1 + 1e-12)) if "ppl" in out["table"] else \
            out["table"].iloc[1:]
        return out

    monkeypatch.setattr(parts, "spec", lambda nb: replace(real, compute=shifted) if nb == NB else None)
    rc, err = run_all(project, "--verify-record", NB, "--part", "tiny-qwen2", capsys=capsys)
    assert rc == 1 and "table.parquet" in err
    assert not (project / "reports" / "record-verify").exists()  # the scratch folder is gone
    monkeypatch.undo()
    rc, err = run_all(project, "--verify-record", NB, "--part", "tiny-llama", capsys=capsys)
    assert rc == 2 and "no part 'tiny-llama'" in err and "tiny-qwen2" in err


def test_a_damaged_part_is_refused_in_one_line_and_never_read(project: Path, capsys, monkeypatch) -> None:
    assert run_all(project, "--only", NB, "--record", "--part", "tiny-qwen2")[0] == 0
    table = _part(project) / "table.parquet"
    raw = bytearray(table.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # same size, one bit
    table.write_bytes(bytes(raw))
    rc, err = run_all(project, "--only", NB, "--record", capsys=capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "part tiny-qwen2 of phase3_week7_cross_model is damaged (table.parquet" in err and "git checkout" in err
    assert not (project / "reports" / "record" / "chunks").exists()
    # the notebook's own loop refuses it too (a part damaged after the chunk's check)
    P = _profile(project, monkeypatch)
    with pytest.raises(EsaError, match="is damaged"):
        parts.per_unit(project / "reports" / "record", NB, P, ["tiny-qwen2"])


def test_a_part_of_other_settings_is_refused_with_the_value_and_what_was_expected(project: Path, capsys,
                                                                                  monkeypatch) -> None:
    assert run_all(project, "--only", NB, "--record", "--part", "tiny-qwen2")[0] == 0
    path = project / "params" / "profiles" / "smoke.yaml"
    path.write_text(yaml.safe_dump({**PROFILE, "zero_alone_windows": {"tiny-qwen2": 2}}))  # the profile moved on
    rc, err = run_all(project, "--only", NB, "--record", capsys=capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "part tiny-qwen2 of phase3_week7_cross_model was recorded with other settings" in err
    assert "zero_alone_windows = 1, this run expects 2" in err and "PART=tiny-qwen2" in err
    rc, _ = run_all(project, "--only", NB, "--dry-run")
    assert "refused: part tiny-qwen2" in capsys.readouterr().out
    P = _profile(project, monkeypatch)
    with pytest.raises(EsaError, match="other settings"):
        parts.per_unit(project / "reports" / "record", NB, P, ["tiny-qwen2"])


def test_an_interrupted_part_leaves_nothing_and_keeps_the_part_it_would_replace(project: Path, monkeypatch) -> None:
    spec = parts.specs()[NB]

    def boom(P, model):
        raise RuntimeError("killed while computing")

    with parts.SPECS.patched(replace(spec, compute=boom)), pytest.raises(RuntimeError, match="killed"):
        run_all(project, "--only", NB, "--record", "--part", "tiny-qwen2")
    assert not (project / "reports" / "record" / "parts" / NB).exists() or not any(
        (project / "reports" / "record" / "parts" / NB).iterdir())

    assert run_all(project, "--only", NB, "--record", "--part", "tiny-qwen2")[0] == 0
    before = {p.name: p.read_bytes() for p in _part(project).iterdir()}
    real = parts.write_json

    def last_write_fails(path, obj):  # part.json is written last: everything before it is done
        if Path(path).name == parts.PART_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(parts, "write_json", last_write_fails)
    assert run_all(project, "--only", NB, "--record", "--part", "tiny-qwen2")[0] == 1
    assert {p.name: p.read_bytes() for p in _part(project).iterdir()} == before  # the old part, untouched
    assert sorted(p.name for p in _part(project).parent.iterdir()) == ["tiny-qwen2"]  # no staging left


def test_part_refusals_before_any_work(project: Path, capsys) -> None:
    rc, err = run_all(project, "--only", NB, "--record", "--part", "tiny-gptneox", capsys=capsys)
    assert rc == 2 and "has no part 'tiny-gptneox'" in err and "one per model (PART=<model>): tiny-llama, tiny-qwen2" in err
    rc, err = run_all(project, "--only", NB, "--part", "tiny-qwen2", capsys=capsys)
    assert rc == 2 and "--part only applies to --record" in err
    assert not (project / "reports" / "record").exists()


def test_a_computed_model_reads_as_a_stored_one(tmp_path: Path) -> None:
    """roundtrip is what a part's write then read gives (tables and values), except transient entries."""
    result = {"table": pd.DataFrame({"a": [1, 2], "b": [0.5, float("inf")], "c": ["x", None]}),
              "stats": {"n": 3, "ratio": float("nan"), "pairs": (1, 2)}, "family": "llama",
              "big": pd.DataFrame({"z": range(5)})}
    path = parts.write(tmp_path / "p", result, {"notebook": "nb", "model": "m", "settings": {}}, ("big",))
    assert not (path / "big.parquet").exists()
    back, same = parts.read(path), parts.roundtrip(result, ("big",))
    pd.testing.assert_frame_equal(back["table"], same["table"], check_exact=True)
    assert json.dumps(back["stats"]) == json.dumps(same["stats"]) and back["family"] == same["family"] == "llama"
    assert same["big"] is result["big"] and parts.problem(path, {}) is None


def test_week2_part_keeps_the_tables_not_the_scores(tmp_path: Path) -> None:
    from esa.phases import phase2

    P = load_profile("smoke", {"models": ["tiny-llama"], "metrics": ["grad_x_weight", "grad_squared"], "seeds": [1, 2],
                               "max_samples": 2, "seqlen": 32, "several_metrics": ["grad_x_weight"]})
    assert plans.week2_metrics(P, "tiny-llama") == ["grad_x_weight", "grad_squared"]
    assert plans.week2_metrics(P, "tiny-qwen2") == ["grad_x_weight"]  # a model week 2 adds
    r = phase2.cross_model_one(P, "tiny-qwen2")
    assert set(r["tails"]["metric"]) == {"grad_x_weight"} and len(r["topk"]) > 0
    assert {"stability", "agreement", "top_weights", "survival", "info"} <= set(r)
    spec = parts.specs()["phase2_week2_cross_model"]
    path = parts.write(tmp_path / "part", r, {"notebook": spec.notebook, "model": "tiny-qwen2"}, spec.transient)
    assert not (path / "topk.parquet").exists() and "topk" not in parts.read(path)  # too large to commit
    assert (path / "stability.parquet").is_file() and parts.read(path)["info"]["family"] == r["info"]["family"]
    settings = phase2.cross_model_settings(P, "tiny-qwen2")
    assert settings["metrics"] == ["grad_x_weight"] and settings["hutchinson_probes"] is None


def test_a_pruning_part_gives_the_criteria_and_findings_of_the_model_itself() -> None:
    from esa.phases import phase5_pruning as pp

    P = load_profile("smoke", {"models": ["tiny-llama"], "seqlen": 32, "max_samples": 2})
    S = pp.settings(P, None)
    plan = pp.plan(S, P, ["tiny-llama"])
    direct = pp.run_model("tiny-llama", P, S)
    stored = pp.from_result("tiny-llama", parts.roundtrip(pp.as_result(direct)))
    assert [c.as_dict() for c in pp.criteria({"tiny-llama": stored}, plan, "e")] == \
        [c.as_dict() for c in pp.criteria({"tiny-llama": direct}, plan, "e")]
    assert pp.findings({"tiny-llama": stored}, plan) == pp.findings({"tiny-llama": direct}, plan)
    assert parts.specs()[pp.NOTEBOOK].settings(P, "tiny-llama")["pruning"]["methods"] == S.methods


def test_zero_alone_on_fewer_windows_evaluates_its_own_baseline(monkeypatch) -> None:
    P = load_profile("smoke", {"zero_alone_windows": {"tiny-llama": 1}, "perturb_eval_windows": 2})
    assert plans.zero_alone_windows(P, "tiny-llama") == 1 and plans.zero_alone_windows(P, "other") is None
    for bad in (0, 3, "1"):
        Q = load_profile("smoke", {"zero_alone_windows": {"tiny-llama": bad}, "perturb_eval_windows": 2})
        with pytest.raises(EsaError, match="zero_alone_windows.tiny-llama"):
            plans.zero_alone_windows(Q, "tiny-llama")
    assert "the first 1 (256 tokens)" in plans.zero_alone_note(P, ["tiny-llama", "other"])


# seconds per 256-token window on the record's machine (2 shared cores, AMD EPYC; make costs, 2026-12-04);
# `zeroshot` is seconds per next-line item (2026-12-05, idle cores): 64 items through
# esa.zeroshot.zero_shot_columns took 35.7 s on SmolLM2 and 76.8 s on Gemma; Qwen's 2.06 s is the ~2.2 min
# per condition that py-spy showed in its committed pruning part
RECORD_COSTS = {"smollm2-135m": {"eval": 4.70, "grad": 2.34, "act": 0.644, "hvp": 6.94, "load": 2.54, "zeroshot": 0.558},
                "gemma3-270m": {"eval": 2.80, "grad": 24.7, "act": 11.1, "hvp": 71.6, "load": 36.5, "zeroshot": 1.20},
                "qwen2.5-coder-0.5b": {"eval": 11.2, "grad": 32.3, "act": 15.5, "hvp": 73.9, "load": 46.0,
                                       "zeroshot": 2.06},
                "micro": {"eval": 0.038, "grad": 0.198, "act": 0.049, "hvp": 0.868, "load": 45.2},
                # week 7 trains its micro MoE where no cache holds it (costs kind `train`, measured 2026-12-05)
                "micro-mixtral-176k": {"train": 0.0354}}


def test_powered_record_chunks_and_parts_fit_two_hours() -> None:
    """At the record machine's measured costs, every part of weeks 2 and 7 and each chunk with its big models as
    parts predicts at most 2 h; week 2 adds no Hutchinson rows, week 7 keeps 20 controls per zero-alone rank."""
    from esa.phases import costs
    from esa.phases import phase5_pruning as pp
    from esa.phases.plans import PLANS
    from esa.runner import schedule

    measured = costs.Costs(256, RECORD_COSTS, {})
    P = load_profile("powered")
    big = ["gemma3-270m", "qwen2.5-coder-0.5b"]
    for nb in ("phase2_week2_cross_model", NB, pp.NOTEBOOK):
        models = schedule.resolve_models(next(e for e in schedule.entries() if e.id == nb), P, None)
        S = pp.settings(P, None)
        plan = (PLANS[nb](P, models) if nb in PLANS else pp.plan(S, P, None)).predict(measured)
        each = parts.specs()[nb].units(P, models)
        assert set(each) >= {"smollm2-135m", *big}
        # pruning scores its zero-shot task on all 49 of Qwen's conditions: that part is over (169 min when
        # recorded), and the dry run says so rather than hiding it
        over = {"qwen2.5-coder-0.5b"} if nb == pp.NOTEBOOK else set()
        assert {m for m in each if plan.seconds(m) > 7200} == over, {m: plan.seconds(m) for m in each}
        lines = parts.plan_lines(plan, nb, P, models, "/nonexistent")
        assert {m for m in each if any(ln.startswith(f"  - {m}: ") and "over the record's 2-hour" in ln
                                       for ln in lines)} == over
        assert sum(plan.seconds(m) for m in each if m not in big) <= 7200
    assert all("hutchinson_diag" not in plans.week2_metrics(P, m) for m in big)
    assert "hutchinson_diag" in plans.week2_metrics(P, "smollm2-135m")
    assert plans.SINGLE_CONTROLS >= 20 and 1 / (plans.SINGLE_CONTROLS + 1) < 0.05
    assert phase3.SINGLE_CONTROLS == plans.SINGLE_CONTROLS


def test_the_origin_sentence_names_each_parts_machine() -> None:
    """Parts of one chunk may be recorded by sessions on different CPUs: the page says which made which."""
    made = {"commit": "a" * 40, "started": "2026-12-05T18:17:00", "seconds": 1192.4,
            "machine": {"cores": 2, "cpu": "Intel(R) Xeon(R) Processor"}}
    got = parts.origin_sentence({"m@seed999": parts.origin(made), "m@seed1": parts.origin(None)})
    assert "m@seed999 from its committed part (commit aaaaaaaaaaaa" in got and "20 min on 2 cores, Intel(R) Xeon" in got
    assert got.endswith("Computed on this page: m@seed1.")
