"""Architecture analyzer on synthetic top-k tables with planted answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esa.analysis import architecture as arch
from esa.errors import EsaError

ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


def topk_table(attn_scale: float, ffn_scale: float, layers: int = 6, k: int = 20, seed: int = 0,
               depth_slope: float = 0.0, metric: str = "grad_x_weight", n_experts: int = 0,
               expert_scales: np.ndarray | None = None, seeds: tuple[int, ...] = (1, 2)) -> pd.DataFrame:
    """k rows per matrix; scores lognormal around the given scale (times exp(depth_slope * layer))."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        for layer in range(layers):
            depth = np.exp(depth_slope * layer)
            mats = [(c, "attention", -1, attn_scale) for c in ATTN]
            if n_experts:
                mats += [(c, "expert", e, ffn_scale * expert_scales[layer, e]) for c in ("gate_up", "down")
                         for e in range(n_experts)]
                mats.append(("router", "router", -1, ffn_scale))
            else:
                mats += [(c, "mlp", -1, ffn_scale) for c in MLP]
            for comp, kind, expert, scale in mats:
                score = np.sort(scale * depth * rng.lognormal(0, 0.3, k))[::-1]
                rows.append(pd.DataFrame(dict(
                    metric=metric, seed=s, param=f"model.layers.{layer}.{comp}.weight", layer=layer, component=comp,
                    kind=kind, expert=expert, row=rng.integers(0, 64, k), col=rng.integers(0, 64, k), score=score,
                    rank=np.arange(1, k + 1))))
    return pd.concat(rows, ignore_index=True)


def test_attention_ffn_ratio_recovers_planted_split():
    tables = {"a": topk_table(3.0, 1.0, seed=1), "b": topk_table(1.0, 2.0, seed=2)}
    r = arch.attention_ffn_ratio(arch.combine_topk(tables)).groupby("model")["attn_ffn_ratio"].mean()
    assert r["a"] == pytest.approx(3.0, rel=0.15)
    assert r["b"] == pytest.approx(0.5, rel=0.15)


def _families(planted: bool) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    tables, meta = {}, []
    for i in range(3):
        tables[f"x{i}"] = topk_table(2.0, 1.0, seed=10 + i)
        tables[f"y{i}"] = topk_table(2.0 if not planted else 0.7, 1.0, seed=20 + i)
        meta += [dict(model=f"x{i}", family="X", moe=False, n_layers=6),
                 dict(model=f"y{i}", family="Y", moe=False, n_layers=6)]
    return tables, pd.DataFrame(meta)


def test_permutation_detects_planted_family_difference():
    tables, meta = _families(planted=True)
    out = arch.compare_architectures(tables, meta, n_perm=2000)
    t = out["tests"].set_index("comparison").loc["X vs Y"]
    assert t["p_perm_holm"] < 0.01 and t["p_mw_holm"] < 0.01
    assert t["diff"] == pytest.approx(np.log(2.0 / 0.7), abs=0.15)
    assert "not independent" in t["confounds"]


def test_permutation_null_family_difference_is_not_significant():
    tables, meta = _families(planted=False)
    t = arch.compare_architectures(tables, meta, n_perm=2000)["tests"].set_index("comparison").loc["X vs Y"]
    assert t["p_perm"] > 0.05 and abs(t["diff"]) < 0.1


def test_permutation_test_calibration_under_null():
    rng = np.random.default_rng(0)
    ps = [arch.permutation_test(rng.normal(size=8), rng.normal(size=8), n_perm=500, seed=i)[1] for i in range(60)]
    assert 0.01 <= np.mean(np.array(ps) < 0.05) <= 0.15  # about 5% false positives


def test_layer_progression_and_depth_trend():
    tables = {"rise": topk_table(1.0, 1.0, depth_slope=0.4, seed=3), "flat": topk_table(1.0, 1.0, seed=4)}
    topk = arch.combine_topk(tables)
    trend = arch.depth_trend(arch.layer_progression(topk)).set_index(["model", "group"])
    assert trend.loc[("rise", "ffn"), "spearman_rho"] > 0.9
    assert trend.loc[("rise", "ffn"), "peak_layer"] == 5
    prog = arch.layer_progression(topk)
    assert prog["rel_depth"].between(0, 1).all()


def test_moe_breakdown_load_vs_sensitivity_and_dense_vs_moe():
    layers, n_exp = 4, 4
    rng = np.random.default_rng(5)
    load = rng.integers(100, 5000, size=(layers, n_exp)).astype(float)
    scales = load / load.mean()  # planted: busier experts are more sensitive
    tables = {"moe": topk_table(1.0, 1.0, layers=layers, n_experts=n_exp, expert_scales=scales, seed=6),
              "dense": topk_table(1.0, 1.0, layers=layers, seed=7)}
    routing = pd.DataFrame([dict(model="moe", layer=lay, expert=e, tokens=load[lay, e])
                            for lay in range(layers) for e in range(n_exp)])
    meta = pd.DataFrame(dict(model=["moe", "dense"], family=["f", "f"], moe=[True, False]))
    out = arch.compare_architectures(tables, meta, routing_counts=routing, n_perm=500)
    assert out["moe_load"].set_index("model").loc["moe", "spearman_rho"] > 0.8
    assert set(out["moe_by_kind"]["kind"]) == {"attention", "expert", "router"}
    assert "dense vs moe" in set(out["tests"]["comparison"])
    assert "p_perm_holm" in out["tests"].columns
    assert (out["tests"]["p_perm_holm"] >= out["tests"]["p_perm"]).all()


def test_instruct_vs_base_paired():
    base = topk_table(1.0, 1.0, seed=8)
    inst = base.assign(score=base["score"] * 1.5 * np.random.default_rng(9).lognormal(0, 0.05, len(base)))
    out = arch.instruct_vs_base(arch.combine_topk({"b": base, "b-instruct": inst}), {"b-instruct": "b", "z": "b"})
    row = out.set_index("instruct").loc["b-instruct"]
    assert row["median_log_ratio"] == pytest.approx(np.log(1.5), abs=0.05) and row["p"] < 1e-3
    assert out.set_index("instruct").loc["z", "n_matrices"] == 0


def test_bad_inputs_say_what_is_missing():
    a, b = topk_table(1, 1, seed=1), topk_table(1, 1, seed=2)
    with pytest.raises(EsaError, match="at least two models"):
        arch.combine_topk({"a": a})
    with pytest.raises(EsaError, match=r"\['b'\] have no top-k.*esa-runner --model b"):
        arch.combine_topk({"a": a, "b": b.iloc[:0]})
    with pytest.raises(EsaError, match="mixed metrics"):
        arch.combine_topk({"a": a, "b": b.assign(metric="act_mag")})
    with pytest.raises(EsaError, match=r"\['a'\] have no top-k rows for metric 'act_mag'.*--model a"):
        arch.combine_topk({"a": a, "b": b.assign(metric="act_mag")}, metric="act_mag")
    both = pd.concat([a, a.assign(metric="act_mag")])
    assert set(arch.combine_topk({"a": both, "b": b}, metric="grad_x_weight")["metric"]) == {"grad_x_weight"}
    with pytest.raises(EsaError, match="mixed k"):
        arch.combine_topk({"a": a, "b": b[b["rank"] <= 10]})
    with pytest.raises(EsaError, match="lacks column"):
        arch.combine_topk({"a": a, "b": b.drop(columns="score")})


def test_dense_vs_moe_not_duplicated_when_it_is_the_family_split():
    layers, n_exp = 3, 2
    scales = np.ones((layers, n_exp))
    tables = {"moe": topk_table(1.0, 1.0, layers=layers, n_experts=n_exp, expert_scales=scales, seed=6),
              "dense": topk_table(1.0, 1.0, layers=layers, seed=7)}
    tests = arch.compare_architectures(tables, n_perm=200)["tests"]
    assert list(tests["comparison"]) == ["dense vs moe"] and list(tests["group_col"]) == ["family"]
