"""Sweeps: perturbation x group (top-k and each control) x seed x dose, into one tidy table.

One condition = perturb one target set in place, evaluate on the fixed evaluation windows, restore.
The evaluation windows are the same for every condition, so every comparison is paired by window,
and conditions that share a seed (top-k of seed s vs its controls drawn with seed s) are paired by seed.

Catastrophic damage is kept, never dropped: a condition whose every window is non-finite raises
`AllNonFinite` from `evaluate_perturbed` (after the model is restored); a sweep either re-raises it
(`strict_nan=True`) or records the row with ppl/log_ppl NaN and `n_nonfinite_windows` = all windows,
so statistics can cap it explicitly (see esa.stats.inference).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from esa.errors import EsaError
from esa.evaluate import EvalResult, evaluate
from esa.models.inventory import WeightSpec
from esa.perturb.apply import PerturbStats, Targets, count_targets, perturbed, targets_from_selection
from esa.perturb.controls import CONTROLS, ControlInput, make_control, overlap
from esa.perturb.ops import PerturbSpec
from esa.progress import progress
from esa.sensitivity.select import BottomSource
from esa.stats.inference import LOG_PPL_CAP, capped
from esa.stats.sequential import Design, SequentialContrast

log = logging.getLogger(__name__)

TOP = "top_k"
COLUMNS = ["perturbation", "scale", "prob", "dose", "group", "k", "seed", "ppl", "log_ppl", "delta_ppl",
           "delta_log_ppl", "accuracy", "n_nonfinite_windows", "n_inf_weights", "n_nan_weights", "seconds",
           "n_changed", "unchanged_share", "overlap_top"]


def unchanged_share(n_changed: int, k: int) -> float:
    """Share of the selected weights whose stored value the perturbation left as it was: in bf16, noise below
    half an ulp of |w| rounds back to w, more often for large (top-k) weights than for random ones."""
    return 1.0 - n_changed / k if k else math.nan


class AllNonFinite(EsaError):
    """Every evaluation window's loss is inf/NaN: the perturbation destroyed the model's output."""


def evaluate_perturbed(
    model: torch.nn.Module,
    windows: torch.Tensor,
    targets: Targets,
    spec: PerturbSpec,
    seed: int = 0,
    batch_size: int | None = None,
) -> tuple[EvalResult, PerturbStats]:
    """Perturb, evaluate, restore (always). Raises AllNonFinite if every window is non-finite."""
    with perturbed(model, targets, spec, seed) as stats:
        res = evaluate(model, windows, batch_size=batch_size, show_progress=False)
    if res.n_windows and res.n_nonfinite_windows == res.n_windows:
        raise AllNonFinite(
            f"{spec.label()} on {count_targets(targets)} weights made every one of the {res.n_windows} "
            f"evaluation windows non-finite (inf/NaN loss; {stats.n_inf} inf and {stats.n_nan} NaN weights "
            "written). The model has been restored."
        )
    return res, stats


def build_groups(
    model: torch.nn.Module,
    inventory: list[WeightSpec],
    selection: pd.DataFrame,
    seeds: Iterable[int],
    controls: Iterable[str],
    scores_by_seed: Mapping[int, Mapping[str, torch.Tensor] | BottomSource | None] | None = None,
) -> dict[tuple[str, int], Targets]:
    """(group, seed) -> target set: the top-k of each seed (from the selection table) and its controls."""
    groups: dict[tuple[str, int], Targets] = {}
    controls = list(controls)
    for c in controls:
        CONTROLS.lookup(c)
    for seed in seeds:
        sel = selection[selection["seed"] == seed] if "seed" in selection and (selection["seed"] == seed).any() \
            else selection
        if sel.empty:
            raise EsaError(f"the top-k selection has no rows for seed {seed}")
        top = targets_from_selection(sel, inventory)
        groups[(TOP, int(seed))] = top
        src = (scores_by_seed or {}).get(int(seed))  # a full map, or the cached bottom candidates
        bottom = src if isinstance(src, BottomSource) else None
        scores = None if bottom is not None else src
        for c in controls:
            groups[(c, int(seed))] = make_control(c, ControlInput(model, inventory, top, int(seed), scores,  # type: ignore[arg-type]
                                                                  bottom))
    return groups


def group_composition(model: torch.nn.Module, groups: dict[tuple[str, int], Targets]) -> pd.DataFrame:
    """Per (group, seed): how many weights, what share is exactly zero, and their median |w|.

    A multiplicative perturbation (sign_flip, zero, bit_flip of the exponent) of an exactly-zero weight is a
    no-op, so a group that is mostly zeros (a bottom_k on a quantised checkpoint) is trivially harmless
    under those perturbations and only informative under additive noise."""
    params = dict(model.named_parameters())
    rows = []
    for (group, seed), targets in groups.items():
        vals = [params[n].detach().reshape(-1)[idx.to(params[n].device)].float().cpu() for n, idx in targets.items()]
        v = torch.cat(vals) if vals else torch.zeros(0)
        rows.append({"group": group, "seed": seed, "n": int(v.numel()),
                     "zero_share": float((v == 0).float().mean()) if v.numel() else float("nan"),
                     "median_abs_w": float(v.abs().median()) if v.numel() else float("nan")})
    return pd.DataFrame(rows)


@dataclass
class SweepResult:
    table: pd.DataFrame  # one row per condition (COLUMNS)
    windows: pd.DataFrame  # one row per (condition, window): per-window NLL and delta NLL
    baseline: EvalResult
    sequential: pd.DataFrame | None = None  # run_sweep_sequential: one row per comparison and its decision


def run_sweep(
    model: torch.nn.Module,
    windows: torch.Tensor,
    groups: dict[tuple[str, int], Targets],
    specs: list[PerturbSpec],
    baseline: EvalResult | None = None,
    batch_size: int | None = None,
    strict_nan: bool = False,
    show_progress: bool = True,
) -> SweepResult:
    """Evaluate every (spec, group, seed) condition once; the model is unchanged afterwards."""
    ids = windows.ids if hasattr(windows, "ids") else windows
    if baseline is None:
        baseline = evaluate(model, windows, batch_size=batch_size, show_progress=False)
    if not np.isfinite(baseline.log_ppl):
        raise EsaError(f"the unperturbed model already has a non-finite loss (log-PPL {baseline.log_ppl})")
    base_nll = np.asarray(baseline.window_nll)
    rows, win_rows = [], []
    conds = [(spec, g, s) for spec in specs for (g, s) in groups]
    for spec, group, seed in progress(conds, desc="perturbation sweep", disable=not show_progress, unit="cond"):
        targets = groups[(group, seed)]
        t0 = time.perf_counter()
        try:
            res, st = evaluate_perturbed(model, windows, targets, spec, seed, batch_size)
            log_ppl, ppl, acc, nonfinite, nll = res.log_ppl, res.ppl, res.accuracy, res.n_nonfinite_windows, \
                np.asarray(res.window_nll)
        except AllNonFinite as e:
            if strict_nan:
                raise
            log.warning("%s", e)
            # recorded as catastrophic (NaN), not dropped; the stats layer caps it and says so
            log_ppl, ppl, acc, nonfinite, nll = np.nan, np.nan, np.nan, len(base_nll), np.full(len(base_nll), np.nan)
            st = _stats_only(model, targets, spec, seed)
        secs = time.perf_counter() - t0
        top = groups.get((TOP, seed), {})
        rows.append(dict(
            perturbation=spec.kind(), scale=float(spec.scale), prob=float(spec.prob), dose=float(spec.dose()),
            group=group, k=count_targets(targets), seed=int(seed), ppl=float(ppl), log_ppl=float(log_ppl),
            delta_ppl=float(ppl - baseline.ppl), delta_log_ppl=float(log_ppl - baseline.log_ppl),
            accuracy=float(acc), n_nonfinite_windows=int(nonfinite), n_inf_weights=st.n_inf,
            n_nan_weights=st.n_nan, seconds=secs, n_changed=st.n_changed,
            unchanged_share=unchanged_share(st.n_changed, count_targets(targets)),
            overlap_top=overlap(targets, top) if group != TOP else count_targets(targets),
        ))
        for w, (a, b) in enumerate(zip(nll, base_nll, strict=True)):
            win_rows.append((spec.kind(), float(spec.scale), float(spec.prob), float(spec.dose()), group, int(seed),
                             w, float(a), float(b), float(a - b)))
    table = pd.DataFrame(rows, columns=COLUMNS)
    wins = pd.DataFrame(win_rows, columns=["perturbation", "scale", "prob", "dose", "group", "seed", "window",
                                           "nll", "base_nll", "delta_nll"])
    del ids
    return SweepResult(table, wins, baseline)


def _stats_only(model: torch.nn.Module, targets: Targets, spec: PerturbSpec, seed: int) -> PerturbStats:
    # Re-apply (same seed -> same values) only to count inf/NaN weights for the catastrophic row.
    with perturbed(model, targets, spec, seed) as st:
        pass
    return st


# ---------------------------------------------------------------- sequential evaluation
Comparison = tuple[str, str, float]  # (group a, group b, c): the claim mean(Δa − c·Δb) > 0


def run_sweep_sequential(
    model: torch.nn.Module,
    windows: Any,
    groups: dict[tuple[str, int], Targets],
    specs: list[PerturbSpec],
    comparisons: Callable[[PerturbSpec], list[Comparison]],
    design: Design,
    baseline: EvalResult | None = None,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> SweepResult:
    """`run_sweep` that adds evaluation windows in looks until each comparison of a perturbation is decided.

    Units are (seed, window) pairs: at look k every seed has w_k = n_k / S windows (the design's looks must
    be multiples of the seed count S; n_max = S x the windows available). A comparison (a, b, c) of a spec
    judges Δa − c·Δb > 0 over those pairs with `design` (esa.stats.sequential: alpha spent over the looks,
    so stopping early keeps the error rate; a family of m comparisons should use a design at alpha/m). Only
    the groups an undecided comparison needs get more windows; a window's non-finite NLL is capped at
    LOG_PPL_CAP. The table gains `n_windows` (windows each condition was evaluated on: its log-PPL is over
    those) and `sequential` holds one row per comparison (decision, look, n, bounds)."""
    ids = windows.ids if hasattr(windows, "ids") else windows
    n_avail = int(ids.shape[0])
    seeds = sorted({s for _, s in groups})
    n_seeds = len(seeds)
    if any(n % n_seeds for n in design.looks) or design.n_max != n_seeds * n_avail:
        raise EsaError(f"sequential sweep: the design's looks {design.looks} must be multiples of the {n_seeds} seeds, "
                       f"ending at {n_seeds} x {n_avail} windows")
    if baseline is None:
        baseline = evaluate(model, windows, batch_size=batch_size, show_progress=False)
    base = capped(np.asarray(baseline.window_nll), LOG_PPL_CAP)
    rows, win_rows, seq_rows = [], [], []
    for spec in progress(specs, desc="sequential sweep", disable=not show_progress, unit="perturbation"):
        seqs = {c: SequentialContrast(design, c[2], 0.0, "(seed, window) pairs") for c in comparisons(spec)}
        blocks: dict[tuple[str, int], list[tuple[EvalResult | None, PerturbStats, float]]] = {g: [] for g in groups}
        nll: dict[tuple[str, int], list[float]] = {g: [] for g in groups}
        for n_k in design.looks:
            active = [c for c, s in seqs.items() if not s.done]
            if not active:
                break
            w_k = n_k // n_seeds
            needed = {TOP} | {g for a, b, _ in active for g in (a, b)}
            for g in groups:
                if g[0] in needed and len(nll[g]) < w_k:
                    _evaluate_block(model, ids, g, groups[g], spec, len(nll[g]), w_k, batch_size, blocks, nll)
            for c in active:
                a, b, _ = c
                w0 = seqs[c].n // n_seeds
                pairs = [(w, s) for w in range(w0, w_k) for s in seeds]
                seqs[c].update([nll[(a, s)][w] - base[w] for w, s in pairs],
                               [nll[(b, s)][w] - base[w] for w, s in pairs])
        for (a, b, c), sq in seqs.items():
            r = (sq.close("windows ran out") if not sq.done else sq.result()).as_dict()
            r.pop("history")
            seq_rows.append(dict(perturbation=spec.kind(), scale=float(spec.scale), prob=float(spec.prob),
                                 dose=float(spec.dose()), a=a, b=b, alpha=design.alpha,
                                 **{k: v for k, v in r.items() if k != "c"},
                                 c=c, zero_differences=bool(np.all(sq._d == 0)) if sq.n else False))
        for g, parts in blocks.items():
            if parts:
                rows.append(_sequential_row(spec, g, parts, nll[g], base, groups))
                win_rows += [(spec.kind(), float(spec.scale), float(spec.prob), float(spec.dose()), g[0], int(g[1]),
                              w, float(v), float(base[w]), float(v - base[w])) for w, v in enumerate(nll[g])]
    table = pd.DataFrame(rows, columns=[*COLUMNS, "n_windows"])
    wins = pd.DataFrame(win_rows, columns=["perturbation", "scale", "prob", "dose", "group", "seed", "window",
                                           "nll", "base_nll", "delta_nll"])
    return SweepResult(table, wins, baseline, pd.DataFrame(seq_rows))


def _evaluate_block(model: torch.nn.Module, ids: torch.Tensor, g: tuple[str, int], targets: Targets,
                    spec: PerturbSpec, start: int, stop: int, batch_size: int | None,
                    blocks: dict[tuple[str, int], list[Any]], nll: dict[tuple[str, int], list[float]]) -> None:
    """Windows [start, stop) of group `g` under `spec` (perturbed in place, evaluated, restored)."""
    t0 = time.perf_counter()
    try:
        res, st = evaluate_perturbed(model, ids[start:stop], targets, spec, g[1], batch_size)
        values = capped(np.asarray(res.window_nll), LOG_PPL_CAP)
    except AllNonFinite:
        res, st, values = None, _stats_only(model, targets, spec, g[1]), np.full(stop - start, LOG_PPL_CAP)
    blocks[g].append((res, st, time.perf_counter() - t0, stop - start))
    nll[g] += values.tolist()


def _sequential_row(spec: PerturbSpec, g: tuple[str, int], parts: list[Any], nll: list[float], base: np.ndarray,
                    groups: dict[tuple[str, int], Targets]) -> dict[str, Any]:
    """One condition's row over the windows it was evaluated on (capped NLL; mean of the window means)."""
    n = len(nll)
    log_ppl = float(np.mean(nll))
    done = [(r, k) for r, _, _, k in parts if r is not None]
    acc = sum(r.accuracy * k for r, k in done) / max(1, sum(k for _, k in done)) if done else math.nan
    nonfinite = sum(r.n_nonfinite_windows if r is not None else k for r, _, _, k in parts)
    st = parts[0][1]
    top = groups.get((TOP, g[1]), {})
    targets = groups[g]
    base_lp = float(np.mean(base[:n]))
    return dict(perturbation=spec.kind(), scale=float(spec.scale), prob=float(spec.prob), dose=float(spec.dose()),
                group=g[0], k=count_targets(targets), seed=int(g[1]), ppl=_exp(log_ppl), log_ppl=log_ppl,
                delta_ppl=_exp(log_ppl) - _exp(base_lp), delta_log_ppl=log_ppl - base_lp, accuracy=float(acc),
                n_nonfinite_windows=int(nonfinite), n_inf_weights=st.n_inf, n_nan_weights=st.n_nan,
                seconds=float(sum(t for _, _, t, _ in parts)), n_changed=st.n_changed,
                unchanged_share=unchanged_share(st.n_changed, count_targets(targets)),
                overlap_top=overlap(targets, top) if g[0] != TOP else count_targets(targets), n_windows=n)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf

