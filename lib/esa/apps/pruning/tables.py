"""The tables of a pruning study: one row per condition, summarised over calibration seeds.

`summarize` gives PPL as the geometric mean over seeds with a 95% t-interval from log-PPL (NaN with one
seed), accuracies and the seeds used; `summary_tables` cuts the study's rows into the main table at the
criterion's sparsity, the sparsity sweep, N:M patterns, OWL allocation and protected vs unprotected.
"""

from __future__ import annotations

import math

import pandas as pd

from esa.stats.intervals import t_interval

CONDITION = ["model", "method", "sparsity", "pattern", "group", "allocation", "protected", "calib_mode"]


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: PPL (geometric mean over seeds, 95% CI from log-PPL), accuracies, seeds."""
    out = []
    for key, g in rows.groupby(CONDITION, sort=False, dropna=False):
        lp, lo, hi = t_interval(g["log_ppl"].to_numpy())
        rec = dict(zip(CONDITION, key, strict=True))
        rec.update({"ppl": math.exp(lp) if math.isfinite(lp) else math.inf,
                    "ppl_lo": math.exp(lo) if math.isfinite(lo) else math.nan,
                    "ppl_hi": math.exp(hi) if math.isfinite(hi) else math.nan,
                    "log_ppl": lp, "accuracy": float(g["accuracy"].mean()),
                    "achieved_sparsity": float(g["achieved_sparsity"].mean()), "n_seeds": len(g),
                    "calib_seeds": ",".join(str(s) for s in sorted(g["calib_seed"].unique()))})
        if "zs_accuracy" in g:
            rec.update({"zs_accuracy": float(g["zs_accuracy"].mean()), "zs_accuracy_norm": float(g["zs_accuracy_norm"].mean()),
                        "zs_chance": float(g["zs_chance"].iloc[0]), "zs_items": int(g["zs_items"].iloc[0])})
        out.append(rec)
    return pd.DataFrame(out)


def summary_tables(table: pd.DataFrame, sparsity: float, sweep_methods: list[str], pattern_methods: list[str],
                   owl_sparsity: float, owl_methods: list[str], protect_methods: list[str] | None) -> dict[str, pd.DataFrame]:
    """The study's tables: main (at `sparsity`), sweep, patterns, owl, protection (None: no protection run);
    each says its calibration mode."""
    dense = table["method"] == "dense"
    unstr = table["pattern"] == "unstructured"
    uni = table["allocation"] == "uniform"
    none = table["protected"] == "none"
    at = table["sparsity"].sub(sparsity).abs() < 1e-9
    main = summarize(table[dense | (unstr & uni & none & at)])
    sweep = summarize(table[dense | (unstr & uni & none & table["method"].isin(sweep_methods))])
    nm = summarize(table[dense | ~unstr | (unstr & uni & none & at & table["method"].isin(pattern_methods))])
    owl_at = table["sparsity"].sub(owl_sparsity).abs() < 1e-9
    owl = summarize(table[dense | (unstr & none & owl_at & table["method"].isin(owl_methods))])
    prot = summarize(table[dense | (unstr & uni & at & table["method"].isin(protect_methods))]) if protect_methods is not None else pd.DataFrame()
    return {"main": main, "sweep": sweep, "patterns": nm, "owl": owl, "protection": prot}


def published_ppl(rows: pd.DataFrame, method: str, pattern: str, sparsity: float, seed: int) -> float | None:
    """The PPL of the row a published number is compared with: `method` ("dense" for the dense model) at
    `pattern` and `sparsity`, unprotected, uniform, calibration seed `seed`; None when not run."""
    if method == "dense":
        sel = rows[rows["method"] == "dense"]
    else:
        sel = rows[(rows["method"] == method) & (rows["pattern"] == pattern) & (rows["protected"] == "none")
                   & (rows["allocation"] == "uniform") & (rows["sparsity"].sub(sparsity).abs() < 1e-9)
                   & (rows["calib_seed"] == seed)]
    return float(sel["ppl"].iloc[0]) if len(sel) else None

