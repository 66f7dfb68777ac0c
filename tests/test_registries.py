"""Every registered method runs through the common path, and adding one is one registry entry.

Metrics go through the caching engine (cache key from the entry's own key fields), perturbations through
the sweep (dose, kind and label from the entry), controls through `make_control`; the hook helper and the
in-place overwrite that Phase 5 builds on restore everything they touch. Every extension point of the
package is one `esa.registry.Registry`: a second entry under a taken name is refused, every entry has a
one-line definition, and an unknown name is one EsaError listing the accepted ones.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import esa.apps.interpret.probes as probes
import esa.apps.interpret.roles as roles
import esa.apps.pruning.allocation as allocation
import esa.apps.pruning.registry as pruning_registry
import esa.apps.pruning.scorers as scorers
import esa.apps.security.attacks as attacks
import esa.apps.security.defences as defences
import esa.apps.security.formats as formats
import esa.apps.training.domains as domains
import esa.apps.training.methods as training_methods
import esa.apps.training.retention as retention
import esa.data as data
import esa.models.embedded as embedded
import esa.models.micro as micro
import esa.models.tiny as tiny
import esa.runner.executors as executors
import esa.zeroshot as zeroshot
from esa import hooks
from esa.data import Calibration, Windows
from esa.errors import EsaError
from esa.models import load
from esa.perturb import build_groups, overwritten, perturbed, run_sweep, weights_hash
from esa.perturb.controls import CONTROLS, ControlInput, make_control
from esa.perturb.ops import PERTURBATIONS, PerturbSpec, get_perturbation, sweep_specs
from esa.registry import DuplicateEntry, Registry, merged
from esa.sensitivity import metrics as metrics_mod
from esa.sensitivity.engine import score, score_many, settings_for
from esa.sensitivity.metrics import METRICS, Metric, MetricConfig, MetricResult, get_metric

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


def test_adding_a_metric_is_one_registry_entry(lm):
    def magnitude(model, specs, ids, cfg):
        return MetricResult({s.name: model.get_parameter(s.name).detach().float().abs() for s in specs})

    with METRICS.patched(Metric("magnitude", "|w|", magnitude, lambda c: {}, "eval")):
        runs = score_many(lm, ["magnitude", "grad_x_weight"], Calibration(seed=2),
                          {"grad_x_weight": MetricConfig(batch_size=2, show_progress=False)}, windows=_windows(2))
        assert "magnitude" not in metrics_mod.fusable()  # no fold: computed on its own pass
    assert "magnitude" not in METRICS
    top = runs["magnitude"].topk(1, "global", lm.inventory).iloc[0]
    p = lm.model.get_parameter(top.param).detach().abs()
    assert float(p[top.row, top.col]) == max(float(lm.model.get_parameter(s.name).detach().abs().max())
                                             for s in lm.inventory)


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


# ---------------------------------------------------------------- one registry shape everywhere
REGISTRIES = {
    "metrics": METRICS, "perturbations": PERTURBATIONS, "controls": CONTROLS,
    "pruning scorers": scorers.SCORERS, "pruning reconstructors": pruning_registry.RECONSTRUCTORS,
    "pruning methods": pruning_registry.methods(), "allocations": allocation.ALLOCATIONS,
    "attacks": attacks.ATTACKS, "storage formats": formats.FORMATS, "security defences": defences.DEFENCES,
    "training retentions": retention.RETENTIONS, "roles": roles.ROLES, "probe builders": probes.BUILDERS,
    "fine-tuning methods": training_methods.METHODS, "target domains": domains.DOMAINS, "corpora": data.CORPORA,
    "embedded models": embedded.EMBEDDED, "tiny models": tiny.TINY_CONFIGS, "micro suite": micro.MICRO_SUITE,
    "micro budgets": micro.BUDGETS, "executors": executors.EXECUTORS, "zero-shot tasks": zeroshot.TASKS,
}


@pytest.mark.parametrize("label", sorted(REGISTRIES))
def test_every_extension_point_is_a_registry_with_a_definition_per_entry(label):
    reg = REGISTRIES[label]
    assert isinstance(reg, Registry) and len(reg) > 0
    assert reg.names() == list(reg) == list(reg.definitions())
    empty = [n for n in reg if not reg.definition(n).strip()]
    assert not empty, f"{label}: no definition for {empty}"
    assert all("\n" not in d for d in reg.definitions().values())  # one line each
    assert not hasattr(reg, "__setitem__")  # read-only: entries come in through register


@pytest.mark.parametrize("label", sorted(REGISTRIES))
def test_an_unknown_name_is_one_error_listing_the_accepted_ones(label):
    reg = REGISTRIES[label]
    with pytest.raises(EsaError) as err:
        reg.lookup("no-such-entry")
    assert str(err.value) == f"unknown {reg.kind} 'no-such-entry'; accepted: {', '.join(sorted(reg))}"
    first = reg.names()[0]
    assert reg.lookup(first) is reg[first]


def test_the_get_wrappers_answer_as_the_registries_do():
    assert get_metric("grad_x_weight") is METRICS["grad_x_weight"]
    assert get_perturbation("zero") is PERTURBATIONS["zero"]
    assert pruning_registry.get_method("sparsegpt") is pruning_registry.RECONSTRUCTORS["sparsegpt"]
    assert pruning_registry.get_method("wanda") is scorers.SCORERS["wanda"]
    for call, kind in ((get_metric, "metric"), (get_perturbation, "perturbation"),
                       (pruning_registry.get_method, "pruning method"), (formats.get_format, "storage format"),
                       (allocation.get_allocation, "allocation"), (domains.get_domain, "target domain"),
                       (executors.get_executor, "executor")):
        with pytest.raises(EsaError, match=f"^unknown {kind} 'nope'; accepted: "):
            call("nope")


def test_a_second_entry_under_a_taken_name_is_refused():
    reg: Registry[str] = Registry("thing", key=str)
    reg.register("a", definition="the first")
    with pytest.raises(DuplicateEntry, match="thing 'a' is registered already"):
        reg.register("a", definition="the second")
    assert reg.definitions() == {"a": "the first"}
    with pytest.raises(DuplicateEntry):  # the package's own registries refuse it too, and stay as they were
        METRICS.register(METRICS["grad_x_weight"])
    with pytest.raises(DuplicateEntry):
        scorers.register(scorers.SCORERS["magnitude"])
    assert list(METRICS) == ["grad_x_weight", "grad_squared", "act_mag", "hutchinson_diag", "ggn_mc_diag"]
    with pytest.raises(DuplicateEntry):  # a union of two registries that share a name
        merged("pruning method", scorers.SCORERS, {"magnitude": pruning_registry.RECONSTRUCTORS["sparsegpt"]})
    with pytest.raises(TypeError):  # an entry of the wrong type is caught at registration
        METRICS.register(CONTROLS["random_k"], "random_k")


def test_merged_keeps_names_order_and_definitions():
    union = pruning_registry.methods()
    assert union.kind == "pruning method"
    assert list(union) == [*scorers.SCORERS, *pruning_registry.RECONSTRUCTORS]
    assert union.definition("obd") == scorers.SCORERS.definition("obd")
    assert union.definition("sparsegpt") == pruning_registry.RECONSTRUCTORS["sparsegpt"].definition


def test_patched_adds_or_replaces_an_entry_for_a_with_block_only():
    before = (list(CONTROLS.items()), CONTROLS.definitions())
    stand_in = CONTROLS["random_k"].__class__("random_k", "a stand-in", CONTROLS["bottom_k"].fn)
    with CONTROLS.patched(stand_in) as entry:
        assert entry is stand_in and CONTROLS["random_k"] is stand_in
        assert CONTROLS.definition("random_k") == "a stand-in"
    with pytest.raises(RuntimeError), CONTROLS.patched(stand_in, "extra", definition="extra one"):
        assert "extra" in CONTROLS
        raise RuntimeError("restored on error too")
    assert (list(CONTROLS.items()), CONTROLS.definitions()) == before
