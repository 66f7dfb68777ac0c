"""Pruning (Phase 5): sensitivity scorers, Wanda, SparseGPT, N:M, OWL, protected critical sets.

    from esa.apps.pruning import PruneSpec, prune, applied, evaluate_condition
    spec = PruneSpec("wanda", sparsity=0.5)                 # validated here, before any model is loaded
    result = prune(lm, spec, protect=targets)               # masks (bit-packed), content-keyed in the cache
    with applied(lm.model, result.masks):                   # in place; restored bit-exactly on exit
        ...
    row = evaluate_condition(lm, result, eval_windows, task)  # one tidy table row

Methods: the scorers of `SCORERS` (magnitude, wanda, grad_x_weight, obd, hutchinson_diag, random; adding
one is one `register(Scorer(...))`) and SparseGPT, all in `methods()`. Sparsity patterns and comparison
groups: `sparsity_patterns`; the critical set a pruning never removes: `critical`. See each module's
docstring for the definitions.
"""

from esa.apps.pruning.allocation import ALLOCATIONS, outlier_ratio, owl_from_ratios
from esa.apps.pruning.core import Decision, InputStats, Job
from esa.apps.pruning.critical import critical_targets
from esa.apps.pruning.evaluation import criterion, dense_row, evaluate_condition, matched_gains, results_table
from esa.apps.pruning.export import clear_gguf_state, export_pruned, without_gguf_state
from esa.apps.pruning.masks import MaskSet, applied, pack_bits, unpack_bits
from esa.apps.pruning.prune import PruneResult, check_prunable, prune
from esa.apps.pruning.registry import get_method, methods
from esa.apps.pruning.scorers import SCORERS, Scorer, register
from esa.apps.pruning.sparsegpt import reconstruct
from esa.apps.pruning.sparsity_patterns import GROUPS, Pattern, parse_pattern
from esa.apps.pruning.spec import CALIBRATIONS, PruneSpec

__all__ = [
    "ALLOCATIONS", "CALIBRATIONS", "GROUPS", "SCORERS", "Decision", "InputStats", "Job", "MaskSet", "Pattern",
    "PruneResult", "PruneSpec", "Scorer", "applied", "check_prunable", "clear_gguf_state", "criterion",
    "critical_targets", "dense_row", "evaluate_condition", "matched_gains", "export_pruned", "get_method", "methods",
    "outlier_ratio", "owl_from_ratios", "pack_bits", "parse_pattern", "prune", "reconstruct", "register",
    "results_table", "unpack_bits", "without_gguf_state",
]
