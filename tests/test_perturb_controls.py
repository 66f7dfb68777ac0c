"""Control groups: counts matched per matrix, reproducible with the seed, disjoint from the top-k, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from esa.errors import EsaError
from esa.models import tiny_model, weight_inventory
from esa.perturb import ControlInput, build_groups, make_control, parse_controls, per_matrix_counts
from esa.perturb.apply import count_targets, targets_from_selection
from esa.perturb.controls import overlap, top_n_stable


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("tiny-mixtral", seed=0)
    inv = weight_inventory(model)
    rng = np.random.default_rng(0)
    # uneven per-matrix counts (1..6), so "matched per matrix" is a real constraint
    top = {}
    for s in inv:
        parts = []
        for e in range(s.n_experts) if s.n_experts else [-1]:
            n = int(rng.integers(1, 7))
            base = max(e, 0) * s.rows * s.cols
            parts.append(torch.from_numpy(rng.choice(s.rows * s.cols, n, replace=False) + base))
        top[s.name] = torch.sort(torch.cat(parts)).values
    scores = {s.name: torch.rand(s.shape, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(inv)}
    return model, inv, top, scores


def test_random_k_matches_per_matrix_counts_and_is_seeded(setup):
    model, inv, top, _ = setup
    a = make_control("random_k", ControlInput(model, inv, top, seed=3))
    b = make_control("random_k", ControlInput(model, inv, top, seed=3))
    c = make_control("random_k", ControlInput(model, inv, top, seed=4))
    assert per_matrix_counts(a, inv) == per_matrix_counts(top, inv)
    assert all(torch.equal(a[n], b[n]) for n in a) and a.keys() == b.keys()
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert overlap(a, top) == 0
    for idx in a.values():
        assert idx.unique().numel() == idx.numel()


def test_random_global_total_count_and_seed(setup):
    model, inv, top, _ = setup
    a = make_control("random_global", ControlInput(model, inv, top, seed=1))
    b = make_control("random_global", ControlInput(model, inv, top, seed=1))
    assert count_targets(a) == count_targets(top)
    assert overlap(a, top) == 0
    assert all(torch.equal(a[n], b[n]) for n in a)
    specs = {s.name: s for s in inv}
    assert all(int(v.max()) < specs[n].numel for n, v in a.items())


def test_bottom_k_takes_lowest_scores_per_matrix(setup):
    model, inv, top, scores = setup
    bot = make_control("bottom_k", ControlInput(model, inv, top, seed=0, scores=scores))
    assert per_matrix_counts(bot, inv) == per_matrix_counts(top, inv)
    name = inv[0].name
    n = top[name].numel()
    expected = torch.sort(torch.argsort(scores[name].reshape(-1))[:n]).values
    assert torch.equal(bot[name], expected)
    with pytest.raises(EsaError, match="needs the sensitivity scores"):
        make_control("bottom_k", ControlInput(model, inv, top, seed=0))


def test_bottom_k_draws_tied_lowest_scores_uniformly_not_by_position():
    from esa.perturb.controls import lowest_n_random_ties

    # 40 exact zeros (a quantised checkpoint's) spread over 1000 scores, 3 scores below them
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0)) + 1.0
    zeros = torch.arange(0, 1000, 25)
    x[zeros] = 0.0
    x[[7, 500, 993]] = -1.0
    rng = np.random.default_rng
    a = lowest_n_random_ties(x, 13, rng(1))
    assert torch.equal(a, torch.sort(a).values) and a.unique().numel() == 13
    assert {7, 500, 993} <= set(a.tolist())  # everything strictly below the cut-off is always taken
    assert set(a.tolist()) - {7, 500, 993} <= set(zeros.tolist())
    assert torch.equal(a, lowest_n_random_ties(x, 13, rng(1)))  # seeded
    # lower-index tie-breaking would take the first 10 zeros (indices 0..225); uniform draws cover the range
    draws = torch.cat([lowest_n_random_ties(x, 13, rng(s)) for s in range(50)])
    assert draws[x[draws] == 0].float().mean() > 400
    assert torch.equal(lowest_n_random_ties(x, 3, rng(2)), torch.tensor([7, 500, 993]))


def test_magnitude_k_takes_largest_abs_per_matrix(setup):
    model, inv, top, _ = setup
    mag = make_control("magnitude_k", ControlInput(model, inv, top, seed=0))
    assert per_matrix_counts(mag, inv) == per_matrix_counts(top, inv)
    s = next(x for x in inv if x.n_experts)  # an expert tensor: per expert slice
    w = model.get_parameter(s.name).detach().abs().reshape(s.n_experts, -1)
    m = s.rows * s.cols
    for e in range(s.n_experts):
        n = int(((top[s.name] // m) == e).sum())
        got = mag[s.name][(mag[s.name] // m) == e] - e * m
        assert torch.equal(got, torch.sort(torch.topk(w[e], n).indices).values)


def test_top_n_stable_breaks_ties_by_lower_index():
    x = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 0.0])
    assert top_n_stable(x, 2).tolist() == [1, 2]
    assert top_n_stable(x, 1, largest=False).tolist() == [3]


def test_k_too_large_for_random_k_is_an_error():
    model = tiny_model("tiny-llama", seed=0)
    inv = weight_inventory(model)
    s = inv[0]
    top = {s.name: torch.arange(s.numel - 2)}  # leaves only 2 weights outside the top-k
    with pytest.raises(EsaError, match="random_k cannot draw"):
        make_control("random_k", ControlInput(model, inv, top, seed=0))


def test_unknown_control_is_an_error():
    with pytest.raises(EsaError, match="unknown control 'lucky_k'"):
        parse_controls("random_k,lucky_k")
    model = tiny_model("tiny-llama", seed=0)
    inv = weight_inventory(model)
    sel = pd.DataFrame([dict(seed=0, param=inv[0].name, expert=-1, row=0, col=0)])
    with pytest.raises(EsaError, match="unknown control"):
        build_groups(model, inv, sel, [0], ["lucky_k"])
    assert count_targets(targets_from_selection(sel, inv)) == 1


def test_group_composition_counts_exact_zeros():
    from esa.perturb.sweep import group_composition

    model = tiny_model("tiny-llama", seed=0)
    name = weight_inventory(model)[0].name
    w = model.get_parameter(name)
    with torch.no_grad():
        w.view(-1)[:4] = 0.0
    groups = {("bottom_k", 1): {name: torch.tensor([0, 1, 2, 3, 10, 11, 12, 13])},
              ("top_k", 1): {name: torch.tensor([20, 21])}}
    comp = group_composition(model, groups).set_index("group")
    assert comp.loc["bottom_k", "n"] == 8 and comp.loc["bottom_k", "zero_share"] == 0.5
    assert comp.loc["top_k", "zero_share"] == 0.0
    assert comp.loc["top_k", "median_abs_w"] == pytest.approx(float(w.detach().view(-1)[20:22].abs().median()))
