"""`single_weight_test`: one weight zeroed alone against random single weights of its matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import planted_tiny_qwen2

from esa.errors import EsaError
from esa.perturb import weights_hash
from esa.perturb.advanced import single_weight_test


def _windows(n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(5))


@pytest.fixture()
def planted():
    return planted_tiny_qwen2()


def test_a_planted_weight_is_confirmed_against_every_control_and_the_model_is_restored(one_thread, planted):
    lm, spec = planted
    before = weights_hash(lm.model)
    r = single_weight_test(lm.model, lm.inventory, spec.name, 9, 4, _windows(), n_controls=20)
    assert weights_hash(lm.model) == before
    assert r["n_controls"] == 20 and r["delta_log_ppl"] > r["control_max"]
    assert r["p_value"] == pytest.approx(1 / 21) and r["verdict"] == "confirmed"


def test_a_weight_that_does_nothing_is_not_confirmed(one_thread, planted):
    lm, spec = planted
    with torch.no_grad():
        lm.model.get_parameter(spec.name)[3, 7] = 0.0  # zeroing a zero changes nothing: effect exactly 0
    r = single_weight_test(lm.model, lm.inventory, spec.name, 3, 7, _windows(), n_controls=20)
    assert r["delta_log_ppl"] == 0.0 and r["p_value"] > 0.05 and r["verdict"] == "not confirmed"


def test_too_few_controls_is_underpowered_whatever_the_effect(one_thread, planted):
    lm, spec = planted
    r = single_weight_test(lm.model, lm.inventory, spec.name, 9, 4, _windows(), n_controls=5)
    assert r["p_value"] == pytest.approx(1 / 6) and r["verdict"] == "underpowered"


def test_controls_are_nonzero_weights_of_the_same_matrix_other_than_the_target(one_thread, planted):
    lm, spec = planted
    w = lm.model.get_parameter(spec.name)
    with torch.no_grad():  # leave only the target and three other weights nonzero
        keep = w.detach().clone()
        w.zero_()
        for r, c in [(9, 4), (0, 0), (5, 5), (20, 30)]:
            w[r, c] = keep[r, c]
    r = single_weight_test(lm.model, lm.inventory, spec.name, 9, 4, _windows(), n_controls=20)
    assert r["n_controls"] == 3 and r["verdict"] == "underpowered"


@pytest.mark.parametrize("row,col", [(-1, 0), (64, 0), (0, 32)])
def test_a_weight_outside_the_matrix_is_refused_with_its_shape(planted, row, col):
    lm, spec = planted
    with pytest.raises(EsaError, match=r"outside .*shape \(64, 32\)"):
        single_weight_test(lm.model, lm.inventory, spec.name, row, col, _windows())


def test_a_tie_with_every_control_is_not_confirmed(one_thread, planted):
    lm, _ = planted
    layer = lm.model.model.layers[1]
    with torch.no_grad():  # the block's MLP input is now exactly zero: no up_proj weight can change anything
        layer.post_attention_layernorm.weight.zero_()
    spec = next(s for s in lm.inventory if s.layer == 1 and s.component == "up")
    r = single_weight_test(lm.model, lm.inventory, spec.name, 2, 3, _windows(), n_controls=20)
    assert r["delta_log_ppl"] == 0.0 and r["control_max"] == 0.0
    assert r["p_value"] == 1.0 and r["verdict"] == "not confirmed"
