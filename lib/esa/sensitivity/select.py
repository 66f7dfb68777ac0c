"""Top-k selection of weights from per-parameter scores, and the control sets of Phase 3.

`select_topk` streams: it works one matrix at a time and, for `global`, merges each matrix's own top-k
candidates (the global top-k is always inside the union of the per-matrix top-k with the same k), so it
never builds a second full-size buffer of the model's scores.

Ties are broken deterministically: equal scores -> lower flat index first (and, across matrices, the
earlier parameter of the inventory first). NaN scores rank last for `largest=True` and first never.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from esa.errors import EsaError, unknown
from esa.models.inventory import WeightSpec

MODES = ("per_layer", "global")
COLUMNS = ["metric", "seed", "param", "layer", "component", "kind", "expert", "row", "col", "score", "rank"]


def _matrices(spec: WeightSpec) -> list[tuple[int, int]]:
    """(expert, flat offset) of each matrix of a parameter: one per expert slice, else one."""
    size = spec.rows * spec.cols
    if spec.n_experts:
        return [(e, e * size) for e in range(spec.n_experts)]
    return [(-1, 0)]


def topk_flat(values: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a 1-D tensor with deterministic ties (lower index first): (scores, indices), best first."""
    v = values.detach().float().reshape(-1)
    key = v if largest else -v
    k = min(k, key.numel())
    if k == 0:
        return v[:0], torch.zeros(0, dtype=torch.long, device=v.device)
    top_vals, idx = torch.topk(key, k, sorted=False)
    thresh = top_vals.min()
    # fast path: no NaN and no tie at the boundary (one comparison pass), else the exact slow path
    if torch.isnan(top_vals).any() or torch.isnan(thresh) or int((key >= thresh).sum()) != k:
        key = torch.nan_to_num(key, nan=-torch.inf)  # NaN never outranks a number
        thresh = torch.topk(key, k, sorted=False).values.min()  # the k-th best key
        above = (key > thresh).nonzero().squeeze(-1)
        ties = (key == thresh).nonzero().squeeze(-1)[: k - above.numel()]  # nonzero() is in index order
        idx = torch.cat([above, ties])
    # order best first; a stable sort over index-ascending input keeps the lower index first among equals
    idx = idx.sort().values
    order = torch.sort(key[idx], descending=True, stable=True).indices
    idx = idx[order]
    return v[idx], idx


def _check(scores: dict[str, torch.Tensor], inventory: list[WeightSpec], k: int, mode: str) -> list[WeightSpec]:
    specs = [s for s in inventory if s.name in scores]
    if not specs:
        raise EsaError("no scored weights: the scores name none of the inventory's parameters")
    for s in specs:
        if tuple(scores[s.name].shape) != tuple(s.shape):
            raise EsaError(f"scores of {s.name} have shape {tuple(scores[s.name].shape)}, the weight {s.shape}")
    return check_k(specs, k, mode)


def check_k(specs: list[WeightSpec], k: int, mode: str) -> list[WeightSpec]:
    """Raise EsaError unless `mode` is known and 1 <= k <= the weights available in that mode."""
    if mode not in MODES:
        raise unknown("mode", mode, MODES)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise EsaError(f"topk must be a positive integer, got {k!r}")
    if not specs:
        raise EsaError("no weights under study")
    if mode == "per_layer":
        smallest = min(specs, key=lambda s: s.rows * s.cols)
        if k > smallest.rows * smallest.cols:
            raise EsaError(
                f"topk {k} is larger than the smallest weight matrix ({smallest.name}: "
                f"{smallest.rows * smallest.cols} weights) in per_layer mode"
            )
    else:
        total = sum(s.numel for s in specs)
        if k > total:
            raise EsaError(f"topk {k} is larger than the {total} weights under study")
    return specs


def matrix_candidates(
    scores: dict[str, torch.Tensor], specs: list[WeightSpec], k: int, largest: bool = True
) -> pd.DataFrame:
    """Each matrix's own top-k (capped at its size), with `order` (inventory position) and `flat` index.

    Any per_layer selection with k' <= k is the rank <= k' prefix of this table, and any global one is
    its merge (`from_candidates`): what the cache stores instead of every score.
    """
    parts: list[dict[str, np.ndarray]] = []
    for order, spec in enumerate(specs):
        flat = scores[spec.name].reshape(-1)
        size = spec.rows * spec.cols
        for expert, offset in _matrices(spec):
            vals, idx = topk_flat(flat[offset : offset + size], k, largest)
            idx = idx.cpu() + offset
            e, r, c = spec.unravel(idx)
            n = len(idx)
            parts.append({
                "order": np.full(n, order), "flat": idx.numpy(),
                "param": np.full(n, spec.name, dtype=object), "layer": np.full(n, spec.layer),
                "component": np.full(n, spec.component, dtype=object), "kind": np.full(n, spec.kind, dtype=object),
                "expert": e.numpy() if expert >= 0 else np.full(n, -1), "row": r.numpy(), "col": c.numpy(),
                "score": vals.cpu().double().numpy(), "rank": np.arange(1, n + 1),
            })
    return pd.DataFrame({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})


def from_candidates(cands: pd.DataFrame, k: int, mode: str = "per_layer", largest: bool = True) -> pd.DataFrame:
    """A top-k selection from `matrix_candidates` output (built with at least k per matrix)."""
    if mode not in MODES:
        raise unknown("mode", mode, MODES)
    if mode == "per_layer":
        df = cands[cands["rank"] <= k]
    else:
        key = cands["score"] if largest else -cands["score"]
        df = cands.assign(_key=key.fillna(-np.inf)).sort_values(
            ["_key", "order", "flat"], ascending=[False, True, True], kind="mergesort").head(k)
        df = df.drop(columns="_key").assign(rank=np.arange(1, min(k, len(df)) + 1))
    df = df.drop(columns=["order", "flat"]).reset_index(drop=True)
    if "metric" not in df:
        df.insert(0, "seed", -1)
        df.insert(0, "metric", "")
    return df[COLUMNS].astype({"layer": int, "expert": int, "row": int, "col": int, "rank": int, "seed": int})


def select_topk(
    scores: dict[str, torch.Tensor],
    inventory: list[WeightSpec],
    k: int,
    mode: str = "per_layer",
    largest: bool = True,
) -> pd.DataFrame:
    """The k highest (or lowest) scoring weights per matrix (`per_layer`) or overall (`global`)."""
    specs = _check(scores, inventory, k, mode)
    return from_candidates(matrix_candidates(scores, specs, k, largest), k, mode, largest)


def bottom_k(scores: dict[str, torch.Tensor], inventory: list[WeightSpec], k: int, mode: str = "per_layer") -> pd.DataFrame:
    """The k lowest-scoring weights (rank 1 = lowest)."""
    return select_topk(scores, inventory, k, mode, largest=False)


def magnitude_scores(model: torch.nn.Module, inventory: list[WeightSpec]) -> dict[str, torch.Tensor]:
    """|w| in fp32: the magnitude control (does sensitivity find anything that size alone does not?)."""
    return {s.name: model.get_parameter(s.name).detach().float().abs() for s in inventory}
