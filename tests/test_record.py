"""The judged record (esa.runner.record) end to end on tiny notebooks in a temporary project folder."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from test_runner_run import KERNEL, make_project, run_all

BODY = """
import esa.nb
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

ctx = esa.nb.context("{id}", profile, models, run_dir, overrides)
ctx.save_table(pd.DataFrame({{"x": [1, 2, 3], "y": [0.5, 0.25, {y}]}}), "numbers")
fig, ax = plt.subplots()
ax.plot([1, 2, 3])
ctx.savefig(fig, "line", caption="a line")
{extra}
"""

ENTRIES = [
    {"id": "nb_a", "phase": 1, "week": 0, "title": "A", "models": "profile", "depends_on": []},
    {"id": "nb_b", "phase": 2, "week": 1, "title": "B", "models": "profile", "depends_on": ["nb_a"]},
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "proj", {"nb_a": BODY.format(id="nb_a", y=0.125, extra=""),
                                            "nb_b": BODY.format(id="nb_b", y=0.0625, extra="")}, ENTRIES)
    return root


def test_chunks_publish_in_order_and_the_index_names_what_is_missing(project: Path, capsys) -> None:
    rec = project / "reports" / "record"
    rc, err = run_all(project, "--only", "nb_b", "--record", capsys=capsys)
    assert rc == 2 and "needs chunk nb_a in the record first" in err and "--only nb_a --record" in err
    assert len(err.strip().splitlines()) == 1 and not rec.exists()

    assert run_all(project, "--only", "nb_a", "--record")[0] == 0
    manifest = json.loads((rec / "chunks" / "nb_a.json").read_text())
    assert manifest["profile"] == "smoke" and manifest["machine"]["cores"] and manifest["seconds"] > 0
    assert {"commit", "code_hash", "models"} <= set(manifest)
    assert (rec / "data" / "nb_a" / "numbers.csv").is_file() and (rec / "html" / "nb_a.nocode.html").is_file()
    assert (rec / "figures" / "nb_a" / "line.png").is_file()  # figures inside the record
    assert (rec / "report.pdf").read_bytes().startswith(b"%PDF")  # rebuilt with the index
    art = json.loads((rec / "data" / "nb_a" / "artefacts.json").read_text())
    assert art["figures"][0]["png"] == "figures/nb_a/line.png"  # relative: a clone elsewhere reads it
    index = (rec / "index.html").read_text()
    assert "Not yet in this record" in index and "nb_b" in index
    assert not (project / "reports" / "record-staging").exists()

    assert run_all(project, "--only", "nb_b", "--record")[0] == 0
    assert "Not yet in this record" not in (rec / "index.html").read_text()
    assert json.loads((rec / "manifest.json").read_text())["missing"] == []


def test_a_failed_chunk_leaves_the_record_as_it_was(project: Path) -> None:
    rec = project / "reports" / "record"
    assert run_all(project, "--only", "nb_a", "--record")[0] == 0
    before = sorted(p.relative_to(rec) for p in rec.rglob("*"))
    nb = project / "notebooks" / "nb_b.py"
    nb.write_text(nb.read_text() + "\nraise RuntimeError('boom')\n")
    assert run_all(project, "--only", "nb_b", "--record")[0] == 1
    assert sorted(p.relative_to(rec) for p in rec.rglob("*")) == before
    assert not (rec / "data" / "nb_b").exists()


def test_a_record_of_another_profile_is_refused_unless_overwrite(project: Path, capsys, monkeypatch) -> None:
    rec = project / "reports" / "record"
    assert run_all(project, "--only", "nb_a", "--record")[0] == 0
    rc, err = run_all(project, "--only", "nb_a", "--record", "--set", "seqlen=64", capsys=capsys)
    assert rc == 2 and "differs in overrides" in err and "--overwrite" in err
    assert run_all(project, "--only", "nb_a", "--record", "--set", "seqlen=64", "--overwrite")[0] == 0
    assert json.loads((rec / "record.json").read_text())["overrides"] == {"seqlen": 64}
    rc, err = run_all(project, "--only", "nb_a", "--overwrite", capsys=capsys)
    assert rc == 2 and "--overwrite only applies to --record" in err


def test_a_record_grows_across_code_versions_and_says_so(project: Path, monkeypatch) -> None:
    """Sessions change the code between chunks: a new chunk is accepted, and each chunk names its own code."""
    from esa.runner import record

    rec = project / "reports" / "record"
    (project / "README.md").write_text(f"# x\n{record.README_BEGIN}\n{record.README_END}\n")
    monkeypatch.setenv("ESA_CODE_HASH", "code-one")
    assert run_all(project, "--only", "nb_a", "--record")[0] == 0
    monkeypatch.setenv("ESA_CODE_HASH", "code-two")
    assert run_all(project, "--only", "nb_b", "--record")[0] == 0
    hashes = {json.loads((rec / "chunks" / f"{nb}.json").read_text())["code_hash"] for nb in ("nb_a", "nb_b")}
    assert hashes == {"code-one", "code-two"}
    manifest = json.loads((rec / "manifest.json").read_text())
    assert len(manifest["code_versions"]) == 2
    assert "2 code versions" in (project / "README.md").read_text()
    # a commit that changes no code (the record's own, say) is the same code version
    chunks = {nb: json.loads((rec / "chunks" / f"{nb}.json").read_text()) for nb in ("nb_a", "nb_b")}
    chunks["nb_c"] = {**chunks["nb_b"], "commit": "another-commit"}
    assert sorted(record.code_versions(chunks)) == ["code-one", "code-two"]


def test_verify_record_reruns_a_chunk_and_finds_a_changed_number(project: Path, capsys) -> None:
    rec = project / "reports" / "record"
    assert run_all(project, "--only", "nb_a", "--record")[0] == 0
    capsys.readouterr()
    rc, _ = run_all(project, "--verify-record", "nb_a")
    assert rc == 0 and "numbers equal the committed record" in capsys.readouterr().out
    nb = project / "notebooks" / "nb_a.py"
    nb.write_text(nb.read_text().replace("0.125", "0.126"))  # a result that changes: verification must fail
    rc, err = run_all(project, "--verify-record", "nb_a", capsys=capsys)
    assert rc == 1 and "numbers.parquet" in err
    assert not (project / "reports" / "record-verify").exists() and (rec / "chunks" / "nb_a.json").is_file()
    rc, err = run_all(project, "--verify-record", "nb_b", capsys=capsys)
    assert rc == 2 and "no chunk nb_b" in err


def test_readme_says_what_the_record_found_in_sentences_computed_from_it(project: Path) -> None:
    from esa.runner import record

    (project / "README.md").write_text(f"# x\n{record.README_BEGIN}\nSTALE TEXT\n{record.README_END}\ntail\n")
    assert run_all(project, "--only", "nb_a", "--record")[0] == 0
    text = (project / "README.md").read_text()
    assert "holds 1 of 2 notebooks" in text and text.endswith("tail\n") and "STALE" not in text
    assert record.readme_block(project) in text


def test_readme_sentences_count_verdicts_per_criterion_family() -> None:
    from esa.runner import record

    rows = [{"id": "P5.prune_gain.obd.vs_wanda.m", "verdict": "FAIL"}, {"id": "P3.cross_architecture", "verdict": "PASS"},
            {"id": "P5.prune_gain.obd.vs_magnitude.m", "verdict": "PASS"}]
    assert record._families(rows) == {"P5.prune_gain": {"P5.prune_gain.obd.vs_wanda.m": "FAIL",
                                                        "P5.prune_gain.obd.vs_magnitude.m": "PASS"},
                                      "P3.cross_architecture": {"P3.cross_architecture": "PASS"}}
    rows = [{**r, "phase": 5 if r["id"].startswith("P5") else 3, "measured": 0.5} for r in rows]
    rows += [{"id": "P5.ft.protect_ewc.m", "phase": 5, "verdict": "not estimable", "measured": None},
             {"id": "P5.ft.gap_lora.m", "phase": 5, "verdict": "FAIL", "measured": 0.0076},
             {"id": "P1.baseline_ppl", "phase": 1, "verdict": "PASS", "measured": 47.9}]
    held, against = record.verdict_sentences(rows)
    # a not-estimable row (no such quantity) is neither a PASS nor a FAIL: P5.ft is 0 of 1 judged, not 0 of 2
    assert held == "Beyond the Phase 1 baselines it confirms, by criterion (PASS of judged): P5.prune_gain (1 of 2), " \
                   "P3.cross_architecture (1 of 1)."
    assert against == "Against the guide's hypotheses: P5.prune_gain fails 1 of 2 (e.g. P5.prune_gain.obd.vs_wanda.m: " \
                      "0.5); P5.ft fails 1 of 1 (e.g. P5.ft.gap_lora.m: 0.0076)."


def test_the_repository_readme_block_is_the_committed_records() -> None:
    from esa.runner import record
    from esa.store import REPO_ROOT

    assert record.readme_block(REPO_ROOT) in (REPO_ROOT / "README.md").read_text()


def test_a_damaged_chunk_is_named_and_never_read(project: Path, capsys) -> None:
    """A same-size flip in a committed chunk's data: the next chunk (which would read it) is refused in one line
    naming the file, and verify-record reports it without running anything."""
    rec = project / "reports" / "record"
    assert run_all(project, "--only", "nb_a", "--record")[0] == 0
    manifest = json.loads((rec / "chunks" / "nb_a.json").read_text())
    assert manifest["files"] and all(len(d) == 32 for d in manifest["files"].values())
    table = next(p for p in sorted((rec / "data" / "nb_a").glob("*.parquet")))
    raw = bytearray(table.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    table.write_bytes(bytes(raw))
    rc, err = run_all(project, "--only", "nb_b", "--record", capsys=capsys)
    assert rc == 2 and "chunk nb_a is damaged" in err and table.name in err
    assert not (rec / "chunks" / "nb_b.json").exists()
    rc, out = run_all(project, "--verify-record", "nb_a", capsys=capsys)
    assert rc == 1


def test_a_chunk_published_before_sealing_is_sealed_at_the_next_rebuild(project: Path) -> None:
    from esa.runner import record
    from esa.runner.driver import RunConfig

    rec = project / "reports" / "record"
    assert run_all(project, "--only", "nb_a", "--record")[0] == 0
    path = rec / "chunks" / "nb_a.json"
    made = json.loads(path.read_text())
    sealed = made.pop("files")
    path.write_text(json.dumps(made))
    record.rebuild(RunConfig(profile="smoke", root=project, kernel=KERNEL))
    again = json.loads(path.read_text())
    assert again["files"] == sealed and again["sealed"] == "after publishing"


def test_a_second_chunk_is_refused_while_one_runs(project: Path, capsys) -> None:
    """Chunks share the staging folder: a second one, while the first holds the record's lock, is refused in
    one line naming the holder, and touches neither the staging folder nor the record."""
    from esa import store
    from esa.runner import record

    stage = project / "reports" / record.STAGING
    stage.mkdir(parents=True)
    (stage / "the first chunk's work").write_text("x")
    with store.folder_lock(project / "reports" / record.LOCK):
        rc, err = run_all(project, "--only", "nb_a", "--record", capsys=capsys)
    assert rc == 2 and f"is in use by PID {os.getpid()}" in err and "one chunk or part at a time" in err, err
    assert len(err.strip().splitlines()) == 1
    assert (stage / "the first chunk's work").is_file() and not (project / "reports" / "record").exists()
    assert run_all(project, "--only", "nb_a", "--record")[0] == 0  # released: the next chunk runs


def test_verification_is_bit_exact_on_the_recording_cpu_and_decisions_only_on_another(monkeypatch, capsys) -> None:
    from esa.phases import costs
    from esa.runner import record

    here = {"cores": 2, "cpu": "Intel(R) Xeon(R) Processor", "platform": "x"}
    monkeypatch.setattr(costs, "machine", lambda: here)
    assert record.same_cpu("chunk w5", {"machine": {**here, "platform": "y"}}) and not capsys.readouterr().out
    assert not record.same_cpu("chunk w5", {"machine": {**here, "cpu": "AMD EPYC"}})
    assert "chunk w5 was recorded on 2 cores of AMD EPYC, this is 2 cores of Intel" in capsys.readouterr().out
    assert not record.same_cpu("part p", {"machine": {**here, "cores": 16}})


def test_a_chunk_compared_across_cpus_still_needs_equal_verdicts_and_counts(tmp_path: Path) -> None:
    import pandas as pd

    from esa.runner import record
    from esa.store import write_json

    a, b = tmp_path / "a", tmp_path / "b"
    for d, mean, verdict, n, s in ((a, 6.933022, "PASS", 64, 1.0), (b, 6.933031, "PASS", 64, 9.0)):
        d.mkdir()  # `seconds` measures the run, not its result: no gap, no difference
        pd.DataFrame({"mean": [mean], "n": [n], "seconds": [s]}).to_parquet(d / "summary.parquet")
        write_json(d / "stats.json", {"verdict": verdict, "mean": mean, "seconds": mean})
    assert len(record.compare(a, b)) == 2 and record.compare(a, b, record.CROSS_CPU_RTOL) == []
    assert record.largest_gap(a, b) == ((6.933031 - 6.933022) / 6.933031, "summary.parquet")
    write_json(b / "stats.json", {"verdict": "FAIL", "mean": 6.933031})
    assert record.compare(a, b, record.CROSS_CPU_RTOL) == ["stats.json: JSON differs at /verdict: 'PASS' != 'FAIL'"]
    # a float beyond rounding (a tie at a top-k threshold broken the other way) is listed, a count is failed
    pd.DataFrame({"mean": [7.5], "n": [64]}).to_parquet(b / "summary.parquet")
    write_json(b / "stats.json", {"verdict": "PASS", "mean": 6.933031})
    assert record.compare(a, b, math.inf) == [] and len(record.compare(a, b, record.CROSS_CPU_RTOL)) == 1
    pd.DataFrame({"mean": [7.5], "n": [128]}).to_parquet(b / "summary.parquet")
    assert record.compare(a, b, math.inf) == ["summary.parquet: column 'n'[0]: 64 != 128"]
    # across CPUs a count may move with a tie broken the other way (listed); a table's shape may not (failed)
    assert record._cross_cpu(a, b) == []
    pd.DataFrame({"mean": [7.5, 1.0], "n": [64, 1]}).to_parquet(b / "summary.parquet")
    assert [d.split(":")[0] for d in record._cross_cpu(a, b)] == ["summary.parquet"]
    (b / "stats.json").unlink()
    assert "stats.json: missing in the fresh run" in record._cross_cpu(a, b)
