"""Pruning masks: compact storage (bit-packed), content-keyed cache entries, in-place reversible application.

A `MaskSet` holds, per pruned matrix, its mask packed 8 weights to a byte (True = pruned; numpy `packbits`
order) and, for a reconstructing method (SparseGPT), the new values of its kept weights in the parameter's
dtype, in flat order. `applied(model, masks)` writes them with `esa.perturb.apply.overwritten` (raw-bit
backup of every written value, restored in `finally`), so no copy of the model is made per condition and
the model is bit-identical afterwards. Memory while applied: the backup of the written values and their
int64 indices (for a mask: the pruned weights; for SparseGPT: the whole matrix).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from esa.apps.pruning.core import Decision
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.perturb.apply import PerturbStats, overwritten
from esa.store import cached, check, read_json, write_json

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # bit 7 first, as numpy.packbits
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 (ceil(n / 8),) on the CPU, 8 weights per byte."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = _SHIFTS.to(flat.device)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8).cpu()  # disjoint bits: the sum is an OR


def unpack_bits(bits: torch.Tensor, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse of `pack_bits`: flat bool (numel,)."""
    b = bits.to(device)
    return ((b.unsqueeze(1) >> _SHIFTS.to(b.device)) & 1).bool().reshape(-1)[:numel]


def updates_for(pruned: torch.Tensor, new: torch.Tensor | None, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, values) that turn `param` into its pruned (and reconstructed) form.

    Only weights whose bit pattern changes are written; values are in the parameter's dtype."""
    p = param.detach().reshape(-1)
    mask = pruned.reshape(-1).to(p.device)
    if new is None:
        idx = mask.nonzero().squeeze(-1)
        return idx, torch.zeros(idx.numel(), dtype=p.dtype, device=p.device)
    target = new.detach().reshape(-1).to(device=p.device, dtype=p.dtype).masked_fill(mask, 0)
    changed = (target.view(_INT[p.dtype]) != p.view(_INT[p.dtype])).nonzero().squeeze(-1)
    return changed, target[changed]


@dataclass
class MaskSet:
    """The outcome of one pruning: which weights are zero, and (SparseGPT) the kept weights' new values."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    bits: dict[str, torch.Tensor] = field(default_factory=dict)  # uint8 packed masks (CPU)
    n_pruned: dict[str, int] = field(default_factory=dict)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # new values of the kept weights (CPU, param dtype)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def add(self, name: str, decision: Decision, param: torch.Tensor) -> None:
        pruned = decision.pruned
        if tuple(pruned.shape) != tuple(param.shape):
            raise EsaError(f"mask of {name} has shape {tuple(pruned.shape)}, the weight {tuple(param.shape)}")
        self.shapes[name] = tuple(param.shape)
        self.bits[name] = pack_bits(pruned)
        self.n_pruned[name] = int(pruned.sum())
        if decision.values is not None:
            flat = decision.values.detach().reshape(-1)
            self.kept[name] = flat[~pruned.reshape(-1).to(flat.device)].to(param.dtype).cpu()

    def mask(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """bool, the weight's shape: True = pruned."""
        shape = self.shapes[name]
        numel = 1
        for s in shape:
            numel *= s
        return unpack_bits(self.bits[name], numel, device).view(shape)

    def pruned_idx(self, name: str) -> torch.Tensor:
        return self.mask(name).reshape(-1).nonzero().squeeze(-1)

    def updates(self, name: str, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(param.shape) != self.shapes[name]:
            raise EsaError(f"mask of {name} is for shape {self.shapes[name]}, the model's weight is {tuple(param.shape)}")
        mask = self.mask(name, param.device)
        new = None
        if name in self.kept:
            new = torch.zeros(mask.numel(), dtype=param.dtype, device=param.device)
            new[~mask.reshape(-1)] = self.kept[name].to(param.device)
        return updates_for(mask, new, param)

    @property
    def n_weights(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the pruned matrices (share of their weights set to zero by the mask)."""
        return sum(self.n_pruned.values()) / max(1, self.n_weights)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.bits.values()) + sum(v.numel() * v.element_size() for v in self.kept.values())

    def per_matrix(self, inventory: list[WeightSpec] | None = None) -> pd.DataFrame:
        specs = {s.name: s for s in inventory or []}
        rows = []
        for name, shape in self.shapes.items():
            n = shape[-2] * shape[-1]
            s = specs.get(name)
            rows.append({"param": name, "layer": s.layer if s else -1, "component": s.component if s else "",
                         "numel": n, "n_pruned": self.n_pruned[name], "sparsity": self.n_pruned[name] / n,
                         "reconstructed": name in self.kept})
        return pd.DataFrame(rows)

    # ------------------------------------------------------------ storage
    def save(self, folder: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
        """Write a sealed cache entry into `folder` (esa.store.cached: built aside, digested, renamed into place)."""
        tensors = {f"bits::{n}": b.contiguous() for n, b in self.bits.items()}
        tensors.update({f"kept::{n}": v.contiguous() for n, v in self.kept.items()})

        def build(tmp: Path) -> None:
            save_file(tensors, str(tmp / "masks.safetensors"))
            write_json(tmp / "meta.json", {"shapes": {n: list(s) for n, s in self.shapes.items()},
                                           "n_pruned": self.n_pruned, "names": self.names, **(meta or {})})
            (tmp / "complete").write_text("masks\n")

        return cached(Path(folder), build, refresh=True)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> tuple[MaskSet, dict[str, Any]]:
        """A saved mask set; CacheCorrupt (esa.store.check) if any byte differs from what was written."""
        folder = Path(folder)
        check(folder)
        meta = read_json(folder / "meta.json")
        tensors = load_file(str(folder / "masks.safetensors"))
        ms = cls()
        for n in meta["names"]:
            ms.shapes[n] = tuple(meta["shapes"][n])
            ms.bits[n] = tensors[f"bits::{n}"]
            ms.n_pruned[n] = int(meta["n_pruned"][n])
            if f"kept::{n}" in tensors:
                ms.kept[n] = tensors[f"kept::{n}"]
        return ms, meta


@contextlib.contextmanager
def applied(model: torch.nn.Module, masks: MaskSet) -> Iterator[PerturbStats]:
    """Apply `masks` to `model` in place for the block; restore every written weight bit-exactly on exit."""
    total = PerturbStats()
    with contextlib.ExitStack() as stack:
        for name in masks.names:
            idx, values = masks.updates(name, model.get_parameter(name))
            st = stack.enter_context(overwritten(model, {name: (idx, values)}))
            del idx, values
            total.n_weights += st.n_weights
            total.n_changed += st.n_changed
            total.n_inf += st.n_inf
            total.n_nan += st.n_nan
        yield total
