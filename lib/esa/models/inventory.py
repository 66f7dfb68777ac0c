"""Which weight matrices are under study, and what each one is.

Definition (README, "Methods"): by default every 2-D weight of the transformer blocks' linear layers (attention q/k/v/o or
fused qkv, MLP gate/up/down or fused gate_up, MoE experts and routers); embeddings and the LM head are
opt-in, norms and biases never. transformers >= 5 stores a MoE layer's experts as one 3-D parameter
(n_experts, out, in); each expert slice is one matrix, addressed by (param, expert, row, col).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from esa.errors import EsaError

# last name segment(s) -> (component, kind). Order matters: the first match wins.
_RULES: list[tuple[str, str, str]] = [
    (r"experts\.gate_up_proj$", "gate_up", "expert"),
    (r"experts\.down_proj$", "down", "expert"),
    (r"experts\.up_proj$", "up", "expert"),
    (r"experts\.gate_proj$", "gate", "expert"),
    (r"experts\.\d+\.(w1|gate_proj)\.weight$", "gate", "expert"),
    (r"experts\.\d+\.(w3|up_proj)\.weight$", "up", "expert"),
    (r"experts\.\d+\.(w2|down_proj)\.weight$", "down", "expert"),
    (r"(mlp|block_sparse_moe)\.(gate|router)\.weight$", "router", "router"),
    (r"router(\.classifier|\.layer)?\.weight$", "router", "router"),
    (r"(?:^|\.)q_proj\.weight$", "q", "attention"),
    (r"(?:^|\.)k_proj\.weight$", "k", "attention"),
    (r"(?:^|\.)v_proj\.weight$", "v", "attention"),
    (r"(?:^|\.)(o_proj|out_proj)\.weight$", "o", "attention"),
    (r"(?:^|\.)(qkv_proj|query_key_value|c_attn|Wqkv)\.weight$", "qkv", "attention"),
    (r"attention\.dense\.weight$", "o", "attention"),
    (r"(?:^|\.)gate_up_proj\.weight$", "gate_up", "mlp"),
    (r"(?:^|\.)gate_proj\.weight$", "gate", "mlp"),
    (r"(?:^|\.)up_proj\.weight$", "up", "mlp"),
    (r"(?:^|\.)down_proj\.weight$", "down", "mlp"),
    (r"(?:^|\.)(dense_h_to_4h|fc1|c_fc)\.weight$", "up", "mlp"),
    (r"(?:^|\.)(dense_4h_to_h|fc2|c_proj)\.weight$", "down", "mlp"),
]
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")

KINDS = ("attention", "mlp", "expert", "router", "embedding", "lm_head")


@dataclass(frozen=True)
class WeightSpec:
    """One parameter under study. `n_experts` > 0 means a 3-D (expert, out, in) tensor."""

    name: str  # parameter name, e.g. "model.layers.3.mlp.down_proj.weight"
    layer: int  # block index; -1 for embeddings / LM head
    component: str  # q k v o qkv gate up down gate_up router embed lm_head
    kind: str  # one of KINDS
    shape: tuple[int, ...]
    n_experts: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def module(self) -> str:
        """The owning module's name (parameter name without the trailing '.weight')."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    def unravel(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat indices into the parameter -> (expert, row, col); expert is -1 for plain matrices."""
        flat = flat.long()
        cols, rows = self.cols, self.rows
        col = flat % cols
        row = (flat // cols) % rows
        expert = flat // (rows * cols) if self.n_experts else torch.full_like(flat, -1)
        return expert, row, col

    def ravel(self, expert: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """(expert, row, col) -> flat index into the parameter (inverse of `unravel`)."""
        base = row.long() * self.cols + col.long()
        if self.n_experts:
            base = base + expert.long() * (self.rows * self.cols)
        return base


def classify(name: str) -> tuple[str, str] | None:
    """(component, kind) of a parameter name, or None if it is not a block linear weight."""
    for pattern, component, kind in _RULES:
        if re.search(pattern, name):
            return component, kind
    return None


def layer_index(name: str) -> int:
    m = _LAYER.search("." + name)
    return int(m.group(1)) if m else -1


def weight_inventory(
    model: torch.nn.Module, include_embeddings: bool = False, include_lm_head: bool = False
) -> list[WeightSpec]:
    """Every weight under study, in parameter order. Tied parameters are listed once."""
    specs: list[WeightSpec] = []
    seen: set[int] = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        kind_comp: tuple[str, str] | None
        if in_emb is not None and p is getattr(in_emb, "weight", None):
            kind_comp = ("embed", "embedding") if include_embeddings else None
        elif out_emb is not None and p is getattr(out_emb, "weight", None):
            kind_comp = ("lm_head", "lm_head") if include_lm_head else None
        elif p.dim() in (2, 3):
            kind_comp = classify(name)
        else:
            kind_comp = None
        if kind_comp is None:
            continue
        seen.add(id(p))
        component, kind = kind_comp
        n_experts = p.shape[0] if p.dim() == 3 else 0
        specs.append(WeightSpec(name, layer_index(name), component, kind, tuple(p.shape), n_experts))
    return specs


def get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    return model.get_parameter(name)


def inventory_without_weights(ref: str) -> list[WeightSpec] | None:
    """The studied weights' shapes without reading any weight: a meta-device model built from the config of
    a tiny model (esa.models.tiny), of a local folder, or of an embedded GGUF model whose dequantised folder
    is already in the cache (esa.models.embedded; not for the chunked ones, whose GGUF this would join).
    None when no config is at hand without loading (a GGUF not yet dequantised, a hub id, an unreadable
    config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from esa.models import embedded, tiny
    from esa.store import cache_dir

    try:
        if ref in tiny.TINY_CONFIGS:
            config = tiny.TINY_CONFIGS[ref]()
        else:
            folder = Path(ref) if Path(ref).is_dir() else None
            if folder is None and ref in embedded.EMBEDDED and embedded.EMBEDDED[ref].chunks is None:
                stem = embedded.gguf_path(ref).stem  # the loader dequantises into models/<stem>-<key>/
                found = sorted(cache_dir("models").glob(f"{stem}-*/config.json"))
                folder = found[0].parent if found else None
            if folder is None or not (folder / "config.json").is_file():
                return None
            config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return weight_inventory(model)
    except (OSError, ValueError, KeyError, EsaError):
        return None
