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

from esa.models.inventory import WeightSpec
from esa.sensitivity.metrics import METRICS, MetricConfig, fusable, fused_gradients
from esa.sensitivity.resolved import RESOLVE_Z, median_z_and_needed


def sample_matrices(specs: list[WeightSpec], n: int) -> list[WeightSpec]:
    """Up to `n` studied matrices spread evenly over depth and over components (deterministic): the i-th pick is
    component i mod (number of components) at depth quantile (i + 1/2) / n. Taking every k-th spec of the
    inventory instead lands on one component whenever k is a multiple of the components per layer (7 of 210 for
    SmolLM2: six o_proj matrices)."""
    if n >= len(specs):
        return list(specs)
    comps = list(dict.fromkeys(s.component for s in specs))
    by_comp = {c: [s for s in specs if s.component == c] for c in comps}
    picked: list[WeightSpec] = []
    for i in range(n):
        pool = [s for s in by_comp[comps[i % len(comps)]] if s not in picked]
        if not pool:
            pool = [s for s in specs if s not in picked]
        picked.append(pool[min(len(pool) - 1, int((i + 0.5) / n * len(pool)))])
    return picked


class _Streams:
    """Per weight of one matrix, the sums and sums of squares (float64) of its per-window scores in the two
    streams: enough for both means and the pooled within-stream sd, without keeping every window's scores
    (200 windows x 6 matrices of a 0.5B model would be ~10 GB)."""

    def __init__(self) -> None:
        self.n = [0, 0]
        self.sum: list[torch.Tensor | None] = [None, None]
        self.sq: list[torch.Tensor | None] = [None, None]

    def add(self, stream: int, x: torch.Tensor) -> None:
        x = x.reshape(-1).double()
        if self.sum[stream] is None:
            self.sum[stream], self.sq[stream] = x.clone(), x.square()
        else:
            self.sum[stream].add_(x)
            self.sq[stream].add_(x.square())
        self.n[stream] += 1

    def mean(self, stream: int) -> torch.Tensor:
        return self.sum[stream] / self.n[stream]

    def pooled_sd(self) -> torch.Tensor:
        ss = sum((self.sq[k] - self.n[k] * self.mean(k).square()).clamp_min_(0) for k in (0, 1))
        return (ss / (self.n[0] + self.n[1] - 2)).sqrt()


def _per_window_streams(model: torch.nn.Module, sub: list[WeightSpec], ids: torch.Tensor, metrics: list[str],
                        cfg: MetricConfig) -> dict[str, dict[str, _Streams]]:
    """Each metric's per-window scores on `sub`, folded into even/odd streams as the windows are scored. The
    gradient metrics share one forward+backward per window (`fused_gradients`, bit-identical to each alone)."""
    one = replace(cfg, batch_size=1, show_progress=False)
    fused = [m for m in metrics if m in fusable()]
    alone = [m for m in metrics if m not in fused]
    streams = {m: {s.name: _Streams() for s in sub} for m in metrics}
    for i in range(int(ids.shape[0])):
        window = ids[i : i + 1]
        results = fused_gradients(model, sub, window, {m: one for m in fused}) if fused else {}
        results.update({m: METRICS[m](model, sub, window, one) for m in alone})
        for m, r in results.items():
            for s in sub:
                streams[m][s.name].add(i % 2, r.scores[s.name])
    return streams


def _judge(metric: str, streams: dict[str, _Streams], topk: int, n: int, n_run: int | None) -> dict[str, Any]:
    n_b = n // 2  # stream B: the odd windows
    z_all, need_all = [], []
    for st in streams.values():
        mean_a, mean_b, sd = st.mean(0), st.mean(1), st.pooled_sd()  # sd: per window, pooled within the streams
        k = min(topk, mean_a.numel())
        top = torch.topk(mean_a, k).indices
        gap = float(mean_b[top].median() - mean_b.median())
        se = float(sd[top].median()) / math.sqrt(n_b)
        z = gap / max(se, 1e-300)
        z_all.append(z)
        need_all.append(math.inf if gap <= 0 else n_b * (RESOLVE_Z / z) ** 2 * 2)
    z_med, z_se, need = median_z_and_needed(z_all, need_all)
    n_run = n_run or n
    z_run = z_med * math.sqrt(n_run / (2 * n_b))  # SE at n_run windows instead of one stream's
    return {"metric": metric, "unit": "calibration windows", "n": n_run, "z": z_run, "resolved": z_run >= RESOLVE_Z,
            "needed": need, "z_se": z_se, "matrices": len(streams), "windows_measured": n,
            "matrices_resolved": float(sum(v >= RESOLVE_Z for v in z_all) / len(z_all)),
            "note": "held out: even windows select each matrix's top-k, odd windows judge it"}


def window_resolutions(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, metrics: list[str],
                       cfg: MetricConfig, topk: int, n_run: int | None = None,
                       matrices: int = 6) -> dict[str, dict[str, Any]]:
    """Held-out resolution of each of `metrics` over the windows of `ids` (see the module docstring), judged at
    `n_run` windows (default: the windows given), on the same sampled matrices. Needs >= 4 windows (two a
    stream, for a spread within each)."""
    n = int(ids.shape[0])
    for m in metrics:
        METRICS.lookup(m)
    if n < 4:
        return {m: {"metric": m, "unit": "calibration windows", "n": n_run or n, "z": math.nan, "resolved": None,
                    "needed": math.nan, "note": f"not estimable: {n} windows (needs >= 4)"} for m in metrics}
    streams = _per_window_streams(model, sample_matrices(specs, matrices), ids, list(metrics), cfg)
    return {m: _judge(m, streams[m], topk, n, n_run) for m in metrics}


def window_resolution(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, metric: str,
                      cfg: MetricConfig, topk: int, n_run: int | None = None, matrices: int = 6) -> dict[str, Any]:
    """`window_resolutions` of one metric."""
    return window_resolutions(model, specs, ids, [metric], cfg, topk, n_run, matrices)[metric]


def from_probes(resolution: dict[str, Any], metric: str = "hutchinson_diag") -> dict[str, Any]:
    """`esa.sensitivity.curvature.resolution_at` output in this module's row format (unit: probes)."""
    return {"metric": metric, "unit": "probes", "n": resolution["probes"], "z": resolution["z"],
            "resolved": resolution["resolved"], "needed": resolution["probes_needed"],
            "note": "held out: two independent probe streams on the same windows"}
