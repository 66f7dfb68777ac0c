"""The fine-tuning methods by name (`METHODS`), the selections sparse fine-tuning accepts, and one builder.

`make_method(name, inventory, ...)` validates everything a method needs (density, targets, LoRA plan) and
raises one EsaError before any model is touched; building is cheap, work starts at `Method.prepare`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from esa.apps.training.base import Method
from esa.apps.training.full import FullFT
from esa.apps.training.lora import LoraFT
from esa.apps.training.sparse import SparseFT, check_density
from esa.errors import EsaError, unknown
from esa.models.inventory import WeightSpec
from esa.perturb.apply import Targets, count_targets
from esa.perturb.controls import CONTROLS
from esa.registry import Registry
from esa.sensitivity.metrics import METRICS

# What a sparse selection may be made from: a registered sensitivity metric's top-k, "obd" (grad_squared
# with times_w2, the OBD saliency), or a control (random_k, magnitude_k, ... from esa.perturb.controls)
# matched to one.
SELECTIONS: tuple[str, ...] = tuple(sorted({*METRICS, "obd"})) + tuple(sorted(CONTROLS))


def check_selection(name: str) -> str:
    """A selection name (metric or control), else one EsaError listing the accepted ones."""
    if name not in SELECTIONS:
        raise unknown("selection", name, SELECTIONS)
    return name


def _sparse(inventory: list[WeightSpec], targets: Targets | None = None, density: float | None = None,
            **kw: Any) -> Method:
    if density is not None:
        check_density(density)
    if not targets:
        raise EsaError("method 'sparse' needs a selection: a target set (param -> flat indices)")
    names = {s.name for s in inventory}
    unknown_params = sorted(set(targets) - names)
    if unknown_params:
        raise EsaError(f"selection names weights outside the inventory: {unknown_params[:3]}")
    return SparseFT(targets, **kw)


def _lora(inventory: list[WeightSpec], targets: Targets | None = None, density: float | None = None,
          n_trainable: int | None = None, **kw: Any) -> Method:
    if density is not None:
        check_density(density)
    if n_trainable is None and targets:
        n_trainable = count_targets(targets)  # equal count with the sparse set it is compared with
    return LoraFT(inventory, n_trainable=n_trainable, **kw)


def _full(inventory: list[WeightSpec], targets: Targets | None = None, density: float | None = None,
          **kw: Any) -> Method:
    return FullFT(inventory=inventory, **kw)


METHODS: Registry[Callable[..., Method]] = Registry("fine-tuning method")
METHODS.register(_sparse, "sparse", "only a selected set of single weights trains (SparseFT), the rest held fixed")
METHODS.register(_lora, "lora", "low-rank adapters on the studied linear weights, merged at the end (LoraFT)")
METHODS.register(_full, "full", "every parameter, or every studied weight (scope), trains (FullFT)")


def make_method(name: str, inventory: list[WeightSpec], targets: Targets | None = None,
                density: float | None = None, **kw: Any) -> Method:
    """Build a method by name. sparse: `targets` (its selection); lora: `n_trainable` or `rank` (default: the
    count of `targets`); full: `scope` ('all' or 'studied'). Extra keywords go to the method's class."""
    return METHODS.lookup(name)(inventory, targets=targets, density=density, **kw)
