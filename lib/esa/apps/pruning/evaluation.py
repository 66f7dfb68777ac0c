"""One evaluation protocol for every pruning condition, and the guide's criterion computed from it.

`evaluate_condition(lm, result, windows, task)` applies the masks in place, measures perplexity and
next-token accuracy (esa.evaluate.evaluate: non-overlapping windows of the evaluation split) and the
offline zero-shot task with any hub tasks (esa.zeroshot: lm-eval on the in-memory model), restores the
model bit-exactly, and returns one tidy row: the condition (method, sparsity, pattern, group, allocation,
protected set, calibration mode and seed) and the measurements (with the evaluation corpus, seqlen, window
count and tokenizer every table must state).
`result=None` is the dense model.

`criterion(table, method, baseline)`: the guide's ">15% better than magnitude", made precise as the
relative reduction of the damage Delta = log-PPL(pruned) - log-PPL(dense) at equal sparsity, per model and
calibration seed: gain = 1 - Delta_method / Delta_baseline (0.15 = 15% less damage). Not estimable when the
baseline does no measurable damage (Delta_baseline <= 0) or a log-PPL is not finite.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np
import pandas as pd

from esa.apps.pruning.masks import applied
from esa.apps.pruning.prune import PruneResult
from esa.data import Windows
from esa.errors import EsaError
from esa.evaluate import evaluate
from esa.models.loader import LoadedModel
from esa.zeroshot import ZeroShotTask, zero_shot_columns


def dense_row(lm: LoadedModel, model_ref: str | None = None) -> dict[str, Any]:
    """The condition columns of the unpruned model."""
    return {"model": model_ref or lm.info.ref, "method": "dense", "definition": "no pruning", "sparsity": 0.0,
            "achieved_sparsity": 0.0, "pattern": "dense", "group": "none", "allocation": "none",
            "protected": "none", "n_protected": 0, "calib_mode": "none", "calib_corpus": "none", "calib_seqlen": 0,
            "calib_windows": 0, "calib_seed": -1, "mask_key": "", "prune_s": 0.0}


def evaluate_condition(lm: LoadedModel, result: PruneResult | None, windows: Windows, task: ZeroShotTask | None = None,
                       batch_size: int | None = None, zs_batch_size: int | None = None,
                       show_progress: bool = False, hub_tasks: tuple[str, ...] = ()) -> dict[str, Any]:
    """One table row: the condition of `result` (None: dense) measured on `windows` (and `task`, `hub_tasks`)."""
    row = result.row() if result is not None else dense_row(lm)
    t0 = time.perf_counter()
    cm = applied(lm.model, result.masks) if result is not None else contextlib.nullcontext()
    with cm:
        ev = evaluate(lm.model, windows, batch_size=batch_size, show_progress=show_progress)
        zs = zero_shot_columns(lm.model, lm.tokenizer, task, hub_tasks, zs_batch_size, show_progress)
    row.update({
        "eval_corpus": windows.corpus, "eval_seqlen": windows.seqlen, "eval_windows": windows.n_windows,
        "eval_tokens": ev.n_tokens, "tokenizer": windows.tokenizer, "ppl": ev.ppl, "log_ppl": ev.log_ppl,
        "accuracy": ev.accuracy, "n_nonfinite_windows": ev.n_nonfinite_windows,
    })
    row.update(zs)
    row["eval_s"] = time.perf_counter() - t0
    return row


def results_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def criterion(table: pd.DataFrame, method: str, baseline: str = "magnitude", sparsity: float = 0.5,
              pattern: str = "unstructured", **match: Any) -> pd.DataFrame:
    """Relative damage reduction of `method` against `baseline`, per model and calibration seed.

    Rows are matched on model, sparsity, pattern and calib_seed (data-free baselines, whose seed does not
    change the mask, are matched on model alone); extra `match` columns (e.g. allocation='uniform',
    protected='none') filter both sides. The dense rows give the reference log-PPL per model."""
    t = table
    for col, val in match.items():
        t = t[(t[col] == val) | (t["method"] == "dense")]
    dense = t[t["method"] == "dense"].groupby("model")["log_ppl"].first()
    sel = t[(t["sparsity"].sub(sparsity).abs() < 1e-9) & (t["pattern"] == pattern)]
    m, b = sel[sel["method"] == method], sel[sel["method"] == baseline]
    b_seeded = b["calib_mode"].ne("none").any()
    rows = []
    for _, r in m.iterrows():
        cand = b[(b["model"] == r["model"]) & ((b["calib_seed"] == r["calib_seed"]) if b_seeded else True)]
        if cand.empty or r["model"] not in dense:
            continue
        if len(cand) > 1:
            raise EsaError(f"criterion: {len(cand)} {baseline} rows match model {r['model']!r}, seed {r['calib_seed']} "
                           "(e.g. two calibration modes or protected sets); narrow them with match=, e.g. "
                           "protected='none', or filter the table first")
        d0 = float(dense[r["model"]])
        dm, db = float(r["log_ppl"]) - d0, float(cand["log_ppl"].iloc[0]) - d0
        ok = math.isfinite(dm) and math.isfinite(db) and db > 0
        rows.append({"model": r["model"], "calib_seed": r["calib_seed"], "method": method, "baseline": baseline,
                     "sparsity": sparsity, "pattern": pattern,
                     **{c: r[c] for c in ("group", "allocation", "protected", "calib_mode") if c in r},
                     "baseline_calib_mode": cand["calib_mode"].iloc[0] if "calib_mode" in cand else "",
                     "delta_log_ppl": dm, "delta_log_ppl_baseline": db, "gain": 1 - dm / db if ok else np.nan,
                     "estimable": ok, "note": "" if ok else "not estimable: baseline does no finite positive damage"})
    return pd.DataFrame(rows)


def matched_gains(table: pd.DataFrame, method: str, baseline: str, sparsity: float, protected: bool) -> pd.DataFrame:
    """Per-seed gains of `method` (its protected rows, or its unprotected ones) against the unprotected
    `baseline`, uniform allocation, at `sparsity` unstructured; empty when either side was not run."""
    t = table[(table["allocation"] == "uniform") | (table["method"] == "dense")]
    m_rows = t[(t["method"] == method) & ((t["protected"] != "none") if protected else (t["protected"] == "none"))]
    b_rows = t[(t["method"] == baseline) & (t["protected"] == "none")]
    sub = pd.concat([t[t["method"] == "dense"], m_rows, b_rows], ignore_index=True)
    if method == baseline or m_rows.empty or b_rows.empty:
        return pd.DataFrame()
    return criterion(sub, method, baseline, sparsity=sparsity, pattern="unstructured")

