"""Figures of Phase 3: damage per group with CIs, and dose-response curves.

Each function returns a matplotlib Figure; the caller saves it (ctx.savefig in notebooks, `save` in the
CLI). Damage is delta log-PPL (nats/token) with catastrophic values capped as esa.stats.inference states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esa.figures import save_figure
from esa.perturb.ops import PERTURBATIONS

GROUP_ORDER = ["top_k", "magnitude_k", "random_k", "random_global", "bottom_k"]


def _plt():
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "tk", "qt", "macosx")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _order(groups) -> list[str]:
    gs = list(dict.fromkeys(groups))
    return [g for g in GROUP_ORDER if g in gs] + [g for g in gs if g not in GROUP_ORDER]


def damage_bars(summary: pd.DataFrame | list[dict[str, Any]], title: str = ""):
    """One panel per condition: mean delta log-PPL per group with its bootstrap CI (log y axis if wide)."""
    plt = _plt()
    s = pd.DataFrame(summary)
    conds = s[["perturbation", "scale", "prob"]].drop_duplicates().to_records(index=False)
    n = len(conds)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, (pert, scale, prob) in zip(axes[0], conds, strict=True):
        d = s[(s.perturbation == pert) & (s.scale == scale) & (s.prob == prob)].set_index("group")
        order = _order(d.index)
        d = d.loc[order]
        vals = d["mean"].to_numpy(dtype=float)
        log_axis = bool(np.all(vals > 0) and vals.max() / max(vals.min(), 1e-12) > 100)
        lower = d["ci_lo"].astype(float)
        floor = vals.min() / 10 if log_axis else None
        if log_axis:
            # A CI reaching down to ~0 would stretch a log axis to 1e-15: stop its whisker a decade below
            # the smallest bar and mark it as running off the axis.
            lower = lower.clip(lower=floor)
        lo = (d["mean"] - lower).clip(lower=0).fillna(0)
        hi = (d["ci_hi"] - d["mean"]).clip(lower=0).fillna(0)
        x = np.arange(len(d))
        ax.bar(
            x, d["mean"], yerr=[lo, hi], color=["C3" if g == "top_k" else "C0" for g in d.index], capsize=3
        )
        if log_axis:
            off = (d["ci_lo"].astype(float) < floor).to_numpy()
            ax.plot(x[off], np.full(off.sum(), floor), "v", color="k", ms=4, label="CI runs below axis")
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor / 2)
        ax.set_xticks(x, d.index, rotation=45, ha="right", fontsize=8)
        dose = PERTURBATIONS[pert.partition("[")[0]].dose  # table kinds name bit variants as bit_flip[<bits>]
        label = {None: pert, "prob": f"{pert} p={prob:g}"}.get(dose, f"{pert} x{scale:g}")
        capped = d["n_capped"].fillna(0).astype(int) if "n_capped" in d else pd.Series(0, index=d.index)
        if capped.any():
            # A capped bar is a floor on the damage, not its size: hatch it and say so in the title.
            for patch, n_cap in zip(ax.patches, capped, strict=True):
                if n_cap:
                    patch.set_hatch("//")
                    patch.set_edgecolor("k")
            label += f"\nhatched: {int((capped > 0).sum())} group(s) at the damage cap"
        ax.set_title(label, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
    axes[0][0].set_ylabel("delta log-PPL (nats/token)")
    fig.suptitle(title or "damage per group (mean over seeds, 95% bootstrap CI)", fontsize=10)
    fig.tight_layout()
    return fig


def dose_plot(table: pd.DataFrame, value: str = "delta_log_ppl", title: str = ""):
    """Mean damage vs dose per group, one panel per perturbation, log x axis."""
    plt = _plt()
    perts = list(dict.fromkeys(table["perturbation"]))
    fig, axes = plt.subplots(1, len(perts), figsize=(3.8 * len(perts), 3.4), squeeze=False)
    for ax, pert in zip(axes[0], perts, strict=True):
        d = table[table.perturbation == pert]
        for g in _order(d["group"]):
            m = d[d.group == g].groupby("dose")[value].agg(["mean", "min", "max"]).sort_index()
            (line,) = ax.plot(m.index, m["mean"], marker="o", label=g, color="C3" if g == "top_k" else None)
            ax.fill_between(m.index, m["min"], m["max"], alpha=0.15, color=line.get_color())
        if (d["dose"] > 0).all() and d["dose"].nunique() > 1:
            ax.set_xscale("log")
        ax.set_xlabel("dose (scale, or bit-flip probability)")
        ax.set_title(pert, fontsize=9)
        ax.grid(alpha=0.3)
    unit = "Δ log-PPL (nats/token)" if value == "delta_log_ppl" else value
    axes[0][0].set_ylabel(f"{unit}, mean (band: seed range)")
    axes[0][-1].legend(fontsize=7, loc="upper left")  # damage rises with the dose: the top left stays clear
    fig.suptitle(title or "dose-response", fontsize=10)
    fig.tight_layout()
    return fig


def save(fig, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=130)
