"""Architecture-specific patterns (Phase 4 week 12) with planted answers, and routing load on a tiny MoE."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from esa.analysis import architecture as arch
from esa.analysis import patterns
from esa.errors import EsaError
from esa.models import load
from tests.test_analysis_architecture import _families, topk_table


def _with_planted_top(df: pd.DataFrame, layer: int, factor: float) -> pd.DataFrame:
    """Make the first down-projection row of `layer` the model's top weight in every seed."""
    df = df.copy()
    for seed in df["seed"].unique():
        i = df[(df["seed"] == seed) & (df["layer"] == layer) & (df["component"] == "down")].index[0]
        df.loc[i, ["row", "col"]] = (5, 7)
        df.loc[i, "score"] = df["score"].max() * factor
    return df


def test_top_weights_finds_the_planted_weight_and_its_margin():
    topk = arch.combine_topk({"a": _with_planted_top(topk_table(1.0, 1.0, seed=1), 4, 100.0),
                              "b": topk_table(1.0, 1.0, seed=2)})
    top = patterns.top_weights(topk, n_layers={"a": 6, "b": 6})
    a = top[top.model == "a"]
    assert (a.layer == 4).all() and (a.component == "down").all() and (a.row == 5).all() and (a.col == 7).all()
    assert a.same_across_seeds.all() and a.rel_depth.iloc[0] == pytest.approx(0.8)
    assert (a.score_over_topk_median > 100).all()
    assert (top[top.model == "b"].score_over_topk_median < 10).all()


def test_component_shares_sum_to_one_and_follow_the_planted_split():
    topk = arch.combine_topk({"a": topk_table(3.0, 1.0, seed=1), "b": topk_table(1.0, 3.0, seed=2)})
    sh = patterns.component_shares(topk)
    assert sh.groupby("model")["score_share"].sum().to_numpy() == pytest.approx([1.0, 1.0])
    attn = sh[sh.kind == "attention"].groupby("model")["score_share"].sum()
    # a: 4 attention matrices at 3x vs 3 MLP at 1x -> 12/15; b: 4 at 1x vs 3 at 3x -> 4/13
    assert attn["a"] == pytest.approx(12 / 15, rel=0.1)
    assert attn["b"] == pytest.approx(4 / 13, rel=0.1)


def test_concentration_of_equal_and_of_single_dominant_scores():
    flat = pd.DataFrame(dict(model="m", seed=1, score=np.ones(1000)))
    spike = pd.DataFrame(dict(model="s", seed=1, score=np.r_[1e6, np.ones(999)]))
    c = patterns.concentration(pd.concat([flat, spike])).set_index("model")
    assert c.loc["m", "gini"] == pytest.approx(0.0, abs=1e-9)
    assert c.loc["m", "share_top_frac"] == pytest.approx(0.01)
    assert c.loc["s", "share_top1"] > 0.99 and c.loc["s", "gini"] > 0.99
    with pytest.raises(EsaError, match="top_frac"):
        patterns.concentration(flat, top_frac=1.5)


def test_routing_load_counts_every_routed_token():
    lm = load("tiny-mixtral", device="cpu")
    ids = torch.randint(0, lm.info.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    load_df = patterns.routing_load(lm.model, lm.inventory, ids, "tiny-mixtral", batch_size=2)
    k = lm.info.experts_per_token
    per_layer = load_df.groupby("layer")["tokens"].sum()
    assert (per_layer == ids.numel() * k).all()  # every token is routed to exactly k experts
    assert load_df.groupby("layer")["share"].sum().to_numpy() == pytest.approx(np.ones(len(per_layer)))
    dense = load("tiny-llama", device="cpu")
    with pytest.raises(EsaError, match="no MoE experts"):
        patterns.routing_load(dense.model, dense.inventory, ids, "tiny-llama")


def test_superweight_presence_dense_and_moe():
    dense = load("tiny-llama", device="cpu")
    row = patterns.superweight_presence(dense.model, dense.tokenizer, dense.inventory, "tiny-llama")
    assert row["applicable"] and row["n_layers_checked"] == dense.info.n_layers
    moe = load("tiny-mixtral", device="cpu")
    row = patterns.superweight_presence(moe.model, moe.tokenizer, moe.inventory, "tiny-mixtral")
    assert not row["applicable"] and "down projections" in row["note"]


def test_family_criterion_passes_only_for_a_planted_difference():
    for planted, expect in ((True, True), (False, False)):
        tables, meta = _families(planted)
        tests = arch.compare_architectures(tables, meta, n_perm=2000)["tests"]
        (row,) = patterns.family_criteria(tests, "test")
        assert row.passed is expect, row.note
        assert "Holm p" in row.note and "Confounds" in row.note
    (row,) = patterns.family_criteria(pd.DataFrame(), "test")
    assert row.passed is None and "no family comparison" in row.note
