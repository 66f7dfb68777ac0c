"""The grid of a pruning study: which (spec, protected) conditions a study section asks for.

`conditions(S, defaults)` expands the section `S` (esa.phases.phase5_pruning.Settings: methods, sparsity,
sweep, patterns, OWL, protection, calibration seeds...) into pruning conditions: the main table at
`S.sparsity`, the sparsity sweep, N:M patterns, OWL against uniform, protected against unprotected, each over
the calibration seeds; a data-free method once (its masks do not depend on the seed). `defaults` are the
profile's values for what the section leaves unset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from esa.apps.pruning.registry import get_method
from esa.apps.pruning.spec import PruneSpec


@dataclass(frozen=True)
class Defaults:
    """The profile's values a section falls back on: calibration corpus and seqlen, batch size, probes."""

    corpus: str
    seqlen: int
    batch_size: int
    probes: int


@dataclass(frozen=True)
class Condition:
    spec: PruneSpec
    protected: bool = False

    def key(self) -> tuple:
        return (tuple(sorted(asdict(self.spec).items())), self.protected)


def base_spec(S: Any, d: Defaults, method: str, sparsity: float | None, pattern: str = "unstructured",
              allocation: str = "uniform", seed: int | None = None, calibration: str | None = None) -> PruneSpec:
    method_obj = get_method(method)
    calib = calibration or S.calibration
    if calib is not None and method_obj.needs == "weights":
        calib = None  # data-free: the mode does not apply
    return PruneSpec(method, sparsity=sparsity, pattern=pattern, allocation=allocation, calibration=calib,
                     corpus=S.calib_corpus or d.corpus, seqlen=S.calib_seqlen or d.seqlen, n_calib=S.calib_windows,
                     calib_seed=S.calib_seeds[0] if seed is None else seed, batch_size=S.batch_size or d.batch_size,
                     probes=d.probes)


def seed_dependent(spec: PruneSpec) -> bool:
    """Whether the calibration seed changes the masks (data-free magnitude does not; random does)."""
    return spec.uses_calibration or spec.method == "random"


def conditions(S: Any, d: Defaults) -> list[Condition]:
    """Every (spec, protected) the section asks for, each over the calibration seeds, without repeats."""
    wanted: list[tuple[str, float | None, str, str, bool]] = []  # method, sparsity, pattern, allocation, protected
    wanted += [(m, S.sparsity, "unstructured", "uniform", False) for m in S.methods]
    wanted += [(m, s, "unstructured", "uniform", False) for m in (S.sweep_methods or S.methods) for s in S.sweep]
    wanted += [(m, None, p, "uniform", False) for m in (S.pattern_methods or S.methods) for p in S.patterns]
    for m in S.owl_methods:
        wanted += [(m, S.owl_sparsity, "unstructured", a, False) for a in ("uniform", "owl")]
    if S.protect:
        wanted += [(m, S.sparsity, "unstructured", "uniform", True) for m in S.protect_methods]
        wanted += [(m, S.sparsity, "unstructured", "uniform", False) for m in S.protect_methods]
    out: dict[tuple, Condition] = {}
    for method, sp, pat, alloc, protected in wanted:
        for seed in S.calib_seeds:
            spec = base_spec(S, d, method, sp, pat, alloc, seed)
            if not seed_dependent(spec) and seed != S.calib_seeds[0]:
                continue
            c = Condition(spec, protected)
            out.setdefault(c.key(), c)
    return list(out.values())


def serves(c: Condition, sparsity: float, compared: tuple[str, ...]) -> bool:
    """Whether a condition's numbers decide the criterion: a compared method at the criterion's sparsity,
    unstructured, uniform allocation."""
    at = c.spec.sparsity is not None and abs(c.spec.sparsity - sparsity) < 1e-9
    return at and c.spec.pattern == "unstructured" and c.spec.allocation == "uniform" and c.spec.method in compared

