"""Top-k selection, control sets, stability and tail statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from esa.errors import EsaError
from esa.models import load
from esa.sensitivity.select import (
    bottom_k,
    from_candidates,
    matrix_candidates,
    select_topk,
    topk_flat,
)
from esa.stats import stability, tails


@pytest.fixture(scope="module")
def mixtral():
    return load("tiny-mixtral", device="cpu")


def _scores(inventory, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in inventory:
        t = torch.rand(s.shape, generator=g)
        out[s.name] = (t * 8).floor() if ties else t.pow(8)  # ties: only 8 distinct values
    return out


def test_topk_flat_breaks_ties_by_lower_index():
    v = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, float("nan")])
    vals, idx = topk_flat(v, 2)
    assert idx.tolist() == [1, 2] and vals.tolist() == [3.0, 3.0]
    _, idx = topk_flat(v, 4)
    assert idx.tolist() == [1, 2, 4, 3]
    _, idx = topk_flat(v, 2, largest=False)
    assert idx.tolist() == [0, 3]


@pytest.mark.parametrize("ties", [False, True])
def test_global_topk_within_union_of_per_layer_and_matches_brute_force(mixtral, ties):
    inv = mixtral.inventory
    scores = _scores(inv, ties=ties)
    k = 50
    per_layer = select_topk(scores, inv, k, "per_layer")
    glob = select_topk(scores, inv, k, "global")
    key = ["param", "expert", "row", "col"]
    assert len(glob) == k and glob["rank"].tolist() == list(range(1, k + 1))
    assert stability.weight_set(glob) <= stability.weight_set(per_layer)
    # brute force over every weight: score desc, then inventory order, then flat index
    rows = []
    for order, s in enumerate(inv):
        flat = scores[s.name].reshape(-1)
        rows.append(pd.DataFrame({"score": flat.double().numpy(), "order": order, "flat": np.arange(flat.numel()),
                                  "param": s.name}))
    allw = pd.concat(rows).sort_values(["score", "order", "flat"], ascending=[False, True, True], kind="mergesort")
    expect = allw.head(k)
    got_flat = [inv[[s.name for s in inv].index(p)].ravel(torch.tensor(e), torch.tensor(r), torch.tensor(c)).item()
                for p, e, r, c in glob[key].itertuples(index=False)]
    assert list(zip(expect["param"], expect["flat"], strict=True)) == list(zip(glob["param"], got_flat, strict=True))
    # per_layer: k rows in every matrix (each expert slice counts as one matrix)
    n_mats = sum(s.n_experts or 1 for s in inv)
    assert len(per_layer) == k * n_mats
    assert per_layer.groupby(["param", "expert"]).size().eq(k).all()


def test_candidates_give_the_same_selection_as_direct(mixtral):
    inv = mixtral.inventory
    scores = _scores(inv, seed=1)
    cands = matrix_candidates(scores, inv, 60)
    for mode in ("per_layer", "global"):
        pd.testing.assert_frame_equal(from_candidates(cands, 25, mode), select_topk(scores, inv, 25, mode))
    low = bottom_k(scores, inv, 5, "global")
    assert low["score"].is_monotonic_increasing
    assert low["score"].iloc[-1] <= min(float(t.min()) for t in scores.values()) + 1e-6 or len(low) == 5


def test_selection_is_deterministic(mixtral):
    inv = mixtral.inventory
    a = select_topk(_scores(inv, ties=True), inv, 30, "global")
    b = select_topk(_scores(inv, ties=True), inv, 30, "global")
    pd.testing.assert_frame_equal(a, b)


def test_bad_k_and_mode(mixtral):
    inv = mixtral.inventory
    scores = _scores(inv)
    with pytest.raises(EsaError, match="per_layer, global|global, per_layer"):
        select_topk(scores, inv, 5, "per_block")
    for k in (0, -3):
        with pytest.raises(EsaError, match="positive"):
            select_topk(scores, inv, k)
    smallest = min(s.rows * s.cols for s in inv)
    with pytest.raises(EsaError, match="smallest weight matrix"):
        select_topk(scores, inv, smallest + 1, "per_layer")
    with pytest.raises(EsaError, match="larger than the"):
        select_topk(scores, inv, sum(s.numel for s in inv) + 1, "global")


def test_jaccard_rank_correlation_and_agreement(mixtral):
    inv = mixtral.inventory
    s1, s2 = _scores(inv, 0), _scores(inv, 1)
    a, b = select_topk(s1, inv, 20, "global"), select_topk(s2, inv, 20, "global")
    assert stability.jaccard(a, a) == 1.0
    sa, sb = stability.weight_set(a), stability.weight_set(b)
    assert stability.jaccard(a, b) == pytest.approx(len(sa & sb) / len(sa | sb))
    pj = stability.pairwise_jaccard({1: a, 2: b, 3: a})
    assert pj["n_pairs"] == 3 and pj["max"] == 1.0
    table = stability.union_scores({1: a, 2: a}, {1: s1, 2: s1}, inv)
    assert stability.rank_correlation(table)["mean"] == pytest.approx(1.0)
    agree = stability.metric_agreement({"x": a, "y": b})
    assert agree.loc[0, "overlap"] == pytest.approx(len(sa & sb) / 20)
    with pytest.raises(EsaError):
        stability.pairwise_jaccard({1: a})


def test_tail_stats_are_exact_and_hill_recovers_alpha():
    rng = np.random.default_rng(0)
    x = rng.lognormal(0, 2, size=100_003).astype(np.float32)
    parts = {"a": torch.from_numpy(x[:40_000]), "b": torch.from_numpy(x[40_000:]).reshape(-1, 1)}
    st = tails.tail_stats(parts, exact=True)
    assert st["median"] == pytest.approx(float(np.median(x)), rel=1e-6)
    m = int(np.ceil(0.01 * x.size))
    assert st["top_mean"] == pytest.approx(float(np.sort(x)[-m:].astype(np.float64).mean()), rel=1e-5)
    approx = tails.tail_stats(parts)  # binned: within 0.8%
    assert approx["median"] == pytest.approx(st["median"], rel=8e-3)
    assert approx["top_mean"] == pytest.approx(st["top_mean"], rel=8e-3)
    assert st["max"] == pytest.approx(float(x.max()))
    pareto = (rng.pareto(1.5, size=200_000) + 1).astype(np.float32)
    assert tails.tail_stats(torch.from_numpy(pareto))["hill_alpha"] == pytest.approx(1.5, rel=0.15)
    surv = tails.survival_curve(parts)
    assert surv["survival"].is_monotonic_decreasing and surv["survival"].iloc[0] == pytest.approx(1.0)


def _numpy_histogram(parts: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The histogram as the host path built it before it moved to torch (np.bincount of the copied scores)."""
    counts = np.zeros(tails.N_BINS, dtype=np.int64)
    sums = np.zeros(tails.N_BINS, dtype=np.float64)
    n_neg = n_nonfinite = 0
    for t in parts.values():
        raw = t.reshape(-1).float()
        n_nonfinite += int((~torch.isfinite(raw)).sum())
        raw = torch.nan_to_num(raw, nan=0.0, posinf=tails.F32_MAX, neginf=-tails.F32_MAX)
        n_neg += int((raw < 0).sum())
        v = raw.abs()
        b = (v.view(torch.int32) >> 16).numpy()
        counts += np.bincount(b, minlength=tails.N_BINS)
        sums += np.bincount(b, weights=v.numpy(), minlength=tails.N_BINS)
    return counts, sums, n_neg, n_nonfinite


def test_tail_histogram_on_torch_equals_the_numpy_path():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(50_001) * rng.lognormal(0, 3, 50_001)).astype(np.float32)
    x[[5, 17, 99]] = [np.nan, np.inf, -np.inf]
    parts = {"a": torch.from_numpy(x[:20_000]).reshape(100, 200), "b": torch.from_numpy(x[20_000:]),
             "c": torch.from_numpy(x[:300]).bfloat16()}
    p = tails._Pass(parts)
    counts, sums, n_neg, n_nonfinite = _numpy_histogram(parts)
    assert np.array_equal(p.counts, counts)
    assert np.array_equal(p.sums, sums)  # float64 sums in the same order on the CPU: bit-equal
    assert (p.n_negative, p.n_nonfinite, p.n) == (n_neg, n_nonfinite, 50_301)
    assert n_nonfinite == 6 and n_neg > 20_000  # the bf16 copy of x[:300] holds the three once more
