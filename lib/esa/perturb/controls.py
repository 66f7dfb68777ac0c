"""Control groups for the top-k set: what a perturbation of *other* weights of the same size does.

Every control is one registered `Control` in `CONTROLS`: a function `fn(inp: ControlInput) -> Targets`, whether
it needs the sensitivity scores, and its one-line definition, which reports print.
"Matrix" means one weight matrix: a 2-D parameter, or one expert slice of a 3-D expert parameter.
- `random_k`: per matrix, as many weights as the top-k has there, drawn uniformly (seeded) from the
  matrix's weights *not* in the top-k (so the control is disjoint from what it controls for).
- `random_global`: the same total count drawn uniformly from all weights under study minus the top-k,
  without matching the per-matrix distribution (the unmatched control).
- `bottom_k`: per matrix, the same count of the lowest-scoring weights (needs the scores). Ties at the
  cut-off are drawn uniformly (seeded), not by position: quantised checkpoints hold exact zeros (SmolLM2's
  GGUF: ~160 per matrix, so ~80% of a per-matrix bottom-100), which all score 0, and taking the lowest
  flat indices would pack the control into a matrix's first rows, a spatial bias of its own.
- `magnitude_k`: per matrix, the same count of the largest |w| (ties -> lower flat index first): shows
  whether sensitivity finds anything that size alone does not. It may overlap the top-k; the sweep
  reports the overlap.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.perturb.apply import Targets
from esa.registry import Registry
from esa.sensitivity.select import BottomSource, topk_flat


@dataclass
class ControlInput:
    model: torch.nn.Module
    inventory: list[WeightSpec]
    top: Targets  # the top-k set the control is matched to
    seed: int = 0
    scores: dict[str, torch.Tensor] | None = None  # param -> fp32 score, same shape (bottom_k only)
    bottom: BottomSource | None = None  # or the cached bottom candidates with complete tie sets (bottom_k only)


ControlFn = Callable[[ControlInput], Targets]


def _matrix_size(spec: WeightSpec) -> int:
    return spec.rows * spec.cols


def per_matrix_counts(top: Targets, inventory: list[WeightSpec]) -> dict[tuple[str, int], int]:
    """(param, expert) -> number of top-k weights in that matrix (expert = -1 for 2-D params)."""
    specs = {s.name: s for s in inventory}
    out: dict[tuple[str, int], int] = {}
    for name, idx in top.items():
        spec = specs[name]
        if spec.n_experts:
            ex = (idx // _matrix_size(spec)).tolist()
            for e, c in zip(*np.unique(ex, return_counts=True), strict=True):
                out[(name, int(e))] = int(c)
        elif idx.numel():
            out[(name, -1)] = int(idx.numel())
    return out


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(zlib.crc32(str(p).encode()) for p in parts)])


def _draw_excluding(rng: np.random.Generator, m: int, n: int, excluded: np.ndarray) -> np.ndarray:
    """n distinct indices uniform over range(m) minus `excluded` (sorted unique). Sorted result."""
    pool = m - len(excluded)
    v = np.sort(rng.choice(pool, size=n, replace=False))
    # The v-th allowed index is v plus the number of excluded indices at or below it; excluded[j] - j is
    # how many allowed indices precede excluded[j].
    adj = excluded - np.arange(len(excluded))
    return v + np.searchsorted(adj, v, side="right")


def _slice(flat_idx: torch.Tensor, spec: WeightSpec, expert: int) -> torch.Tensor:
    """Indices (into the whole param) that lie in matrix `expert`, made local to it."""
    if expert < 0:
        return flat_idx
    m = _matrix_size(spec)
    sel = flat_idx[(flat_idx // m) == expert]
    return sel - expert * m


def _assemble(parts: dict[str, list[torch.Tensor]]) -> Targets:
    return {k: torch.sort(torch.cat(v)).values for k, v in parts.items() if v}


def _random_k(inp: ControlInput) -> Targets:
    specs = {s.name: s for s in inp.inventory}
    parts: dict[str, list[torch.Tensor]] = {}
    for (name, expert), n in per_matrix_counts(inp.top, inp.inventory).items():
        spec = specs[name]
        m = _matrix_size(spec)
        excluded = _slice(inp.top[name], spec, expert).numpy()
        if n > m - len(excluded):
            raise EsaError(
                f"random_k cannot draw {n} weights from {name}{'' if expert < 0 else f' expert {expert}'}: "
                f"only {m - len(excluded)} weights lie outside the top-k; lower top-k"
            )
        local = _draw_excluding(_rng(inp.seed, "random_k", name, expert), m, n, np.sort(excluded))
        base = max(expert, 0) * m
        parts.setdefault(name, []).append(torch.from_numpy(local + base).long())
    return _assemble(parts)


def _random_global(inp: ControlInput) -> Targets:
    sizes = [s.numel for s in inp.inventory]
    offsets = np.concatenate([[0], np.cumsum(sizes)])  # global index = offset[param] + flat
    total = int(offsets[-1])
    k = sum(int(v.numel()) for v in inp.top.values())
    excluded = np.sort(np.concatenate(
        [inp.top[s.name].numpy() + offsets[i] for i, s in enumerate(inp.inventory) if s.name in inp.top] or
        [np.zeros(0, dtype=np.int64)]))
    if k > total - len(excluded):
        raise EsaError(f"random_global cannot draw {k} weights: only {total - len(excluded)} lie outside the top-k")
    g = _draw_excluding(_rng(inp.seed, "random_global"), total, k, excluded)
    which = np.searchsorted(offsets, g, side="right") - 1  # param position of each draw
    out: Targets = {}
    for i in np.unique(which):
        out[inp.inventory[i].name] = torch.from_numpy(g[which == i] - offsets[i]).long()
    return out


def top_n_stable(x: torch.Tensor, n: int, largest: bool = True) -> torch.Tensor:
    """Indices of the n largest (or smallest) values of 1-D `x`, ties -> lower index first; sorted.

    The same tie-breaking as the top-k selection, because it is the same function."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(topk_flat(x, n, largest)[1]).values.cpu()


def lowest_n_random_ties(x: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """Indices of the n smallest values of 1-D `x`, sorted; ties at the n-th value drawn uniformly by `rng`."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    x = x.detach().float().cpu()
    cut = torch.kthvalue(x, n).values
    below = torch.nonzero(x < cut).flatten()
    tied = torch.nonzero(x == cut).flatten().numpy()
    return _draw_ties(below, tied, n, rng)


def _draw_ties(below: torch.Tensor, tied: np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    pick = torch.from_numpy(np.sort(rng.choice(tied, size=n - below.numel(), replace=False))).long()
    return torch.sort(torch.cat([below, pick])).values


def _bottom_from_candidates(inp: ControlInput, source: BottomSource) -> Targets:
    """bottom_k from the cached bottom candidates: the same draw as from the full map, bit for bit."""
    specs = {s.name: s for s in inp.inventory}
    order = dict(zip(source.bottom["param"], source.bottom["order"].astype(int), strict=True))
    parts: dict[str, list[torch.Tensor]] = {}
    for (name, expert), n in per_matrix_counts(inp.top, inp.inventory).items():
        if name not in order:
            raise EsaError(f"bottom_k needs a score for {name}, which is missing")
        spec = specs[name]
        size = _matrix_size(spec)
        base = max(expert, 0) * size
        weight = inp.model.get_parameter(name).detach().reshape(-1)[base : base + size]
        below, tied = source.lowest(spec, order[name], expert, n, weight)
        idx = _draw_ties(torch.from_numpy(below).long(), tied, n, _rng(inp.seed, "bottom_k", name, expert))
        parts.setdefault(name, []).append(idx + base)
    return _assemble(parts)


def _per_matrix_extreme(inp: ControlInput, source: dict[str, torch.Tensor], largest: bool, label: str) -> Targets:
    specs = {s.name: s for s in inp.inventory}
    parts: dict[str, list[torch.Tensor]] = {}
    for (name, expert), n in per_matrix_counts(inp.top, inp.inventory).items():
        spec = specs[name]
        if name not in source:
            raise EsaError(f"{label} needs a score for {name}, which is missing")
        t = source[name].detach().float().reshape(-1)  # (numel,)
        m = _matrix_size(spec)
        base = max(expert, 0) * m
        chunk = t[base : base + m] if expert >= 0 else t
        if n > chunk.numel():
            raise EsaError(f"{label} cannot take {n} weights from a matrix of {chunk.numel()} ({name})")
        if largest:
            idx = top_n_stable(chunk, n, largest=True)
        else:
            idx = lowest_n_random_ties(chunk, n, _rng(inp.seed, label, name, expert))
        parts.setdefault(name, []).append(idx + base)
    return _assemble(parts)


def _bottom_k(inp: ControlInput) -> Targets:
    if inp.scores:
        return _per_matrix_extreme(inp, inp.scores, largest=False, label="bottom_k")
    if inp.bottom is not None:
        return _bottom_from_candidates(inp, inp.bottom)
    raise EsaError("bottom_k needs the sensitivity scores or their bottom candidates (the k lowest-scoring "
                   "weights); none were given")


def _magnitude_k(inp: ControlInput) -> Targets:
    params = dict(inp.model.named_parameters())
    mags = {name: params[name].detach().abs() for name in inp.top}
    return _per_matrix_extreme(inp, mags, largest=True, label="magnitude_k")


@dataclass(frozen=True)
class Control:
    """One control group: how it is drawn, what it needs, and its definition."""

    name: str
    definition: str
    fn: ControlFn
    needs_scores: bool = False  # drawn from the sensitivity scores (ControlInput.scores)

    def __call__(self, inp: ControlInput) -> Targets:
        return self.fn(inp)


CONTROLS: Registry[Control] = Registry("control", (
    Control("random_k", "per matrix, the top-k's count drawn uniformly (seeded) outside the top-k", _random_k),
    Control("random_global", "the top-k's total count drawn uniformly over all studied weights outside it",
            _random_global),
    Control("bottom_k", "per matrix, the top-k's count of lowest scores (ties drawn uniformly, seeded)", _bottom_k,
            needs_scores=True),
    Control("magnitude_k", "per matrix, the top-k's count of largest |w|", _magnitude_k),
), base=Control)


def parse_controls(names: str | list[str] | None) -> list[str]:
    if names is None:
        return []
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    items = [n for n in items if n and n.lower() != "none"]
    for n in items:
        CONTROLS.lookup(n)
    return items


def make_control(name: str, inp: ControlInput) -> Targets:
    return CONTROLS.lookup(name)(inp)


def overlap(a: Targets, b: Targets) -> int:
    """Number of weights two target sets share."""
    n = 0
    for name, idx in a.items():
        if name in b:
            n += int(np.intersect1d(idx.numpy(), b[name].numpy(), assume_unique=True).size)
    return n
