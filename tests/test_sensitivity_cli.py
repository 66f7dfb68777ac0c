"""The caching engine and `esa-runner`: reproducibility, outputs, and every bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from esa import cli
from esa.data import Calibration, Windows
from esa.errors import EsaError
from esa.models import load
from esa.sensitivity.engine import score, score_many
from esa.sensitivity.metrics import MetricConfig, get_metric
from esa.sensitivity.select import COLUMNS
from esa.stats import stability

pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "king", "speaks", "and", "all", "men", "hear", "a", "storm", "rises", "over", "sea"]
    text = "\n\n".join(" ".join(rng.choice(words, size=40)) for _ in range(150))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


def _same(a, b) -> bool:
    """Two runs' stored results (candidates, derived candidates, matrix sums over every weight) are identical."""
    frames = lambda r: [r.top, r.bottom, r.matrices, *r.derived.values()]  # noqa: E731
    return all(x.equals(y) for x, y in zip(frames(a), frames(b), strict=True))


def _windows(seed: int) -> Windows:
    ids = torch.randint(3, 259, (4, 24), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, "random", "calib", 24, False, "byt5", 100, tuple(range(4)))


@pytest.mark.parametrize("metric", ["grad_x_weight", "hutchinson_diag", "act_mag"])
def test_same_seed_same_scores_bit_for_bit(metric):
    lm = load("tiny-llama", device="cpu")
    cfg = MetricConfig(batch_size=2, probes=2, seed=7, show_progress=False)
    a = score(lm, metric, Calibration(seed=7), cfg=cfg, use_cache=False, windows=_windows(7))
    b = score(lm, metric, Calibration(seed=7), cfg=cfg, use_cache=False, windows=_windows(7))
    assert _same(a, b)
    pd.testing.assert_frame_equal(a.topk(10, "global"), b.topk(10, "global"))
    c = score(lm, metric, Calibration(seed=8), cfg=MetricConfig(batch_size=2, probes=2, seed=8, show_progress=False),
              use_cache=False, windows=_windows(8))
    assert not _same(a, c)


def test_cache_round_trip():
    lm = load("tiny-llama", device="cpu")
    cfg = MetricConfig(batch_size=2, show_progress=False)
    a = score(lm, "grad_squared", Calibration(seed=1), cfg=cfg, windows=_windows(1))
    b = score(lm, "grad_squared", Calibration(seed=1), cfg=cfg, windows=_windows(1))
    assert not a.from_cache and b.from_cache and a.key == b.key
    assert a.scores is None and b.scores is None  # candidates by default, no full map
    assert _same(a, b) and set(b.derived) == {"obd"}
    pd.testing.assert_frame_equal(a.topk(5, "per_layer"), b.topk(5, "per_layer"))
    assert b.tails == pytest.approx(a.tails)
    other = score(lm, "grad_squared", Calibration(seed=1), cfg=MetricConfig(batch_size=2, times_w2=True, show_progress=False),
                  windows=_windows(1))
    assert other.key != a.key and not other.from_cache


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-mixtral"])
def test_fused_gradient_metrics_equal_separate_runs_bit_for_bit(ref, monkeypatch, tmp_path):
    lm = load(ref, device="cpu")
    cfgs = {"grad_x_weight": MetricConfig(batch_size=2, show_progress=False),
            "grad_squared": MetricConfig(batch_size=2, times_w2=True, show_progress=False),
            "act_mag": MetricConfig(show_progress=False)}
    fused = score_many(lm, list(cfgs), Calibration(seed=3), cfgs, windows=_windows(3), fuse=True)
    assert fused["grad_x_weight"].extras["fused_with"] == ["grad_squared"]
    assert "fused_with" not in fused["act_mag"].extras  # not a gradient metric: its own pass
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path / "separate"))
    for metric, cfg in cfgs.items():
        alone = score(lm, metric, Calibration(seed=3), cfg=cfg, windows=_windows(3))
        assert not alone.from_cache and alone.key == fused[metric].key  # same content key: same cache entry
        assert _same(alone, fused[metric]), metric
    # a second call reads every metric back from the cache instead of computing
    again = score_many(lm, list(cfgs), Calibration(seed=3), cfgs, windows=_windows(3))
    assert all(r.from_cache for r in again.values())


def test_obd_selection_derived_from_fisher_equals_the_times_w2_run():
    from esa.phases import phase2

    lm = load("tiny-llama", device="cpu")
    fisher = score(lm, "grad_squared", Calibration(seed=2), cfg=MetricConfig(batch_size=2, show_progress=False), windows=_windows(2))
    obd_run = score(lm, "grad_squared", Calibration(seed=2), cfg=MetricConfig(batch_size=2, times_w2=True, show_progress=False),
                    windows=_windows(2))
    derived = phase2.obd_selections({("grad_squared", 2): fisher}, lm, 5, "per_layer")
    direct = obd_run.topk(5, "per_layer", lm.inventory)
    cols = ["param", "expert", "row", "col", "rank"]
    pd.testing.assert_frame_equal(derived[cols].reset_index(drop=True), direct[cols].reset_index(drop=True))
    assert set(derived["metric"]) == {phase2.OBD_LABEL}
    agree = phase2.agreement_table({("grad_squared", 2): fisher}, fisher.topk(5, "per_layer", lm.inventory)
                                   .assign(metric="grad_squared", seed=2), derived=derived)
    assert list(zip(agree.metric_a, agree.metric_b, strict=True)) == [("grad_squared", phase2.OBD_LABEL)]


def test_obd_is_not_derived_from_a_single_micro_batch(caplog):
    from esa.phases import phase2
    from esa.sensitivity.select import from_candidates, matrix_candidates

    lm = load("tiny-llama", device="cpu")
    cfg = MetricConfig(batch_size=8, show_progress=False)  # every window in one micro-batch
    runs = {(m, 2): score(lm, m, Calibration(seed=2), cfg=cfg, windows=_windows(2)) for m in ("grad_squared", "grad_x_weight")}
    # the premise: with one micro-batch the Fisher diagonal is g^2, and g^2 w^2 ranks as |g w|
    fisher = get_metric("grad_squared")(lm.model, lm.inventory, _windows(2).ids, cfg).scores
    obd_scores = {n: fisher[n] * lm.model.get_parameter(n).detach().square() for n in fisher}
    specs = [s for s in lm.inventory if s.name in obd_scores]
    by_hand = from_candidates(matrix_candidates(obd_scores, specs, 5, largest=True), 5, "per_layer", True)
    gxw = runs[("grad_x_weight", 2)].topk(5, "per_layer", lm.inventory)
    assert stability.weight_set(by_hand) == stability.weight_set(gxw)
    with caplog.at_level("WARNING", logger="esa.phases.phase2"):
        assert phase2.obd_selections(runs, lm, 5, "per_layer").empty
    assert "one micro-batch" in caplog.text


def test_fuse_auto_falls_back_when_the_extra_accumulator_does_not_fit(monkeypatch):
    from esa import memory

    lm = load("tiny-llama", device="cpu")
    cfgs = {m: MetricConfig(batch_size=2, show_progress=False) for m in ("grad_x_weight", "grad_squared")}
    # room for one gradient pass at a time, not for the fused pass's extra accumulator (each pass asks first)
    one = memory.estimate(lm.model, "gradient", 2, 24).need("cpu", True)
    fused = memory.estimate(lm.model, "grad_fused", 2, 24).need("cpu", True)
    assert fused > one
    monkeypatch.setattr(memory, "free_bytes", lambda device: int((one + fused) / 2 / memory.HEADROOM))
    runs = score_many(lm, list(cfgs), Calibration(seed=4), cfgs, windows=_windows(4), use_cache=False)
    assert all("fused_with" not in r.extras for r in runs.values())
    with pytest.raises(EsaError, match="fuse must be"):
        score_many(lm, list(cfgs), Calibration(seed=4), cfgs, windows=_windows(4), use_cache=False, fuse="yes")


def test_esa_runner_writes_topk_and_summary(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--model", "tiny-llama", "--metric", "grad_x_weight,act_mag", "--topk", "5", "--max-samples", "4",
                   "--seqlen", "32", "--corpus", corpus, "--seeds", "1,2", "--stability-check", "--weight-analysis",
                   "--architecture-analysis", "--save-plots", "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_parquet(out / "topk.parquet")
    assert list(table.columns) == [*COLUMNS, "model", "run_id"]
    assert set(table["metric"]) == {"grad_x_weight", "act_mag"} and set(table["seed"]) == {1, 2}
    n_mats = len(load("tiny-llama").inventory)
    assert len(table) == 2 * 2 * 5 * n_mats
    summary = json.loads((out / "summary.json").read_text())
    for key in ("settings", "stability", "agreement", "metrics", "component_shares", "timings", "versions",
                "weight_analysis", "architecture_analysis", "super_weights"):
        assert key in summary, key
    j = summary["stability"]["grad_x_weight"]["jaccard"]["mean"]
    assert 0.0 <= j <= 1.0
    assert (out / "survival.png").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".") and not p.name.startswith(".lock")]  # no staging


BAD = [
    (["--metric", "fisher"], "fisher"),
    (["--mode", "blocks"], "blocks"),
    (["--dtype", "int3"], "int3"),
    (["--topk", "0"], "topk"),
    (["--topk", "100000"], "100000"),
    (["--seeds", ","], "seeds"),
    (["--max-samples", "100000"], "100000"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--hutchinson-probes", "-1"], "probes"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD)
def test_esa_runner_bad_input(tmp_path, corpus, capsys, extra, needle):
    out = tmp_path / "out"
    base = ["--model", "tiny-llama", "--metric", "grad_x_weight", "--topk", "5", "--max-samples", "2", "--seqlen",
            "32", "--corpus", corpus, "--seeds", "1", "--out-dir", str(out)]
    rc = cli.main(base + extra)
    err = capsys.readouterr().err
    assert rc == 2 and "esa-runner: error:" in err and needle in err, err
    assert not out.exists() or not any(out.iterdir())


def test_model_without_studied_modules_is_a_clear_error():
    from esa.errors import EsaError

    lm = load("tiny-llama", device="cpu")
    with pytest.raises(EsaError, match="no weights under study"):
        score(lm, "grad_x_weight", Calibration(seed=1), inventory=[], use_cache=False, windows=_windows(1))


@pytest.mark.slow
def test_guide_command_on_smollm2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ESA_CACHE_DIR")  # the real model's dequantised cache lives in the default cache
    out = tmp_path / "x"
    rc = cli.main(["--model", "smollm2-135m", "--metric", "grad_x_weight", "--topk", "100", "--max-samples", "8",
                   "--seeds", "1337,123", "--stability-check", "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_parquet(out / "topk.parquet")
    assert len(table) == 2 * 100 * 30 * 7  # 2 seeds x k x (30 layers x 7 matrices)


def test_quiet_switches_off_every_bar_even_after_transformers_was_imported(monkeypatch):
    from transformers.utils import logging as tlog

    from esa.progress import QUIET_ENV, quiet

    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    tlog.enable_progress_bar()
    try:
        quiet()
        assert not tlog.is_progress_bar_enabled()
        assert all(os.environ[k] == v for k, v in QUIET_ENV.items())
    finally:
        tlog.enable_progress_bar()
