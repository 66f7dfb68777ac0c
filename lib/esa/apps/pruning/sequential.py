"""Pruning conditions evaluated window by window, their comparisons decided sequentially.

`Windowed` keeps each condition's per-window NLL and evaluates more windows only when asked (masks applied
in place and restored bit-exactly, as `evaluate_condition` does). `decide` runs comparisons "method does more
than `threshold` less damage than baseline", D = (1 − threshold)·Δbaseline − Δmethod > 0 per (calibration
seed, window) pair (Δ = NLL(pruned) − NLL(dense) on the window), with a group-sequential design
(esa.stats.sequential): windows are added in doubling looks only to the conditions whose comparison is still
open, so a decided comparison stops at its first look. A condition in no comparison is measured on the first
look's windows. Every row says on how many windows it was measured (`eval_windows`); comparisons are paired
on the windows both sides share (a prefix of one fixed window order).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from esa.apps.pruning.evaluation import dense_row
from esa.apps.pruning.masks import applied
from esa.apps.pruning.prune import PruneResult
from esa.data import Windows
from esa.errors import EsaError
from esa.evaluate import EvalResult, evaluate
from esa.models.loader import LoadedModel
from esa.stats.inference import LOG_PPL_CAP, capped
from esa.stats.sequential import Design, SequentialContrast
from esa.zeroshot import ZeroShotTask, zero_shot_columns

UNIT = "(calibration seed, window) pairs"


class Windowed:
    """Per-window NLL of pruning conditions (key -> its PruneResult, None for dense), evaluated on demand."""

    def __init__(self, lm: LoadedModel, windows: Windows, batch_size: int | None = None) -> None:
        self.lm, self.windows, self.batch_size = lm, windows, batch_size
        self.results: dict[str, PruneResult | None] = {}
        self.parts: dict[str, list[EvalResult]] = {}
        self.seconds: dict[str, float] = {}

    def add(self, key: str, result: PruneResult | None) -> None:
        self.results[key] = result
        self.parts.setdefault(key, [])
        self.seconds.setdefault(key, 0.0)

    def n(self, key: str) -> int:
        return sum(p.n_windows for p in self.parts[key])

    def nll(self, key: str, n: int) -> np.ndarray:
        """The first `n` windows' mean NLL (capped at LOG_PPL_CAP), evaluating those not yet seen."""
        have = self.n(key)
        if have < n:
            res = self.results[key]
            t0 = time.perf_counter()
            with applied(self.lm.model, res.masks) if res is not None else contextlib.nullcontext():
                self.parts[key].append(evaluate(self.lm.model, self.windows.ids[have:n], batch_size=self.batch_size,
                                                show_progress=False))
            self.seconds[key] += time.perf_counter() - t0
        values = np.concatenate([np.asarray(p.window_nll, dtype=float) for p in self.parts[key]])
        return capped(values[:n], LOG_PPL_CAP)

    def row(self, key: str, task: ZeroShotTask | None = None, hub_tasks: tuple[str, ...] = ()) -> dict[str, Any]:
        """The condition's table row over the windows it was evaluated on (+ the zero-shot tasks, once)."""
        res, parts = self.results[key], self.parts[key]
        if not parts:
            raise EsaError(f"condition {key} was never evaluated")
        n_tok = sum(p.n_tokens for p in parts)
        log_ppl = float(sum(p.log_ppl * p.n_tokens for p in parts) / n_tok)
        row = res.row() if res is not None else dense_row(self.lm)
        row.update({"eval_corpus": self.windows.corpus, "eval_seqlen": self.windows.seqlen,
                    "eval_windows": self.n(key), "eval_tokens": n_tok, "tokenizer": self.windows.tokenizer,
                    "ppl": float(np.exp(log_ppl)) if log_ppl < 700 else float("inf"), "log_ppl": log_ppl,
                    "accuracy": float(sum(p.accuracy * p.n_tokens for p in parts) / n_tok),
                    "n_nonfinite_windows": sum(p.n_nonfinite_windows for p in parts)})
        if task is not None or hub_tasks:
            with applied(self.lm.model, res.masks) if res is not None else contextlib.nullcontext():
                row.update(zero_shot_columns(self.lm.model, self.lm.tokenizer, task, hub_tasks))
        row["eval_s"] = self.seconds[key]
        return row


@dataclass(frozen=True)
class Comparison:
    """One claim: `method` does more than `threshold` less damage than `baseline`, per calibration seed.
    `method` and `baseline` map each seed to a condition key of the `Windowed` (a seed-free baseline maps
    every seed to its one key)."""

    label: str
    method: dict[int, str]
    baseline: dict[int, str]
    threshold: float = 0.15


def decide(comparisons: list[Comparison], w: Windowed, dense: str, design_for: Callable[[int], Design]) -> pd.DataFrame:
    """Each comparison's sequential decision (one row each): windows go only to what is still open.
    `design_for(n_seeds)` gives the design of a comparison over that many calibration seeds (its looks are
    multiples of them)."""
    if not comparisons:
        return pd.DataFrame()
    designs = {c.label: design_for(len(c.method)) for c in comparisons}
    seqs = {c.label: SequentialContrast(designs[c.label], 1.0, 0.0, UNIT) for c in comparisons}
    for look in range(max(len(d.looks) for d in designs.values())):
        for c in comparisons:
            sq, looks = seqs[c.label], designs[c.label].looks
            if sq.done or look >= len(looks):
                continue
            seeds = sorted(c.method)
            w_k, w0 = looks[look] // len(seeds), sq.n // len(seeds)
            base = w.nll(dense, w_k)
            a, b = [], []
            for s in seeds:
                da = w.nll(c.baseline[s], w_k)[w0:w_k] - base[w0:w_k]
                dm = w.nll(c.method[s], w_k)[w0:w_k] - base[w0:w_k]
                a.append((1 - c.threshold) * da)
                b.append(dm)
            sq.update(np.stack(a, axis=1).ravel(), np.stack(b, axis=1).ravel())  # window-major, seed-minor
    rows = []
    for c in comparisons:
        r = (seqs[c.label].close("windows ran out") if not seqs[c.label].done else seqs[c.label].result()).as_dict()
        r.pop("history")
        rows.append({"comparison": c.label, "threshold": c.threshold, "alpha": designs[c.label].alpha,
                     "n_seeds": len(c.method), **{k: v for k, v in r.items() if k != "threshold"}})
    return pd.DataFrame(rows)




def comparisons_of(conditions: dict[int, Any], esa_methods: list[str], baselines: tuple[str, ...], sparsity: float,
                   protected_methods: set[str], threshold: float) -> list[Comparison]:
    """The criterion's comparisons among `conditions` (index -> grid.Condition): each ESA method (its protected
    variant where one was run) against each baseline, at `sparsity`, unstructured, uniform allocation."""
    def keys(method: str, protected: bool) -> dict[int, str]:
        return {c.spec.calib_seed: str(k) for k, c in conditions.items()
                if c.spec.method == method and c.protected == protected and c.spec.pattern == "unstructured"
                and c.spec.allocation == "uniform" and c.spec.sparsity is not None
                and abs(c.spec.sparsity - sparsity) < 1e-9}

    out = []
    for m in esa_methods:
        prot = m in protected_methods
        mine = keys(m, prot)
        for base in baselines:
            theirs = keys(base, False)
            if base == m or not mine or not theirs:
                continue
            if len(theirs) == 1:  # data-free: one mask for every seed
                theirs = dict.fromkeys(mine, next(iter(theirs.values())))
            if set(theirs) != set(mine):
                continue
            out.append(Comparison(f"{m}{'+protect' if prot else ''}.vs_{base}", mine, theirs, threshold))
    return out


def evaluate_all(w: Windowed, comparisons: list[Comparison], design_for: Callable[[int], Design], first: int,
                 task: ZeroShotTask | None, hub_tasks: tuple[str, ...] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decide the comparisons, measure every other condition on the first `first` windows, the dense model
    on as many as any condition used; returns (one row per condition, one row per decision)."""
    decisions = decide(comparisons, w, "dense", design_for)
    for key in w.results:
        if key != "dense" and w.n(key) == 0:
            w.nll(key, min(first, w.windows.n_windows))
    w.nll("dense", max(w.n(k) for k in w.results))
    return pd.DataFrame([w.row(k, task, hub_tasks) for k in w.results]), decisions


def run(lm: LoadedModel, windows: Windows, batch_size: int | None, results: list[PruneResult],
        comparisons: list[Comparison], task: ZeroShotTask | None, alpha: float,
        policy: dict[str, Any], hub_tasks: tuple[str, ...] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sequential evaluation of a study's conditions (`results`, indexed as `comparisons_of` saw them):
    each comparison at alpha / m with looks from `policy` (first_windows per seed, doubling; spending)."""
    w = Windowed(lm, windows, batch_size)
    w.add("dense", None)
    for i, r in enumerate(results):
        w.add(str(i), r)
    first = int(policy.get("first_windows", 2))

    def design(n_seeds: int) -> Design:
        return Design(alpha=alpha / max(1, len(comparisons)), n0=n_seeds * min(first, windows.n_windows),
                      n_max=n_seeds * windows.n_windows, spending=policy.get("spending", "pocock"))

    return evaluate_all(w, comparisons, design, first, task, hub_tasks)

