"""Every pruning method by name: the registered scorers plus SparseGPT (one lookup, one error message)."""

from __future__ import annotations

from esa.apps.pruning.scorers import SCORERS, Scorer
from esa.apps.pruning.sparsegpt import SparseGPT
from esa.errors import unknown

Method = Scorer | SparseGPT
RECONSTRUCTORS: dict[str, SparseGPT] = {"sparsegpt": SparseGPT()}


def methods() -> dict[str, Method]:
    """Scorers (live view of the registry: a scorer registered later is included) and reconstructors."""
    return {**SCORERS, **RECONSTRUCTORS}


def get_method(name: str) -> Method:
    known = methods()
    if name not in known:
        raise unknown("pruning method", name, known)
    return known[name]
