"""Apply a perturbation in place to selected weights only, and restore them bit-exactly.

A *target set* is `dict[param name -> LongTensor of flat indices into that parameter]` (deduplicated,
sorted). `perturbed(model, targets, spec, seed)` is a context manager: on entry it backs up only the
selected values (as raw integer bit patterns, so NaN payloads and -0.0 survive), writes the perturbed
values, and yields a `PerturbStats` (inf/NaN counts of the written values); on exit it writes the
backup back, whether the block finished or raised. Memory: the backup is the selected values and their
index, or a copy of the matrix when more than about a fifth of it is written (`dense_backup_cheaper`).
"""

from __future__ import annotations

import contextlib
import hashlib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from esa.dispatch import require_resident
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.perturb.ops import BIT_LAYOUTS, PERTURBATIONS, OpContext, PerturbSpec

Targets = dict[str, torch.Tensor]

# integer views of float weights: copies of raw bit patterns restore NaN payloads and -0.0 exactly
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}


@dataclass
class PerturbStats:
    n_weights: int = 0  # weights written (selected)
    n_changed: int = 0  # of those, how many changed bit pattern
    n_inf: int = 0  # written values that are +-inf
    n_nan: int = 0  # written values that are NaN


def targets_from_selection(selection: pd.DataFrame, inventory: list[WeightSpec]) -> Targets:
    """Top-k table rows (param, expert, row, col) -> target set. Unknown params are an error."""
    specs = {s.name: s for s in inventory}
    out: Targets = {}
    if selection.empty:
        return out
    for name, rows in selection.groupby("param", sort=False):
        if name not in specs:
            raise EsaError(f"selection names parameter {name!r}, which is not in the model's weight inventory")
        spec = specs[name]
        expert = torch.as_tensor(np.array(rows["expert"] if "expert" in rows else [-1] * len(rows), dtype=np.int64))
        row = torch.as_tensor(np.array(rows["row"], dtype=np.int64))
        col = torch.as_tensor(np.array(rows["col"], dtype=np.int64))
        flat = spec.ravel(expert, row, col)
        if int(flat.min()) < 0 or int(flat.max()) >= spec.numel:
            raise EsaError(f"selection indices out of range for {name} with shape {spec.shape}")
        out[str(name)] = torch.unique(flat)  # sorted, deduplicated
    return out


def count_targets(targets: Targets) -> int:
    return int(sum(int(v.numel()) for v in targets.values()))


def _matrix_std(p: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Std of the matrix each selected index lives in (expert slices are matrices of their own). (n,)"""
    if p.dim() == 3:
        per_expert = p.detach().float().flatten(1).std(dim=1)  # (E,)
        return per_expert[(flat // (p.shape[1] * p.shape[2])).to(per_expert.device)]  # (n,)
    return p.detach().float().std().expand(flat.numel())


def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per (seed, parameter): the draw for a matrix does not depend on which others are selected.
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def dense_backup_cheaper(n_written: int, numel: int, dtype_bytes: int) -> bool:
    """A copy of the whole matrix (numel x dtype bytes) costs less than the written values with their int64
    index (n x (8 + dtype bytes)): past about 20% of a bf16 matrix, 33% of an fp32 one."""
    return numel * dtype_bytes < n_written * (8 + dtype_bytes)


class _InPlace:
    """Writes into parameters with a raw-bit backup of what it overwrote; `restore` puts it back (in reverse
    order, so overlapping writes unwind correctly; NaN payloads and -0.0 survive). The backup of one write is
    the overwritten values with their index, or a copy of the whole matrix when that is smaller."""

    def __init__(self) -> None:
        # (int view, idx or None for a whole-matrix copy, raw values)
        self.entries: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._stats = PerturbStats()
        # device -> (changed, inf, nan) counts, summed on the weights' devices; `stats` reads them once
        self._counts: dict[torch.device, torch.Tensor] = {}

    def write(self, name: str, p: torch.Tensor, idx_d: torch.Tensor, new: torch.Tensor) -> None:
        """Set `p.view(-1)[idx_d] = new` (same dtype as p), backing up the old bit patterns first."""
        if not p.is_contiguous():
            raise EsaError(f"parameter {name} is not contiguous; cannot change it in place")
        ints = p.view(INT_VIEW[p.dtype]).view(-1)  # raw bit patterns, shares storage with p
        if dense_backup_cheaper(int(idx_d.numel()), ints.numel(), p.element_size()):
            raw = ints.clone()  # the whole matrix: the index need not be kept
            self.entries.append((ints, None, raw))
            old = raw[idx_d]
        else:
            raw = ints[idx_d].clone()  # (n,) the backup: selected values only
            self.entries.append((ints, idx_d, raw))
            old = raw
        p.view(-1)[idx_d] = new
        self._stats.n_weights += int(idx_d.numel())  # a host number: no sync
        counts = torch.stack([(ints[idx_d] != old).sum(), torch.isinf(new).sum(), torch.isnan(new).sum()])
        if p.device in self._counts:
            self._counts[p.device] += counts
        else:
            self._counts[p.device] = counts

    @property
    def stats(self) -> PerturbStats:
        """The stats of every write so far: one host sync per device when read (after the last write)."""
        for counts in self._counts.values():
            changed, inf, nan = (int(c) for c in counts.cpu())
            self._stats.n_changed += changed
            self._stats.n_inf += inf
            self._stats.n_nan += nan
        self._counts.clear()
        return self._stats

    def restore(self) -> None:
        with torch.no_grad():
            for ints, idx_d, raw in reversed(self.entries):
                if idx_d is None:
                    ints.copy_(raw)
                else:
                    ints[idx_d] = raw


def _params_for(model: torch.nn.Module, names: Iterable[str], what: str) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise EsaError(f"target parameters not in the model: {missing[:3]}")
    require_resident(model, names, what)
    return params


@contextlib.contextmanager
def perturbed(model: torch.nn.Module, targets: Targets, spec: PerturbSpec, seed: int = 0) -> Iterator[PerturbStats]:
    """Perturb `targets` of `model` in place for the duration of the block, then restore bit-exactly."""
    pert = PERTURBATIONS[spec.name]
    params = _params_for(model, targets, f"perturbation {spec.name}")
    writes = _InPlace()
    try:
        with torch.no_grad():
            for name, idx in targets.items():
                if idx.numel() == 0:
                    continue
                p = params[name].data
                if pert.float_bits and p.dtype not in BIT_LAYOUTS:
                    raise EsaError(f"{spec.name} needs a bf16/fp16/fp32 parameter; {name} is {p.dtype}")
                idx_d = idx.to(p.device)
                ctx = OpContext(_generator(seed, name))
                if pert.matrix_std:
                    ctx.matrix_std = _matrix_std(p, idx).to(p.device)  # (n,) per selected weight
                writes.write(name, p, idx_d, pert.fn(p.view(-1)[idx_d], spec, ctx))
        yield writes.stats
    finally:
        writes.restore()


@contextlib.contextmanager
def overwritten(model: torch.nn.Module, updates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[PerturbStats]:
    """Write `values` at flat `idx` of each named parameter for the block, then restore bit-exactly.

    `updates`: param name -> (LongTensor idx (n,), values (n,)); values are cast to the parameter's dtype.
    The general form of `perturbed` for callers that compute the new values themselves (pruning masks,
    reconstructed weights, attack flips). Memory: the backup is the written values only."""
    params = _params_for(model, updates, "an in-place update")
    writes = _InPlace()
    try:
        _write_updates(writes, params, updates)
        # this frame lives as long as the block: without the del it would keep every index and value the caller
        # handed over (pruning enters one block per matrix until it ends), not only the backup
        del updates
        yield writes.stats
    finally:
        writes.restore()


@torch.no_grad()
def _write_updates(writes: _InPlace, params: dict[str, torch.nn.Parameter],
                   updates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name, (idx, values) in updates.items():
        if idx.numel() == 0:
            continue
        if values.numel() != idx.numel():
            raise EsaError(f"update of {name}: {idx.numel()} indices but {values.numel()} values")
        p = params[name].data
        writes.write(name, p, idx.to(p.device).long(), values.reshape(-1).to(device=p.device, dtype=p.dtype))


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's raw bytes (bit-exact fingerprint of the model's weights)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        t = p.detach().cpu().contiguous()
        h.update(t.view(INT_VIEW.get(t.dtype, torch.uint8)).numpy().tobytes() if t.dtype in INT_VIEW
                 else t.numpy().tobytes())
    return h.hexdigest()
