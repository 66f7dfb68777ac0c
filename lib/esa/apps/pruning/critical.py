"""The critical set that ESA-guided pruning never prunes: super-weight candidates plus a metric's top-k.

`critical_targets(lm, scores, topk)` returns target sets (param -> flat indices) ready for
`prune(..., protect=...)`, a label for tables, and the table of protected weights with their source. The
scores are any per-weight sensitivity scores (a ScoreRun's `scores`, or a scorer's own), so the caller
chooses the metric; protecting the top-k of the very scorer that prunes changes little (its top-k are the
last weights it would prune), protecting another metric's top-k is the informative comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from esa.errors import EsaError, unknown
from esa.models.loader import LoadedModel
from esa.perturb.apply import Targets, targets_from_selection
from esa.sensitivity.select import MODES, select_topk
from esa.sensitivity.superweights import DEFAULT_PROMPT, detect_superweights


@dataclass
class Critical:
    targets: Targets
    label: str
    table: pd.DataFrame  # param, expert, row, col, source


def critical_targets(
    lm: LoadedModel,
    scores: Mapping[str, torch.Tensor] | None = None,
    topk: int = 0,
    mode: str = "per_layer",
    superweights: bool = True,
    metric: str = "",
    prompt: str = DEFAULT_PROMPT,
) -> Critical:
    """Super-weight detector candidates (if `superweights`) plus the top-`topk` weights of `scores` (`mode`
    per_layer: per matrix; global: overall). `metric` names the scores in the label."""
    if mode not in MODES:
        raise unknown("mode", mode, MODES)
    if topk and scores is None:
        raise EsaError("critical_targets: topk > 0 needs the scores of a sensitivity metric")
    parts, label = [], []
    if superweights:
        sw = detect_superweights(lm.model, lm.tokenizer, lm.inventory, prompt=prompt)
        cand = sw[sw["candidate"]]
        parts.append(pd.DataFrame({"param": cand["param"], "expert": -1, "row": cand["row"], "col": cand["col"],
                                   "source": "superweight"}))
        label.append(f"superweights({len(cand)})")
    if topk:
        inv = [s for s in lm.inventory if s.name in scores]  # type: ignore[operator]
        sel = select_topk(dict(scores), inv, topk, mode)  # type: ignore[arg-type]
        parts.append(sel[["param", "expert", "row", "col"]].assign(source=f"top{topk}:{metric or 'scores'}"))
        label.append(f"{metric or 'scores'}@top{topk}/{mode}")
    if not parts:
        raise EsaError("critical_targets: nothing to protect (superweights=False and topk=0)")
    table = pd.concat(parts, ignore_index=True)
    targets = targets_from_selection(table, lm.inventory) if len(table) else {}
    return Critical(targets, "+".join(label), table)


def critical_or_topk(lm: LoadedModel, scores: Mapping[str, torch.Tensor] | None, topk: int, mode: str,
                     superweights: bool, metric: str) -> tuple[Critical, str]:
    """`critical_targets`, falling back to the top-k alone when the super-weight detector cannot read the
    architecture; returns the set and a note saying so ("" when the detector ran)."""
    try:
        return critical_targets(lm, scores, topk=topk, mode=mode, superweights=superweights, metric=metric), ""
    except EsaError as e:
        if not (superweights and topk):
            raise
        crit = critical_targets(lm, scores, topk=topk, mode=mode, superweights=False, metric=metric)
        return crit, f"super-weight detector skipped: {e}"

