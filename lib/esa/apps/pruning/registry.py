"""Every pruning method by name: the registered scorers plus SparseGPT (one lookup, one error message)."""

from __future__ import annotations

from esa.apps.pruning.scorers import SCORERS, Scorer
from esa.apps.pruning.sparsegpt import SparseGPT
from esa.registry import Registry, merged

Method = Scorer | SparseGPT
RECONSTRUCTORS: Registry[SparseGPT] = Registry("pruning reconstructor", (SparseGPT(),), base=SparseGPT)


def methods() -> Registry[Method]:
    """Scorers and reconstructors in one registry, built at each call (a scorer registered later is included);
    a name in both is a registry.DuplicateEntry."""
    return merged("pruning method", SCORERS, RECONSTRUCTORS)


def get_method(name: str) -> Method:
    return methods().lookup(name)
