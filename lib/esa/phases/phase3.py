"""Phase 3 (weeks 5-8): top-k sets from Phase 2's cache, evaluation windows, one model's perturbation sweep.

Top-k sets come through the recipe layer from the score cache, which returns Phase 2's run when the
settings (model, corpus, seqlen, samples, seed, metric settings, dtype, code version) match: Phase 3 never
computes its own selection. Whether each set came from the cache is reported (`from_cache`).

Week 7's per-model body (`cross_model_one`: the sweep and the zero-alone ranks of one model) is a record part
(esa.phases.parts): the notebook and `make record ... PART=<model>` call the same function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from esa.data import Windows
from esa.errors import EsaError
from esa.evaluate import EvalResult, evaluate
from esa.models import LoadedModel
from esa.params import Profile
from esa.perturb import build_groups, run_sweep
from esa.perturb.advanced import single_weight_test
from esa.perturb.ops import PerturbSpec
from esa.perturb.sweep import TOP, group_composition, run_sweep_sequential
from esa.phases import criteria, parts
from esa.phases.plans import SINGLE_CONTROLS, cross_model_list, zero_alone_windows
from esa.recipes import Recipe
from esa.sensitivity.superweights import detect_superweights
from esa.stats.inference import analyze
from esa.stats.sequential import Design

log = logging.getLogger(__name__)

PRIMARY_METRIC = "grad_x_weight"


@dataclass
class ModelSweep:
    model: str
    family: str
    table: pd.DataFrame
    windows: pd.DataFrame
    stats: dict[str, Any]
    baseline: Any
    from_cache: dict[int, bool] = field(default_factory=dict)
    seconds: float = 0.0
    composition: pd.DataFrame = field(default_factory=pd.DataFrame)  # per group and seed: n, zero share, |w|
    selection: pd.DataFrame = field(default_factory=pd.DataFrame)  # the top-k table the sweep perturbed


def load_model(name: str, P: Profile) -> LoadedModel:
    return Recipe.of(P).load(name)


def topk_sets(lm: LoadedModel, model_name: str, P: Profile, metric: str = PRIMARY_METRIC, k: int | None = None,
              mode: str | None = None) -> tuple[pd.DataFrame, dict[int, Any], dict[int, bool]]:
    """(selection table over P.seeds, scores by seed, from_cache by seed) via Phase 2's engine cache."""
    sel, scores, cached, _ = Recipe.of(P).scored_topk(lm, model_name, metric, k, mode)
    for seed, hit in cached.items():
        if not hit:
            log.warning("%s %s seed %d: no cached Phase 2 scores matched; they were computed now (and cached)",
                        model_name, metric, seed)
    return sel, scores, cached


def eval_windows(lm: LoadedModel, P: Profile) -> Windows:
    return Recipe.of(P).evaluation_windows(lm, perturbation=True)


def specs_from_profile(P: Profile, perturbations: list[str] | None = None, scales: list[float] | None = None,
                       probs: list[float] | None = None) -> list[PerturbSpec]:
    return Recipe.of(P).perturb_specs(perturbations, scales, probs)


def feasible_k(inventory: list, k: int) -> int:
    """k capped at a quarter of the smallest matrix, so random_k can still draw k weights outside the top-k
    (tiny models' MoE routers have 128 weights; a per-matrix top-100 would leave 28)."""
    smallest = min(s.rows * s.cols for s in inventory)
    return max(1, min(k, smallest // 4))


def sweep_model(model_name: str, P: Profile, specs: list[PerturbSpec], controls: list[str] | None = None,
                metric: str = PRIMARY_METRIC, lm: LoadedModel | None = None, k: int | None = None,
                min_windows: int = 0) -> ModelSweep:
    """Top-k (cached) + controls -> sweep -> statistics, for one model (k: default the profile's top-k).
    min_windows: a sequential sweep's first look holds at least this many windows per seed (an analysis of
    the windows themselves, such as week 8's ranking stability, needs them even when a comparison is decided)."""
    t0 = time.perf_counter()
    lm = lm or load_model(model_name, P)
    sel, scores, cached = topk_sets(lm, model_name, P, metric, k=k)
    controls = list(P.controls if controls is None else controls)
    wins = eval_windows(lm, P)
    groups = build_groups(lm.model, lm.inventory, sel, P.seeds, controls, scores)
    if P.sequential:
        design = sweep_design(P, specs, controls, wins.n_windows, min_windows)
        res = run_sweep_sequential(lm.model, wins, groups, specs, lambda s: comparisons(s, controls), design,
                                   batch_size=P.batch_size, show_progress=False)
    else:
        res = run_sweep(lm.model, wins, groups, specs, batch_size=P.batch_size)
    stats = analyze(res.table, res.windows, sequential=res.sequential)
    table = res.table.assign(model=model_name)
    return ModelSweep(model_name, lm.info.family, table, res.windows.assign(model=model_name), stats,
                      res.baseline, cached, time.perf_counter() - t0,
                      group_composition(lm.model, groups).assign(model=model_name), sel)


def comparisons(spec: PerturbSpec, controls: list[str]) -> list[tuple[str, str, float]]:
    """What a sweep judges per perturbation: top-k against each control (P3.significance), and for sign_flip
    top-k against 5x random_k (P3.sign_flip_ratio)."""
    out = [(TOP, c, 1.0) for c in controls]
    if spec.kind() == "sign_flip" and "random_k" in controls:
        out.append((TOP, "random_k", criteria.RATIO_THRESHOLD))
    return out


def sweep_design(P: Profile, specs: list[PerturbSpec], controls: list[str], n_windows: int,
                 min_windows: int = 0) -> Design:
    """The sequential design of a sweep: looks at `first_windows` x seeds (doubling) up to every window, each
    comparison at alpha / m (Bonferroni over the sweep's m comparisons: valid for any stopping)."""
    S = len(P.seeds)
    m = sum(len(comparisons(s, controls)) for s in specs)
    first = max(int(P.sequential.get("first_windows", 2)), min_windows)
    return Design(alpha=criteria.ALPHA / max(1, m), n0=S * min(first, n_windows), n_max=S * n_windows,
                  spending=P.sequential.get("spending", "pocock"))


def zero_alone(lm: LoadedModel, P: Profile, selection: pd.DataFrame, metric: str = PRIMARY_METRIC,
               n_controls: int = SINGLE_CONTROLS, baseline: EvalResult | None = None,
               n_windows: int | None = None) -> pd.DataFrame:
    """The headline super-weight question for one model: the detector's strongest candidate and `metric`'s
    global top-1 (first seed), each zeroed alone against `n_controls` random single weights of its matrix, on
    the first `n_windows` perturbation windows (None: all). A row per tested weight (one when both are the
    same weight); a model the detector cannot read (no dense MLP down projections) gets only the metric's
    row, with the reason in `attrs["detector"]`. `baseline`: the unperturbed evaluation on every perturbation
    window (a sweep's `ModelSweep.baseline`), used when all of them are; else evaluated here."""
    targets: dict[tuple, list[str]] = {}
    note = ""
    try:
        sw = detect_superweights(lm.model, lm.tokenizer, lm.inventory)
        cands = sw[sw["candidate"]].sort_values("out_max", ascending=False)
        note = f"{len(cands)} candidate(s) flagged over {len(sw)} layers"
        if len(cands):
            c = cands.iloc[0]
            targets.setdefault((c["param"], int(c["row"]), int(c["col"]), -1), []).append("the detector's strongest candidate")
    except EsaError as e:
        note = str(e)
    first = selection[selection["seed"] == P.seeds[0]] if "seed" in selection else selection
    if len(first):
        t = first.sort_values("score", ascending=False, kind="stable").iloc[0]
        expert = int(t["expert"]) if "expert" in t and pd.notna(t["expert"]) else -1
        targets.setdefault((t["param"], int(t["row"]), int(t["col"]), expert), []).append(f"the {metric} top-1")
    ids = eval_windows(lm, P).ids
    if n_windows is not None and n_windows < len(ids):
        ids, baseline = ids[:n_windows], None  # the sweep's baseline is over every window
    if baseline is None:
        baseline = evaluate(lm.model, ids, batch_size=P.batch_size, show_progress=False)
    rows = [dict(tested=" and ".join(why), **single_weight_test(lm.model, lm.inventory, param, row, col, ids,
                                                               n_controls=n_controls, seed=P.seeds[0],
                                                               batch_size=P.batch_size, expert=expert,
                                                               baseline=baseline), windows=len(ids))
            for (param, row, col, expert), why in targets.items()]
    out = pd.DataFrame(rows)
    out.attrs["detector"] = note
    return out


# ------------------------------------------------------------------ week 7: one model, as a record part
CROSS_MODEL = "phase3_week7_cross_model"
_CROSS_KEYS = ("corpus", "dtype", "seqlen", "max_samples", "seeds", "topk", "mode", "batch_size", "candidate_depth",
               "keep_scores", "perturb_scale", "sequential")


def cross_model_controls(P: Profile) -> list[str]:
    return [c for c in P.controls if c in ("random_k", "bottom_k")]


def cross_model_specs(P: Profile) -> list[PerturbSpec]:
    return [PerturbSpec("sign_flip", scale=P.perturb_scale), PerturbSpec("zero")]


def cross_model_settings(P: Profile, model: str) -> dict[str, Any]:
    """What determines `cross_model_one(P, model)` (a part's settings)."""
    return parts.model_settings(P, model, _CROSS_KEYS, windows=P.perturb_eval_windows or P.eval_windows,
                                controls=cross_model_controls(P), metric=PRIMARY_METRIC,
                                zero_alone_windows=zero_alone_windows(P, model), single_controls=SINGLE_CONTROLS)


def cross_model_one(P: Profile, model: str) -> dict[str, Any]:
    """Week 7's body for one model: the top-k (capped by the smallest matrix) against random_k and bottom_k
    under sign flip and zero, and the zero-alone ranks on the sweep's windows. Only what the page reads."""
    lm = load_model(model, P)
    k = feasible_k(lm.inventory, P.topk)  # tiny models' routers are too small for the profile's k
    run = sweep_model(model, P, cross_model_specs(P), controls=cross_model_controls(P), lm=lm, k=k)
    one = zero_alone(lm, P, run.selection, baseline=run.baseline, n_windows=zero_alone_windows(P, model))
    return {"table": run.table, "zero_alone": one.assign(model=model, family=run.family), "stats": run.stats,
            "baseline": run.baseline.as_dict(), "family": run.family, "detector": one.attrs["detector"], "k": k}


parts.SPECS.register(parts.PartSpec(CROSS_MODEL, cross_model_list, cross_model_settings, cross_model_one))


def zero_alone_view(table: pd.DataFrame) -> pd.DataFrame:
    """The page's columns of `zero_alone` rows: which weight, what zeroing it alone does, and the controls."""
    view = table.assign(weight_at=[f"{p.removeprefix('model.')}[{r}, {c}]"
                                   for p, r, c in zip(table["param"], table["row"], table["col"], strict=True)])
    return view[["model", "tested", "weight_at", "weight", "windows", "base_ppl", "ppl", "delta_log_ppl",
                 "control_max", "n_controls", "p_value", "verdict"]]


def zero_alone_lines(table: pd.DataFrame, detector: dict[str, str]) -> list[str]:
    """One sentence per model from `zero_alone` rows: where the weight sits, what zeroing it alone does, and
    how that compares with the random single weights of its matrix."""
    lines = []
    for model, grp in table.groupby("model", sort=False):
        parts = []
        for r in grp.itertuples():
            ctl = (f"{r.n_controls} random single weights of its matrix: median {r.control_median:+.2g}, "
                   f"max {r.control_max:+.2g} nats")
            parts.append(f"{r.tested}, `{r.param}[{r.row}, {r.col}]` (w = {r.weight:.3g}), zeroed alone takes PPL "
                         f"{r.base_ppl:.4g} -> {r.ppl:.4g} ({r.delta_log_ppl:+.3g} nats/token); {ctl}; "
                         f"p = {r.p_value:.3g}: **{r.verdict}**")
        lines.append(f"- **{model}** (detector: {detector.get(model, '')}): " + "; ".join(parts) + ".")
    return lines
