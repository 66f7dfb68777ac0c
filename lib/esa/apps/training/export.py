"""Export a fine-tuned model: a sparse delta (indices + values) that re-applies bit-exactly, or merged safetensors.

`SparseDelta`: per parameter, the sorted flat indices that changed, the new values in the weight's dtype
(what `apply` writes, so applying is exact by construction), the fp32 delta new - base (for analysis), and
a SHA-256 of the base values' raw bits at those indices: applying to a model whose base values differ is
refused, so a delta never lands silently on the wrong base. Built from a trained `SparseFT`
(`from_sparse`) or from any two models by raw-bit comparison (`between`, e.g. after full fine-tuning).
Stored as one safetensors file (`<param>.idx`, `<param>.values`, `<param>.delta`; the hashes and any notes
in its metadata), written atomically.

`save_merged(model, folder)`: the plain trained model (LoRA merged by `Method.finish`) as a Hugging Face
folder with safetensors weights, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from esa.apps.pruning.export import without_gguf_state
from esa.apps.training.sparse import SparseFT
from esa.errors import EsaError
from esa.perturb.apply import INT_VIEW, PerturbStats, overwritten
from esa.store import atomic_folder, atomic_path

FORMAT = "esa-sparse-delta/1"


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def _hash(values: torch.Tensor) -> str:
    return hashlib.sha256(_bits(values.cpu()).numpy().tobytes()).hexdigest()


@dataclass
class DeltaEntry:
    idx: torch.Tensor  # (n,) int64, sorted flat indices
    values: torch.Tensor  # (n,) new weights, the parameter's dtype
    delta: torch.Tensor  # (n,) fp32, values - base
    base_hash: str  # SHA-256 of the base values' raw bits at idx


@dataclass
class SparseDelta:
    entries: dict[str, DeltaEntry]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        return int(sum(e.idx.numel() for e in self.entries.values()))

    @classmethod
    def from_sparse(cls, method: SparseFT, model: torch.nn.Module, notes: dict[str, Any] | None = None) -> SparseDelta:
        """The delta a sparse fine-tuning run wrote into `model` (its selection, as trained)."""
        entries = {}
        for name, (idx, base) in method.base_values().items():
            p = model.get_parameter(name)
            new = p.detach().view(-1)[idx.to(p.device)].cpu().clone()
            entries[name] = DeltaEntry(idx, new, new.float() - base.float(), _hash(base))
        return cls(entries, dict(notes or {}))

    @classmethod
    def between(cls, base: torch.nn.Module, tuned: torch.nn.Module, names: list[str] | None = None,
                notes: dict[str, Any] | None = None) -> SparseDelta:
        """Every weight whose raw bits differ between two models of the same architecture."""
        bp, tp = dict(base.named_parameters()), dict(tuned.named_parameters())
        entries = {}
        for name in names or list(tp):
            if name not in bp or name not in tp or bp[name].shape != tp[name].shape:
                raise EsaError(f"models differ in parameter {name!r}; a delta needs the same architecture")
            b, t = bp[name].detach().cpu().reshape(-1), tp[name].detach().cpu().reshape(-1)
            if b.dtype != t.dtype:
                raise EsaError(f"{name} is {b.dtype} in the base and {t.dtype} in the tuned model")
            idx = torch.nonzero(_bits(b) != _bits(t)).flatten()
            if idx.numel():
                entries[name] = DeltaEntry(idx, t[idx].clone(), t[idx].float() - b[idx].float(), _hash(b[idx]))
        return cls(entries, dict(notes or {}))

    def _check_base(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = dict(model.named_parameters())
        for name, e in self.entries.items():
            if name not in params:
                raise EsaError(f"the delta names parameter {name!r}, which is not in the model")
            p = params[name]
            if e.idx.numel() and int(e.idx.max()) >= p.numel():
                raise EsaError(f"the delta's indices for {name} exceed its {p.numel()} weights")
            if e.values.dtype != p.dtype:
                raise EsaError(f"the delta's values for {name} are {e.values.dtype}, the weight {p.dtype}")
            if _hash(p.detach().view(-1)[e.idx.to(p.device)]) != e.base_hash:
                raise EsaError(f"the model's {name} is not the base this delta was made for (base values differ)")
        return params

    def apply(self, model: torch.nn.Module) -> None:
        """Write the delta into `model` in place (after checking it is the right base)."""
        params = self._check_base(model)
        with torch.no_grad():
            for name, e in self.entries.items():
                p = params[name]
                p.view(-1)[e.idx.to(p.device)] = e.values.to(p.device)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[PerturbStats]:
        """The delta applied for the block only; the base is restored bit-exactly afterwards."""
        self._check_base(model)
        with overwritten(model, {n: (e.idx, e.values) for n, e in self.entries.items()}) as stats:
            yield stats

    def save(self, path: str | os.PathLike[str]) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        for name, e in self.entries.items():
            tensors[f"{name}.idx"] = e.idx.contiguous()
            tensors[f"{name}.values"] = e.values.contiguous()
            tensors[f"{name}.delta"] = e.delta.contiguous()
        meta = {"format": FORMAT, "params": json.dumps(list(self.entries)),
                "base_hash": json.dumps({n: e.base_hash for n, e in self.entries.items()}),
                "notes": json.dumps(self.notes, default=str)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SparseDelta:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise EsaError(f"{path} is not a sparse delta ({FORMAT}); format {meta.get('format')!r}")
        tensors = load_file(str(path))
        hashes = json.loads(meta["base_hash"])
        entries = {n: DeltaEntry(tensors[f"{n}.idx"], tensors[f"{n}.values"], tensors[f"{n}.delta"], hashes[n])
                   for n in json.loads(meta["params"])}
        return cls(entries, json.loads(meta.get("notes", "{}")))


def save_merged(model: torch.nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Save a plain trained model as a Hugging Face folder (config + safetensors), atomically."""
    if hasattr(model, "peft_config"):
        raise EsaError("this is a peft model with unmerged adapters; save the model that Method.finish() "
                       "(or the TrainResult) returns")
    folder = Path(folder)
    # a model dequantised from GGUF refuses save_pretrained unless its GGUF state is cleared
    with atomic_folder(folder) as tmp, without_gguf_state(model):
        model.save_pretrained(tmp, safe_serialization=True)
    return folder
