"""Attention sinks per head against the sensitivity of that head's weights.

Sink strength of a head = the attention mass it puts on the sink keys (position 0, or position 0 and the
delimiters: tokens.SINKS), averaged over query positions t >= 1 and over inputs, from one forward pass with
eager attention. Sensitivity of a head = an aggregate (sum, mean or max) of a metric's per-weight scores
over the head's slice of q (its rows), k and v (its key-value group's rows: grouped-query heads share
them), and o (its columns); fused qkv weights are split by anatomy.head_slices_fused. `sink_correlation`
gives Spearman's rho over heads with a bootstrap CI (heads resampled), overall and within each layer;
`head_sink_correlation` runs the three for a loaded model, `plot_sinks` draws the heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from esa.apps.interpret.anatomy import Eager, anatomy, head_slices, head_slices_fused, require
from esa.apps.interpret.correlation import spearman_ci
from esa.apps.interpret.passes import Wants, forward_capture
from esa.apps.interpret.tokens import sink_mask
from esa.errors import EsaError, unknown
from esa.models.inventory import WeightSpec
from esa.models.loader import LoadedModel
from esa.stats.inference import bootstrap_ci

AGGREGATES = ("sum", "mean", "max")
COMPONENTS = ("q", "k", "v", "o")


def head_sink_strength(model: torch.nn.Module, ids: torch.Tensor, tokenizer: Any = None, sink: str = "first",
                       batch_size: int | None = None) -> pd.DataFrame:
    """One row per (layer, head): mean attention mass on the sink keys, its sd over inputs, n inputs."""
    anat = anatomy(model)
    require(anat, "the sink analysis", ("layers", "attention_probs"))
    cap = forward_capture(model, anat, ids, Wants(sinks=True), sink_mask(ids, tokenizer, sink), batch_size)
    s = cap.sinks.double()  # (L, n, heads)
    rows = [{"layer": li, "head": h, "sink_mass": float(s[li, :, h].mean()),
             "sink_sd": float(s[li, :, h].std()) if s.shape[1] > 1 else math.nan, "n_inputs": int(s.shape[1])}
            for li in range(s.shape[0]) for h in range(s.shape[2])]
    return pd.DataFrame(rows)


def _agg(t: torch.Tensor, how: str) -> float:
    t = t.double()
    return float(t.sum() if how == "sum" else t.mean() if how == "mean" else t.max())


def head_sensitivity(scores: dict[str, torch.Tensor], inventory: list[WeightSpec], model: torch.nn.Module,
                     agg: str = "sum") -> pd.DataFrame:
    """One row per (layer, head): the aggregate score of the head's q, k, v and o slices, and `total`
    (sum of the four for sum/mean, their max for max). Layers without scored attention weights are left out."""
    if agg not in AGGREGATES:
        raise unknown("aggregate", agg, AGGREGATES)
    anat = anatomy(model)
    require(anat, "head sensitivity", ("layers", "attention"))
    per: dict[tuple[int, int], dict[str, float]] = {}
    attn = [s for s in inventory if s.kind == "attention" and s.name in scores]
    if not attn:
        raise EsaError("head sensitivity needs scores of attention weights (q/k/v/o); the scores have none")
    for spec in attn:
        score = scores[spec.name]
        if tuple(score.shape) != tuple(spec.shape):
            raise EsaError(f"scores of {spec.name} have shape {tuple(score.shape)}, the weight {spec.shape}")
        parts = head_slices_fused(anat, spec) if spec.component == "qkv" else {spec.component: head_slices(anat, spec)}
        for comp, slices in parts.items():
            for h, (rs, cs) in enumerate(slices):
                per.setdefault((spec.layer, h), {})[comp] = _agg(score[rs, cs], agg)
    rows = []
    for (layer, h), comps in sorted(per.items()):
        vals = [comps.get(c, math.nan) for c in COMPONENTS]
        finite = [v for v in vals if not math.isnan(v)]
        total = (max(finite) if agg == "max" else sum(finite)) if finite else math.nan
        rows.append({"layer": layer, "head": h, **dict(zip(COMPONENTS, vals, strict=True)), "total": total})
    return pd.DataFrame(rows)


@dataclass
class SinkCorrelation:
    overall: dict[str, Any]  # rho, CI, p, n over all heads (pools between- and within-layer variation)
    within_layer: dict[str, Any]  # mean of the per-layer rhos, bootstrap CI over layers
    per_layer: pd.DataFrame  # layer, rho, ci_lo, ci_hi, p, n, note
    per_component: pd.DataFrame  # component (q, k, v, o, total), rho, CI, p, n over all heads
    table: pd.DataFrame  # the merged (layer, head) table


def sink_correlation(strength: pd.DataFrame, sensitivity: pd.DataFrame, component: str = "total",
                     n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> SinkCorrelation:
    """Rank correlation of sink strength with head sensitivity (`component`: q, k, v, o or total)."""
    if component not in (*COMPONENTS, "total"):
        raise unknown("component", component, (*COMPONENTS, "total"))
    t = strength.merge(sensitivity, on=["layer", "head"], how="inner")
    if t.empty:
        raise EsaError("sink strength and head sensitivity share no (layer, head)")
    overall = spearman_ci(t["sink_mass"], t[component], n_boot, level, seed)
    per_layer = pd.DataFrame([{"layer": int(layer), **spearman_ci(g["sink_mass"], g[component], n_boot, level, seed)}
                              for layer, g in t.groupby("layer")])
    per_comp = pd.DataFrame([{"component": c, **spearman_ci(t["sink_mass"], t[c], n_boot, level, seed)}
                             for c in (*COMPONENTS, "total") if c in t and t[c].notna().any()])
    return SinkCorrelation(overall, _within(per_layer, n_boot, level, seed), per_layer, per_comp, t)


def _within(per_layer: pd.DataFrame, n_boot: int, level: float, seed: int) -> dict[str, Any]:
    """Mean within-layer rho: sink mass and sensitivity both trend with depth, so the pooled rho can come from
    the layers alone; this one compares heads of the same layer only."""
    r = per_layer["rho"].to_numpy(dtype=float)
    r = r[np.isfinite(r)]
    if r.size < 2:
        return {"rho": math.nan, "ci_lo": math.nan, "ci_hi": math.nan, "n_layers": int(r.size),
                "note": "not estimable: fewer than 2 layers with a correlation"}
    est, lo, hi = bootstrap_ci(r, n_boot=n_boot, level=level, seed=seed)
    return {"rho": est, "ci_lo": lo, "ci_hi": hi, "n_layers": int(r.size),
            "n_negative": int((r < 0).sum()), "note": "mean of per-layer Spearman rho; CI resamples layers"}


def head_sink_correlation(lm: LoadedModel, scores: dict[str, torch.Tensor], ids: torch.Tensor, sink: str = "first",
                          aggregate: str = "sum", n_boot: int = 2000, seed: int = 0,
                          batch_size: int | None = None) -> SinkCorrelation:
    """Per-head sink strength on `ids` (eager attention for that pass) against the heads' aggregated `scores`."""
    with Eager(lm.model):
        strength = head_sink_strength(lm.model, ids, lm.tokenizer, sink, batch_size)
    sensitivity = head_sensitivity(scores, lm.inventory, lm.model, aggregate)
    return sink_correlation(strength, sensitivity, n_boot=n_boot, seed=seed)


def plot_sinks(sc: SinkCorrelation, title: str, ax: Any = None) -> Any:
    """Sink mass of each head against its sensitivity (log scale), coloured by layer."""
    import matplotlib.pyplot as plt  # plotting only: the method package imports without matplotlib

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    t = sc.table
    pts = ax.scatter(np.maximum(t["total"], 1e-30), t["sink_mass"], c=t["layer"], s=12, cmap="viridis")
    ax.set_xscale("log")
    ax.set_xlabel("head sensitivity (sum over q/k/v/o slices)")
    ax.set_ylabel("attention mass on sink")
    o = sc.overall
    ax.set_title(f"{title}: Spearman {o['rho']:.2f} [{o['ci_lo']:.2f}, {o['ci_hi']:.2f}]", fontsize=9)
    plt.colorbar(pts, ax=ax, label="layer")
    return ax
