"""Figures of the security analyses. Each function returns a matplotlib Figure; the caller saves it.

Damage is log(PPL / base PPL) in nats; a non-finite held-out loss (a destroyed model) is drawn at the top
of its axis (`cap`) so it stays visible instead of vanishing from the plot.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def _plt() -> Any:
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "tk", "qt", "macosx")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(mid: Any, lo: Any, hi: Any) -> np.ndarray:
    """(2, n) error-bar lengths, never negative (bounds equal to the value up to rounding)."""
    m = np.asarray(mid, dtype=float)
    return np.clip(np.vstack([m - np.asarray(lo, dtype=float), np.asarray(hi, dtype=float) - m]), 0, None)


def collapse_bars(collapse: pd.DataFrame, title: str) -> Any:
    """Share of weights whose single worst flip collapses the model, per (model, format), Wilson 95% CI."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{r.model}\n{r.format}" for r in collapse.itertuples()]
    x = np.arange(len(collapse))
    share = collapse["share"].to_numpy(float)
    err = np.clip(np.vstack([share - collapse["lo"].to_numpy(float), collapse["hi"].to_numpy(float) - share]), 0, None)
    ax.bar(x, share, yerr=err, capsize=3, color="tab:red", alpha=0.8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share collapsing (one flip)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def attack_curves(history: pd.DataFrame, base_log_ppl: float, title: str, cap: float | None = None) -> Any:
    """Held-out damage against flips, one line per (target set, attack seed); the random-flip baseline dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    d = history.assign(damage=history["heldout_log_ppl"] - base_log_ppl)
    fin = d["damage"][np.isfinite(d["damage"])]
    top = cap if cap is not None else (float(fin.max()) * 1.1 + 0.1 if len(fin) else 1.0)
    colours = {}
    for (label, seed), g in d.groupby(["set", "seed"], sort=True):
        x = g["net_flips"] if "net_flips" in g and g["net_flips"].notna().all() else g["step"]
        y = g["damage"].where(np.isfinite(g["damage"]), top)
        c = colours.setdefault(label, f"C{len(colours)}")
        ax.plot(x, y, ls="--" if label == "random_flips" else "-", marker="o", ms=2, color=c,
                label=label if seed == d[d["set"] == label]["seed"].min() else None)
    ax.axhline(math.log(100), color="grey", lw=0.8, ls=":")
    ax.text(ax.get_xlim()[0], math.log(100), " PPL x100", fontsize=7, va="bottom", color="grey")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("bit flips")
    ax.set_ylabel("log(PPL / base)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fault_plot(faults: pd.DataFrame, protection: pd.DataFrame, title: str) -> Any:
    """Left: catastrophic-trial rate against the per-bit rate, per format (Wilson CI). Right: against the
    protected fraction, guarding the critical set vs an equal random set."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    ax = axes[0]
    for fmt, g in faults.groupby("format"):
        g = g.sort_values("rate")
        ax.errorbar(g["rate"], g["catastrophic_rate"], yerr=_err(g["catastrophic_rate"], g["catastrophic_lo"],
                                                                  g["catastrophic_hi"]),
                    marker="o", capsize=3, label=fmt)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("per-bit fault rate")
    ax.set_ylabel("catastrophic trials")
    ax.legend(fontsize=7)
    ax.set_title("fault campaigns", fontsize=9)
    ax = axes[1]
    if len(protection):
        none = protection[protection["protected"] == "none"].iloc[0]
        ax.axhline(none["catastrophic_rate"], color="grey", ls=":", label="unprotected")
        for kind, g in protection[protection["protected"] != "none"].groupby("kind"):
            g = g.sort_values("requested_fraction")
            ax.errorbar(g["requested_fraction"], g["catastrophic_rate"],
                        yerr=_err(g["catastrophic_rate"], g["catastrophic_lo"], g["catastrophic_hi"]),
                        marker="o", capsize=3,
                        label=f"guard {kind}")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("protected fraction of weights")
    ax.set_title("protection", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def pgd_plot(table: pd.DataFrame, title: str) -> Any:
    """Attack-loss increase against the L-infinity budget, per target set (mean and range over seeds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, g in table.groupby("set"):
        s = g.groupby("eps")["loss_increase"].agg(["mean", "min", "max"]).sort_index()
        ax.errorbar(s.index, s["mean"], yerr=_err(s["mean"], s["min"], s["max"]), marker="o",
                    capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("L-inf budget")
    ax.set_ylabel("attack-loss increase (nats)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def detector_plot(scores: pd.DataFrame, title: str) -> Any:
    """Anomaly scores of clean and backdoored models, per detector."""
    plt = _plt()
    dets = list(dict.fromkeys(scores["detector"]))
    fig, axes = plt.subplots(1, len(dets), figsize=(4 * len(dets), 3), squeeze=False)
    for ax, det in zip(axes[0], dets, strict=True):
        g = scores[scores["detector"] == det]
        for lab, name in ((0, "clean"), (1, "backdoored")):
            v = g[g["label"] == lab]["score"].to_numpy(float)
            ax.scatter(np.full(v.size, lab) + np.linspace(-0.1, 0.1, v.size), v, label=name, s=14)
        ax.set_xticks([0, 1], ["clean", "backdoored"])
        ax.set_ylabel("anomaly score")
        ax.set_title(det, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
