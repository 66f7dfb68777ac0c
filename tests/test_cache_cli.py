"""`python -m esa.runner.cache`: du's numbers, prune's filters and safety, plan's projections, bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from esa.data import Calibration, Windows
from esa.models import load
from esa.params import load_profile
from esa.runner import cache as cc
from esa.sensitivity.engine import FORMAT, entry_bytes, score
from esa.sensitivity.metrics import MetricConfig

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")  # tests/conftest.py
GiB = 2**30


def _windows(seed: int) -> Windows:
    ids = torch.randint(3, 259, (4, 24), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, "random", "calib", 24, False, "byt5", 100, tuple(range(4)))


def _size(path: Path) -> int:
    """Independent of the module under test: every regular file's size."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def fake(private_cache):
    """A score cache with real entries of two model names (one with a full map), a format-1 entry, an
    unreadable one, a dead writer's leftover and a live writer's temporary folder; plus other folders."""
    lm = load("tiny-llama", device="cpu")
    cfg = lambda s: MetricConfig(batch_size=2, seed=s, show_progress=False)  # noqa: E731
    runs = [score(lm, "grad_x_weight", Calibration(seed=s), cfg=cfg(s), windows=_windows(s)) for s in (1, 2)]
    runs.append(score(lm, "grad_squared", Calibration(seed=1), cfg=cfg(1), windows=_windows(1), keep_scores=True))
    # entries are keyed by the weights' content, so "tiny-llama-b" is another model: one weight differs
    lm_b = load("tiny-llama", device="cpu")
    with torch.no_grad():
        next(lm_b.model.parameters()).view(-1)[0] += 1.0
    runs += [score(lm_b, "grad_x_weight", Calibration(seed=s), cfg=cfg(s), windows=_windows(s),
                   model_ref="tiny-llama-b") for s in (1, 3)]
    scores = private_cache / "scores"
    old = scores / "0123456789abcdef"  # what the format-1 code wrote: no "format" key, fp32 map, a `complete` file
    old.mkdir()
    save_file({"w": torch.zeros(64, 64)}, str(old / "scores.safetensors"))
    (old / "meta.json").write_text(json.dumps({"metric": "grad_x_weight", "seed": 1337, "key": old.name,
                                               "settings": {"model": "tiny-llama", "seed": 1337}}))
    (old / "complete").write_text("ok\n")
    broken = scores / "fedcba9876543210"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    (broken / "top.parquet").write_bytes(b"x" * 500)
    dead = scores / f"{runs[0].key}.partial-{_dead_pid()}"
    dead.mkdir()
    (dead / "top.parquet").write_bytes(b"y" * 300)
    live = scores / f".{runs[1].key}.partial-{os.getpid()}"
    live.mkdir()
    (live / "top.parquet").write_bytes(b"z" * 200)
    (private_cache / "models").mkdir()
    (private_cache / "models" / "weights.bin").write_bytes(b"m" * 12345)
    (private_cache / "tokens").mkdir(exist_ok=True)
    (private_cache / "tokens" / "t.npy").write_bytes(b"t" * 678)
    return {"lm": lm, "runs": runs, "old": old, "broken": broken, "dead": dead, "live": live, "cfg": cfg}


def _names(cache: Path) -> dict[str, int]:
    return {p.name: _size(p) for p in (cache / "scores").iterdir()}


def test_du_numbers_equal_the_folder_sizes(fake, private_cache, capsys):
    entries = {e.path.name: e for e in cc.scan()}
    assert {n: e.bytes for n, e in entries.items()} == _names(private_cache)
    assert sorted(e.format for e in entries.values()) == sorted([str(FORMAT)] * 5 + ["1", "unreadable", "leftover",
                                                                                      "leftover"])
    assert {n for n, e in entries.items() if e.stale} == {fake["old"].name, fake["broken"].name, fake["dead"].name}
    assert entries[fake["runs"][2].key].bytes > 2 * sum(s.numel for s in fake["lm"].inventory)  # the bf16 map
    table = cc.du_table(list(entries.values()), ["model"]).set_index("model")
    for model in ("tiny-llama", "tiny-llama-b"):
        want = sum(_size(private_cache / "scores" / r.key) for r in fake["runs"] if r.settings["model"] == model)
        want += _size(fake["old"]) if model == "tiny-llama" else 0
        assert table.loc[model, "bytes"] == want
    assert table.loc["total", "bytes"] == _size(private_cache / "scores") and table.loc["total", "entries"] == 9
    by_seed = cc.du_table(list(entries.values()), ["seed"]).set_index("seed")
    assert by_seed.loc["3", "entries"] == 1 and by_seed.loc["1", "entries"] == 3 and by_seed.loc["?", "entries"] == 3
    assert by_seed.loc["1337", "entries"] == 1 and by_seed.loc["2", "entries"] == 1
    fmt = cc.du_table(list(entries.values()), ["format"]).set_index("format")
    assert fmt.loc["1 (stale)", "bytes"] == _size(fake["old"]) and fmt.loc[str(FORMAT), "entries"] == 5

    assert cc.main(["du"]) == 0
    out = capsys.readouterr().out
    total = [line.split() for line in out.splitlines() if line.split()[:1] == ["total"]]
    assert total == [["total", "9", str(_size(private_cache / "scores")), *total[0][3:]]]
    assert "1 (stale)" in out and "tiny-llama-b" in out and "unreadable (stale)" in out
    other = [line for line in out.splitlines() if line.startswith("other cache folders:")]
    assert len(other) == 1 and f"total {12345 + 678} bytes" in other[0] and "models" in other[0]
    assert cc.main(["du", "--by", "metric"]) == 0
    out = capsys.readouterr().out
    assert "grad_squared" in out and "model" not in out.splitlines()[1]


def test_prune_dry_run_leaves_everything(fake, private_cache, capsys):
    before = _names(private_cache)
    assert cc.main(["prune", "--stale", "--dry-run"]) == 0
    assert cc.main(["prune", "--older-than", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _names(private_cache) == before
    stale = _size(fake["old"]) + _size(fake["broken"]) + _size(fake["dead"])
    assert f"would free {stale} bytes" in out and "would remove 0123456789abcdef" in out
    assert f".partial-{os.getpid()}" not in out  # a live writer's folder is never a candidate


def test_prune_by_model_keeps_the_rest_readable(fake, private_cache, capsys):
    before = _names(private_cache)
    b_keys = {r.key for r in fake["runs"] if r.settings["model"] == "tiny-llama-b"}
    assert cc.main(["prune", "--model", "tiny-llama-b"]) == 0
    out = capsys.readouterr().out
    assert set(_names(private_cache)) == set(before) - b_keys
    assert f"freed {sum(before[k] for k in b_keys)} bytes" in out
    assert not [p for p in (private_cache / "scores").iterdir() if ".pruned-" in p.name]
    again = score(fake["lm"], "grad_x_weight", Calibration(seed=1), cfg=fake["cfg"](1), windows=_windows(1))
    assert again.from_cache and again.key == fake["runs"][0].key


def test_prune_stale_and_age_filters_all_apply(fake, private_cache, capsys):
    assert cc.main(["prune", "--stale"]) == 0
    left = set(_names(private_cache))
    assert {fake["old"].name, fake["broken"].name, fake["dead"].name}.isdisjoint(left)
    assert fake["live"].name in left and {r.key for r in fake["runs"]} <= left
    old_run = fake["runs"][3]  # tiny-llama-b, seed 1: completed 10 days ago
    meta = private_cache / "scores" / old_run.key / "meta.json"
    ten_days = time.time() - 10 * 86400
    os.utime(meta, (ten_days, ten_days))
    assert cc.main(["prune", "--older-than", "5", "--model", "tiny-llama"]) == 0  # none is both
    assert set(_names(private_cache)) == left
    assert cc.main(["prune", "--older-than", "5", "--model", "tiny-llama-b"]) == 0
    assert set(_names(private_cache)) == left - {old_run.key}
    out = capsys.readouterr().out
    assert "freed 0 bytes (0 B) in 0 entries" in out and f"removed {old_run.key} (tiny-llama-b" in out


@pytest.mark.parametrize("argv, names", [
    (["prune"], ["--older-than", "--model", "--stale"]),
    (["prune", "--dry-run"], ["--older-than", "--model", "--stale"]),
    (["prune", "--older-than", "soon"], ["'soon'", "days >= 0"]),
    (["prune", "--older-than", "-3"], ["'-3'", "days >= 0"]),
    (["prune", "--model", "gpt-9"], ["'gpt-9'", "tiny-llama-b"]),
    (["du", "--by", "colour"], ["'colour'", "'model', 'metric', 'seed', 'format'"]),
    (["plan", "--profile", "huge"], ["'huge'", "extended, powered, smoke, standard"]),
    (["plan", "--profile", "smoke", "--model", "gpt-9"], ["'gpt-9'", "llama-3.1-8b", "tiny-llama"]),
    (["plan"], ["--profile"]),
    (["vacuum"], ["'vacuum'", "'du', 'prune', 'plan'"]),
])
def test_bad_arguments_are_one_line_and_exit_2(fake, private_cache, capsys, argv, names):
    before = _names(private_cache)
    try:
        rc = cc.main(argv)
    except SystemExit as stop:
        rc = stop.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert all(n in err for n in names), err
    assert _names(private_cache) == before


def test_plan_tiny_model_matches_its_inventory(private_cache):
    lm = load("tiny-llama", device="cpu")
    inv = cc.meta_inventory(cc.shape_source("tiny-llama")[1]())
    assert [(s.name, s.shape) for s in inv] == [(s.name, s.shape) for s in lm.inventory]
    row = cc.plan("smoke", ["tiny-llama"]).iloc[0]
    seeds = 2  # smoke: seeds [1337, 123], highres_seeds [1337, 123]
    want = seeds * (3 * entry_bytes(lm.inventory) + entry_bytes(lm.inventory, n_derived=1))
    assert row["entries"] == 4 * seeds and row["bytes"] == want
    assert row["bytes_keep_scores"] - row["bytes"] == 4 * seeds * 2 * sum(s.numel for s in lm.inventory)
    many = cc.plan("standard", ["tiny-llama", "tiny-mixtral"])  # 3 seeds | 5 highres seeds = 5
    n = 5 * len(load_profile("standard").metrics)
    assert list(many["entries"]) == [n, n] and many["bytes"].iloc[1] > many["bytes"].iloc[0]


def test_plan_llama_8b_from_its_published_shape(private_cache, capsys):
    row = cc.plan("extended", ["llama-3.1-8b"]).iloc[0]
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert row["studied_weights"] == 32 * per_layer and row["matrices"] == 32 * 7
    # metrics x ({1337, 123, 999} | {1337, 123, 999, 2024, 7})
    assert row["entries"] == len(load_profile("extended").metrics) * 5
    print(f"\nLlama-3.1-8B, extended Phase 2: {row['entries']} entries, {row['bytes'] / GiB:.3f} GiB candidates only, "
          f"{row['bytes_keep_scores'] / GiB:.1f} GiB with keep_scores")
    assert row["bytes"] <= 5 * GiB < row["bytes_keep_scores"]
    assert row["bytes_keep_scores"] >= 20 * 2 * 32 * per_layer  # 2 bytes a weight per entry
    assert cc.main(["plan", "--profile", "extended", "--model", "llama-3.1-8b"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-8b" in out and "published shape" in out and "free space at" in out
    assert str(int(row["bytes"])) in out
    assert not (private_cache / "scores").exists()  # planning writes nothing
