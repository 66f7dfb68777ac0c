"""Perturbations: exact restore, only the selected weights change, bit flips and inf/NaN counts, bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from esa.errors import EsaError
from esa.models import tiny_model, weight_inventory
from esa.perturb import (
    PERTURBATIONS,
    AllNonFinite,
    PerturbSpec,
    bit_positions,
    build_groups,
    evaluate_perturbed,
    flip_bits,
    perturbed,
    run_sweep,
    targets_from_selection,
    weights_hash,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_selection(inventory, k: int, seed: int) -> pd.DataFrame:
    """A top-k-shaped table with k random weights per matrix (stands in for select_topk)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in inventory:
        for e in range(s.n_experts) if s.n_experts else [-1]:
            flat = rng.choice(s.rows * s.cols, size=k, replace=False)
            for r, f in enumerate(flat):
                rows.append(dict(metric="test", seed=seed, param=s.name, layer=s.layer, component=s.component,
                                 kind=s.kind, expert=e, row=int(f // s.cols), col=int(f % s.cols),
                                 score=float(k - r), rank=r + 1))
    return pd.DataFrame(rows)


def windows(n: int = 3, seqlen: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 259, (n, seqlen), generator=g)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_flat(before: dict[str, torch.Tensor], model) -> dict[str, set[int]]:
    out = {}
    for n, p in model.named_parameters():
        a = before[n].reshape(-1)
        b = p.detach().reshape(-1)
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        idx = (~same).nonzero().flatten().tolist()
        if idx:
            out[n] = set(idx)
    return out


ALL_SPECS = [PerturbSpec("sign_flip"), PerturbSpec("sign_flip", scale=0.1), PerturbSpec("gauss_noise", scale=0.5),
             PerturbSpec("gauss_noise", scale=2.0, sigma="abs"), PerturbSpec("zero"),
             PerturbSpec("bit_flip", prob=1.0, bits="any"), PerturbSpec("bit_flip", prob=0.5, bits="exponent"),
             PerturbSpec("bit_flip", prob=1.0, bits="msb-exponent"), PerturbSpec("bit_flip", prob=1.0, bits="sign"),
             PerturbSpec("bit_flip", prob=0.5, bits="lsb-exponent")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_sweep_restores_every_weight_bit_exactly(dtype):
    # tiny-mixtral: 3-D expert tensors and a router are covered too. One seed and two groups keep it fast;
    # every control is covered by test_perturb_controls.
    model = tiny_model("tiny-mixtral", seed=1, dtype=dtype)
    inv = weight_inventory(model)
    sel = random_selection(inv, 5, seed=1)
    h0 = weights_hash(model)
    groups = build_groups(model, inv, sel, [1], ["random_k"])
    res = run_sweep(model, windows(1, 8), groups, ALL_SPECS, show_progress=False)
    assert weights_hash(model) == h0
    assert len(res.table) == len(ALL_SPECS) * len(groups)
    # bit choices other than the default are their own perturbation type (never pooled with exponent flips)
    assert {"bit_flip", "bit_flip[lsb-exponent]", "bit_flip[msb-exponent]"} <= set(res.table.perturbation)
    # the sweep really perturbed something: top-k sign flips change the loss
    sf = res.table[(res.table.perturbation == "sign_flip") & (res.table.scale == 1.0)]
    assert (sf["delta_log_ppl"].abs() > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.label())
def test_only_selected_weights_change(dtype, spec):
    model = tiny_model("tiny-mixtral", seed=2, dtype=dtype)
    inv = weight_inventory(model)
    targets = targets_from_selection(random_selection(inv, 4, seed=3), inv)
    before = snapshot(model)
    with perturbed(model, targets, spec, seed=7) as st:
        diff = changed_flat(before, model)
        allowed = {n: set(v.tolist()) for n, v in targets.items()}
        for n, idx in diff.items():
            assert n in allowed and idx <= allowed[n], f"{n} changed outside the selection"
        if spec.name in ("sign_flip", "zero") or (spec.name == "bit_flip" and spec.prob == 1.0):
            # every selected weight changes (a zero weight under sign_flip/zero is the only exception)
            nonzero = sum(int((before[n].reshape(-1)[v] != 0).sum()) for n, v in targets.items())
            assert sum(len(v) for v in diff.values()) >= (nonzero if spec.name != "bit_flip" else
                                                          sum(len(v) for v in allowed.values()))
        assert st.n_weights == sum(len(v) for v in targets.values())
    assert changed_flat(before, model) == {}


def test_sign_flip_and_zero_values():
    model = tiny_model("tiny-llama", seed=0)
    inv = weight_inventory(model)
    targets = targets_from_selection(random_selection(inv, 3, seed=0), inv)
    name, idx = next(iter(targets.items()))
    w0 = model.get_parameter(name).detach().reshape(-1)[idx].clone()
    with perturbed(model, targets, PerturbSpec("sign_flip", scale=0.5)):
        assert torch.equal(model.get_parameter(name).reshape(-1)[idx], -0.5 * w0)
    with perturbed(model, targets, PerturbSpec("zero")):
        assert (model.get_parameter(name).reshape(-1)[idx] == 0).all()


def test_gauss_noise_sigma_is_matrix_std_and_seeded():
    model = tiny_model("tiny-llama", seed=0)
    inv = weight_inventory(model)
    spec0 = inv[0]
    p = model.get_parameter(spec0.name)
    idx = torch.arange(p.numel())  # the whole matrix, so the noise's std is measurable
    w0 = p.detach().reshape(-1).clone()
    with perturbed(model, {spec0.name: idx}, PerturbSpec("gauss_noise", scale=0.3), seed=5):
        noise = p.detach().reshape(-1) - w0
        first = noise.clone()
    assert noise.std().item() == pytest.approx(0.3 * w0.std().item(), rel=0.1)
    with perturbed(model, {spec0.name: idx}, PerturbSpec("gauss_noise", scale=0.3), seed=5):
        assert torch.equal(p.detach().reshape(-1) - w0, first)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flip_bits_layout_and_involution(dtype):
    x = torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=dtype)
    sign = bit_positions(dtype, "sign")[0]
    assert torch.equal(flip_bits(x, torch.full((4,), sign)), -x)
    pos = torch.tensor([0, sign, -1, bit_positions(dtype, "msb-exponent")[0]])
    once = flip_bits(x, pos)
    assert torch.equal(once[2], x[2])  # -1: untouched
    twice = flip_bits(once, pos)
    assert torch.equal(twice.view(torch.int16 if dtype != torch.float32 else torch.int32),
                      x.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # 1.0 has exponent field 0111..1; flipping its MSB gives all ones with a zero mantissa: inf
    assert math.isinf(float(once[3]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_flip_counts_inf_and_nan(dtype):
    model = tiny_model("tiny-llama", seed=0, dtype=dtype)
    name = weight_inventory(model)[0].name
    p = model.get_parameter(name)
    with torch.no_grad():
        flat = p.data.reshape(-1)
        flat[0], flat[1], flat[2], flat[3] = 1.5, 1.0, -1.0, 3.0
    # msb-exponent flip: values in [1, 2) have exponent field 011..1 -> all ones: 1.5 (mantissa != 0) -> NaN,
    # +-1.0 -> +-inf; 3.0 (exponent field 100..0) -> 000..0, a tiny finite value.
    targets = {name: torch.tensor([0, 1, 2, 3])}
    with perturbed(model, targets, PerturbSpec("bit_flip", prob=1.0, bits="msb-exponent")) as st:
        new = p.detach().reshape(-1)[:4].float()
        assert st.n_inf == int(torch.isinf(new).sum()) and st.n_nan == int(torch.isnan(new).sum())
        assert (st.n_inf, st.n_nan) == (2, 1)
        assert math.isnan(float(new[0])) and float(new[1]) == math.inf and float(new[2]) == -math.inf
        assert math.isfinite(float(new[3])) and abs(float(new[3])) < 1e-4
    assert float(p.detach().reshape(-1)[0]) == 1.5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lsb_exponent_flip_doubles_or_halves_and_is_a_separate_type(dtype):
    x = torch.tensor([1.0, -3.0, 0.75, 6.0], dtype=dtype)
    out = flip_bits(x, torch.full((4,), bit_positions(dtype, "lsb-exponent")[0]))
    ratio = (out.float() / x.float()).tolist()
    assert all(r in (2.0, 0.5) for r in ratio), ratio  # the value is doubled or halved, never overflows
    assert PerturbSpec("bit_flip", bits="lsb-exponent").kind() == "bit_flip[lsb-exponent]"
    assert PerturbSpec("bit_flip").kind() == "bit_flip" and PerturbSpec("zero").kind() == "zero"
    with pytest.raises(EsaError, match="lsb-exponent"):
        PerturbSpec("bit_flip", bits="lsb")


def test_bit_flip_probability_zero_changes_nothing():
    model = tiny_model("tiny-llama", seed=0)
    inv = weight_inventory(model)
    targets = targets_from_selection(random_selection(inv, 4, seed=0), inv)
    h = weights_hash(model)
    with perturbed(model, targets, PerturbSpec("bit_flip", prob=0.0)) as st:
        assert weights_hash(model) == h and st.n_changed == 0


def test_restore_when_evaluation_raises():
    model = tiny_model("tiny-llama", seed=0)
    inv = weight_inventory(model)
    targets = targets_from_selection(random_selection(inv, 4, seed=0), inv)
    h = weights_hash(model)
    for name in PERTURBATIONS:
        with pytest.raises(RuntimeError, match="boom"), perturbed(model, targets, PerturbSpec(name, prob=1.0)):
            assert weights_hash(model) != h
            raise RuntimeError("boom")
        assert weights_hash(model) == h
    # and through the real evaluation path: bad token ids make the forward pass raise
    bad = torch.full((1, 8), 10_000)
    with pytest.raises(IndexError):
        evaluate_perturbed(model, bad, targets, PerturbSpec("zero"))
    assert weights_hash(model) == h


def test_all_nan_windows_is_a_clear_error_and_recorded_in_sweeps():
    model = tiny_model("tiny-llama", seed=0)
    inv = weight_inventory(model)
    sel = random_selection(inv, 4, seed=0)
    targets = targets_from_selection(sel, inv)
    h = weights_hash(model)
    # sign flip with a huge scale in fp32 -> inf weights -> NaN losses in every window
    spec = PerturbSpec("sign_flip", scale=1e38)
    with perturbed(model, targets, spec) as st:
        pass
    with pytest.raises(AllNonFinite, match="every one of the"):
        evaluate_perturbed(model, windows(), targets, spec)
    assert weights_hash(model) == h
    assert issubclass(AllNonFinite, EsaError)
    groups = build_groups(model, inv, sel, [0], [])
    res = run_sweep(model, windows(), groups, [spec], show_progress=False)
    row = res.table.iloc[0]
    assert row.n_nonfinite_windows == 3 and math.isnan(row.log_ppl) and math.isnan(row.delta_log_ppl)
    assert (row.n_inf_weights, row.n_nan_weights) == (st.n_inf, st.n_nan)
    with pytest.raises(AllNonFinite):
        run_sweep(model, windows(), groups, [spec], strict_nan=True, show_progress=False)
    assert weights_hash(model) == h


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="melt"), "unknown perturbation 'melt'"),
    (dict(name="sign_flip", scale=-1.0), "scale must be"),
    (dict(name="bit_flip", prob=1.5), r"probability must be in \[0, 1\]"),
    (dict(name="bit_flip", bits="mantissa"), "unknown bit choice"),
    (dict(name="gauss_noise", sigma="var"), "unknown gauss_noise sigma"),
])
def test_bad_specs(kwargs, match):
    with pytest.raises(EsaError, match=match):
        PerturbSpec(**kwargs)


def test_selection_naming_unknown_param_is_an_error():
    model = tiny_model("tiny-llama", seed=0)
    inv = weight_inventory(model)
    sel = random_selection(inv, 2, seed=0)
    sel.loc[0, "param"] = "nope.weight"
    with pytest.raises(EsaError, match="nope.weight"):
        targets_from_selection(sel, inv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_backup_past_a_fifth_of_a_matrix_restores_bit_exactly(dtype):
    """Writing most of a matrix backs up the matrix itself (cheaper than values + int64 index); the restore is
    still bit-exact, NaN payloads and -0.0 included, and overlapping writes unwind in reverse order."""
    from esa.perturb.apply import INT_VIEW, _InPlace, dense_backup_cheaper

    assert dense_backup_cheaper(300, 1000, 2) and not dense_backup_cheaper(100, 1000, 2)  # bf16: past 20%
    assert dense_backup_cheaper(400, 1000, 4) and not dense_backup_cheaper(300, 1000, 4)  # fp32: past 33%
    p = torch.randn(40, 25).to(dtype)
    ints = p.view(INT_VIEW[dtype]).view(-1)
    p.view(-1)[1] = -0.0
    ints[2] = ints[2] | 0x7F81 if dtype != torch.float32 else 0x7FC00123  # a NaN with a payload
    before = ints.clone()
    writes = _InPlace()
    with torch.no_grad():
        big = torch.arange(0, 900)  # 90% of the matrix: a dense backup
        writes.write("w", p, big, torch.full((900,), 7.0, dtype=dtype))
        small = torch.tensor([5, 950])  # then a few weights: values + index
        writes.write("w", p, small, torch.full((2,), -3.0, dtype=dtype))
    assert [e[1] is None for e in writes.entries] == [True, False]
    assert writes.stats.n_weights == 902 and writes.stats.n_changed == 902  # none was 7.0 or -3.0 before
    writes.restore()
    assert torch.equal(ints, before)


def test_sweep_tables_state_the_unchanged_share_and_bf16_leaves_large_weights_unchanged():
    """gauss_noise at 0.01 sigma in bf16: about half of the largest weights round back to themselves, a fifth of random
    ones do, and the sweep table says so in its unchanged_share column (1 - n_changed / k)."""
    model = tiny_model("tiny-llama", seed=1, dtype=torch.bfloat16)
    inv = weight_inventory(model)
    params = dict(model.named_parameters())
    large = {s.name: params[s.name].detach().float().abs().reshape(-1).topk(40).indices.sort().values for s in inv}
    rand = targets_from_selection(random_selection(inv, 40, seed=2), inv)
    groups = {("top_k", 1): large, ("random_k", 1): rand}
    res = run_sweep(model, windows(), groups, [PerturbSpec("gauss_noise", scale=0.01)], show_progress=False)
    t = res.table.set_index("group")
    assert (t["unchanged_share"] == 1 - t["n_changed"] / t["k"]).all()
    assert t.loc["top_k", "unchanged_share"] > 0.4 > 0.3 > t.loc["random_k", "unchanged_share"]  # 0.48 vs 0.20
