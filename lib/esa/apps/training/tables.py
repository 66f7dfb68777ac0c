"""The tables of a fine-tuning grid: one row per arm, summarised over seeds.

`summary_table` gives each arm's gain and forgetting (nats per token; mean over seeds with a 95% bootstrap
CI over seeds where there are >= 2), its costs and whether it is on the gain-forgetting Pareto front;
`equal_count_table` lines up the unprotected arms at equal trainable count (sparse selections, controls,
LoRA per density; full fine-tuning last); `protection_table` puts every protection of the protected method
beside its unprotected reference, with the share of gain kept and the forgetting avoided.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from esa.apps.training.grid import Arm
from esa.stats.inference import bootstrap_ci

FAMILY_ORDER = {"sparse": 0, "control": 1, "lora": 2, "full": 3}


def summary_table(final: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: gain and forgetting (mean over seeds, 95% bootstrap CI over seeds where >= 2), costs.
    An arm that could not run keeps its row with the reason in `error`."""
    rows = []
    for _, g in final.groupby("arm", sort=False):
        first = g.iloc[0]
        row: dict[str, Any] = {k: first[k] for k in ("arm", "method", "family", "selection", "density", "protection")}
        ok = g[g["error"] == ""] if "error" in g else g
        row.update(n_seeds=len(ok), error=next((e for e in g.get("error", []) if e), ""))
        if len(ok):
            for v in ("gain", "forgetting"):
                est, lo, hi = bootstrap_ci(ok[v].to_numpy(float))
                row.update({v: est, f"{v}_lo": lo, f"{v}_hi": hi})
            row.update(n_trainable=int(ok["n_trainable"].median()), lr=float(ok["lr"].median()),
                       target_ppl_0=float(ok["target_ppl_0"].mean()),
                       target_ppl=float(ok["target_ppl"].mean()), source_ppl_0=float(ok["source_ppl_0"].mean()),
                       source_ppl=float(ok["source_ppl"].mean()),
                       optimizer_mib=float(ok["optimizer_state_bytes"].median()) / 2**20,
                       seconds_per_step=float(ok["seconds_per_step"].median()))
            for v in ("massive_act_ratio", "super_weight_rel_drift"):
                if v in ok:
                    row[v] = float(ok[v].mean())
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["pareto"] = pareto_front(out)
    return out


def pareto_front(summary: pd.DataFrame) -> list[bool]:
    """Arms no other arm beats on both axes (higher gain and lower forgetting, at least one strictly)."""
    g, f = summary.get("gain"), summary.get("forgetting")
    if g is None or f is None:
        return [False] * len(summary)
    gs, fs = g.to_numpy(float), f.to_numpy(float)
    out = []
    for i in range(len(gs)):
        if not (np.isfinite(gs[i]) and np.isfinite(fs[i])):
            out.append(False)
            continue
        dominated = any(np.isfinite(gs[j]) and np.isfinite(fs[j]) and gs[j] >= gs[i] and fs[j] <= fs[i]
                        and (gs[j] > gs[i] or fs[j] < fs[i]) for j in range(len(gs)) if j != i)
        out.append(not dominated)
    return out


def equal_count_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Unprotected arms by density (sparse selections, controls, LoRA at the same trainable count), full FT last."""
    s = summary[summary["protection"] == "none"].copy()
    s["_f"] = s["family"].map(FAMILY_ORDER)
    s["_d"] = s["density"].fillna(math.inf)
    cols = [c for c in ("arm", "family", "selection", "density", "n_seeds", "n_trainable", "lr", "target_ppl_0",
                        "target_ppl", "gain", "gain_lo", "gain_hi", "source_ppl", "forgetting", "forgetting_lo",
                        "forgetting_hi", "optimizer_mib", "seconds_per_step", "pareto", "error") if c in s]
    return s.sort_values(["_d", "_f", "arm"])[cols].reset_index(drop=True)


def protection_table(summary: pd.DataFrame, reference: Arm) -> pd.DataFrame:
    """The unprotected `reference` arm and every protection of it, with gain kept and forgetting avoided."""
    s = summary[(summary["method"] == reference.method) & (summary["arm"].str.startswith(reference.label))].copy()
    if s.empty or reference.label not in set(s["arm"]):
        return s
    base = s.set_index("arm").loc[reference.label]
    s["gain_kept"] = s["gain"] / base["gain"] if base.get("gain", 0) else math.nan
    s["forgetting_avoided"] = base.get("forgetting", math.nan) - s["forgetting"]
    return s.reset_index(drop=True)
