"""Where critical weights sit: layer depth, component, massive-activation channels, magnitudes.

Shares are computed on a `global` selection (a `per_layer` selection puts k in every matrix by
construction, so its shares only reflect how many matrices each component has) and on score mass
(the per-matrix table of the engine).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from esa.hooks import Call, hooked
from esa.models.inventory import WeightSpec


def component_shares(selection: pd.DataFrame, inventory: list[WeightSpec]) -> pd.DataFrame:
    """Per component: share of the selection, share of all weights, and their ratio (enrichment)."""
    total = sum(s.numel for s in inventory)
    weights = pd.Series({c: sum(s.numel for s in inventory if s.component == c) for c in
                         dict.fromkeys(s.component for s in inventory)}, name="weight_share") / total
    sel = selection.groupby("component").size() / max(1, len(selection))
    df = pd.DataFrame({"selected_share": sel, "weight_share": weights}).fillna(0.0)
    df["enrichment"] = df["selected_share"] / df["weight_share"].where(df["weight_share"] > 0)
    return df.reset_index(names="component").sort_values("selected_share", ascending=False)


def layer_component_counts(selection: pd.DataFrame) -> pd.DataFrame:
    """Selected weights per (layer, component): the hotspot table (rows = layers)."""
    return selection.pivot_table(index="layer", columns="component", values="rank", aggfunc="size", fill_value=0)


def architecture_analysis(matrices: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """Attention vs FFN (mlp + experts + router) per layer: share of the score mass and of a global top-k."""
    m = matrices.assign(block=np.where(matrices["kind"] == "attention", "attention", "ffn"))
    mass = m.pivot_table(index="layer", columns="block", values="sum", aggfunc="sum", fill_value=0.0)
    mass = mass.div(mass.to_numpy().sum())
    s = selection.assign(block=np.where(selection["kind"] == "attention", "attention", "ffn"))
    cnt = s.pivot_table(index="layer", columns="block", values="rank", aggfunc="size", fill_value=0)
    cnt = cnt.div(max(1, len(selection)))
    out = mass.add_prefix("mass_").join(cnt.add_prefix("topk_"), how="outer").fillna(0.0)
    return out.reset_index()


@torch.no_grad()
def input_channel_max(model: torch.nn.Module, inventory: list[WeightSpec], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per 2-D studied weight: max |x_j| over tokens of its input (cols,), and for down projections the
    max |y_i| of its output (rows,) under key name + ':out'. One forward pass."""
    out: dict[str, torch.Tensor] = {}
    by_module: dict[str, list[WeightSpec]] = {}
    for spec in inventory:
        if not spec.n_experts:
            by_module.setdefault(spec.name.rpartition(".")[0], []).append(spec)

    def channel_max(call: Call) -> None:
        args, y = call.args, call.output
        for spec in by_module[call.name]:
            if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[-1] != spec.cols:
                continue
            x = args[0].detach().float().reshape(-1, spec.cols).abs().amax(0)  # (in,)
            out[spec.name] = torch.maximum(out[spec.name], x) if spec.name in out else x
            if spec.component == "down" and isinstance(y, torch.Tensor):
                yy = y.detach().float().reshape(-1, y.shape[-1]).abs().amax(0)  # (out,)
                key = spec.name + ":out"
                out[key] = torch.maximum(out[key], yy) if key in out else yy

    with hooked(model, {name: channel_max for name in by_module}):
        model(input_ids=ids.to(model.get_input_embeddings().weight.device), use_cache=False)
    return out


def weight_analysis(
    model: torch.nn.Module, inventory: list[WeightSpec], selection: pd.DataFrame, ids: torch.Tensor,
    massive_factor: float = 20.0,
) -> dict[str, Any]:
    """Do critical weights sit on massive-activation channels, and are they simply the largest weights?

    A channel is 'massive' when its max |activation| is >= `massive_factor` x the median channel's max
    in the same module (Sun et al. 2024 report 10^3-10^4 x on real models).
    """
    chan = input_channel_max(model, inventory, ids)
    specs = {s.name: s for s in inventory}
    on_massive_col, on_massive_row, pct, top1 = [], [], [], []
    n_massive_cols = 0
    massive_cache: dict[str, torch.Tensor] = {}
    for name, x in chan.items():
        massive_cache[name] = x >= massive_factor * x.median().clamp_min(1e-30)
        if not name.endswith(":out"):
            n_massive_cols += int(massive_cache[name].sum())
    for param, grp in selection.groupby("param", sort=False):
        spec = specs[param]
        w = model.get_parameter(param).detach().float()
        if spec.n_experts:
            continue
        a = w.abs().reshape(-1)
        sorted_abs = a.sort().values
        rows_t = torch.tensor(grp["row"].to_numpy())
        cols_t = torch.tensor(grp["col"].to_numpy())
        vals = w[rows_t, cols_t].abs()
        below = torch.searchsorted(sorted_abs, vals, right=False).double() / a.numel()  # |w| percentile
        pct.extend(below.tolist())
        top1.extend((below >= 0.99).tolist())
        if param in massive_cache:
            on_massive_col.extend(massive_cache[param][cols_t].tolist())
        if param + ":out" in massive_cache:
            on_massive_row.extend(massive_cache[param + ":out"][rows_t].tolist())
    total_cols = sum(v.numel() for k, v in chan.items() if not k.endswith(":out"))
    return {
        "massive_factor": massive_factor,
        "massive_col_fraction_all": n_massive_cols / max(1, total_cols),
        "selected_on_massive_col": float(np.mean(on_massive_col)) if on_massive_col else float("nan"),
        "selected_down_on_massive_row": float(np.mean(on_massive_row)) if on_massive_row else float("nan"),
        "magnitude_percentile_median": float(np.median(pct)) if pct else float("nan"),
        "selected_in_top1pct_magnitude": float(np.mean(top1)) if top1 else float("nan"),
        "n_selected_dense": len(pct),
    }
