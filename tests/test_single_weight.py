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


def test_zero_alone_tests_the_detector_candidate_and_the_top1_once_each(one_thread, planted, monkeypatch):
    """Phase 3's headline rows per model: the detector's strongest candidate (by output spike) and the
    metric's top-1, one row each, or one row under both names when they are the same weight; an MoE without
    dense down projections gets the metric's row only, with the detector's reason."""
    import pandas as pd

    from esa.models import load
    from esa.params import load_profile
    from esa.phases import phase3

    P = load_profile("smoke")
    lm, spec = planted
    down = next(s for s in lm.inventory if s.layer == 1 and s.component == "down").name
    sel = pd.DataFrame([dict(seed=P.seeds[0], param=spec.name, row=9, col=4, expert=-1, score=2.0),
                        dict(seed=P.seeds[0], param=spec.name, row=1, col=1, expert=-1, score=1.0),
                        dict(seed=P.seeds[1], param=spec.name, row=2, col=2, expert=-1, score=9.0)])

    def detector(cands):  # a two-layer model cannot spike 5x above its own median: give the table directly
        return lambda *a, **k: pd.DataFrame([dict(param=p, row=r, col=c, out_max=o, candidate=f)
                                             for p, r, c, o, f in cands])

    monkeypatch.setattr(phase3, "detect_superweights", detector([(down, 6, 41, 90.0, True), (down, 1, 2, 99.0, False),
                                                                 (down, 3, 5, 50.0, True)]))
    t = phase3.zero_alone(lm, P, sel, n_controls=3)
    assert list(t["tested"]) == ["the detector's strongest candidate", "the grad_x_weight top-1"]
    assert [(r.param, r.row, r.col) for r in t.itertuples()] == [(down, 6, 41), (spec.name, 9, 4)]
    assert set(t["verdict"]) == {"underpowered"} and t.attrs["detector"] == "2 candidate(s) flagged over 3 layers"
    lines = phase3.zero_alone_lines(t.assign(model="m"), {"m": t.attrs["detector"]})
    assert len(lines) == 1 and lines[0].count("zeroed alone") == 2

    monkeypatch.setattr(phase3, "detect_superweights", detector([(spec.name, 9, 4, 90.0, True)]))
    same = phase3.zero_alone(lm, P, sel, n_controls=3)
    assert list(same["tested"]) == ["the detector's strongest candidate and the grad_x_weight top-1"]

    monkeypatch.undo()
    moe = load("tiny-mixtral", device="cpu")
    s = next(s for s in moe.inventory if not s.n_experts)
    one = phase3.zero_alone(moe, P, pd.DataFrame([dict(seed=P.seeds[0], param=s.name, row=0, col=0, expert=-1,
                                                       score=1.0)]), n_controls=2)
    assert list(one["tested"]) == ["the grad_x_weight top-1"]
    assert "needs dense MLP down projections" in one.attrs["detector"]


def test_a_given_baseline_is_used_instead_of_a_new_evaluation(one_thread, planted, monkeypatch):
    from esa.evaluate import evaluate
    from esa.perturb import advanced

    lm, spec = planted
    wins = _windows()
    base = evaluate(lm.model, wins, show_progress=False)
    calls = []
    monkeypatch.setattr(advanced, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    r = single_weight_test(lm.model, lm.inventory, spec.name, 9, 4, wins, n_controls=3, baseline=base)
    assert r["base_ppl"] == base.ppl and calls == []  # perturbed evaluations go through the sweep's evaluate


def test_zero_alone_on_its_first_windows_evaluates_their_own_baseline(one_thread, planted, monkeypatch):
    """Week 7's zero_alone_windows: the ranks run on the first n perturbation windows, against a baseline of
    those windows (the sweep's, over every window, would bias every delta), and say how many they used."""
    import pandas as pd

    from esa.data import Windows
    from esa.evaluate import evaluate
    from esa.params import load_profile
    from esa.phases import phase3

    lm, spec = planted
    ids = _windows(3)
    monkeypatch.setattr(phase3, "eval_windows", lambda lm, P: Windows(ids, "x", "eval", 24, False, "t", 3, (0, 1, 2)))
    monkeypatch.setattr(phase3, "detect_superweights", lambda *a, **k: (_ for _ in ()).throw(EsaError("no detector")))
    P = load_profile("smoke")
    sel = pd.DataFrame([dict(seed=P.seeds[0], param=spec.name, row=9, col=4, expert=-1, score=1.0)])
    full = evaluate(lm.model, ids, show_progress=False)
    one = phase3.zero_alone(lm, P, sel, n_controls=3, baseline=full, n_windows=1)
    assert one["windows"].tolist() == [1]
    assert one["base_ppl"].iloc[0] == evaluate(lm.model, ids[:1], show_progress=False).ppl != full.ppl
    every = phase3.zero_alone(lm, P, sel, n_controls=3, baseline=full, n_windows=3)
    assert every["windows"].tolist() == [3] and every["base_ppl"].iloc[0] == full.ppl
