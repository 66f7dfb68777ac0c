"""The esa-runner perturbation stage (esa.phases.command.perturb) and the Phase 2/3 scorecard rows."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_perturb_core import random_selection
from test_stats_inference import synthetic_table

from esa.errors import EsaError
from esa.models import load
from esa.perturb import weights_hash
from esa.phases import criteria
from esa.phases.command import Command, perturb
from esa.recipes import Recipe
from esa.stats.inference import analyze
from esa.store import read_json


def command(scales: tuple[float, ...] = (1.0,), **kw) -> Command:
    base = dict(perturbations=("sign_flip", "zero"), controls=("random_k", "random_global"), topk=3, seeds=(1, 2),
                seqlen=32, max_samples=2, batch_size=2, eval_windows=2, metrics=("test",))
    base.update(kw)
    return Command("tiny-llama", Recipe(**base), save_plots=True, perturb=True, perturb_scales=scales,
                   perturb_probs=(0.5,))


@pytest.fixture(scope="module")
def lm():
    return load("tiny-llama")


def test_perturb_stage_writes_tables_stats_and_plots(lm, tmp_path):
    sel = pd.concat([random_selection(lm.inventory, 3, s) for s in (1, 2)])
    h = weights_hash(lm.model)
    out = perturb(command(), lm, sel, {}, tmp_path)
    assert weights_hash(lm.model) == h
    t = pd.read_parquet(tmp_path / "perturbation.parquet")
    assert len(t) == out["n_conditions"] == 2 * 3 * 2  # perturbations x groups x seeds
    assert set(t.group) == {"top_k", "random_k", "random_global"}
    assert set(t.model) == {"tiny-llama"} and set(t.metric) == {"test"}  # every table says what wrote it
    st = read_json(tmp_path / "stats.json")
    assert st["setup"]["baseline"]["n_windows"] == 2 and st["comparisons"]
    assert (tmp_path / "perturb_damage.png").exists()


def test_perturb_stage_dose_list_and_bottom_k_without_scores(lm, tmp_path):
    sel = random_selection(lm.inventory, 2, 1)
    perturb(command(scales=(0.1, 1.0), perturbations=("sign_flip",), controls=(), seeds=(1,)), lm, sel, {}, tmp_path)
    assert (tmp_path / "perturb_dose.png").exists()
    with pytest.raises(EsaError, match="bottom_k"):
        perturb(command(controls=("bottom_k",)), lm, sel, {}, tmp_path)


def test_scorecard_rows_from_results():
    table, wins = synthetic_table(effect=1.0)
    st = analyze(table, wins, n_boot=200)
    rows = {r.id: r for r in criteria.phase3_rows(st, "stats.json", expected_types=["sign_flip", "zero"])}
    assert rows["P3.sign_flip_ratio"].passed is True and rows["P3.sign_flip_ratio"].measured > 0
    assert rows["P3.significance"].passed is True
    assert rows["P3.dose_monotonic"].passed is None and "2 or more doses" in rows["P3.dose_monotonic"].note
    missing = criteria.p3_significance(st, "x", expected=["sign_flip", "zero", "bit_flip"])[0]
    assert missing.passed is None and "bit_flip" in missing.note
    null_table, null_wins = synthetic_table(effect=0.05)
    null = analyze(null_table, null_wins, n_boot=200)
    assert criteria.p3_sign_flip_ratio(null, "x")[0].passed is False
    j = criteria.p2_jaccard({"grad_x_weight": 0.5, "act_mag": 0.2}, 3, "x")
    assert [r.passed for r in j] == [True, False]
    assert criteria.p2_jaccard({"grad_x_weight": 0.5}, 2, "x")[0].passed is None
    assert criteria.p2_metric_overlap(None, "x")[0].passed is None
    assert criteria.p2_metric_overlap(0.7, "x")[0].passed is True
    few = criteria.p3_cross_architecture({"a": ("llama", st), "b": ("mistral", st)}, "x")[0]
    assert few.passed is None and "only 2 architecture" in few.note
    four = criteria.p3_cross_architecture({m: (m, st) for m in ("llama", "mistral", "phi3", "mixtral")}, "x")[0]
    assert four.passed is True and four.measured == 4
    assert not math.isnan(rows["P3.significance"].measured)
