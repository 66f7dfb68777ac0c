"""Perturbation validation: perturb selected weights in place, evaluate, restore bit-exactly.

- `ops`: the perturbation registry (`PERTURBATIONS`: sign_flip, gauss_noise, zero, bit_flip) and `PerturbSpec`.
- `apply`: target sets from a top-k table, the `perturbed(...)` context manager, `weights_hash`.
- `controls`: the control registry (`CONTROLS`: random_k, random_global, bottom_k, magnitude_k).
- `sweep`: perturbation x group x seed x dose sweeps into one tidy table.
"""

from esa.perturb.apply import (
    PerturbStats,
    Targets,
    count_targets,
    overwritten,
    perturbed,
    targets_from_selection,
    weights_hash,
)
from esa.perturb.controls import CONTROLS, ControlInput, make_control, parse_controls, per_matrix_counts
from esa.perturb.ops import (
    PERTURBATIONS,
    PerturbSpec,
    bit_positions,
    flip_bits,
    parse_perturbations,
    parse_scales,
)
from esa.perturb.sweep import TOP, AllNonFinite, SweepResult, build_groups, evaluate_perturbed, run_sweep

__all__ = [
    "CONTROLS", "PERTURBATIONS", "TOP", "AllNonFinite", "ControlInput", "PerturbSpec", "PerturbStats",
    "SweepResult", "Targets", "bit_positions", "build_groups", "count_targets", "evaluate_perturbed",
    "flip_bits", "make_control", "overwritten", "parse_controls", "parse_perturbations", "parse_scales", "per_matrix_counts",
    "perturbed", "run_sweep", "targets_from_selection", "weights_hash",
]
