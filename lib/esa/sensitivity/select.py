"""Top-k selection of weights from per-parameter scores, and the control sets of Phase 3.

`select_topk` streams: it works one matrix at a time and, for `global`, merges each matrix's own top-k
candidates (the global top-k is always inside the union of the per-matrix top-k with the same k), so it
never builds a second full-size buffer of the model's scores.

Ties are broken deterministically: equal scores -> lower flat index first (and, across matrices, the
earlier parameter of the inventory first). NaN scores rank last for `largest=True` and first never.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ---------------------------------------------------------------- compact storage of candidates
COMPACT = ["order", "expert", "flat", "score"]  # what a cache entry stores; the rest follows from the inventory


def compact_candidates(cands: pd.DataFrame) -> pd.DataFrame:
    """The stored form of `matrix_candidates` output: inventory position, expert, flat index and the fp32 score.

    The scores come from fp32 tensors, so float32 holds them exactly; parameter names, layers, rows, columns
    and ranks are rebuilt from the inventory by `expand_candidates` (about 10 bytes a candidate on disk
    instead of about 40).
    """
    flat = cands["flat"].to_numpy()
    wide = len(flat) and int(flat.max()) >= np.iinfo(np.int32).max
    return pd.DataFrame({
        "order": cands["order"].to_numpy().astype(np.int32), "expert": cands["expert"].to_numpy().astype(np.int16),
        "flat": flat.astype(np.int64 if wide else np.int32), "score": cands["score"].to_numpy().astype(np.float32),
    })


def expand_candidates(stored: pd.DataFrame, specs: list[WeightSpec]) -> pd.DataFrame:
    """`matrix_candidates` output again from `compact_candidates` output and the same `specs`, exactly."""
    order = stored["order"].to_numpy().astype(np.int64)
    if len(order) and int(order.max()) >= len(specs):
        raise EsaError(f"stored candidates name weight #{int(order.max())}, the inventory has {len(specs)}")
    flat = stored["flat"].to_numpy().astype(np.int64)
    expert = stored["expert"].to_numpy().astype(np.int64)
    rows = np.array([s.rows for s in specs], dtype=np.int64)[order]
    cols = np.array([s.cols for s in specs], dtype=np.int64)[order]
    group = order * 65536 + expert + 1  # one matrix = one contiguous run of rows, best first
    start = np.r_[True, group[1:] != group[:-1]] if len(group) else np.zeros(0, dtype=bool)
    first = np.maximum.accumulate(np.where(start, np.arange(len(group)), 0)) if len(group) else group
    obj = lambda attr: np.array([getattr(s, attr) for s in specs], dtype=object)[order]  # noqa: E731
    return pd.DataFrame({
        "order": order, "flat": flat, "param": obj("name"),
        "layer": np.array([s.layer for s in specs], dtype=np.int64)[order],
        "component": obj("component"), "kind": obj("kind"), "expert": expert,
        "row": (flat // cols) % rows, "col": flat % cols,
        "score": stored["score"].to_numpy().astype(np.float64), "rank": np.arange(len(order)) - first + 1,
    })


# ---------------------------------------------------------------- bottom ties past the stored depth
@dataclass
class BottomTies:
    """Matrices whose lowest score at the stored depth is tied past it (quantised checkpoints: tens of
    thousands of exact zeros in a matrix, all scoring 0), recorded at scoring time so that bottom_k can still
    draw its ties uniformly from the complete tie set.

    `groups`: order, expert, value (the tied score), n_tied (the whole matrix's count), base ("weight_zero": the
    tie set is the matrix's zero weights, symmetric difference `diff` applied; "none": it is `diff`).
    `diff`: order, expert, flat."""

    groups: pd.DataFrame
    diff: pd.DataFrame

    @classmethod
    def empty(cls) -> BottomTies:
        return cls(pd.DataFrame({"order": np.zeros(0, np.int32), "expert": np.zeros(0, np.int16),
                                 "value": np.zeros(0, np.float32), "n_tied": np.zeros(0, np.int64),
                                 "base": np.zeros(0, dtype=object)}),
                   pd.DataFrame({"order": np.zeros(0, np.int32), "expert": np.zeros(0, np.int16),
                                 "flat": np.zeros(0, np.int64)}))


def bottom_ties(scores: dict[str, torch.Tensor], specs: list[WeightSpec], bottom: pd.DataFrame,
                model: torch.nn.Module) -> BottomTies:
    """The `BottomTies` of `bottom` (matrix_candidates, smallest first) against the full `scores`."""
    groups, diffs = [], []
    for (order, expert), c in bottom.groupby(["order", "expert"], sort=False):
        spec = specs[int(order)]
        size = spec.rows * spec.cols
        value = float(c["score"].iloc[-1])
        if len(c) >= size:
            continue  # the whole matrix is stored
        base = max(int(expert), 0) * size
        chunk = scores[spec.name].reshape(-1)[base : base + size]
        tied = chunk == value
        n_tied = int(tied.sum())
        if n_tied == int((c["score"] == value).sum()):
            continue  # the tie group ends inside the stored depth
        use_zero = value == 0.0  # quantised zeros: store only where the tie set differs from the zero weights
        if use_zero:
            zero = model.get_parameter(spec.name).detach().reshape(-1)[base : base + size] == 0
            tied = tied ^ zero.to(tied.device)
        extra = torch.nonzero(tied).flatten().cpu().numpy() + base
        groups.append({"order": int(order), "expert": int(expert), "value": value, "n_tied": n_tied,
                       "base": "weight_zero" if use_zero else "none"})
        diffs.append(pd.DataFrame({"order": np.full(len(extra), int(order), np.int32),
                                   "expert": np.full(len(extra), int(expert), np.int16),
                                   "flat": extra.astype(np.int64)}))
    out = BottomTies.empty()
    if groups:
        g = pd.DataFrame(groups)
        out.groups = g.astype({"order": np.int32, "expert": np.int16, "value": np.float32, "n_tied": np.int64})
        out.diff = pd.concat([out.diff, *diffs], ignore_index=True).astype(out.diff.dtypes.to_dict())
    return out


@dataclass
class BottomSource:
    """Bottom candidates + complete tie sets: the n lowest of a matrix, ties drawn by the caller, without the map."""

    bottom: pd.DataFrame  # matrix_candidates, smallest first
    ties: BottomTies
    depth: int

    def lowest(self, spec: WeightSpec, order: int, expert: int, n: int,
               weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(local indices strictly below the n-th lowest score, local indices of every weight tied with it),
        both ascending; `weight`: the matrix's weights (flat), for a tie set based on its zeros."""
        size = spec.rows * spec.cols
        base = max(expert, 0) * size
        b = self.bottom
        c = b[(b["param"] == spec.name) & (b["expert"] == expert)]
        if n > len(c):
            raise EsaError(f"bottom_k needs the {n} lowest scores of {spec.name}, the cache stores {len(c)} "
                           "(candidate_depth): raise candidate_depth or keep full maps (keep_scores)")
        scores = c["score"].to_numpy()
        flats = c["flat"].to_numpy().astype(np.int64) - base
        cut = scores[n - 1]
        below = np.sort(flats[scores < cut])
        g = self.ties.groups
        rec = g[(g["order"] == order) & (g["expert"] == expert)]
        if len(rec) and float(rec["value"].iloc[0]) == float(cut):
            d = self.ties.diff
            extra = d[(d["order"] == order) & (d["expert"] == expert)]["flat"].to_numpy().astype(np.int64) - base
            mask = np.zeros(size, dtype=bool)
            if rec["base"].iloc[0] == "weight_zero":
                mask = (weight.detach().reshape(-1) == 0).cpu().numpy()
            mask[extra] ^= True
            tied = np.nonzero(mask)[0]
            if len(tied) != int(rec["n_tied"].iloc[0]):
                raise EsaError(f"bottom_k: {spec.name} has {len(tied)} weights tied at its cut-off, {int(rec['n_tied'].iloc[0])} "
                               "when it was scored: its weights changed since (draw the controls before perturbing)")
        else:
            tied = np.sort(flats[scores == cut])
        return below, tied
