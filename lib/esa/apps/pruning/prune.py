"""The one pruning entry point: `prune(lm, PruneSpec(...), protect=...) -> PruneResult`.

Order of work: the spec was validated when built; `check_prunable` checks it against the model's shapes
and the protected set (no pass has run yet); the calibration sample is drawn; a cached result with the
same content key is read back if there is one; otherwise OWL (if asked) takes its dense pass, the method
runs in its calibration mode, and the masks come back compact. The model is modified in place only while
layer-sequential calibration needs it and is restored bit-exactly before `prune` returns; apply the result
with `masks.applied(lm.model, result.masks)` for as long as it is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from esa import memory
from esa.apps.pruning import calibrate
from esa.apps.pruning.allocation import get_allocation
from esa.apps.pruning.core import Decision
from esa.apps.pruning.masks import MaskSet, updates_for
from esa.apps.pruning.registry import get_method
from esa.apps.pruning.sparsity_patterns import check_divides, check_protected, check_protected_global
from esa.apps.pruning.spec import PruneSpec
from esa.data import Windows, calibration
from esa.dispatch import require_resident
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.models.loader import LoadedModel
from esa.perturb.apply import Targets, overwritten
from esa.store import CacheCorrupt, cache_dir, content_key, quarantine, source_hash

log = logging.getLogger(__name__)

PRUNE_CODE = tuple(f"esa.apps.pruning.{m}" for m in (
    "allocation", "calibrate", "core", "masks", "prune", "registry", "scorers", "sparsegpt", "sparsity_patterns", "spec"
))


@dataclass
class PruneResult:
    spec: PruneSpec
    masks: MaskSet
    key: str
    model_ref: str
    definition: str  # the method's one-line definition
    calibration: dict[str, Any]  # mode + the windows used (corpus, seqlen, n_windows, seed, indices, tokenizer)
    allocation: dict[str, Any]  # block sparsities (and OWL's outlier ratios)
    protected: dict[str, Any]  # label, n_protected, n_outside (protected weights not among the pruned matrices)
    timings: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False

    @property
    def achieved_sparsity(self) -> float:
        return self.masks.sparsity

    def row(self) -> dict[str, Any]:
        """The condition's columns of a results table (evaluation.evaluate_condition adds the measurements)."""
        c = self.calibration
        return {
            "model": self.model_ref, "method": self.spec.method, "definition": self.definition,
            "sparsity": self.spec.sparsity, "achieved_sparsity": self.achieved_sparsity,
            "pattern": self.spec.pattern, "group": self.spec.group, "allocation": self.spec.allocation,
            "protected": self.protected["label"] or "none", "n_protected": self.protected["n_protected"],
            "calib_mode": c["mode"], "calib_corpus": c.get("corpus", "none"), "calib_seqlen": c.get("seqlen", 0),
            "calib_windows": c.get("n_windows", 0), "calib_seed": self.spec.calib_seed,
            "mask_key": self.key, "prune_s": self.timings.get("total_s", float("nan")),
        }

    def summary(self) -> dict[str, Any]:
        """JSON-able description (settings, calibration, allocation, timings): what a card or manifest prints."""
        return {"key": self.key, "model": self.model_ref, "spec": self.spec.key_fields(), "definition": self.definition,
                "achieved_sparsity": self.achieved_sparsity, "calibration": self.calibration,
                "allocation": self.allocation, "protected": self.protected,
                "timings": {k: v for k, v in self.timings.items() if k != "blocks"}, "mask_bytes": self.masks.nbytes}


def pruned_specs(inventory: list[WeightSpec], spec: PruneSpec) -> list[WeightSpec]:
    return [s for s in inventory if s.kind in spec.kinds]


def check_prunable(lm: LoadedModel, spec: PruneSpec, protect: Targets | None = None,
                   specs: list[WeightSpec] | None = None) -> list[WeightSpec]:
    """Every check that needs the model's shapes, before any pass: returns the matrices to prune."""
    method = get_method(spec.method)
    specs = pruned_specs(lm.inventory, spec) if specs is None else list(specs)
    if not specs:
        raise EsaError(f"{lm.info.ref}: no weights of kinds {list(spec.kinds)} to prune")
    fused = [s for s in specs if s.n_experts]
    if fused:
        raise EsaError(f"pruning works on 2-D linear weights; {fused[0].name} is a 3-D tensor of {fused[0].n_experts} "
                       "experts (transformers fuses MoE experts). Prune with kinds=('attention', 'mlp') to leave "
                       "the experts dense")
    require_resident(lm.model, [s.name for s in specs], f"pruning with {spec.method}")
    if method.needs in ("inputs", "hessian"):
        for s in specs:
            mod = lm.model.get_submodule(s.module)
            if not isinstance(mod, torch.nn.Linear) or mod.weight is not lm.model.get_parameter(s.name):
                raise EsaError(f"{spec.method} reads each layer's inputs and needs nn.Linear layers; {s.module} is "
                               f"a {type(mod).__name__}. Use a data-free scorer (magnitude, random) on this model")
    calibrate.find_blocks(lm.model, specs)  # raises if a weight's block cannot be told
    pattern = spec.pattern_obj
    check_divides(pattern, specs)
    if protect:
        _check_protect_targets(lm, spec, protect, specs, {s.name: spec.sparsity for s in specs})
    return specs


def _check_protect_targets(lm: LoadedModel, spec: PruneSpec, protect: Targets, specs: list[WeightSpec],
                           sparsity: dict[str, float]) -> None:
    params = dict(lm.model.named_parameters())
    missing = [n for n in protect if n not in params]
    if missing:
        raise EsaError(f"protected set names {missing[0]!r}, which is not a parameter of the model")
    blocksize = spec.blocksize if spec.method == "sparsegpt" else None
    for s in specs:
        idx = protect.get(s.name)
        if idx is None or idx.numel() == 0:
            continue
        if int(idx.min()) < 0 or int(idx.max()) >= s.numel:
            raise EsaError(f"protected indices out of range for {s.name} with {s.numel} weights")
        check_protected(s, idx.cpu().long(), spec.pattern_obj, spec.group, sparsity[s.name], blocksize)
    if spec.group == "global":
        check_protected_global(specs, protect, spec.sparsity)


def _normalise_protect(protect: Targets | None) -> dict[str, torch.Tensor]:
    return {n: torch.unique(torch.as_tensor(v).long().reshape(-1).cpu()) for n, v in (protect or {}).items()}


def _protect_hash(protect: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(protect):
        h.update(name.encode())
        h.update(protect[name].numpy().tobytes())
    return h.hexdigest()[:16]


def mask_key(model_ref: str, dtype: str, spec: PruneSpec, specs: list[WeightSpec], calib: Windows | None,
             protect: dict[str, torch.Tensor]) -> str:
    modules = PRUNE_CODE + (("esa.sensitivity.metrics",) if spec.needs == "gradients" else ())
    return content_key({
        "model": model_ref, "dtype": dtype, "weights": content_key([s.name for s in specs]),
        "spec": spec.key_fields(), "protected": _protect_hash(protect) if protect else None,
        "calibration": None if calib is None else {**calib.describe(), "indices": list(calib.indices)},
        "code": source_hash(*modules),
    })


def prune(
    lm: LoadedModel,
    spec: PruneSpec,
    protect: Targets | None = None,
    calib: Windows | None = None,
    specs: list[WeightSpec] | None = None,
    model_ref: str | None = None,
    use_cache: bool = True,
    show_progress: bool = False,
) -> PruneResult:
    """Prune `lm`'s block linears by `spec`, never pruning `protect` (param -> flat indices).

    `calib`: calibration windows (default: drawn from the spec's corpus, seqlen, n_calib, calib_seed).
    `specs`: the matrices to prune (default: the inventory's weights of `spec.kinds`). Returns the masks;
    the model is unchanged on return (bit-exact)."""
    t_start = time.perf_counter()
    protect_t = _normalise_protect(protect)
    specs = check_prunable(lm, spec, protect_t, specs)
    method = get_method(spec.method)
    allocation = get_allocation(spec.allocation)
    model = lm.model
    if spec.uses_calibration and calib is None:
        calib = calibration(lm.tokenizer, spec.corpus, spec.seqlen, spec.n_calib, spec.calib_seed,
                            max_positions=lm.info.max_positions or None)
    if not spec.uses_calibration:
        calib = None
    ref = model_ref or lm.info.ref
    key = mask_key(ref, lm.info.dtype, spec, specs, calib, protect_t)
    folder = cache_dir("masks") / key
    if use_cache and folder.exists():
        try:  # sizes, headers and digests are checked: a damaged entry is named, quarantined and recomputed
            masks, meta = MaskSet.load(folder)
            return PruneResult(spec, masks, key, ref, method.definition, meta["calibration"], meta["allocation"],
                               meta["protected"], dict(meta["timings"]), from_cache=True)
        except CacheCorrupt as err:
            quarantine(folder, err.reason)

    _check_memory(lm, spec, specs, calib)
    names = {s.name for s in specs}
    protected_info = {"label": spec.protect, "n_protected": sum(int(v.numel()) for n, v in protect_t.items() if n in names),
                      "n_outside": sum(int(v.numel()) for n, v in protect_t.items() if n not in names)}
    protect_t = {n: v for n, v in protect_t.items() if n in names}
    blocks = calibrate.find_blocks(model, specs)
    ids = calib.ids if calib is not None else None
    timings: dict[str, Any] = {}

    stats = None
    if allocation.needs_inputs:
        t0 = time.perf_counter()
        hessian = method.needs == "hessian" and spec.calibration == "one-shot"  # one pass serves both
        stats = calibrate.dense_stats(model, blocks, ids, spec.batch_size, hessian, show_progress)
        timings["allocation_pass_s"] = time.perf_counter() - t0
    params = {s.name: model.get_parameter(s.name).data for s in specs}
    alloc = allocation.fn(specs, spec.sparsity, params=params, stats=stats or {}, m=spec.owl_m, lam=spec.owl_lambda)
    if protect_t and allocation.needs_inputs:
        _check_protect_targets(lm, spec, protect_t, specs, alloc.sparsity)

    masks = MaskSet()
    with contextlib.ExitStack() as restore:
        def emit(decisions: dict[str, Decision]) -> None:
            for name, d in decisions.items():
                masks.add(name, d, params[name])

        def write(decisions: dict[str, Decision]) -> None:
            for name, d in decisions.items():
                restore.enter_context(overwritten(model, {name: updates_for(d.pruned, d.values, params[name])}))

        plan = calibrate.Plan(model, blocks, method, spec, spec.pattern_obj, alloc.sparsity, protect_t, ids,
                              emit, write, show_progress)
        t0 = time.perf_counter()
        if spec.calibration == "none":
            calibrate.run_data_free(plan)
        elif spec.calibration == "one-shot":
            calibrate.run_one_shot(plan, stats)
        else:
            calibrate.run_sequential(plan)
        timings["method_s"] = time.perf_counter() - t0
    # the ExitStack has restored every weight written during layer-sequential calibration
    del stats
    timings.update(_sum_timings(plan.timings))
    timings["total_s"] = time.perf_counter() - t_start
    timings["blocks"] = plan.timings
    calib_info: dict[str, Any] = {"mode": spec.calibration}
    if calib is not None:
        calib_info.update({**calib.describe(), "indices": list(calib.indices)})
        if spec.calibration == "none":
            calib_info["used_by"] = "owl allocation only"
    alloc_info = {"by_layer": {str(k): v for k, v in alloc.by_layer.items()}, **alloc.info}
    result = PruneResult(spec, masks, key, ref, method.definition, calib_info, alloc_info, protected_info, timings)
    if use_cache:
        masks.save(folder, {"calibration": calib_info, "allocation": alloc_info, "protected": protected_info,
                            "timings": timings, "summary": result.summary()})
    return result


def memory_pass(spec: PruneSpec) -> str:
    """esa.memory's pass for `spec`'s method and calibration mode: layer-sequential calibration holds every
    window's block inputs and the restore backup of the blocks written; one-shot (and data-free) writes nothing
    and holds every block's statistics at once (SparseGPT: every block's Hessians). A gradient scorer runs its
    metric's gradient pass (prune_gradient, or prune_hutchinson for the double backward): once per block
    layer-sequentially, once over every pruned weight one-shot."""
    method = get_method(spec.method)
    if method.needs == "gradients":
        base = f"prune_{method.scoring_pass}"
    else:
        base = "sparsegpt" if method.needs == "hessian" else "prune"
    return base if spec.calibration == "sequential" else f"{base}_one_shot"


def _check_memory(lm: LoadedModel, spec: PruneSpec, specs: list[WeightSpec], calib: Windows | None) -> None:
    """Ask the memory plan of the method and calibration mode before any pass (`memory_pass`)."""
    written = sum(round(float(spec.sparsity or 0.0) * s.numel) for s in specs)
    windows = calib.n_windows if calib is not None else 0
    memory.check(lm.model, memory_pass(spec), spec.batch_size, spec.seqlen, specs, probes=spec.probes,
                 work={"written": written, "windows": windows})


def _sum_timings(blocks: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in blocks:
        for k, v in t.items():
            if k.endswith("_s"):
                out[k] = out.get(k, 0.0) + v
    return out


def check_protected_fits(spec: PruneSpec, specs: list[WeightSpec], k: int, mode: str, superweights: bool) -> None:
    """Refuse a protected set larger than what the sparsity keeps, from the shapes alone (worst case within
    the comparison group is checked on the real indices later; this is the count that can never fit)."""
    n_sw = 1 if superweights else 0
    for s in specs:
        keep = s.numel - round(spec.sparsity * s.numel)
        need = (k if mode == "per_layer" else 0) + n_sw
        if need > keep:
            raise EsaError(f"--protect-critical protects {need} weights of {s.name} (top-{k} per matrix"
                           f"{' + a super-weight' if n_sw else ''}), more than the {keep} that sparsity "
                           f"{spec.sparsity:g} keeps; lower --topk or --sparsity")
    if mode == "global":
        keep = sum(s.numel for s in specs) - round(spec.sparsity * sum(s.numel for s in specs))
        if k > keep:
            raise EsaError(f"--protect-critical protects the global top-{k}, more than the {keep} weights sparsity "
                           f"{spec.sparsity:g} keeps; lower --topk or --sparsity")


def check_shapes(spec: PruneSpec, specs: list[WeightSpec] | None, protect_topk: int | None, mode: str,
                 superweights: bool) -> None:
    """What the shapes alone can refuse before a model loads (nothing when they are unknown, `specs` None): an
    N:M group that does not divide a row, and (`protect_topk` given) a protected set larger than what is kept."""
    if specs is None:
        return
    todo = pruned_specs(specs, spec)
    check_divides(spec.pattern_obj, todo)
    if protect_topk is not None:
        check_protected_fits(spec, todo, protect_topk, mode, superweights)

