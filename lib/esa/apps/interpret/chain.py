"""Trace one weight's chain through depth on one sentence: super weight -> massive channel -> attention sink.

`trace_chain` runs the sentence three times (baseline, the weight zeroed, one random weight of the same
matrix zeroed as the matched control) and reads, at every decoder block, the residual channel the weight
writes (its max |h| over tokens and where it sits), the attention mass every head puts on the sink
token(s), and the next-token probability mass on stopwords. Yu et al. 2024's chain reads off the table:
the input spike the weight multiplies, the output spike it makes, how far zeroing it shrinks the channel
after its block, how much later blocks rebuild it, and what happens to the sinks and to stopwords.
Zeroing is in place with bit-exact restore (esa.perturb.apply.perturbed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from esa.apps.interpret.anatomy import anatomy, block_of, require, writes_residual
from esa.apps.interpret.passes import Capture, Wants, forward_capture
from esa.apps.interpret.tokens import sink_mask, stopword_ids
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.perturb.apply import perturbed
from esa.perturb.controls import ControlInput, make_control
from esa.perturb.ops import PerturbSpec
from esa.sensitivity.superweights import DEFAULT_PROMPT

CONDITIONS = ("base", "ablated", "control")


@dataclass
class ChainTrace:
    weight: str  # "param[row, col]"
    control: str  # the matched random weight
    text: str
    tokens: list[str]
    channel: int  # residual channel traced
    depth: pd.DataFrame  # one row per block: channel max / argmax token / sink mass, per condition
    heads: pd.DataFrame  # one row per (block, head): sink mass per condition
    summary: dict[str, Any]


def _spec(inventory: list[WeightSpec], param: str) -> WeightSpec:
    for s in inventory:
        if s.name == param:
            return s
    raise EsaError(f"parameter {param!r} is not in the model's weight inventory")


@torch.no_grad()
def trace_chain(model: torch.nn.Module, tokenizer: Any, inventory: list[WeightSpec], param: str, row: int, col: int,
                text: str = DEFAULT_PROMPT, channel: int | None = None, sink: str = "first", seed: int = 0,
                ) -> ChainTrace:
    """Baseline / weight-zeroed / control-zeroed passes over `text`, traced through every block.

    `channel`: the residual channel to follow (default: `row` when the weight writes the residual stream,
    i.e. attention out or MLP down; otherwise the channel with the largest baseline peak after its block)."""
    anat = anatomy(model)
    require(anat, "the chain trace", ("layers", "attention_probs", "lm_head"))
    spec = _spec(inventory, param)
    if spec.n_experts:
        raise EsaError(f"the chain trace takes a 2-D weight; {param} holds {spec.n_experts} experts")
    if not (0 <= row < spec.rows and 0 <= col < spec.cols):
        raise EsaError(f"({row}, {col}) is out of range for {param} with shape {spec.shape}")
    layer = block_of(anat, param)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
    if ids.shape[1] < 2:
        raise EsaError(f"the chain text must have at least 2 tokens, got {ids.shape[1]}: {text!r}")
    flat = row * spec.cols + col
    ctl_flat = int(make_control("random_k", ControlInput(model, inventory, {param: torch.tensor([flat])},
                                                          seed=seed))[param][0])
    mask = sink_mask(ids, tokenizer, sink)
    stop = stopword_ids(tokenizer)
    module = spec.module

    if channel is None:
        if writes_residual(spec):
            channel = row
        else:  # one extra pass to find the block's dominant channel
            channel = int(forward_capture(model, anat, ids, Wants(residual=True), mask).residual[layer, 0].argmax())
    if not 0 <= channel < anat.hidden_size:
        raise EsaError(f"channel {channel} is out of range (hidden size {anat.hidden_size})")
    wants = Wants(residual=True, sinks=True, stopwords=stop, channels=torch.tensor([channel]),
                  inputs={module: torch.tensor([col])}, outputs={module: torch.tensor([row])})
    zero = PerturbSpec("zero")
    caps: dict[str, Capture] = {"base": forward_capture(model, anat, ids, wants, mask)}
    with perturbed(model, {param: torch.tensor([flat])}, zero):
        caps["ablated"] = forward_capture(model, anat, ids, wants, mask)
    with perturbed(model, {param: torch.tensor([ctl_flat])}, zero):
        caps["control"] = forward_capture(model, anat, ids, wants, mask)

    tokens = [tokenizer.decode([int(i)]) for i in ids[0]]
    rows = []
    for b in range(anat.n_layers):
        r: dict[str, Any] = {"block": b}
        for cond, cap in caps.items():
            vals = cap.channels[b, 0, :, 0]  # (T,) signed values of the channel
            pos = int(vals.abs().argmax())
            r[f"max_{cond}"] = float(vals.abs().max())
            r[f"argmax_{cond}"] = pos
            r[f"sink_{cond}"] = float(cap.sinks[b, 0].mean())
        r["factor"] = r["max_base"] / max(r["max_ablated"], 1e-30)
        r["control_factor"] = r["max_base"] / max(r["max_control"], 1e-30)
        r["argmax_token"] = tokens[r["argmax_base"]]
        rows.append(r)
    depth = pd.DataFrame(rows)
    heads = pd.DataFrame([{"block": b, "head": h, **{f"sink_{c}": float(caps[c].sinks[b, 0, h]) for c in caps}}
                          for b in range(anat.n_layers) for h in range(caps["base"].sinks.shape[2])])
    x = caps["base"].inputs[module][0, :, 0]  # (T,) the input column the weight multiplies
    y = caps["base"].outputs[module][0, :, 0]  # (T,) the output row it writes
    stop_mass = {c: float(caps[c].stop_mass[0].mean()) for c in caps}
    later = depth[depth["block"] > layer]
    summary = {
        "weight": f"{param}[{row}, {col}]", "layer": layer, "channel": channel, "weight_value": float(
            model.get_parameter(param).reshape(-1)[flat]),
        "input_spike": float(x.abs().max()), "input_spike_token": tokens[int(x.abs().argmax())],
        "output_spike": float(y.abs().max()), "output_spike_token": tokens[int(y.abs().argmax())],
        "max_after_block_base": float(depth.loc[layer, "max_base"]),
        "max_after_block_ablated": float(depth.loc[layer, "max_ablated"]),
        "max_after_block_control": float(depth.loc[layer, "max_control"]),
        "factor_at_block": float(depth.loc[layer, "factor"]),
        "control_factor_at_block": float(depth.loc[layer, "control_factor"]),
        "sink_mass_later_base": float(later["sink_base"].mean()) if len(later) else float("nan"),
        "sink_mass_later_ablated": float(later["sink_ablated"].mean()) if len(later) else float("nan"),
        "sink_mass_later_control": float(later["sink_control"].mean()) if len(later) else float("nan"),
        "stopword_mass": stop_mass,
        "stopword_ratio": stop_mass["ablated"] / max(stop_mass["base"], 1e-30),
        "stopword_ratio_control": stop_mass["control"] / max(stop_mass["base"], 1e-30),
        "n_tokens": int(ids.shape[1]), "sink": sink,
    }
    e, cr, cc = spec.unravel(torch.tensor([ctl_flat]))
    return ChainTrace(summary["weight"], f"{param}[{int(cr[0])}, {int(cc[0])}]", text, tokens, channel, depth, heads,
                      summary)


def plot_chain(trace: ChainTrace, axes: Any = None) -> Any:
    """Two panels over depth: the channel's max |h| (log scale) and the mean sink mass, per condition."""
    import matplotlib.pyplot as plt  # plotting only: the method package imports without matplotlib

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    d = trace.depth
    styles = {"base": ("k", "-"), "ablated": ("tab:red", "-"), "control": ("tab:blue", "--")}
    for cond, (color, ls) in styles.items():
        axes[0].plot(d["block"], np.maximum(d[f"max_{cond}"], 1e-3), color=color, ls=ls, label=cond)
        axes[1].plot(d["block"], d[f"sink_{cond}"], color=color, ls=ls, label=cond)
    layer = trace.summary["layer"]
    for ax in axes:
        ax.axvline(layer, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("block")
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"max |h| of channel {trace.channel}")
    axes[1].set_ylabel(f"attention mass on sink ({trace.summary['sink']})")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{trace.weight} zeroed vs control", fontsize=9)
    axes[1].set_title(repr(trace.text), fontsize=9)
    return axes
