"""Stability of top-k sets across seeds (calibration samples) and agreement between metrics.

A weight is identified by (param, expert, row, col). Stability = mean pairwise Jaccard of the seeds'
top-k sets (with spread) plus Spearman rank correlation of the scores on the union of the sets;
agreement = overlap of two metrics' top-k sets (README, "Methods").
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from esa.errors import EsaError
from esa.models.inventory import WeightSpec

KEY = ["param", "expert", "row", "col"]


def weight_set(selection: pd.DataFrame) -> set[tuple[str, int, int, int]]:
    return set(selection[KEY].itertuples(index=False, name=None))


def jaccard(a: set | pd.DataFrame, b: set | pd.DataFrame) -> float:
    a = weight_set(a) if isinstance(a, pd.DataFrame) else a
    b = weight_set(b) if isinstance(b, pd.DataFrame) else b
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def overlap(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """|A & B| / |A|: the share of A's weights that B also selects (the guide's 'overlap')."""
    sa, sb = weight_set(a), weight_set(b)
    return len(sa & sb) / len(sa) if sa else float("nan")


def _spread(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n_pairs": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "n_pairs": int(arr.size)}


def pairwise_jaccard(selections: Mapping[int, pd.DataFrame]) -> dict[str, Any]:
    """Mean pairwise Jaccard of the seeds' sets, with std/min/max and every pair."""
    if len(selections) < 2:
        raise EsaError("stability needs at least two seeds")
    sets = {s: weight_set(df) for s, df in selections.items()}
    pairs = {f"{a}-{b}": jaccard(sets[a], sets[b]) for a, b in itertools.combinations(sorted(sets), 2)}
    return {**_spread(list(pairs.values())), "pairs": pairs}


def _lookup(scores: Mapping[str, torch.Tensor], spec: WeightSpec, keys: pd.DataFrame) -> np.ndarray:
    flat = spec.ravel(torch.tensor(keys["expert"].to_numpy()), torch.tensor(keys["row"].to_numpy()),
                      torch.tensor(keys["col"].to_numpy()))
    t = scores[spec.name]
    return t.reshape(-1)[flat.to(t.device)].double().cpu().numpy()


def union_scores(
    selections: Mapping[int, pd.DataFrame], scores_by_seed: Mapping[int, Mapping[str, torch.Tensor]],
    inventory: list[WeightSpec],
) -> pd.DataFrame:
    """Scores of every seed on the union of the seeds' top-k sets: one row per weight, one column per seed.

    `scores_by_seed[seed]` may be lazy (e.g. reading one tensor at a time from a safetensors file).
    """
    union = pd.concat([df[KEY] for df in selections.values()]).drop_duplicates().reset_index(drop=True)
    specs = {s.name: s for s in inventory}
    cols: dict[int, np.ndarray] = {seed: np.empty(len(union)) for seed in scores_by_seed}
    for param, grp in union.groupby("param", sort=False):
        for seed, scores in scores_by_seed.items():
            cols[seed][grp.index.to_numpy()] = _lookup(scores, specs[param], grp)
    return union.assign(**{f"seed_{s}": v for s, v in cols.items()})


def rank_correlation(table: pd.DataFrame) -> dict[str, Any]:
    """Mean pairwise Spearman correlation of the seed columns of `union_scores`."""
    seed_cols = [c for c in table.columns if c.startswith("seed_")]
    if len(seed_cols) < 2:
        raise EsaError("rank correlation needs at least two seeds")
    pairs = {}
    for a, b in itertools.combinations(seed_cols, 2):
        rho = stats.spearmanr(table[a], table[b]).statistic
        pairs[f"{a[5:]}-{b[5:]}"] = float(rho)
    return {**_spread(list(pairs.values())), "pairs": pairs, "n_union": len(table)}


def metric_agreement(selections: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Overlap and Jaccard between every pair of metrics' top-k sets (same seed, k and mode)."""
    rows = []
    for a, b in itertools.combinations(sorted(selections), 2):
        rows.append({"metric_a": a, "metric_b": b, "overlap": overlap(selections[a], selections[b]),
                     "jaccard": jaccard(selections[a], selections[b]), "k": len(selections[a])})
    return pd.DataFrame(rows, columns=["metric_a", "metric_b", "overlap", "jaccard", "k"])
