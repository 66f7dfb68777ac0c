"""What every scoring pass over calibration windows shares: its settings and result, and the machinery of one pass.

`esa.sensitivity.metrics` (the registered metrics) and `esa.sensitivity.curvature` (the Monte-Carlo GGN
diagonal and the curvature reliability measurement) both build on this module, which imports neither:

- `MetricConfig`, `MetricResult`: a metric's settings and its scores;
- `micro_batches`: the calibration windows in micro-batches, each with its share of the tokens;
- `studied_params`: the parameters to score (resident on a device, never offloaded);
- `streamed_grads`: gradients on for those parameters only, each folded the moment it is complete and freed;
- `math_attention`: the SDPA kernel that has a double backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from esa.dispatch import require_resident
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.progress import progress


@dataclass
class MetricConfig:
    batch_size: int = 4  # windows per forward/backward micro-batch
    per_batch: bool = False  # grad_x_weight: mean_b |w g_b| instead of |w * mean_b g_b| (default)
    times_w2: bool = False  # grad_squared: multiply the Fisher diagonal by w^2 (OBD saliency)
    probes: int = 2  # hutchinson_diag: Rademacher probe vectors
    seed: int = 0  # hutchinson_diag: probe seed (the calibration seed is the caller's)
    hutchinson_output: str = "saliency"  # "saliency" (0.5 diag w^2) or "diag" (the Hessian diagonal)
    spread_sample: int = 256  # hutchinson_diag: weights per matrix whose per-probe values give the spread
    hutchinson_groups: int = 1  # >1: probe the weights in this many groups (less memory, that many more passes)
    show_progress: bool = True


@dataclass
class MetricResult:
    scores: dict[str, torch.Tensor]  # param name -> fp32 scores, shape of the parameter
    extras: dict[str, Any] = field(default_factory=dict)


def micro_batches(ids: torch.Tensor, cfg: MetricConfig, desc: str) -> Iterator[tuple[torch.Tensor, float]]:
    """Micro-batches of `ids` with their weight (share of all target tokens)."""
    n = ids.shape[0]
    if n == 0:
        raise EsaError("no calibration windows to score with")
    bs = max(1, cfg.batch_size)
    for start in progress(range(0, n, bs), desc=desc, disable=not cfg.show_progress, unit="batch"):
        batch = ids[start : start + bs]
        yield batch, batch.shape[0] / n


def studied_params(model: torch.nn.Module, specs: list[WeightSpec]) -> dict[str, torch.nn.Parameter]:
    """The parameters of `specs` by name; an EsaError when there are none, or when one is offloaded."""
    if not specs:
        raise EsaError("no weights to score: the model has none of the modules this metric studies")
    require_resident(model, [s.name for s in specs], "a sensitivity metric")
    return {s.name: model.get_parameter(s.name) for s in specs}


@contextlib.contextmanager
def streamed_grads(
    params: dict[str, torch.nn.Parameter], fold: Callable[[str, torch.nn.Parameter, torch.Tensor], None]
) -> Iterator[None]:
    """Turn on gradients for `params` only; fold each finished .grad with `fold` and free it at once."""
    handles = []
    for name, p in params.items():
        p.requires_grad_(True)

        def hook(p: torch.Tensor, name: str = name) -> None:
            fold(name, p, p.grad)  # type: ignore[arg-type]
            p.grad = None  # free now: never hold every gradient together with every accumulator

        handles.append(p.register_post_accumulate_grad_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)


def math_attention() -> contextlib.AbstractContextManager:
    """The math SDPA kernel: the flash/cuDNN kernels have no double backward (measured on an H100: "derivative
    for aten::_scaled_dot_product_cudnn_attention_backward is not implemented")."""
    return sdpa_kernel(SDPBackend.MATH)
