"""Can a metric resolve its own top-k at the calibration sample it ran on? One rule for every metric.

A score is an average over calibration windows (and, for hutchinson_diag, over probes; that noise is measured by
`esa.sensitivity.curvature.reliability`). Held out: the windows are split into two streams, stream A (even
windows) picks each matrix's top-k and stream B (odd windows) judges it, so noise cannot confirm itself. The
per-window standard deviation of a weight's score is pooled within the streams; with n_B windows in stream B,
a matrix's z = (median of B's scores over A's top-k - B's matrix median) / (median per-window sd over the
top-k / sqrt(n_B)). The metric is resolved at the run's n windows when the median z over the sampled matrices,
scaled to n (SE shrinks as 1/sqrt(windows)), is >= RESOLVE_Z; the windows needed follow the same scaling.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.sensitivity.metrics import METRICS, MetricConfig

RESOLVE_Z = 2.0  # resolved (every metric, curvature's probes too): the top-k's median stands >= 2 SE above the median


def median_z_and_needed(z_all: list[float], need_all: list[float]) -> tuple[float, float, float]:
    """(median z over matrices, its standard error, the median sample needed). The sample needed scales the
    measured z by 1/sqrt(sample); when the median z is within 2 of its own standard errors of 0 there is no
    effect to scale (any number would come out), so it is inf: "not distinguishable from the median"."""
    z = torch.tensor(z_all, dtype=torch.float64)
    z_med = float(z.median())
    # standard error of a median: sqrt(pi / 2) x sd / sqrt(n), for roughly normal spreads; one matrix's z is
    # in its own standard errors, so its noise is about 1
    z_se = math.sqrt(math.pi / 2) * float(z.std()) / math.sqrt(len(z_all)) if len(z_all) > 1 else 1.0
    need = float(torch.tensor(need_all, dtype=torch.float64).median())
    return z_med, z_se, (need if z_med > 2 * z_se else math.inf)


def sample_matrices(specs: list[WeightSpec], n: int) -> list[WeightSpec]:
    """Up to `n` studied matrices spread evenly over depth and kinds (deterministic)."""
    if n >= len(specs):
        return list(specs)
    step = len(specs) / n
    return [specs[int(i * step + step / 2)] for i in range(n)]


def window_resolution(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, metric: str,
                      cfg: MetricConfig, topk: int, n_run: int | None = None, matrices: int = 6) -> dict[str, Any]:
    """Held-out resolution of `metric` over the windows of `ids` (see the module docstring), judged at `n_run`
    windows (default: the windows given). Needs >= 4 windows (two a stream, for a spread within each)."""
    n = int(ids.shape[0])
    if n < 4:
        return {"metric": metric, "unit": "calibration windows", "n": n_run or n, "z": math.nan,
                "resolved": None, "needed": math.nan, "note": f"not estimable: {n} windows (needs >= 4)"}
    if metric not in METRICS:
        raise EsaError(f"unknown metric {metric!r}")
    sub = sample_matrices(specs, matrices)
    one = replace(cfg, batch_size=1, show_progress=False)
    per_window = [METRICS[metric](model, sub, ids[i : i + 1], one).scores for i in range(n)]
    streams = (list(range(0, n, 2)), list(range(1, n, 2)))
    z_all, need_all = [], []
    for s in sub:
        x = torch.stack([per_window[i][s.name].reshape(-1).double() for i in range(n)])  # (windows, weights)
        a, b = x[streams[0]], x[streams[1]]
        resid = torch.cat([a - a.mean(0), b - b.mean(0)])
        sd = (resid.square().sum(0) / (n - 2)).sqrt()  # per-window sd, pooled within the streams
        k = min(topk, a.shape[1])
        top = torch.topk(a.mean(0), k).indices
        mean_b = b.mean(0)
        gap = float(mean_b[top].median() - mean_b.median())
        se = float(sd[top].median()) / math.sqrt(len(streams[1]))
        z = gap / max(se, 1e-300)
        z_all.append(z)
        need_all.append(math.inf if gap <= 0 else len(streams[1]) * (RESOLVE_Z / z) ** 2 * 2)
    z_med, z_se, need = median_z_and_needed(z_all, need_all)
    n_run = n_run or n
    z_run = z_med * math.sqrt(n_run / (2 * len(streams[1])))  # SE at n_run windows instead of one stream's
    return {"metric": metric, "unit": "calibration windows", "n": n_run, "z": z_run, "resolved": z_run >= RESOLVE_Z,
            "needed": need, "z_se": z_se, "matrices": len(sub), "windows_measured": n,
            "matrices_resolved": float(sum(v >= RESOLVE_Z for v in z_all) / len(z_all)),
            "note": "held out: even windows select each matrix's top-k, odd windows judge it"}


def from_probes(resolution: dict[str, Any], metric: str = "hutchinson_diag") -> dict[str, Any]:
    """`esa.sensitivity.curvature.resolution_at` output in this module's row format (unit: probes)."""
    return {"metric": metric, "unit": "probes", "n": resolution["probes"], "z": resolution["z"],
            "resolved": resolution["resolved"], "needed": resolution["probes_needed"],
            "note": "held out: two independent probe streams on the same windows"}
