"""The few types every pruning method shares: calibration statistics, one unit of work, one decision.

A method (a registered scorer, or SparseGPT) sees a `Job` -- the matrices to decide together (one block in
layer-sequential calibration, every block in one-shot, everything for a `global` comparison) -- and returns
one `Decision` per matrix: which weights are pruned and, for methods that reconstruct, the new values of
the whole matrix. The calibration driver (`calibrate.py`) builds jobs; the method never walks the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from esa.models.inventory import WeightSpec

if TYPE_CHECKING:  # type hints only: spec.py imports the registries, which import this module
    from esa.apps.pruning.sparsity_patterns import Pattern
    from esa.apps.pruning.spec import PruneSpec

NEEDS = ("weights", "inputs", "hessian", "gradients")  # what a method reads besides the weights themselves


@dataclass
class InputStats:
    """Statistics of one linear layer's input over every calibration token (fp32).

    Linears that read the very same tensor (q/k/v, gate/up) share one object, so it is gathered once."""

    n_tokens: int = 0
    sq: torch.Tensor | None = None  # (cols,) sum_t x_tj^2, i.e. ||X_j||_2^2
    xtx: torch.Tensor | None = None  # (cols, cols) sum_t x_t x_t^T (SparseGPT's Hessian, up to 2/n)

    def add(self, x: torch.Tensor, hessian: bool) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, cols)
        if self.sq is None:
            self.sq = torch.zeros(x2.shape[1], dtype=torch.float32, device=x2.device)
        self.sq.add_((x2 * x2).sum(0))
        if hessian:
            if self.xtx is None:
                self.xtx = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
            self.xtx.addmm_(x2.T, x2)
        self.n_tokens += x2.shape[0]


@dataclass
class Job:
    """Matrices decided together, with everything a method may read."""

    specs: list[WeightSpec]
    params: dict[str, torch.Tensor]  # the live weights (param.data): read, never written by a method
    sparsity: dict[str, float]  # per matrix (uniform, or the layer's OWL sparsity)
    pattern: Pattern
    group: str
    spec: PruneSpec
    protected: dict[str, torch.Tensor] = field(default_factory=dict)  # flat indices never pruned
    stats: dict[str, InputStats] = field(default_factory=dict)  # needs "inputs" / "hessian"
    scores: dict[str, torch.Tensor] | None = None  # precomputed scores (gradient scorers in one-shot mode)
    model: torch.nn.Module | None = None  # gradient scorers run the model in its current state
    ids: torch.Tensor | None = None  # calibration windows (n, seqlen) for gradient scorers


@dataclass
class Decision:
    pruned: torch.Tensor  # bool, the matrix's shape: True = set to zero
    values: torch.Tensor | None = None  # the whole new matrix (fp32) for reconstructing methods, else None
