"""One typed pruning condition, validated when it is built (before any model is loaded).

`PruneSpec(method, sparsity, pattern, group, allocation, calibration, ...)` resolves the method's defaults
(comparison group, calibration mode) and refuses every bad or contradictory setting with one EsaError
naming the value and the accepted ones. Checks that need the model's shapes (M divides the rows, the
protected set fits) are in `prune.check_prunable`, which runs before any calibration pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from esa.apps.pruning.allocation import ALLOCATIONS, get_allocation
from esa.apps.pruning.registry import get_method
from esa.apps.pruning.sparsity_patterns import Pattern, parse_pattern
from esa.errors import EsaError, unknown
from esa.models.inventory import KINDS

CALIBRATIONS = ("sequential", "one-shot")
NM_GROUP = "run"  # the comparison group of N:M: each run of M weights of a row


@dataclass(frozen=True)
class PruneSpec:
    method: str  # a registered scorer (scorers.SCORERS) or "sparsegpt"
    sparsity: float | None = None  # share of the pruned matrices' weights set to zero; N:M implies N/M
    pattern: str = "unstructured"  # "unstructured" | "N:M" (N pruned in every M consecutive inputs of a row)
    group: str | None = None  # "row" | "matrix" | "global"; None: the method's default (N:M: per run)
    allocation: str = "uniform"  # "uniform" | "owl" (layer-wise sparsity)
    calibration: str | None = None  # "sequential" | "one-shot"; None: the method's default; "none" if data-free
    corpus: str = "shakespeare"  # calibration text (esa.data); Wanda's paper uses C4
    seqlen: int = 256  # calibration window length (Wanda: 2048 on 7B)
    n_calib: int = 8  # calibration windows (Wanda: 128)
    calib_seed: int = 0  # which calibration windows (and the random scorer's draw)
    batch_size: int = 4  # calibration windows per forward
    kinds: tuple[str, ...] = ("attention", "mlp", "expert")  # which studied weights are pruned (no routers)
    owl_m: float = 5.0  # OWL: outlier threshold, times the block's mean score
    owl_lambda: float = 0.08  # OWL: block sparsities move by up to about lambda around the target
    blocksize: int = 128  # SparseGPT: columns per lazy-update block (and per adaptive mask choice)
    damp: float = 0.01  # SparseGPT: damping, a fraction of the mean Hessian diagonal
    probes: int = 2  # hutchinson_diag: Rademacher probes
    protect: str = ""  # label of the protected (critical) set; the indices themselves are passed to prune()

    def __post_init__(self) -> None:
        method = get_method(self.method)
        pat = parse_pattern(self.pattern)
        object.__setattr__(self, "pattern", pat.label)
        object.__setattr__(self, "sparsity", _sparsity(self.sparsity, pat))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        bad_kinds = [k for k in self.kinds if k not in KINDS]
        if bad_kinds or not self.kinds:
            raise unknown("weight kind", bad_kinds[0] if bad_kinds else "()", KINDS)
        if pat.kind == "nm":
            if self.group not in (None, NM_GROUP):
                raise EsaError(f"group {self.group!r} does not apply to pattern {pat.label}: each run of {pat.m} "
                               "weights of a row is its own group; leave group unset")
            object.__setattr__(self, "group", NM_GROUP)
        else:
            group = self.group or method.default_group
            if group not in method.groups:
                raise unknown(f"comparison group for {self.method}", group, method.groups)
            object.__setattr__(self, "group", group)
        get_allocation(self.allocation)
        if self.allocation == "owl" and pat.kind == "nm":
            raise EsaError(f"allocation 'owl' sets unstructured layer sparsities; pattern {pat.label} fixes every "
                           "layer at N/M. Use allocation 'uniform' with N:M")
        if self.allocation == "owl" and self.group == "global":
            raise EsaError("allocation 'owl' sets per-layer sparsities; group 'global' ranks all layers together. "
                           "Use group 'row' or 'matrix' with OWL")
        calib = self.calibration or method.default_calibration
        if calib not in CALIBRATIONS and not (calib == "none" and method.needs == "weights"):
            raise unknown("calibration mode", calib, CALIBRATIONS)
        if method.needs == "weights":
            calib = "none"  # data-free: no calibration, whichever mode was asked
        object.__setattr__(self, "calibration", calib)
        if self.group == "global" and calib == "sequential":
            raise EsaError(f"group 'global' ranks every block at once, which layer-sequential calibration cannot "
                           f"(block l is scored after blocks < l are pruned); use calibration 'one-shot' for "
                           f"{self.method} with group 'global'")
        _positive_int(self, "seqlen", 2)
        for name in ("n_calib", "batch_size", "blocksize", "probes"):
            _positive_int(self, name, 1)
        if not (isinstance(self.owl_m, int | float) and self.owl_m > 0):
            raise EsaError(f"owl_m must be a number > 0, got {self.owl_m!r}")
        if not (isinstance(self.owl_lambda, int | float) and 0 <= self.owl_lambda < 0.5):
            raise EsaError(f"owl_lambda must be in [0, 0.5), got {self.owl_lambda!r}")
        if not (isinstance(self.damp, int | float) and self.damp > 0):
            raise EsaError(f"damp must be a number > 0, got {self.damp!r}")

    @property
    def pattern_obj(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def needs(self) -> str:
        return get_method(self.method).needs

    @property
    def uses_calibration(self) -> bool:
        """Whether any calibration text is read (the method's own pass, or OWL's dense pass)."""
        return self.calibration != "none" or ALLOCATIONS[self.allocation].needs_inputs

    def key_fields(self) -> dict[str, Any]:
        """Everything that changes the masks (for content keys)."""
        return asdict(self)

    def label(self) -> str:
        return (f"{self.method} {self.sparsity:.0%} {self.pattern} {self.group} {self.allocation}"
                f"{' protect=' + self.protect if self.protect else ''}")


def _sparsity(value: Any, pat: Pattern) -> float:
    implied = pat.sparsity
    if value is None:
        if implied is None:
            raise EsaError("sparsity is required for pattern 'unstructured': a number in (0, 1)")
        return implied
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 < value < 1:
        raise EsaError(f"sparsity must be a number in (0, 1) (the share of weights pruned), got {value!r}")
    if implied is not None and abs(value - implied) > 1e-9:
        raise EsaError(f"sparsity {value!r} contradicts pattern {pat.label}, which prunes exactly {implied:g}; "
                       "leave sparsity unset for N:M")
    return float(value)


def _positive_int(spec: PruneSpec, name: str, low: int) -> None:
    v = getattr(spec, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise EsaError(f"{name} must be an integer >= {low}, got {v!r}")
