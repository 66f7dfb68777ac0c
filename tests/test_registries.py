"""Every registered method runs through the common path, and adding one is one registry entry.

Metrics go through the caching engine (cache key from the entry's own key fields), perturbations through
the sweep (dose, kind and label from the entry), controls through `make_control`; the hook helper and the
in-place overwrite that Phase 5 builds on restore everything they touch.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from esa import hooks
from esa.data import Calibration, Windows
from esa.errors import EsaError
from esa.models import load
from esa.perturb import build_groups, overwritten, perturbed, run_sweep, weights_hash
from esa.perturb.controls import CONTROLS, ControlInput, make_control
from esa.perturb.ops import PERTURBATIONS, PerturbSpec, sweep_specs
from esa.sensitivity import metrics as metrics_mod
from esa.sensitivity.engine import score, score_many, settings_for
from esa.sensitivity.metrics import METRICS, Metric, MetricConfig, MetricResult

pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def lm():
    return load("tiny-llama", device="cpu", attn_implementation="eager")


def _windows(seed: int, n: int = 4) -> Windows:
    ids = torch.randint(3, 259, (n, 24), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, "random", "calib", 24, False, "byt5", 100, tuple(range(n)))


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_scores_through_the_engine_and_caches(lm, name):
    cfg = MetricConfig(batch_size=2, probes=2, seed=3, show_progress=False)
    first = score(lm, name, Calibration(seed=3), cfg, windows=_windows(3), keep_scores=True)
    again = score(lm, name, Calibration(seed=3), cfg, windows=_windows(3), keep_scores=True)
    assert not first.from_cache and again.from_cache and first.key == again.key
    assert first.settings["metric_settings"] == METRICS[name].key(cfg)
    assert METRICS[name].definition and METRICS[name].memory_pass
    for s in lm.inventory:
        assert first.scores[s.name].shape == s.shape and torch.isfinite(first.scores[s.name]).all()


def test_a_key_field_changes_the_cache_key_and_others_do_not(lm):
    w = _windows(1)
    base = settings_for("m", w, "grad_x_weight", 1, "float32", MetricConfig(batch_size=2), lm.inventory)
    per_batch = settings_for("m", w, "grad_x_weight", 1, "float32", MetricConfig(batch_size=2, per_batch=True),
                             lm.inventory)
    probes = settings_for("m", w, "grad_x_weight", 1, "float32", MetricConfig(batch_size=2, probes=9), lm.inventory)
    assert base != per_batch and base == probes  # probes are not a grad_x_weight setting
    act = [settings_for("m", w, "act_mag", 1, "float32", MetricConfig(batch_size=b), lm.inventory) for b in (1, 4)]
    assert act[0] == act[1]  # act_mag sums over tokens: batching does not change it


def test_adding_a_metric_is_one_registry_entry(lm, monkeypatch):
    def magnitude(model, specs, ids, cfg):
        return MetricResult({s.name: model.get_parameter(s.name).detach().float().abs() for s in specs})

    monkeypatch.setitem(METRICS, "magnitude", Metric("magnitude", "|w|", magnitude, lambda c: {}, "eval"))
    runs = score_many(lm, ["magnitude", "grad_x_weight"], Calibration(seed=2),
                      {"grad_x_weight": MetricConfig(batch_size=2, show_progress=False)}, windows=_windows(2))
    top = runs["magnitude"].topk(1, "global", lm.inventory).iloc[0]
    p = lm.model.get_parameter(top.param).detach().abs()
    assert float(p[top.row, top.col]) == max(float(lm.model.get_parameter(s.name).detach().abs().max())
                                             for s in lm.inventory)
    assert "magnitude" not in metrics_mod.fusable()  # no fold: computed on its own pass


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_every_perturbation_sweeps_and_restores(lm, name):
    specs = sweep_specs([name], [0.5, 1.0], [0.3], bits=["exponent", "lsb-exponent"])
    entry = PERTURBATIONS[name]
    n_doses = {"scale": 2, "prob": 2 if entry.bit_variants else 1, None: 1}[entry.dose]
    assert len(specs) == n_doses
    sel_inv = lm.inventory[:3]
    targets = {s.name: torch.arange(0, s.numel, 17) for s in sel_inv}
    h = weights_hash(lm.model)
    for spec in specs:
        with perturbed(lm.model, targets, spec, seed=1) as st:
            assert st.n_weights == sum(int(t.numel()) for t in targets.values())
        assert weights_hash(lm.model) == h
        assert spec.dose() == entry.dose_of(spec) and spec.kind().startswith(name) and spec.label().startswith(name)


def test_sweep_table_takes_dose_and_kind_from_the_registry(lm):
    top = {s.name: torch.arange(0, 8) for s in lm.inventory[:2]}
    sel = pd.DataFrame([dict(param=s.name, expert=-1, row=int(i) // s.cols, col=int(i) % s.cols, seed=1)
                        for s in lm.inventory[:2] for i in top[s.name]])
    groups = build_groups(lm.model, lm.inventory, sel, [1], ["random_k"])
    specs = [PerturbSpec("bit_flip", prob=0.25, bits="lsb-exponent"), PerturbSpec("zero")]
    res = run_sweep(lm.model, _windows(5, 2), groups, specs, show_progress=False)
    assert set(res.table.perturbation) == {"bit_flip[lsb-exponent]", "zero"}
    assert sorted(res.table.dose.unique()) == [0.25, 1.0]


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_every_control_draws_a_matched_set(lm, name):
    top = {s.name: torch.arange(0, 5) for s in lm.inventory}
    scores = {s.name: torch.rand(s.shape, generator=torch.Generator().manual_seed(0)) for s in lm.inventory}
    out = make_control(name, ControlInput(lm.model, lm.inventory, top, seed=1, scores=scores))
    assert sum(int(v.numel()) for v in out.values()) == sum(int(v.numel()) for v in top.values())
    assert CONTROLS[name].definition
    if CONTROLS[name].needs_scores:
        with pytest.raises(EsaError):
            make_control(name, ControlInput(lm.model, lm.inventory, top, seed=1, scores=None))


def test_overwritten_restores_bit_exactly_even_after_an_error(lm):
    spec = lm.inventory[0]
    idx = torch.tensor([0, 5, 9])
    h = weights_hash(lm.model)
    with overwritten(lm.model, {spec.name: (idx, torch.tensor([float("nan"), -0.0, 1e30]))}) as st:
        flat = lm.model.get_parameter(spec.name).detach().view(-1)
        assert torch.isnan(flat[0]) and st.n_nan == 1 and st.n_weights == 3
    assert weights_hash(lm.model) == h
    with pytest.raises(RuntimeError, match="boom"), overwritten(lm.model, {spec.name: (idx, torch.zeros(3))}):
        raise RuntimeError("boom")
    assert weights_hash(lm.model) == h
    with pytest.raises(EsaError, match="3 indices but 2 values"), \
            overwritten(lm.model, {spec.name: (idx, torch.zeros(2))}):
        pass
    assert weights_hash(lm.model) == h


def test_hooks_capture_and_always_remove_their_handles(lm):
    names = [s.module for s in lm.inventory if s.component == "down"]
    ids = _windows(1, 2).ids
    with hooks.captured(lm.model, names, "input", reduce=lambda t: t.abs().amax(dim=(0, 1))) as seen:
        lm.model(input_ids=ids, use_cache=False)
    assert all(len(v) == 1 and v[0].shape == (lm.model.get_submodule(n).in_features,) for n, v in seen.items())

    def boom(call: hooks.Call) -> None:
        raise RuntimeError("inside the hook")

    with pytest.raises(RuntimeError, match="inside the hook"), hooks.hooked(lm.model, {names[0]: boom}):
        lm.model(input_ids=ids, use_cache=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
    with pytest.raises(EsaError, match="no module"), hooks.hooked(lm.model, {"model.nowhere": boom}):
        pass
