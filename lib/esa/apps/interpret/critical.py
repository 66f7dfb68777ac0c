"""Which weights are explained: each metric's global top-k plus the super-weight detector's candidates, and
the one weight whose chain through depth is traced.

`critical_selection` stacks the global top-k of every metric (columns param, expert, row, col, score, rank,
metric) and, as metric `DETECTOR`, the detector's candidates ranked by their output spike; the role
catalogue tests them all, the criterion counts only what a metric ranks. `trace_chosen` traces the chain of
the detector's strongest candidate (without one: the largest down-projection output spike; without a
detector table: the first metric's top weight) and says why that weight was chosen.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from esa.apps.interpret.anatomy import Eager
from esa.apps.interpret.chain import ChainTrace, trace_chain
from esa.errors import EsaError
from esa.models.loader import LoadedModel
from esa.sensitivity.engine import ScoreRun
from esa.sensitivity.select import check_k
from esa.sensitivity.superweights import DEFAULT_PROMPT, detect_superweights

DETECTOR = "detector"  # the metric name of the super-weight detector's candidates in a selection


def detector_table(lm: LoadedModel, text: str = DEFAULT_PROMPT) -> pd.DataFrame:
    """The super-weight detector's per-layer table (empty, with the reason in attrs, for a model it cannot read)."""
    try:
        return detect_superweights(lm.model, lm.tokenizer, lm.inventory, prompt=text)
    except EsaError as e:
        out = pd.DataFrame(columns=["layer", "param", "row", "col", "in_max", "out_max", "candidate"])
        out.attrs["skipped"] = str(e)
        return out


def critical_selection(lm: LoadedModel, runs: dict[tuple[str, int], ScoreRun], metrics: list[str], seed: int, k: int,
                       detector: pd.DataFrame | None = None) -> pd.DataFrame:
    """Global top-k of each metric at `seed` plus, as metric DETECTOR, the detector's candidates ranked by their
    output spike. k larger than the weights, or a metric not scored at `seed`: EsaError."""
    check_k(lm.inventory, k, "global")
    parts = []
    for m in metrics:
        if (m, seed) not in runs:
            raise EsaError(f"no scores of metric {m!r} at seed {seed}; scored: {sorted(runs)}")
        parts.append(runs[(m, seed)].topk(k, "global", lm.inventory)[["param", "expert", "row", "col", "score",
                                                                        "rank"]].assign(metric=m))
    if detector is not None and len(detector) and detector["candidate"].any():
        cand = detector[detector["candidate"]].sort_values("out_max", ascending=False)
        parts.append(pd.DataFrame({"param": cand["param"], "expert": -1, "row": cand["row"], "col": cand["col"],
                                   "score": cand["out_max"], "rank": np.arange(1, len(cand) + 1),
                                   "metric": DETECTOR}))
    return pd.concat(parts, ignore_index=True)


def has_candidate(detector: pd.DataFrame) -> bool:
    return bool(len(detector) and detector["candidate"].any())


def chain_weight(detector: pd.DataFrame, sel: pd.DataFrame) -> tuple[str, int, int, str]:
    """(param, row, col, why) of the weight whose chain is traced (module docstring)."""
    if has_candidate(detector):
        r = detector[detector["candidate"]].sort_values("out_max", ascending=False).iloc[0]
        return str(r["param"]), int(r["row"]), int(r["col"]), "the super-weight detector's strongest candidate"
    if len(detector):
        r = detector.sort_values("out_max", ascending=False).iloc[0]
        return (str(r["param"]), int(r["row"]), int(r["col"]),
                "no detector candidate: the largest down-projection output spike, traced as the nearest thing")
    r = sel.iloc[0]
    return (str(r["param"]), int(r["row"]), int(r["col"]),
            f"no detector table ({detector.attrs.get('skipped', '')}): the top weight of {r['metric']}")


def trace_chosen(lm: LoadedModel, detector: pd.DataFrame, sel: pd.DataFrame, text: str = DEFAULT_PROMPT,
                 sink: str = "first", seed: int = 0) -> ChainTrace:
    """The chain of `chain_weight`'s weight on `text` (eager attention meanwhile); summary["chosen_because"] says why."""
    param, row, col, why = chain_weight(detector, sel)
    with Eager(lm.model):
        trace = trace_chain(lm.model, lm.tokenizer, lm.inventory, param, row, col, text, sink=sink, seed=seed)
    trace.summary["chosen_because"] = why
    return trace
