"""Architecture-specific patterns of critical weights (Phase 4 week 12) and the family-difference criterion.

Inputs are the project-wide top-k tables (see `esa.analysis.architecture.TOPK_COLUMNS`) with a `model`
column, plus loaded models where a measurement needs a forward pass (routing load, super weights).

- `top_weights`: each model's single highest-scoring weight per seed, where it sits, how far it stands
  above the rest of the top-k, and whether every seed finds the same one.
- `component_shares`: share of a model's top-k score mass per component (q/k/v/o, gate/up/down,
  expert gate_up/down, router), averaged over seeds.
- `concentration`: how much of the top-k score mass its top 1% (and its single top weight) hold.
- `routing_load`: tokens the router sends to each expert on the calibration windows (MoE only); the
  architecture analyzer correlates it with per-expert sensitivity.
- `superweight_presence`: the data-free super-weight detector (Yu et al. 2024) summarised per model.
- `family_criteria`: the guide's "quantified family differences" as a scorecard row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from esa.dispatch import input_device
from esa.errors import EsaError
from esa.hooks import Call, hooked
from esa.sensitivity.metrics import expert_routing_inputs
from esa.sensitivity.superweights import detect_superweights
from esa.stats.verdicts import Criterion

ALPHA = 0.05  # family comparisons: Holm-adjusted significance level of the scorecard row


def _need(topk: pd.DataFrame, cols: tuple[str, ...]) -> None:
    missing = [c for c in cols if c not in topk.columns]
    if missing:
        raise EsaError(f"top-k table lacks column(s) {missing}; combine per-model tables with "
                       "esa.analysis.architecture.combine_topk first")


def top_weights(topk: pd.DataFrame, n_layers: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Per model and seed: the highest-scoring weight and its score over the median top-k score.

    `same_across_seeds` is True when every seed of the model picks the same (param, expert, row, col).
    """
    _need(topk, ("model", "seed", "param", "layer", "component", "kind", "expert", "row", "col", "score"))
    idx = topk.groupby(["model", "seed"])["score"].idxmax()
    top = topk.loc[idx, ["model", "seed", "param", "layer", "component", "kind", "expert", "row", "col", "score"]]
    med = topk.groupby(["model", "seed"])["score"].median().rename("topk_median")
    top = top.merge(med.reset_index(), on=["model", "seed"])
    top["score_over_topk_median"] = top["score"] / top["topk_median"].where(top["topk_median"] > 0)
    depth = {m: (n_layers or {}).get(m, int(sub["layer"].max()) + 1) for m, sub in topk.groupby("model")}
    top["rel_depth"] = [lay / max(1, depth[m] - 1) if lay >= 0 else np.nan
                        for m, lay in zip(top["model"], top["layer"], strict=True)]
    key = top[["param", "expert", "row", "col"]].astype(str).agg(":".join, axis=1)
    top["same_across_seeds"] = key.groupby(top["model"]).transform("nunique") == 1
    return top.reset_index(drop=True)


def component_shares(topk: pd.DataFrame) -> pd.DataFrame:
    """Per model and component (with its kind): share of the model's top-k score mass, mean over seeds."""
    _need(topk, ("model", "seed", "component", "kind", "score"))
    g = topk.assign(score=topk["score"].abs()).groupby(["model", "seed", "kind", "component"])["score"].sum()
    share = (g / g.groupby(["model", "seed"]).transform("sum")).rename("score_share").reset_index()
    out = share.groupby(["model", "kind", "component"], as_index=False)["score_share"].mean()
    return out.sort_values(["model", "score_share"], ascending=[True, False]).reset_index(drop=True)


def concentration(topk: pd.DataFrame, top_frac: float = 0.01) -> pd.DataFrame:
    """Per model and seed: share of top-k score mass in its top `top_frac` rows and in its top row; Gini."""
    if not 0 < top_frac < 1:
        raise EsaError(f"top_frac must be in (0, 1), got {top_frac}")
    _need(topk, ("model", "seed", "score"))
    rows = []
    for (m, seed), sub in topk.groupby(["model", "seed"]):
        s = np.sort(sub["score"].abs().to_numpy(float))[::-1]
        total = s.sum()
        n_top = max(1, int(round(top_frac * len(s))))
        asc = s[::-1]
        # Gini of the score mass over selected weights: 0 = all equal, -> 1 = one weight holds everything
        gini = (float((2 * np.arange(1, len(s) + 1) - len(s) - 1) @ asc / (len(s) * total))
                if total > 0 else np.nan)
        rows.append(dict(model=m, seed=seed, n_selected=len(s), top_frac=top_frac,
                         share_top_frac=float(s[:n_top].sum() / total) if total > 0 else np.nan,
                         share_top1=float(s[0] / total) if total > 0 else np.nan, gini=gini))
    return pd.DataFrame(rows)


@torch.no_grad()
def routing_load(model: torch.nn.Module, inventory: list[Any], ids: torch.Tensor, model_name: str,
                 batch_size: int = 4) -> pd.DataFrame:
    """Tokens routed to each expert of each MoE layer over `ids` (model, layer, expert, tokens, share).

    Read from the experts module's routing inputs (transformers-5 fused experts), so it is the routing the
    model actually used, including its top-k choice.
    """
    experts = {}
    for s in inventory:
        if s.n_experts:  # fused 3-D expert weights: the owner of the parameter is the experts module
            experts[s.name.rpartition(".")[0]] = (s.layer, s.n_experts)
    if not experts:
        raise EsaError(f"{model_name}: no MoE experts in the inventory; routing load exists only for MoE models")
    counts = {mod: torch.zeros(n, dtype=torch.long) for mod, (_, n) in experts.items()}

    def routed(call: Call) -> None:
        n = experts[call.name][1]
        _, top_k_index = expert_routing_inputs(call.module, call.args, call.kwargs)
        idx = top_k_index.reshape(-1).long().cpu()
        counts[call.name] += torch.bincount(idx[idx < n], minlength=n)

    with hooked(model, {name: routed for name in experts}, pre=True):
        dev = input_device(model)
        for start in range(0, ids.shape[0], max(1, batch_size)):
            model(input_ids=ids[start : start + batch_size].to(dev), use_cache=False)
    rows = [dict(model=model_name, layer=experts[mod][0], expert=e, tokens=int(c))
            for mod, cnt in counts.items() for e, c in enumerate(cnt.tolist())]
    df = pd.DataFrame(rows)
    df["share"] = df["tokens"] / df.groupby("layer")["tokens"].transform("sum")
    return df


def superweight_presence(model: torch.nn.Module, tokenizer: Any, inventory: list[Any], model_name: str,
                         spike_factor: float = 5.0) -> dict[str, Any]:
    """One row: does the model show super-weight candidates (input and output spikes of mlp.down_proj)?

    Models without dense down projections (MoE experts) get `applicable=False` and the reason.
    """
    try:
        sw = detect_superweights(model, tokenizer, inventory, spike_factor=spike_factor)
    except EsaError as e:
        return dict(model=model_name, applicable=False, n_candidates=0, note=str(e))
    best = sw.loc[sw["out_max"].idxmax()]
    return dict(model=model_name, applicable=True, n_candidates=int(sw["candidate"].sum()),
                n_layers_checked=len(sw), layer=int(best["layer"]), row=int(best["row"]), col=int(best["col"]),
                out_spike=float(best["out_max"]),
                out_spike_over_layer_median=float(best["out_max"] / max(sw["out_max"].median(), 1e-30)),
                in_spike_over_layer_median=float(best["in_max"] / max(sw["in_max"].median(), 1e-30)),
                weight_abs_rank_in_matrix=int(best["weight_abs_rank_in_matrix"]), note="")


def match_top_to_superweights(top: pd.DataFrame, presence: pd.DataFrame) -> pd.DataFrame:
    """Per model: does the top-ranked weight (any seed) coincide with the detector's strongest candidate?"""
    if presence.empty:
        return pd.DataFrame(columns=["model", "superweight_is_top1"])
    rows = []
    for p in presence.itertuples():
        sub = top[top["model"] == p.model]
        if not p.applicable or sub.empty:
            rows.append(dict(model=p.model, superweight_is_top1=None, seeds_agreeing=0, seeds=len(sub)))
            continue
        hit = (sub["layer"] == p.layer) & (sub["component"] == "down") & (sub["row"] == p.row) & (sub["col"] == p.col)
        rows.append(dict(model=p.model, superweight_is_top1=bool(hit.any()), seeds_agreeing=int(hit.sum()),
                         seeds=len(sub)))
    return pd.DataFrame(rows)


def family_criteria(tests: pd.DataFrame, evidence: str, alpha: float = ALPHA) -> list[Criterion]:
    """The guide's "family differences quantified" row, judged from `compare_architectures`' tests.

    Passes when at least one family comparison is significant after Holm correction; the measured value
    is that comparison's difference of mean per-layer log(attention/FFN) score ratio (with its
    rank-biserial effect size and confounds in the note). Layers are not independent replicates, which the
    note says: a pass quantifies a difference between these models, not between architectures at large.
    """
    text = "Architecture families differ quantifiably in where critical weights sit (attention vs FFN)"
    if tests is None or tests.empty or "p_perm_holm" not in tests.columns:
        return [Criterion("P4.family_differences", 4, text, None, f"Holm-adjusted p < {alpha}", None, evidence,
                          "no family comparison could be made (one family, or fewer than two layers per group)")]
    t = tests.loc[tests["p_perm_holm"].astype(float).idxmin()]
    p = float(t["p_perm_holm"])
    note = (f"{t['comparison']} ({t['group_col']}): diff {t['diff']:+.3f}, rank-biserial {t['rank_biserial']:+.2f}, "
            f"n = {int(t['n_a'])} vs {int(t['n_b'])} layers, Holm p = {p:.3g} over {len(tests)} comparison(s). "
            f"Confounds: {t['confounds']}")
    return [Criterion("P4.family_differences", 4, text, round(float(t["diff"]), 4), f"Holm-adjusted p < {alpha}",
                      bool(p < alpha), evidence, note)]
