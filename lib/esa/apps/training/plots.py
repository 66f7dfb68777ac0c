"""Figures of fine-tuning: the gain-forgetting Pareto plot, learning curves, and super-weight drift.

Each function returns a matplotlib Figure; the caller saves it. Gain and forgetting are in nats per token
(target loss drop, source loss rise); error bars are 95% bootstrap CIs over seeds where there are >= 2.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

FAMILY_COLOURS = {"sparse": "#c0392b", "control": "#7f8c8d", "lora": "#2980b9", "full": "#27ae60"}
MARKERS = {"none": "o", "freeze": "s", "ewc": "D", "anchor": "^", "random_freeze": "v"}


def _plt():
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "tk", "qt", "macosx")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(s: pd.DataFrame, v: str) -> np.ndarray | None:
    if f"{v}_lo" not in s or s[f"{v}_lo"].isna().all():
        return None
    lo = (s[v] - s[f"{v}_lo"]).clip(lower=0).fillna(0).to_numpy()
    hi = (s[f"{v}_hi"] - s[v]).clip(lower=0).fillna(0).to_numpy()
    return np.vstack([lo, hi])


def pareto_plot(summary: pd.DataFrame, title: str = ""):
    """Target gain (y, higher is better) against source forgetting (x, lower is better), one point per arm;
    the non-dominated arms are joined by the Pareto line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    s = summary[summary["gain"].notna()] if "gain" in summary else summary.iloc[0:0]
    for _, r in s.iterrows():
        one = s.loc[[r.name]]
        ax.errorbar(r["forgetting"], r["gain"], xerr=_err(one, "forgetting"), yerr=_err(one, "gain"),
                    fmt=MARKERS.get(r["protection"], "o"), color=FAMILY_COLOURS.get(r["family"], "k"), capsize=3,
                    ms=7, alpha=0.9)
        ax.annotate(r["arm"], (r["forgetting"], r["gain"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = s[s["pareto"]].sort_values("forgetting") if "pareto" in s else s.iloc[0:0]
    if len(front) > 1:
        ax.plot(front["forgetting"], front["gain"], "--", color="k", lw=0.8, label="Pareto front")
    for fam, col in FAMILY_COLOURS.items():
        if fam in set(s.get("family", [])):
            ax.plot([], [], "o", color=col, label=fam)
    ax.axvline(0, color="0.7", lw=0.6)
    ax.axhline(0, color="0.7", lw=0.6)
    ax.set_xlabel("source forgetting (Shakespeare loss rise, nats/token; lower is better)")
    ax.set_ylabel("target gain (GSM8K held-out loss drop, nats/token)")
    n = int(s["n_seeds"].max()) if len(s) else 0
    ax.set_title(title or f"gain vs forgetting ({n} seed(s){'; 95% CI over seeds' if n >= 2 else ''})", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def curve_plot(steps: pd.DataFrame, evals: pd.DataFrame, title: str = ""):
    """Training loss per step and held-out target / source loss at each evaluation, mean over seeds per arm."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    arms = list(dict.fromkeys(steps["arm"])) if len(steps) else []
    cmap = plt.get_cmap("tab10")
    for i, arm in enumerate(arms):
        col = cmap(i % 10)
        st = steps[steps["arm"] == arm].groupby("step")["loss"].mean()
        axes[0].plot(st.index, st.to_numpy(), color=col, lw=1, label=arm)
        ev = evals[evals["arm"] == arm].groupby("step")[["target_loss", "source_loss"]].mean()
        axes[1].plot(ev.index, ev["target_loss"], "o-", color=col, lw=1, ms=3)
        axes[2].plot(ev.index, ev["source_loss"], "o-", color=col, lw=1, ms=3)
    for ax, t in zip(axes, ("training loss (GSM8K train windows)", "held-out GSM8K loss (target)",
                            "Shakespeare loss (source; forgetting)"), strict=True):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("nats/token")
    if arms:
        axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def drift_plot(drift: pd.DataFrame, evals: pd.DataFrame, title: str = ""):
    """Relative drift of the tracked super weight(s) and the massive-activation channel's max |activation|
    (relative to the base model) at each evaluation, mean over seeds per arm."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("tab10")
    arms = list(dict.fromkeys(evals["arm"])) if len(evals) else []
    for i, arm in enumerate(arms):
        col = cmap(i % 10)
        d = drift[drift["arm"] == arm] if len(drift) else drift
        if len(d):
            rel = (d["drift"] / d["initial"].abs().replace(0, math.nan)).groupby(d["step"]).mean()
            axes[0].plot(rel.index, rel.to_numpy(), "o-", color=col, ms=3, lw=1, label=arm)
        e = evals[evals["arm"] == arm]
        if "massive_act" in e:
            m = e.groupby("step")["massive_act"].mean()
            axes[1].plot(m.index, (m / m.iloc[0]).to_numpy(), "o-", color=col, ms=3, lw=1, label=arm)
    axes[0].set_title("super weight: (w - w0) / |w0|", fontsize=9)
    axes[1].set_title("massive-activation channel: max |act| / base", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.axhline(0 if ax is axes[0] else 1, color="0.7", lw=0.6)
    if arms:
        axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
