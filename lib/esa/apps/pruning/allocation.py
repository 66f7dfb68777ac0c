"""Layer-wise sparsity: uniform, or OWL (outlier-weighted layerwise sparsity, Yin et al. 2024).

OWL, as published: for each transformer block l, the outlier ratio D_l is the share of the block's Wanda
scores |W_ij| * ||X_j||_2 (all its pruned matrices together, dense model) that exceed M times the block's
mean score. The ratios are min-max scaled to [0, 2 * lambda], recentred on the target density (1 - target
sparsity), and each block's sparsity is 1 minus its density: blocks with more outliers are pruned less,
by up to about lambda either side of the target, and the mean block sparsity equals the target. Defaults
M = 5, lambda = 0.08 (the OWL README's LLaMA settings). The scores always come from one dense calibration
pass, whatever scorer then prunes inside each block (OWL's own procedure).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from esa.apps.pruning.core import InputStats
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.registry import Registry


@dataclass
class Allocated:
    sparsity: dict[str, float]  # param -> its block's sparsity
    by_layer: dict[int, float]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Allocation:
    name: str
    definition: str
    needs_inputs: bool  # needs a dense calibration pass (input norms)
    fn: Callable[..., Allocated]


def _uniform(specs: list[WeightSpec], target: float, **_: Any) -> Allocated:
    return Allocated({s.name: target for s in specs}, {s.layer: target for s in specs})


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of entries above m x the mean over all of `scores` together (no concatenated copy)."""
    total = sum(int(s.numel()) for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_from_ratios(ratios: list[float], target: float, lam: float) -> list[float]:
    """Block sparsities from outlier ratios by the published rule (mean = target)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    if span == 0:
        return [target] * len(ratios)  # every block alike: nothing to reallocate
    density = (r - r.min()) / span * (2 * lam)
    density = density - density.mean() + (1 - target)
    return [float(1 - d) for d in density]


def _owl(specs: list[WeightSpec], target: float, params: dict[str, torch.Tensor],
         stats: dict[str, InputStats], m: float, lam: float, **_: Any) -> Allocated:
    layers = sorted({s.layer for s in specs})
    ratios = []
    for layer in layers:
        scores = []
        for s in specs:
            if s.layer != layer:
                continue
            st = stats.get(s.name)
            if st is None or st.sq is None:
                raise EsaError(f"OWL: no calibration input statistics for {s.name}")
            scores.append(params[s.name].detach().float().abs() * st.sq.sqrt().unsqueeze(0))
        ratios.append(outlier_ratio(scores, m))
        del scores
    sp = owl_from_ratios(ratios, target, lam)
    bad = [(layer, v) for layer, v in zip(layers, sp, strict=True) if not 0 <= v < 1]
    if bad:
        raise EsaError(f"OWL: lambda={lam:g} around sparsity {target:g} gives block {bad[0][0]} sparsity "
                       f"{bad[0][1]:.3f}, outside [0, 1); lower lambda")
    by_layer = dict(zip(layers, sp, strict=True))
    return Allocated({s.name: by_layer[s.layer] for s in specs}, by_layer,
                     {"outlier_ratio": dict(zip(layers, ratios, strict=True)), "M": m, "lambda": lam,
                      "rule": "D_l = share of block scores > M * block mean; density = minmax(D) * 2*lambda, "
                              "recentred on 1 - target"})


ALLOCATIONS: Registry[Allocation] = Registry("allocation", (
    Allocation("uniform", "every block at the target sparsity", False, _uniform),
    Allocation("owl", "outlier-weighted layerwise sparsity (Yin et al. 2024), M and lambda in the settings",
               True, _owl),
), base=Allocation)


def get_allocation(name: str) -> Allocation:
    return ALLOCATIONS.lookup(name)
