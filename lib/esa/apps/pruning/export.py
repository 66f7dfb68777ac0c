"""Export a pruned model as a Hugging Face folder (safetensors) that transformers and esa.models.load read.

A model that came from a GGUF file (the embedded models) still carries transformers' GGUF quantizer and a
`quantization_config` in its config, and `save_pretrained` refuses it ("The model is quantized with gguf
and is not serializable"). Its weights are plain dense tensors by then, so `without_gguf_state` detaches
both for the save (and puts them back afterwards: the in-memory model is left as it was). The folder gets
the weights with the masks applied, the tokenizer, `pruning.json` (settings, calibration, allocation,
per-matrix sparsity) and a README.md card of the settings; it is written under a temporary name and
renamed into place, so a crash never leaves a half-written export. A 2:4 pruning also gets
`sparse-24-bitmask/`: the same model with its pruned matrices stored as compressed-tensors' 2:4 values +
bitmask (esa.apps.pruning.sparse24).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from esa.apps.pruning import sparse24
from esa.apps.pruning.masks import applied
from esa.apps.pruning.prune import PruneResult
from esa.apps.pruning.sparse24 import write_sparse24
from esa.apps.pruning.sparsity_patterns import parse_pattern
from esa.errors import EsaError
from esa.models.loader import LoadedModel
from esa.store import atomic_folder, write_json

_MISSING = object()


def clear_gguf_state(model: torch.nn.Module) -> tuple[bool, Any, Any]:
    """Detach a GGUF quantizer and its quantization_config (the weights are dense tensors already).

    Returns (was there one, the quantizer, the config entry) so that `without_gguf_state` can put them back."""
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", _MISSING)
    is_gguf = _is_gguf(quantizer, qconfig)
    if is_gguf:
        model.hf_quantizer = None
        if qconfig is not _MISSING:
            delattr(model.config, "quantization_config")
    return is_gguf, quantizer, qconfig


@contextlib.contextmanager
def without_gguf_state(model: torch.nn.Module) -> Iterator[bool]:
    """`clear_gguf_state` for the block, restored afterwards; yields whether there was GGUF state."""
    is_gguf, quantizer, qconfig = clear_gguf_state(model)
    try:
        yield is_gguf
    finally:
        if is_gguf:
            model.hf_quantizer = quantizer
            if qconfig is not _MISSING:
                model.config.quantization_config = qconfig


def _is_gguf(quantizer: Any, qconfig: Any) -> bool:
    def method(obj: Any) -> str:
        if obj is None or obj is _MISSING:
            return ""
        m = obj.get("quant_method") if isinstance(obj, dict) else getattr(obj, "quant_method", "")
        return str(getattr(m, "value", m)).lower()

    q = method(getattr(quantizer, "quantization_config", None)) if quantizer is not None else ""
    return "gguf" in (q, method(qconfig))


def export_pruned(lm: LoadedModel, result: PruneResult | None, folder: str | os.PathLike[str],
                  card: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save `lm` with `result`'s masks applied (None: the dense model) as a safetensors folder + card."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise EsaError(f"export folder {folder} exists; pass overwrite=True or choose another folder")
    with atomic_folder(folder) as tmp:
        masks_cm = applied(lm.model, result.masks) if result is not None else contextlib.nullcontext()
        with masks_cm, without_gguf_state(lm.model) as had_gguf:
            lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        info: dict[str, Any] = {"base_model": lm.info.ref, "cleared_gguf_state": had_gguf, **(card or {})}
        if result is not None:
            info["pruning"] = result.summary()
            info["per_matrix"] = result.masks.per_matrix(lm.inventory).to_dict(orient="records")
        if result is not None and parse_pattern(result.spec.pattern).label == "2:4":
            info["sparse24"] = _sparse24(tmp, result)
        write_json(tmp / "pruning.json", info)
        (tmp / "README.md").write_text(model_card(lm, result, card or {}))
    return folder


def _sparse24(folder: Path, result: PruneResult) -> dict[str, Any]:
    """The 2:4 copy in `folder`/sparse-24-bitmask (esa.apps.pruning.sparse24), or why there is none."""
    try:
        sizes = write_sparse24(folder, result.masks, folder / sparse24.FOLDER)
    except EsaError as e:  # e.g. a protected weight kept a third input of a group
        shutil.rmtree(folder / sparse24.FOLDER, ignore_errors=True)
        return {"written": False, "why": str(e)}
    return {"written": True, "folder": sparse24.FOLDER, "format": sparse24.FORMAT, **sizes}


def model_card(lm: LoadedModel, result: PruneResult | None, extra: dict[str, Any]) -> str:
    """A short README.md: what the model is, how it was pruned, where the full settings are."""
    lines = ["---", "library_name: transformers", "tags: [pruned, critical-weights]", "---", ""]
    if result is None:
        lines += [f"# {lm.info.ref} (dense export)", ""]
    else:
        s, c = result.spec, result.calibration
        lines += [f"# {lm.info.ref}, pruned with {s.method} to {result.achieved_sparsity:.2%} sparsity", "",
                  "| setting | value |", "|---|---|"]
        rows = {
            "method": f"{s.method}: {result.definition}", "target sparsity": f"{s.sparsity:g}",
            "achieved sparsity (pruned matrices)": f"{result.achieved_sparsity:.6f}", "pattern": s.pattern,
            "comparison group": s.group, "allocation": s.allocation + (
                f" (M={s.owl_m:g}, lambda={s.owl_lambda:g})" if s.allocation == "owl" else ""),
            "pruned weights": ", ".join(s.kinds) + " linear weights of the transformer blocks",
            "protected set": f"{result.protected['label'] or 'none'} ({result.protected['n_protected']} weights)",
            "calibration": c["mode"] + (f": {c.get('n_windows')} x {c.get('seqlen')} tokens of {c.get('corpus')}, "
                                        f"seed {s.calib_seed}" if "corpus" in c else ""),
            "mask key": result.key,
        }
        if s.method == "sparsegpt":
            rows["SparseGPT"] = f"blocksize {s.blocksize}, damp {s.damp:g}"
        lines += [f"| {k} | {v} |" for k, v in rows.items()]
        lines.append("")
    if extra:
        lines += ["Additional settings:", "", "```json", json.dumps(extra, indent=2, default=str), "```", ""]
    lines += ["Full settings and per-matrix sparsity: `pruning.json`. Produced by critical-weights "
              "(esa.apps.pruning.export).", ""]
    return "\n".join(lines)
