"""One forward pass that keeps only what the interpretability tests read.

`forward_capture(model, anat, ids, wants)` runs the model once over `ids` (n, T) with hooks (esa.hooks)
that reduce each tensor the moment it is produced, so a pass over a 30-layer model keeps a few kB per
input instead of every activation:
- `residual`: per decoder block, the per-channel max |h| over tokens of the residual stream after it,
  (L, n, H);
- `sinks`: per attention module, the attention mass each head puts on the sink keys, averaged over query
  positions t >= 1 (position 0 can attend only to itself), (L, n, heads);
- `stopwords`: the probability mass the next-token distribution puts on the given token ids, (n, T);
- `channels`: per decoder block, the signed values of chosen residual channels at every token, (L, n, T, k);
- `outputs`: for named modules, chosen output rows y[..., rows], (n, T, nrows);
- `inputs`: for named linear modules, the chosen input columns x[..., cols], (n, T, ncols), and the
  median over all input channels of max_t |x|, (n,), the reference level of "massive".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from esa import memory
from esa.apps.interpret.anatomy import Anatomy
from esa.dispatch import input_device
from esa.errors import EsaError
from esa.hooks import Call, hooked


@dataclass
class Wants:
    """What one pass should keep (everything off by default)."""

    residual: bool = False
    sinks: bool = False
    stopwords: torch.Tensor | None = None  # LongTensor of token ids
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # linear module name -> LongTensor of columns
    channels: torch.Tensor | None = None  # LongTensor of residual channels kept per token
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> LongTensor of output rows

    def empty(self) -> bool:
        return not (self.residual or self.sinks or self.stopwords is not None or self.inputs
                    or self.channels is not None or self.outputs)


@dataclass
class Capture:
    residual: torch.Tensor | None = None  # (L, n, H) max |h| over tokens, fp32
    sinks: torch.Tensor | None = None  # (L, n, heads) mean attention mass on the sink keys
    stop_mass: torch.Tensor | None = None  # (n, T) next-token probability mass on the stopword ids
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (n, T, ncols) fp32
    input_median_peak: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (n,)
    channels: torch.Tensor | None = None  # (L, n, T, k) signed residual values of the chosen channels
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (n, T, nrows) fp32


def _tensor(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index,return-value]


@torch.no_grad()
def forward_capture(model: torch.nn.Module, anat: Anatomy, ids: torch.Tensor, wants: Wants,
                    sink_mask: torch.Tensor | None = None, batch_size: int | None = None) -> Capture:
    """Run `model` over `ids` (n, T) in batches and return the reduced captures `wants` asks for.

    `sink_mask` (n, T) bool marks the sink keys of each input (default: position 0 only)."""
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise EsaError(f"inputs must be a (n, T >= 2) tensor of token ids, got shape {tuple(ids.shape)}")
    n, t_len = ids.shape
    if sink_mask is None:
        sink_mask = torch.zeros(n, t_len, dtype=torch.bool)
        sink_mask[:, 0] = True
    bs = batch_size or n
    memory.check(model, "capture", min(bs, n), t_len)
    dev = input_device(model)
    parts: dict[str, list[torch.Tensor]] = {}
    layer_pos = {name: i for i, name in enumerate(anat.layers)}
    attn_pos = {name: i for i, name in enumerate(anat.attention) if name}
    state: dict[str, torch.Tensor] = {}

    def keep(key: str, value: torch.Tensor) -> None:
        parts.setdefault(key, []).append(value.detach().float().cpu())

    def on_block(call: Call) -> None:
        h = _tensor(call.output)  # (B, T, H)
        if wants.residual:
            keep(f"res{layer_pos[call.name]}", h.detach().float().abs().amax(dim=1))  # (B, H)
        if wants.channels is not None:
            keep(f"ch{layer_pos[call.name]}", h[..., wants.channels.to(h.device)])  # (B, T, k)

    def on_output(call: Call) -> None:
        y = _tensor(call.output)  # (B, T, out)
        keep(f"out:{call.name}", y[..., wants.outputs[call.name].to(y.device)])  # (B, T, nrows)

    def on_attention(call: Call) -> None:
        out = call.output
        probs = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if probs is None:
            raise EsaError(f"{call.name} returned no attention probabilities; load the model with "
                           "attn_implementation='eager'")
        mask = state["sink_mask"].to(probs.device, probs.dtype)  # (B, T_k)
        mass = (probs[:, :, 1:, :].float() * mask[:, None, None, :]).sum(-1)  # (B, heads, T_q - 1)
        keep(f"sink{attn_pos[call.name]}", mass.mean(-1))  # (B, heads)

    def on_head(call: Call) -> None:
        logits = _tensor(call.output).float()  # (B, T, V)
        probs = torch.softmax(logits, dim=-1)
        keep("stop", probs[..., state["stop_ids"].to(probs.device)].sum(-1))  # (B, T)

    def on_input(call: Call) -> None:
        x = call.input  # (B, T, in)
        cols = wants.inputs[call.name]
        if x.shape[-1] <= int(cols.max()):
            raise EsaError(f"{call.name}: input has {x.shape[-1]} features, fewer than column {int(cols.max())}")
        keep(f"in:{call.name}", x[..., cols.to(x.device)])  # (B, T, ncols)
        keep(f"med:{call.name}", x.detach().float().abs().amax(dim=1).median(dim=-1).values)  # (B,)

    callbacks = {}
    if wants.residual or wants.channels is not None:
        callbacks.update({name: on_block for name in anat.layers})
    if wants.sinks:
        callbacks.update({name: on_attention for name in attn_pos})
    if wants.stopwords is not None:
        if anat.lm_head is None:
            raise EsaError("stopword mass needs the LM head; this model has none")
        state["stop_ids"] = wants.stopwords.long()
        callbacks[anat.lm_head] = on_head
    # a module may be asked for its input and its output: one hooked() block per kind, so one dict never
    # needs two callbacks under the same name
    with hooked(model, callbacks), hooked(model, {name: on_input for name in wants.inputs}), \
            hooked(model, {name: on_output for name in wants.outputs}):
        for start in range(0, n, bs):
            batch = ids[start : start + bs]
            state["sink_mask"] = sink_mask[start : start + bs]
            model(input_ids=batch.to(dev), use_cache=False)
    cap = Capture()
    if wants.residual:
        cap.residual = torch.stack([torch.cat(parts[f"res{i}"]) for i in range(anat.n_layers)])
    if wants.channels is not None:
        cap.channels = torch.stack([torch.cat(parts[f"ch{i}"]) for i in range(anat.n_layers)])
    if wants.sinks:
        cap.sinks = torch.stack([torch.cat(parts[f"sink{i}"]) for i in sorted(attn_pos.values())])
    if wants.stopwords is not None:
        cap.stop_mass = torch.cat(parts["stop"])
    for name in wants.inputs:
        cap.inputs[name] = torch.cat(parts[f"in:{name}"])
        cap.input_median_peak[name] = torch.cat(parts[f"med:{name}"])
    for name in wants.outputs:
        cap.outputs[name] = torch.cat(parts[f"out:{name}"])
    return cap
