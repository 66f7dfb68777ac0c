"""esa-runner as the research guide writes it: every command shape runs verbatim, outputs land where the guide
says, the CLI and a notebook with the same settings hit the same cache entries, and bad flags are refused
before anything is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from esa import cli
from esa.params import load_profile
from esa.phases import phase2
from esa.store import PARTIAL, REPO_ROOT, folder_lock

# The research guide's command shapes (weeks 1-9), `python esa_runner.py` replaced by `esa-runner`;
# only --model is tiny-llama here so that each runs in seconds.
GUIDE = {
    "week1_quick_validation": "--model {m} --metric grad_x_weight --topk 50 --max-samples 50 --seeds 1337 --verbose",
    "week2_all_metrics": "--model {m} --metric all --topk 100 --max-samples 8 --seeds 1337,123,999 "
                         "--stability-check --save-plots",
    "week3_global": "--model {m} --metric grad_x_weight --mode global --topk 500 --max-samples 8 --seeds 1337,123 "
                    "--stability-check",
    "week4_components": "--model {m} --metric act_mag --topk 100 --max-samples 8 --seeds 1337 --weight-analysis "
                        "--architecture-analysis",
    "week6_dose": "--model {m} --metric grad_x_weight --topk 100 --max-samples 8 --seeds 1337 --perturb sign_flip "
                  "--perturb-scale 0.005,0.01,0.05,0.1 --controls random_k,bottom_k",
    "week7_perturbations": "--model {m} --metric grad_x_weight --topk 100 --max-samples 8 --seeds 1337,123 "
                           "--perturb sign_flip,gauss_noise,zero,bit_flip --controls random_k,random_global "
                           "--save-plots",
    "week9_bf16": "--model {m} --metric grad_x_weight --topk 100 --max-samples 8 --seeds 1337 --dtype bfloat16",
}


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch, module_cache):
    """One cache for the module (tests/conftest.py; the corpus is tokenised once); each test in its tmp_path."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", sorted(GUIDE))
def test_guide_command_runs_verbatim_into_the_guide_layout(name, tmp_path, capsys):
    argv = GUIDE[name].format(m="tiny-llama").split()
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    args = cli.build_parser().parse_args(argv)
    metric = "all" if args.metric == "all" else args.metric
    mode = args.mode or "per_layer"
    out = tmp_path / "outputs" / "esa" / "tiny-llama" / f"{metric}_{mode}_k{args.topk}"
    assert f"outputs: {out}" in printed
    table = pd.read_parquet(out / "topk.parquet")
    assert set(table.seed) == {int(s) for s in args.seeds.split(",")} and set(table.model) == {"tiny-llama"}
    manifest = json.loads((out / cli.MANIFEST).read_text())
    assert manifest["settings"]["model"] == "tiny-llama" and "topk.parquet" in manifest["files"]
    if args.perturb:
        t = pd.read_parquet(out / "perturbation.parquet")
        assert set(t.perturbation) >= set(args.perturb.split(",")) and set(t.model) == {"tiny-llama"}
    assert not [p for p in out.iterdir() if p.name.startswith(PARTIAL)]


def test_root_shim_takes_the_guide_line_verbatim(tmp_path):
    line = "--model tiny-llama --metric grad_x_weight --topk 5 --max-samples 2 --seeds 1337 --quiet"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "esa_runner.py"), *line.split()], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "outputs/esa/tiny-llama/grad_x_weight_per_layer_k5/topk.parquet").exists()


def test_cli_and_notebook_with_the_same_settings_share_cache_entries(capsys):
    P = load_profile("smoke", {"metrics": ["grad_x_weight", "act_mag"], "seeds": [5, 6], "max_samples": 2,
                               "seqlen": 64})
    lm = phase2.load_model("tiny-llama", P)
    runs = phase2.score_model(lm, "tiny-llama", P)
    assert not any(r.from_cache for r in runs.values())
    rc = cli.main(["--model", "tiny-llama", "--metric", "grad_x_weight,act_mag", "--seeds", "5,6", "--max-samples",
                   "2", "--seqlen", "64", "--out-dir", "o"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(Path("o/summary.json").read_text())
    for (metric, seed), run in runs.items():
        entry = summary["metrics"][metric][str(seed)]
        assert entry["from_cache"] and entry["cache_key"] == run.key, (metric, seed)


BAD = [
    (["--controls", "random_k"], "--controls needs --perturb"),
    (["--perturb-scale", "0.1"], "--perturb-scale needs --perturb"),
    (["--perturb", "sign_flip", "--controls", "bogus_k"], "bogus_k"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--seqlen", "0"], "--seqlen must be at least 2"),
    (["--seeds", "-1"], "seeds are integers 0 .. 4294967295"),
    (["--seeds", str(2**64)], "seeds are integers 0 .. 4294967295"),
    (["--corpus", "/no/such/text.txt"], "unknown corpus"),
    (["--device", "tpu9"], "tpu9"),
    (["--out-dir", "/proc/esa-out"], "virtual file system"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD)
def test_bad_flags_are_refused_before_any_load(extra, needle, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("esa.phases.command.load_model", no_load)
    rc = cli.main(["--model", "tiny-llama", "--metric", "grad_x_weight", "--topk", "5", "--max-samples", "2",
                   "--seeds", "1", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("esa-runner: error:") and needle in err and err.count("\n") == 1, err
    assert not Path("outputs").exists()  # nothing left behind


def test_out_dir_of_another_configuration_is_refused_unless_overwritten(capsys):
    base = ["--model", "tiny-llama", "--metric", "grad_x_weight", "--topk", "5", "--max-samples", "2",
            "--seeds", "1", "--out-dir", "d", "--quiet"]
    assert cli.main(base) == 0
    assert cli.main(base) == 0  # the same settings again: a rerun replaces its own outputs
    capsys.readouterr()
    assert cli.main([*base, "--topk", "6"]) == 2
    assert "differs in ['topk']" in capsys.readouterr().err
    assert cli.main([*base, "--topk", "6", "--overwrite"]) == 0
    assert json.loads(Path("d", cli.MANIFEST).read_text())["settings"]["topk"] == 6
    Path("stranger").mkdir()
    Path("stranger/notes.txt").write_text("mine")
    assert cli.main([*base[:-3], "--out-dir", "stranger"]) == 2
    assert "files esa-runner did not write" in capsys.readouterr().err
    assert Path("stranger/notes.txt").read_text() == "mine"


def test_a_second_runner_on_a_busy_out_dir_is_refused_and_stale_partials_are_cleaned(capsys):
    Path("d").mkdir()
    stale = Path("d") / f"{PARTIAL}999999999"
    stale.mkdir()
    argv = ["--model", "tiny-llama", "--metric", "grad_x_weight", "--topk", "5", "--max-samples", "2", "--seeds", "1",
            "--out-dir", "d", "--quiet"]
    with folder_lock(Path("d"), what="out dir", command="first esa-runner"):
        rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and f"is in use by PID {os.getpid()}" in err and "another --out-dir" in err, err
    assert stale.exists()  # nothing is touched while another runner holds the folder
    assert cli.main(argv) == 0
    assert not stale.exists()  # the next run cleans the dead runner's staging folder


def test_a_failed_run_leaves_no_folder_it_made(capsys):
    rc = cli.main(["--model", "tiny-llama", "--metric", "grad_x_weight", "--topk", "5", "--max-samples", "100000",
                   "--seeds", "1", "--out-dir", "new/out"])
    assert rc == 2 and "100000" in capsys.readouterr().err
    assert not Path("new/out").exists()
