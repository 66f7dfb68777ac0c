"""Data-free super-weight detector (Yu et al. 2024, "The Super Weight in Large Language Models").

One forward pass on a short prompt; for every MLP down projection the largest |input| activation gives
the column and the largest |output| activation the row of a super-weight candidate. Layers whose
spikes stand far above the others' are flagged. Our own reading of the paper's method; no code copied.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from esa.errors import EsaError
from esa.hooks import Call, hooked
from esa.models.inventory import WeightSpec

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."


@torch.no_grad()
def detect_superweights(
    model: torch.nn.Module,
    tokenizer: Any,
    inventory: list[WeightSpec],
    prompt: str = DEFAULT_PROMPT,
    spike_factor: float = 5.0,
) -> pd.DataFrame:
    """One row per layer's down projection: layer, param, row, col, in_max, out_max, weight, candidate.

    `candidate` = both the input and the output spike are at least `spike_factor` times the median
    spike over layers (the paper reads the spikes off a plot; this makes the reading a rule).
    """
    downs = [s for s in inventory if s.component == "down" and s.kind == "mlp" and not s.n_experts]
    if not downs:
        raise EsaError("super-weight detection needs dense MLP down projections; this model has none")
    device = model.get_input_embeddings().weight.device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> per-channel max |input|, max |output|

    def spikes(call: Call) -> None:
        x = call.input.detach().float().reshape(-1, call.input.shape[-1])  # (T, in)
        y = call.output.detach().float().reshape(-1, call.output.shape[-1])  # (T, out)
        seen[call.name] = (x.abs().amax(0), y.abs().amax(0))  # per channel max over tokens

    with hooked(model, {spec.module: spikes for spec in downs}):
        model(input_ids=ids, use_cache=False)
    rows = []
    for spec in downs:
        in_abs, out_abs = seen[spec.module]
        col, row = int(in_abs.argmax()), int(out_abs.argmax())
        w = model.get_parameter(spec.name)
        rows.append({"layer": spec.layer, "param": spec.name, "row": row, "col": col,
                     "in_max": float(in_abs[col]), "out_max": float(out_abs[row]),
                     "in_median": float(in_abs.median()), "out_median": float(out_abs.median()),
                     "weight": float(w[row, col]), "weight_abs_rank_in_matrix": _abs_rank(w, row, col)})
    df = pd.DataFrame(rows)
    med_in, med_out = df["in_max"].median(), df["out_max"].median()
    df["candidate"] = (df["in_max"] >= spike_factor * med_in) & (df["out_max"] >= spike_factor * med_out)
    df.attrs["prompt"] = prompt
    return df


def _abs_rank(w: torch.Tensor, row: int, col: int) -> int:
    """1 = the largest |w| in its matrix."""
    a = w.detach().float().abs()
    return int((a > a[row, col]).sum()) + 1


def match_selection(sw: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """For each super-weight candidate: is (param, row, col) in a top-k selection, and at which rank?"""
    cands = sw[sw["candidate"]][["layer", "param", "row", "col"]]
    merged = cands.merge(selection[["param", "row", "col", "rank", "metric", "seed"]], on=["param", "row", "col"],
                         how="left")
    merged["found"] = merged["rank"].notna()
    return merged
