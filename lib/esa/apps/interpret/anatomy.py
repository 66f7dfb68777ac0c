"""Where things live in a decoder-only model: its layers, their attention modules, the LM head, head geometry.

The role tests, the chain trace and the sink analysis read the residual stream after each decoder layer,
the attention probabilities of each attention module and the logits. `anatomy(model)` finds those modules
once, by structure (the `ModuleList` of decoder blocks, each block's attention child), so Llama, Mistral,
Phi-3, Mixtral, Qwen2, Gemma-3 and GPT-NeoX all work; a model without them gets one clear EsaError from
`require(...)`, before any forward pass. `Eager(model)` switches a model to eager attention for a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esa.errors import EsaError
from esa.models.inventory import WeightSpec, layer_index

ATTENTION_CHILDREN = ("self_attn", "attention", "attn")  # Llama-style, GPT-NeoX, GPT-2-style
RESIDUAL_WRITERS = ("o", "down")  # components whose output rows are residual-stream channels
BEFORE_ATTENTION = ("q", "k", "v", "qkv")  # components that change their own layer's attention pattern


@dataclass(frozen=True)
class Anatomy:
    """Module names of one model (`None` where the model has no such module)."""

    layers: tuple[str, ...]  # decoder blocks in depth order, e.g. "model.layers.3"
    attention: tuple[str | None, ...]  # each block's attention module
    lm_head: str | None
    attn_implementation: str | None  # config._attn_implementation ("eager" returns probabilities)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def _config_int(config: object, *names: str, default: int = 0) -> int:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def anatomy(model: torch.nn.Module) -> Anatomy:
    """Find the decoder blocks, their attention modules and the LM head of `model`."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config  # multimodal wrappers keep the LM's config inside
    n_layers = _config_int(text, "num_hidden_layers", "n_layer", "num_layers")
    blocks: tuple[str, ...] = ()
    for name, module in model.named_modules():
        named_like = name.rsplit(".", 1)[-1] in ("layers", "h", "blocks", "layer")
        if isinstance(module, torch.nn.ModuleList) and named_like and len(module) > 0 and (
                not n_layers or len(module) == n_layers):
            blocks = tuple(f"{name}.{i}" for i in range(len(module)))
            break
    attention: list[str | None] = []
    for b in blocks:
        block = model.get_submodule(b)
        child = next((c for c in ATTENTION_CHILDREN if isinstance(getattr(block, c, None), torch.nn.Module)), None)
        attention.append(f"{b}.{child}" if child else None)
    lm_head = None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        lm_head = next((n for n, m in model.named_modules() if m is out), None)
    n_heads = _config_int(text, "num_attention_heads", "n_head")
    n_kv = _config_int(text, "num_key_value_heads", default=n_heads)
    hidden = _config_int(text, "hidden_size", "n_embd")
    head_dim = _config_int(text, "head_dim", default=hidden // n_heads if n_heads else 0)
    return Anatomy(blocks, tuple(attention), lm_head, getattr(text, "_attn_implementation", None), n_heads, n_kv,
                   head_dim, hidden)


class Eager:
    """Eager attention for the duration of a `with` block (the sink role, the chain and the sink analysis read
    attention probabilities), then the model's own implementation again."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.before = model, anatomy(model).attn_implementation

    def __enter__(self) -> None:
        if self.before != "eager":
            self.model.set_attn_implementation("eager")

    def __exit__(self, *exc: object) -> None:
        if self.before != "eager" and self.before is not None:
            self.model.set_attn_implementation(self.before)


def require(anat: Anatomy, what: str, needs: tuple[str, ...]) -> None:
    """Raise one EsaError unless the model has every structure in `needs` ("layers", "attention",
    "attention_probs", "lm_head") that `what` (a role or analysis name) reads."""
    if "layers" in needs and not anat.layers:
        raise EsaError(f"{what} needs the decoder blocks (a ModuleList named layers/h/blocks); this model exposes none")
    if "attention" in needs or "attention_probs" in needs:
        missing = [b for b, a in zip(anat.layers, anat.attention, strict=True) if a is None]
        if not anat.layers or missing:
            raise EsaError(
                f"{what} needs each decoder block's attention module (a child named {'/'.join(ATTENTION_CHILDREN)}); "
                f"{'no blocks found' if not anat.layers else f'missing in {missing[:3]}'}"
            )
        if not anat.n_heads:
            raise EsaError(f"{what} needs the number of attention heads (config.num_attention_heads); it is not set")
    if "attention_probs" in needs and anat.attn_implementation != "eager":
        raise EsaError(
            f"{what} needs attention probabilities, which only eager attention returns; this model uses "
            f"{anat.attn_implementation!r}. Load it with esa.models.load(..., attn_implementation='eager')"
        )
    if "lm_head" in needs and anat.lm_head is None:
        raise EsaError(f"{what} needs the LM head (output embeddings); this model has none")


def block_of(anat: Anatomy, param: str) -> int:
    """Index of the decoder block that owns `param` (its layer number), checked against the anatomy."""
    layer = layer_index(param)
    if layer < 0 or layer >= anat.n_layers or not param.startswith(anat.layers[layer] + "."):
        raise EsaError(f"parameter {param!r} is not inside one of the model's decoder blocks")
    return layer


def writes_residual(spec: WeightSpec) -> bool:
    """True when the weight's output row is a residual-stream channel (attention out, MLP down)."""
    return spec.component in RESIDUAL_WRITERS


def head_slices(anat: Anatomy, spec: WeightSpec) -> list[tuple[slice, slice]]:
    """(rows, cols) of `spec` that belong to each attention head h = 0..n_heads-1.

    q: rows of head h; k/v: rows of h's key-value group (grouped-query attention shares them, so every
    head of a group gets the group's slice); o: columns of head h; fused qkv: Phi-3's [q | k | v] row
    blocks, or GPT-NeoX's per-head [q, k, v] interleave (query_key_value)."""
    h_n, kv_n, d = anat.n_heads, anat.n_kv_heads, anat.head_dim
    if not (h_n and kv_n and d):
        raise EsaError("head slicing needs num_attention_heads, num_key_value_heads and head_dim in the config")
    group = max(1, h_n // kv_n)
    allc = slice(None)
    comp = spec.component
    if comp == "q":
        return [(slice(h * d, (h + 1) * d), allc) for h in range(h_n)]
    if comp in ("k", "v"):
        return [(slice((h // group) * d, (h // group + 1) * d), allc) for h in range(h_n)]
    if comp == "o":
        return [(allc, slice(h * d, (h + 1) * d)) for h in range(h_n)]
    raise EsaError(f"head slicing of {spec.name} ({comp}) is not defined; use head_slices_fused for fused qkv")


def head_slices_fused(anat: Anatomy, spec: WeightSpec) -> dict[str, list[tuple[slice, slice]]]:
    """{q, k, v: per-head (rows, cols)} of a fused qkv weight (Phi-3 blocks or GPT-NeoX interleave)."""
    h_n, kv_n, d = anat.n_heads, anat.n_kv_heads, anat.head_dim
    group = max(1, h_n // kv_n)
    allc = slice(None)
    if spec.rows == 3 * h_n * d and spec.name.endswith("query_key_value.weight"):  # GPT-NeoX: per head q, k, v
        return {c: [(slice(h * 3 * d + i * d, h * 3 * d + (i + 1) * d), allc) for h in range(h_n)]
                for i, c in enumerate("qkv")}
    if spec.rows == (h_n + 2 * kv_n) * d:  # Phi-3 style: [q (H*d) | k (KV*d) | v (KV*d)]
        q0, k0, v0 = 0, h_n * d, h_n * d + kv_n * d
        return {"q": [(slice(q0 + h * d, q0 + (h + 1) * d), allc) for h in range(h_n)],
                "k": [(slice(k0 + (h // group) * d, k0 + (h // group + 1) * d), allc) for h in range(h_n)],
                "v": [(slice(v0 + (h // group) * d, v0 + (h // group + 1) * d), allc) for h in range(h_n)]}
    raise EsaError(f"cannot split the fused weight {spec.name} of shape {spec.shape} into heads "
                   f"({h_n} heads, {kv_n} key-value heads, head_dim {d})")
