"""A 2:4-pruned model in compressed-tensors' `sparse-24-bitmask` layout, written beside the dense export.

Why this layout: PyTorch's own semi-structured layout (`torch.sparse.to_sparse_semi_structured`) is built only
on CUDA, so a CPU machine cannot write or test it. compressed-tensors (the safetensors extension of
llm-compressor; vLLM's `CompressedTensors24` scheme read it, vllm-project/vllm#12097) stores each 2:4 weight
W (rows x cols) as three tensors:
- `<module>.compressed`: the 2 kept values of every 4 inputs, row-major, (rows, cols / 2), W's dtype;
- `<module>.bitmask`: which inputs are kept, one bit per weight packed little-endian along the row,
  uint8 (rows, ceil(cols / 8));
- `<module>.shape`: (rows, cols) as an int64 (2, 1) tensor;
and names the format in config.json's `quantization_config.sparsity_config` (format `sparse-24-bitmask`,
structure `2:4`, the compressed modules as `targets`). Every other tensor is stored as in the dense export.
Readers today: `load_state` below, and compressed-tensors' `Sparse24BitMaskTensor` (versions up to 0.14;
0.17 on keep only the config class). vLLM removed Sparse24 inference in v0.19.1 (vllm-project/vllm#36799),
so the file halves the weights on disk (measured in the README) but no current engine runs it sparse.

`write_sparse24(dense_folder, masks, out)` converts an export; `load_state(folder)` returns the dense state
dict the compressed file stands for, bit-identical to the dense export's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from esa.apps.pruning.masks import MaskSet
from esa.errors import EsaError

FORMAT = "sparse-24-bitmask"
FOLDER = "sparse-24-bitmask"  # the subfolder of a 2:4 export
_SUFFIXES = ("compressed", "bitmask", "shape")


def compress(weight: torch.Tensor, pruned: torch.Tensor, name: str = "weight") -> dict[str, torch.Tensor]:
    """W's 2:4 triplet (module docstring); `pruned` (True = zero) must keep exactly 2 of every 4 inputs."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise EsaError(f"{name}: 2:4 compression needs a matrix with a multiple of 4 inputs, got {tuple(weight.shape)}")
    keep = ~pruned.to(torch.bool).cpu()
    if not bool((keep.view(weight.shape[0], -1, 4).sum(-1) == 2).all()):
        raise EsaError(f"{name}: the mask does not keep exactly 2 of every 4 inputs; only a 2:4 pattern compresses")
    w = weight.detach().cpu()
    rows, cols = w.shape
    bits = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    return {"compressed": w[keep].reshape(rows, cols // 2).contiguous(), "bitmask": bits,
            "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1)}


def decompress(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    rows, cols = (int(x) for x in shape.flatten())
    keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little").astype(bool))
    out = torch.zeros(rows, cols, dtype=compressed.dtype)
    out[keep] = compressed.flatten()
    return out


def write_sparse24(dense: Path, masks: MaskSet, out: Path) -> dict[str, int]:
    """The dense export in `dense` (safetensors + config + tokenizer) rewritten into `out` with every masked
    weight compressed; returns the bytes of the dense and of the compressed tensor files."""
    names = set(masks.names)
    out.mkdir(parents=True)
    files = sorted(dense.glob("*.safetensors"))
    if not files:
        raise EsaError(f"no safetensors files in {dense}")
    renamed: dict[str, str] = {}
    for f in files:
        tensors, packed = load_file(f), {}
        for key, t in tensors.items():
            if key in names:
                prefix = key.removesuffix(".weight")
                for suffix, v in compress(t, masks.mask(key), key).items():
                    packed[f"{prefix}.{suffix}"] = v
                    renamed[f"{prefix}.{suffix}"] = f.name
            else:
                packed[key] = t
                renamed[key] = f.name
        save_file(packed, out / f.name, metadata={"format": "pt"})
    if missing := names - {k.removesuffix(".compressed") + ".weight" for k in renamed if k.endswith(".compressed")}:
        raise EsaError(f"masked weights not found in the dense export: {sorted(missing)[:3]}")
    index = dense / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        idx["weight_map"] = renamed
        (out / index.name).write_text(json.dumps(idx, indent=2))
    config = json.loads((dense / "config.json").read_text())
    n_total = sum(int(np.prod(masks.shapes[n])) for n in names)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": FORMAT,
        "sparsity_config": {"format": FORMAT, "sparsity_structure": "2:4", "targets": sorted(k.removesuffix(".weight") for k in names),
                            "ignore": [], "global_sparsity": sum(masks.n_pruned.values()) / max(1, n_total)}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in dense.iterdir():  # tokenizer, generation config, card: as the dense export has them
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", index.name):
            shutil.copy2(f, out / f.name)
    return {"dense_bytes": sum(f.stat().st_size for f in files),
            "sparse24_bytes": sum((out / f.name).stat().st_size for f in files)}


def load_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict a `sparse-24-bitmask` folder stands for (compressed weights decompressed)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    if cfg.get("sparsity_config", {}).get("format") != FORMAT:
        raise EsaError(f"{folder} is not a {FORMAT} export (config.json's quantization_config.sparsity_config)")
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    for key in [k for k in state if k.endswith(".compressed")]:
        prefix = key.removesuffix(".compressed")
        parts = {s: state.pop(f"{prefix}.{s}") for s in _SUFFIXES}
        state[f"{prefix}.weight"] = decompress(parts["compressed"], parts["bitmask"], parts["shape"])
    return state
