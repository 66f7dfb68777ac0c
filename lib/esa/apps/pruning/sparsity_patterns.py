"""Which weights a pruning removes, given scores: sparsity patterns and comparison groups.

Convention: lower score = pruned first. Every selection is exact and deterministic: a group prunes exactly
`n_pruned(sparsity, size)` weights (floor of sparsity x size), ties go to the lower flat index (and, for
`global`, to the earlier matrix of the inventory), and protected weights are never chosen.

- `unstructured` with a comparison group:
  - `row`: each output row prunes its own share (Wanda's comparison group);
  - `matrix`: each weight matrix prunes its share (the magnitude baseline of the Wanda code);
  - `global`: one ranking over every pruned matrix together.
- `N:M`: in every run of M consecutive weights along a row's input dimension, exactly N are pruned (the
  convention of the Wanda and SparseGPT code: 2:4 and 4:8 are 50%). Each run is its own group.

(Sparsity patterns of a pruning; the patterns found across architectures are `esa.analysis.patterns`.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from esa.errors import EsaError, unknown
from esa.models.inventory import WeightSpec

GROUPS = ("row", "matrix", "global")
PATTERNS = ("unstructured", "N:M (e.g. 2:4, 4:8)")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "nm"
    n: int = 0  # N:M: pruned weights per run
    m: int = 0  # N:M: run length along the input dimension

    @property
    def label(self) -> str:
        return "unstructured" if self.kind == "unstructured" else f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float | None:
        """The sparsity the pattern fixes (N:M), or None (unstructured: the caller chooses)."""
        return self.n / self.m if self.kind == "nm" else None


def parse_pattern(text: str) -> Pattern:
    """'unstructured' or 'N:M' with 0 < N < M. Raises EsaError naming the bad value."""
    if not isinstance(text, str):
        raise unknown("pattern", text, PATTERNS)
    if text.strip().lower() == "unstructured":
        return Pattern("unstructured")
    m = _NM.match(text)
    if not m:
        raise unknown("pattern", text, PATTERNS)
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise EsaError(f"pattern {text!r}: N:M needs 0 < N < M (N weights pruned in every M), got N={n}, M={mm}")
    return Pattern("nm", n, mm)


def n_pruned(sparsity: float, size: int) -> int:
    """How many of `size` weights a group prunes: floor(sparsity * size), robust to float round-off
    (0.29 * 100 is 28.999999999999996 in floating point and must give 29)."""
    return int(math.floor(round(sparsity * size, 6)))


# ---------------------------------------------------------------- checks before any work
def check_divides(pattern: Pattern, specs: list[WeightSpec]) -> None:
    """N:M needs M to divide every pruned row."""
    if pattern.kind != "nm":
        return
    bad = [s for s in specs if s.cols % pattern.m]
    if bad:
        s = bad[0]
        raise EsaError(
            f"pattern {pattern.label}: M={pattern.m} does not divide the rows of {s.name} ({s.cols} inputs)"
            f"{f' and {len(bad) - 1} more matrices' if len(bad) > 1 else ''}; choose an M that divides every row"
        )


def check_protected(spec: WeightSpec, idx: torch.Tensor, pattern: Pattern, group: str, sparsity: float,
                    blocksize: int | None = None) -> None:
    """Refuse a protected set that leaves some group fewer prunable weights than the sparsity removes.

    `blocksize`: SparseGPT's `matrix` rule compares weights within column blocks; each block must keep room.
    `global` is checked by `check_protected_global` (it needs every matrix)."""
    if idx.numel() == 0 or group == "global":
        return
    rows, cols = spec.rows, spec.cols
    r, c = idx // cols, idx % cols
    if pattern.kind == "nm":
        runs = torch.bincount(r * (cols // pattern.m) + c // pattern.m, minlength=rows * cols // pattern.m)
        worst = int(runs.max())
        if worst > pattern.m - pattern.n:
            run = int(runs.argmax())
            raise EsaError(
                f"protected set too large for {pattern.label}: {spec.name} row {run // (cols // pattern.m)} has "
                f"{worst} protected weights in one run of {pattern.m}, but {pattern.label} keeps only "
                f"{pattern.m - pattern.n}; protect fewer weights"
            )
        return
    if group == "row" and blocksize:  # SparseGPT: each row's quota is spread over its column blocks
        n_blocks = math.ceil(cols / blocksize)
        counts = torch.bincount(r * n_blocks + c // blocksize, minlength=rows * n_blocks)
        worst_at = int(counts.argmax())
        b = worst_at % n_blocks
        start, stop = b * blocksize, min(cols, (b + 1) * blocksize)
        keep = stop - start - row_quota(sparsity, cols, start, stop)
        where = f"row {worst_at // n_blocks} of {spec.name} in column block {b}"
    elif group == "row":
        counts = torch.bincount(r, minlength=rows)
        keep = cols - n_pruned(sparsity, cols)
        where = f"row {int(counts.argmax())} of {spec.name}"
    elif blocksize:  # SparseGPT: per column block, over all rows
        counts = torch.bincount(c // blocksize, minlength=math.ceil(cols / blocksize))
        b = int(counts.argmax())
        width = min(blocksize, cols - b * blocksize)
        keep = rows * width - block_quota(sparsity, rows, cols, blocksize)[b]
        where = f"column block {b} ({width} columns) of {spec.name}"
    else:
        counts = torch.as_tensor([idx.numel()])
        keep = rows * cols - n_pruned(sparsity, rows * cols)
        where = spec.name
    worst = int(counts.max())
    if worst > keep:
        raise EsaError(
            f"protected set too large: {where} has {worst} protected weights but sparsity {sparsity:g} keeps "
            f"only {keep}; protect fewer weights or lower the sparsity"
        )


def check_protected_global(specs: list[WeightSpec], protected: dict[str, torch.Tensor], sparsity: float) -> None:
    total = sum(s.numel for s in specs)
    keep = total - n_pruned(sparsity, total)
    n_prot = sum(int(protected[s.name].numel()) for s in specs if s.name in protected)
    if n_prot > keep:
        raise EsaError(f"protected set too large: {n_prot} protected weights but sparsity {sparsity:g} keeps only "
                       f"{keep} of the {total} pruned weights; protect fewer weights or lower the sparsity")


def block_quota(sparsity: float, rows: int, cols: int, blocksize: int) -> list[int]:
    """Pruned weights per column block so that the blocks add up to exactly n_pruned(sparsity, rows*cols)."""
    edges = list(range(0, cols, blocksize)) + [cols]
    cum = [n_pruned(sparsity, rows * e) for e in edges]
    return [cum[i + 1] - cum[i] for i in range(len(edges) - 1)]


def row_quota(sparsity: float, cols: int, start: int, stop: int) -> int:
    """Pruned weights per row in columns [start, stop) so that a row's blocks add up to n_pruned(sparsity, cols)."""
    return n_pruned(sparsity, stop) - n_pruned(sparsity, start)



# ---------------------------------------------------------------- selection
def lowest_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, cols) bool, True at the k lowest of each row (ties: lower column first). O(n): no sort."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values  # (rows, 1) the k-th smallest of each row
    mask = scores < kth
    ties = scores == kth
    need = k - mask.sum(1, keepdim=True)  # how many of the tied values each row still prunes
    if torch.equal(ties.sum(1, keepdim=True), need):  # the usual case: no tie beyond the k-th value
        return mask | ties
    return mask | (ties & (ties.cumsum(1) <= need))


def lowest_flat(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of `scores`' shape, True at its k lowest entries (ties: lower flat index first)."""
    return lowest_rows(scores.reshape(1, -1), k).view(scores.shape)


def select(scores: torch.Tensor, pattern: Pattern, group: str, sparsity: float,
           protected: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """Pruning mask (True = pruned) of one matrix from its scores (rows, cols), lower score pruned first.

    `protected`: flat indices that are never pruned (checked beforehand by `check_protected`). `inplace`: the
    scores are the caller's to spend (protected entries are overwritten with +inf; no copy is made)."""
    s = scores.detach().float()  # a new tensor unless the scores are fp32 already
    if not inplace and s.data_ptr() == scores.data_ptr():
        s = s.clone()  # the caller's scores stay as they were
    _finite(s)
    if protected is not None and protected.numel():
        s.view(-1)[protected.to(s.device)] = math.inf
    rows, cols = s.shape
    if pattern.kind == "nm":
        runs = s.view(rows, cols // pattern.m, pattern.m)
        order = torch.sort(runs, dim=2, stable=True).indices[..., : pattern.n]
        mask = torch.zeros_like(runs, dtype=torch.bool).scatter_(2, order, True)
        return mask.view(rows, cols)
    if group == "row":
        return lowest_rows(s, n_pruned(sparsity, cols))
    if group == "matrix":
        return lowest_flat(s, n_pruned(sparsity, rows * cols))
    raise unknown("comparison group", group, ("row", "matrix"), hint="'global' is chosen by select_global")


def _finite(s: torch.Tensor) -> None:
    bad = int(torch.isnan(s).sum())
    if bad:
        raise EsaError(f"scores contain {bad} NaN values; the scorer failed on this model (no mask is chosen from NaN)")


def _sortable(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int32 keys with the same order (negative floats: flip the magnitude bits)."""
    bits = x.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def select_global(scores: dict[str, torch.Tensor], order: list[str], sparsity: float,
                  protected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One ranking over every matrix: exactly n_pruned(sparsity, total) lowest scores are pruned.

    The k-th smallest score is found from order-preserving integer keys by a two-level radix count (the high
    16 bits, then the low 16 bits inside the one high bucket that holds it), so no concatenated copy of
    all scores is built; ties at the threshold go to the earlier matrix of
    `order`, then to the lower flat index."""
    keys: dict[str, torch.Tensor] = {}
    for name in order:
        s = scores[name].detach().float()
        _finite(s)
        key = _sortable(s)  # a new int32 tensor: the scores are never modified
        if protected and name in protected and protected[name].numel():
            key.view(-1)[protected[name].to(key.device)] = 2**31 - 1  # +inf and above: never pruned first
        keys[name] = key
    total = sum(k.numel() for k in keys.values())
    k = n_pruned(sparsity, total)
    if k == 0:
        return {n: torch.zeros_like(v, dtype=torch.bool) for n, v in keys.items()}
    lo = _kth_key(list(keys.values()), k)
    need = k - sum(int((v < lo).sum()) for v in keys.values())
    out: dict[str, torch.Tensor] = {}
    for name in order:
        mask = keys[name] < lo
        if need > 0:
            ties = (keys[name].view(-1) == lo).nonzero().squeeze(-1)[:need]  # nonzero() is in index order
            mask.view(-1)[ties] = True
            need -= int(ties.numel())
        out[name] = mask
    return out


def _kth_key(keys: list[torch.Tensor], k: int) -> int:
    """The k-th smallest (1-based) of int32 keys spread over several tensors: two bincount passes."""
    dev = keys[0].device
    hi = torch.zeros(1 << 16, dtype=torch.long, device=dev)
    for v in keys:
        hi += torch.bincount((v.reshape(-1) >> 16).long() + (1 << 15), minlength=1 << 16)
    cum = hi.cumsum(0)
    bucket = int(torch.searchsorted(cum, torch.tensor([k], device=dev)).item())  # first bucket with cum >= k
    below = int(cum[bucket - 1]) if bucket else 0
    lo = torch.zeros(1 << 16, dtype=torch.long, device=dev)
    for v in keys:
        flat = v.reshape(-1)
        inside = flat[(flat >> 16).long() + (1 << 15) == bucket]
        lo += torch.bincount((inside & 0xFFFF).long(), minlength=1 << 16)
    low = int(torch.searchsorted(lo.cumsum(0), torch.tensor([k - below], device=dev)).item())
    return ((bucket - (1 << 15)) << 16) | low
