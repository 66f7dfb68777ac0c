"""Phase 5, week 13a (pruning): every scorer side by side at equal sparsity, one evaluation, one criterion.

A `Study` (esa.phases.study) on the profile section `pruning`: `plan` expands it into conditions
(esa.apps.pruning.grid), `run` prunes and evaluates each in place (masks restored bit-exactly), and `criteria`
judges "ESA-guided pruning outperforms magnitude by >15%" per model as the contrast 0.85·Δ_magnitude − Δ_method
> 0 (Δ = log-PPL(pruned) − log-PPL(dense), unstructured, at the section's sparsity), over calibration seeds
(esa.stats.intervals.damage_contrast) or, with the profile's `sequential`, over (seed, window) pairs decided
in looks (esa.apps.pruning.sequential); Wanda and SparseGPT stand beside magnitude.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from esa.apps.pruning import (
    ALLOCATIONS,
    CALIBRATIONS,
    PruneSpec,
    critical_targets,
    evaluate_condition,
    export_pruned,
    get_method,
    grid,
    matched_gains,
    methods,
    prune,
    results_table,
    sentences,
)
from esa.apps.pruning import sequential as seq
from esa.apps.pruning.critical import critical_or_topk
from esa.apps.pruning.prune import check_shapes
from esa.apps.pruning.sparsity_patterns import parse_pattern
from esa.apps.pruning.tables import published_ppl, summary_tables
from esa.data import check_reachable, evaluation
from esa.errors import EsaError
from esa.models.loader import LoadedModel, inventory_without_weights
from esa.params import Profile, model_params
from esa.perturb.apply import weights_hash
from esa.phases import parts as record_parts
from esa.phases import study as st
from esa.phases.study import Plan, Planned, RunContext, Study, option, setting
from esa.recipes import Recipe
from esa.sensitivity.metrics import METRICS
from esa.sensitivity.select import MODES
from esa.stats.intervals import damage_contrast, decision_verdict
from esa.stats.verdicts import Criterion
from esa.store import write_json, write_parquet
from esa.zeroshot import ZeroShotTask, build_next_line, check_hub_tasks, engine

SENSITIVITY = ("grad_x_weight", "obd", "hutchinson_diag")  # the scorers the guide calls "ESA"
CRITERION = "P5.prune_gain"
BASELINES = ("magnitude", "wanda", "sparsegpt")


_METHODS = st.each(st.one_of(lambda: methods()), unique=True)
_SPARSITY = st.fraction("a sparsity (the share of weights pruned)")


@dataclass(frozen=True)
class Settings:
    """The profile section `pruning` (every key optional; None means "the profile's value")."""

    models: list[str] | None = None  # None: the profile's models (or the notebook's `models`)
    methods: list[str] = setting(check=st.each(st.one_of(lambda: methods()), nonempty=True, unique=True), factory=lambda: [
        "magnitude", "wanda", "sparsegpt", "grad_x_weight", "obd", "hutchinson_diag", "random"])
    sparsity: float = setting(0.5, _SPARSITY)  # the main table and the criterion
    sweep: list[float] = setting(check=st.each(_SPARSITY), factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    sweep_methods: list[str] | None = setting(None, _METHODS)  # None: methods
    patterns: list[str] = setting(check=st.each(lambda p, w: _nm(p, w)), factory=lambda: ["2:4", "4:8"])
    pattern_methods: list[str] | None = setting(None, _METHODS)  # None: methods
    owl_sparsity: float = setting(0.7, _SPARSITY)
    owl_methods: list[str] = setting(check=_METHODS, factory=lambda: ["wanda"])  # each also run uniform there
    protect: bool = True  # ESA-guided: the same scorers with the critical set never pruned
    protect_methods: list[str] = setting(check=_METHODS, factory=lambda: ["grad_x_weight", "obd", "magnitude"])
    protect_metric: str = setting("grad_x_weight", st.one_of(lambda: METRICS))  # whose top-k (first seed) is protected
    protect_topk: int | None = setting(None, st.optional(st.at_least(0)))  # None: the profile's topk
    protect_mode: str | None = setting(None, st.optional(st.one_of(lambda: MODES)))  # None: the profile's mode
    superweights: bool = True  # the super-weight detector's candidates are protected too
    calibration: str | None = None  # "sequential" | "one-shot"; None: each method's default (gradients: one-shot)
    calib_seeds: list[int] = setting(check=st.each(st.seed_value, nonempty=True, unique=True), factory=lambda: [0, 1, 2])
    calib_windows: int = setting(8, st.at_least(1))
    calib_seqlen: int | None = setting(None, st.optional(st.at_least(2)))
    calib_corpus: str | None = setting(None, st.optional(st.corpus))
    eval_windows: int | None = setting(None, st.optional(st.at_least(1)))  # None: the profile's (null there: all)
    eval_seqlen: int | None = setting(None, st.optional(st.at_least(2)))
    eval_corpus: str | None = setting(None, st.optional(st.corpus))
    zeroshot_items: int = setting(64, st.at_least(0))  # 0: no zero-shot task
    zeroshot_corpus: str = setting("shakespeare", st.corpus)  # the next-line task needs a play's speeches
    zeroshot_tasks: list[str] = setting(factory=list)  # lm-eval tasks from the hub, beside the next-line task
    esa_methods: list[str] = setting(check=_METHODS, factory=lambda: list(SENSITIVITY))  # judged by the criterion
    threshold: float = setting(0.15, st.finite)
    min_damage: float = setting(0.01, st.at_least(0))  # nats: findings call a baseline doing less "no damage"
    alpha: float = setting(0.01, st.fraction("a level"))  # of the criterion's one-sided bound
    batch_size: int | None = setting(None, st.optional(st.at_least(1)))
    machinery_only: bool = False  # smoke budgets: verdicts are machinery-only (the numbers are still shown)
    reference: dict[str, Any] = field(default_factory=dict)  # published PPL: {pattern: {method: ppl}}
    reference_source: str = ""
    reference_tolerance: float = setting(0.1, st.at_least(1e-12))  # PPL


def _nm(p: str, where: str) -> None:
    if parse_pattern(p).kind != "nm":
        raise EsaError(f"{where} lists N:M patterns (e.g. 2:4); {p!r} is not one")


def settings(profile: Profile, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The profile's section `pruning` (+ overrides), typed and validated: one EsaError on the first bad value."""
    S = st.build_settings(profile, "pruning", Settings, overrides)
    for pat, by_method in S.reference.items():
        parse_pattern(pat)
        if not isinstance(by_method, dict):
            raise EsaError(f"pruning.reference.{pat} must map method (or 'dense') to a PPL, got {by_method!r}")
        for m in set(by_method) - {"dense"}:
            get_method(m)
    conditions(S, profile)  # every PruneSpec is built (and so checked) here
    check_hub_tasks(S.zeroshot_tasks, "pruning.zeroshot_tasks")
    return S


# ---------------------------------------------------------------- conditions
def _defaults(P: Profile) -> grid.Defaults:
    return grid.Defaults(P.corpus, P.seqlen, P.batch_size, P.hutchinson_probes)


def conditions(S: Settings, P: Profile) -> list[grid.Condition]:
    return grid.conditions(S, _defaults(P))  # the section's (spec, protected) pairs, each over the seeds


def plan(S: Settings, P: Profile, models: Sequence[str] | None = None) -> Plan:
    """What a run of the section computes, without loading anything (the dry run prints it). Sequential: a
    compared condition is planned at its cap (the worst case), any other at the first look's windows."""
    chosen, n_eval, seqlen = list(models or S.models or P.models), S.eval_windows or P.eval_windows or 0, \
        S.eval_seqlen or P.seqlen
    notes = st.hub_notes({S.calib_corpus or P.corpus, S.eval_corpus or P.corpus}
                         | ({S.zeroshot_corpus} if S.zeroshot_items else set()), chosen)
    notes += [f"lm-eval hub tasks {', '.join(S.zeroshot_tasks)}: need the hub (or a local HF cache)"] * bool(
        S.zeroshot_tasks)
    notes += [f"reference ({S.reference_source}): {S.reference}; pass = within {S.reference_tolerance:g} PPL"] * bool(
        S.reference)
    first = min(n_eval, int(P.sequential.get("first_windows", 2))) if P.sequential else n_eval
    # every condition, dense included, also scores the next-line task once (the tables average it per method):
    # priced per item (costs kind `zeroshot`); at 64 items it costs about 70 evaluation windows of 256 tokens
    zs = S.zeroshot_items
    notes += [f"zero-shot: the next-line task ({zs} items x 4 candidates, lm-eval) is scored once on every "
              "condition, dense included; each condition's prediction includes it"] * bool(zs)

    def row(m: str, label: str, n: int, serves: tuple[str, ...]) -> Planned:
        return Planned(m, label, n, "windows", serves, seqlen=seqlen, once=(("zeroshot", zs),) if zs else ())

    planned = []
    for m in chosen:
        planned.append(row(m, "dense", n_eval, (CRITERION,)))
        for c in conditions(S, P):
            decides = grid.serves(c, S.sparsity, (*S.esa_methods, *BASELINES))
            planned.append(row(m, f"{c.spec.label()}{' [protected]' * c.protected} seed={c.spec.calib_seed} "
                                  f"calib={c.spec.calibration}", n_eval if decides else first, (CRITERION,) * decides))
    setup = {"calibration": dict(corpus=S.calib_corpus or P.corpus, seqlen=S.calib_seqlen or P.seqlen,
                                 windows=S.calib_windows, seeds=list(S.calib_seeds)),
             "evaluation": dict(corpus=S.eval_corpus or P.corpus, seqlen=seqlen, windows=n_eval,
                                zeroshot_items=S.zeroshot_items, zeroshot_tasks=list(S.zeroshot_tasks), sequential=P.sequential or "no (fixed n)")}
    return Plan("pruning", P, chosen, S, planned, setup, notes)


# ---------------------------------------------------------------- one model
@dataclass
class ModelPruning:
    model: str
    rows: pd.DataFrame  # one row per evaluated condition (dense included)
    tables: dict[str, pd.DataFrame]
    critical: dict[str, Any]
    evaluation: dict[str, Any]
    zeroshot: dict[str, Any]
    restored: bool  # weights hash after == before
    seconds: float = 0.0
    pruned: list[Any] = field(default_factory=list)  # the PruneResults (masks), only when run_model(keep=True)
    decisions: pd.DataFrame | None = None  # sequential evaluation: one row per comparison of the criterion


def eval_windows(lm: LoadedModel, S: Settings, P: Profile) -> Any:
    n = S.eval_windows if S.eval_windows is not None else P.eval_windows
    return evaluation(lm.tokenizer, S.eval_corpus or P.corpus, S.eval_seqlen or P.seqlen, n_windows=n, seed=0,
                      max_positions=lm.info.max_positions or None)


def protected_set(lm: LoadedModel, name: str, S: Settings, P: Profile) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The critical set: super-weight candidates + the top-k of `protect_metric` (Phase 2's cached scores)."""
    R = Recipe.of(P)
    k = S.protect_topk if S.protect_topk is not None else P.topk
    mode = S.protect_mode or P.mode
    scores, from_cache = None, None
    if k:
        run = R.score_model(lm, name, [S.protect_metric], seeds=[P.seeds[0]])[(S.protect_metric, P.seeds[0])]
        scores, from_cache = run.full(), run.from_cache
    crit, note = critical_or_topk(lm, scores, k, mode, S.superweights, S.protect_metric)
    info = {"label": crit.label, "n_protected": len(crit.table), "metric": S.protect_metric, "topk": k, "mode": mode,
            "score_seed": P.seeds[0], "scores_from_cache": from_cache, "note": note,
            "by_source": crit.table["source"].value_counts().to_dict()}
    return crit.targets, info


def run_model(name: str, P: Profile, S: Settings, lm: LoadedModel | None = None, show_progress: bool = False,
              conds: list[grid.Condition] | None = None, protect: tuple[dict, dict] | None = None,
              keep: bool = False) -> ModelPruning:
    """Every condition of the section (or `conds`) on model `name`: prune, evaluate in place, restore (checked).
    `protect`: (targets, description) of the critical set, instead of the section's; `keep`: keep the masks."""
    t0 = time.perf_counter()
    conds = conditions(S, P) if conds is None else conds
    lm = lm or Recipe.of(P).load(name)
    before = weights_hash(lm.model)
    windows = eval_windows(lm, S, P)
    task: ZeroShotTask | None = build_next_line(S.zeroshot_corpus, n_items=S.zeroshot_items) if S.zeroshot_items else None
    targets, crit = protect or ({}, {"label": "none", "n_protected": 0})
    if protect is None and S.protect and any(c.protected for c in conds):
        targets, crit = protected_set(lm, name, S, P)
    bs, hub = S.batch_size or P.batch_size, tuple(S.zeroshot_tasks)
    rows, kept, decisions = [] if P.sequential else [evaluate_condition(lm, None, windows, task, batch_size=bs,
                                                                        hub_tasks=hub)], [], None
    for c in conds:  # fixed n: each condition pruned, evaluated on every window, its masks dropped
        spec = replace(c.spec, protect=crit["label"]) if c.protected else c.spec
        res = prune(lm, spec, protect=targets if c.protected else None, model_ref=name, show_progress=show_progress)
        if not P.sequential:
            rows.append(evaluate_condition(lm, res, windows, task, batch_size=bs, show_progress=show_progress,
                                           hub_tasks=hub))
        kept += [res] if keep or P.sequential else []
    if P.sequential:  # sequential: windows go to the criterion's comparisons until each is decided
        prot = {m for m in S.esa_methods if S.protect and m in S.protect_methods and any(
            c.protected and c.spec.method == m for c in conds)}
        comps = seq.comparisons_of(dict(enumerate(conds)), S.esa_methods, BASELINES, S.sparsity, prot, S.threshold)
        table, decisions = seq.run(lm, windows, bs, kept, comps, task, S.alpha, P.sequential, hub)
        kept = kept if keep else []
    else:
        table = results_table(rows)
    table["model"] = name
    restored = weights_hash(lm.model) == before
    if not restored:
        raise EsaError(f"{name}: the weights differ from the dense model after pruning and evaluation "
                       "(a mask was not restored bit-exactly)")
    return ModelPruning(name, table, tables(table, S), crit, windows.describe(),
                        task.describe() if task is not None else {}, restored, time.perf_counter() - t0, kept, decisions)


def tables(table: pd.DataFrame, S: Settings) -> dict[str, pd.DataFrame]:
    return summary_tables(table, S.sparsity, S.sweep_methods or S.methods, S.pattern_methods or S.methods,
                          S.owl_sparsity, S.owl_methods, S.protect_methods if S.protect else None)


def run(p: Plan) -> dict[str, ModelPruning]:
    """Every model of the plan, one after the other (each loaded, pruned condition by condition, restored)."""
    return {m: run_model(m, p.profile, p.settings) for m in p.models}


# ---------------------------------------------------------------- the criterion
def criterion_rows(table: pd.DataFrame, S: Settings, evidence: str,
                   decisions: pd.DataFrame | None = None) -> tuple[list[Criterion], pd.DataFrame]:
    """Scorecard rows: each ESA scorer (protected if run, else plain) vs magnitude (the guide's criterion),
    and beside it vs Wanda and SparseGPT; plus the per-seed gains they rest on. With `decisions` (a
    sequential run's, column `model`), each row is that comparison's decision over (seed, window) pairs."""
    rows, detail = [], []
    for model in table["model"].unique():
        tm = table[table["model"] == model]
        for m in S.esa_methods:
            protected = bool(S.protect and m in S.protect_methods and (tm["method"].eq(m) & tm["protected"].ne("none")).any())
            for base in BASELINES:
                if base == m:
                    continue
                cmp = matched_gains(tm, m, base, S.sparsity, protected)
                if not cmp.empty:
                    detail.append(cmp.assign(protected_method=protected))
                dm = cmp["delta_log_ppl"].tolist() if not cmp.empty else []
                db = cmp["delta_log_ppl_baseline"].tolist() if not cmp.empty else []
                tag = f"{m}{'+protect' if protected else ''}"
                v = damage_contrast(dm, db, S.threshold, S.alpha, S.machinery_only) if decisions is None else \
                    decision_verdict(decisions[(decisions["model"] == model) & (decisions["comparison"]
                                                                                 == f"{tag}.vs_{base}")], S.machinery_only)
                text = (f"ESA-guided pruning outperforms {base} pruning by >{S.threshold:.0%} ({tag}, {model}, "
                        f"{S.sparsity:.0%} unstructured)")
                if base != "magnitude":
                    text = f"beside the criterion: {tag} vs {base} ({model}, {S.sparsity:.0%} unstructured)"
                note = f"Δ = log-PPL(pruned) − log-PPL(dense) for {tag} and {base}; {v.note}"
                rows.append(Criterion(f"P5.prune_gain.{tag}.vs_{base}.{model}", 5, text,
                                      None if v.measured is None else round(v.measured, 4),
                                      f"> 0: one-sided {1 - S.alpha:.0%} lower bound of {1 - S.threshold:g}·Δ{base} − Δ{tag}",
                                      v.passed, evidence, note, verdict=v.verdict))
    return rows, (pd.concat(detail, ignore_index=True) if detail else pd.DataFrame())


def reference_rows(mp: ModelPruning, S: Settings, evidence: str) -> list[Criterion]:
    """The GPU reproduction: each published PPL matched within `reference_tolerance` (first calibration seed)."""
    out = []
    t = mp.rows
    for pat, by_method in S.reference.items():
        for method, published in by_method.items():
            sparsity = S.sparsity if pat == "unstructured" else parse_pattern(pat).sparsity
            got = published_ppl(t, method, parse_pattern(pat).label, sparsity, S.calib_seeds[0])
            passed = None if got is None or not math.isfinite(got) else abs(got - float(published)) <= S.reference_tolerance
            out.append(Criterion(f"P5.reproduce.{mp.model}.{pat}.{method}", 5,
                                 f"reproduce {S.reference_source or 'the published'} {method} {pat} PPL {published}",
                                 got, f"within {S.reference_tolerance:g} of {published}", passed, evidence,
                                 "" if got is not None else "condition not run", verdict="" if got is not None else "not estimable"))
    return out


def criteria(results: Mapping[str, ModelPruning], p: Plan, evidence: str) -> list[Criterion]:
    """The gain rows over every model, and the reproduction rows where the section names published numbers."""
    rows, _ = criterion_rows(pd.concat([r.rows for r in results.values()], ignore_index=True), p.settings, evidence,
                             _decisions(results))
    for m, r in results.items():
        rows += reference_rows(r, p.settings, f"{evidence} ({m})") if p.settings.reference else []
    return rows


def _decisions(results: Mapping[str, ModelPruning]) -> pd.DataFrame | None:
    parts = [r.decisions.assign(model=m) for m, r in results.items() if r.decisions is not None]
    return pd.concat(parts, ignore_index=True) if parts else None


def findings(results: Mapping[str, ModelPruning], p: Plan) -> list[str]:
    """Markdown sentences computed from the numbers, one paragraph per model."""
    S = p.settings
    _, detail = criterion_rows(pd.concat([r.rows for r in results.values()], ignore_index=True), S, "")
    return [sentences.paragraph(mp.model, mp.tables, mp.critical, detail[detail["model"] == mp.model] if len(detail)
                                else detail, S.sparsity, S.min_damage) for mp in results.values()]


# ---------------------------------------------------------------- one model, as a record part
NOTEBOOK = "phase5_week13_pruning"
_PART_KEYS = ("corpus", "dtype", "seqlen", "eval_windows", "max_samples", "seeds", "topk", "mode", "batch_size",
              "candidate_depth", "keep_scores", "hutchinson_probes", "sequential")


def part_models(P: Profile, models: Sequence[str]) -> list[str]:
    """The notebook's models: the section's `models`, else the schedule's."""
    S = settings(P, None)
    return plan(S, P, None if S.models else list(models)).models


def part_settings(P: Profile, model: str) -> dict[str, Any]:
    """What determines `run_model(model, P, settings(P))`: the section and the profile keys it reads."""
    return record_parts.model_settings(P, model, _PART_KEYS, pruning=asdict(settings(P, None)))


def as_result(mp: ModelPruning) -> dict[str, Any]:
    """A ModelPruning as a part stores it (tables and plain values; no masks)."""
    return {"rows": mp.rows, **{f"tables.{k}": v for k, v in mp.tables.items()}, "critical": mp.critical,
            "evaluation": mp.evaluation, "zeroshot": mp.zeroshot, "restored": mp.restored, "seconds": mp.seconds,
            "decisions": mp.decisions}


def from_result(model: str, r: Mapping[str, Any]) -> ModelPruning:
    """`as_result`'s inverse (a part's, or a model computed in the notebook)."""
    tables = {k.split(".", 1)[1]: v for k, v in r.items() if k.startswith("tables.")}
    return ModelPruning(model, r["rows"], tables, r["critical"], r["evaluation"], r["zeroshot"], r["restored"],
                        r["seconds"], [], r.get("decisions"))


record_parts.SPECS.register(record_parts.PartSpec(NOTEBOOK, part_models, part_settings,
                                                  lambda P, model: as_result(run_model(model, P, settings(P, None)))))


# ---------------------------------------------------------------- esa-runner
@dataclass(frozen=True)
class PruneRequest:
    """esa-runner's pruning flags (the command layer builds them from these fields)."""

    prune: str | None = option("prune with a registered scorer or reconstructor", choices=lambda: methods(),
                               metavar="METHOD")
    sparsity: float | None = option("share of weights pruned, in (0, 1) (default: the profile's pruning.sparsity)",
                                    check=_SPARSITY)
    pattern: str | None = option("unstructured | N:M, e.g. 2:4, 4:8 (N pruned in every M inputs of a row)")
    allocation: str | None = option("layer-wise sparsity", choices=lambda: ALLOCATIONS)
    protect_critical: bool = option("never prune the critical set: super-weight candidates + the top-k of the "
                                    "first --metric", default=False)
    calibration: str | None = option("default: the method's", choices=lambda: CALIBRATIONS)
    export_pruned: str | None = option("also save the pruned model as a safetensors folder", metavar="DIR",
                                       check=st.new_path)
    zeroshot_items: int | None = option("items of the offline next-line task, scored by lm-eval (0: none; default: "
                                        "the profile's pruning.zeroshot_items)", check=st.at_least(0))
    zeroshot_tasks: list[str] | None = option("lm-eval tasks from the hub scored beside it, comma list (needs the hub "
                                              "or a local HF cache)", metavar="TASKS",
                                              accepts="a comma list of lm-eval task names, e.g. hellaswag,arc_easy")


@dataclass(frozen=True)
class PruneJob:
    """esa-runner's pruning request, validated: the condition, its protection, evaluation and export."""

    spec: PruneSpec
    settings: Settings = field(default_factory=Settings)
    protect_critical: bool = False
    export_dir: str | None = None

    def describe(self) -> str:
        return f"{self.spec.label()} calib={self.spec.calibration}"


def job(req: PruneRequest, ctx: RunContext) -> PruneJob:
    """Every value checked against the run before anything is loaded; one EsaError on the first bad one."""
    profile, R = ctx.profile, ctx.recipe
    S = settings(profile)
    pattern = req.pattern or "unstructured"
    sparsity = S.sparsity if req.sparsity is None and parse_pattern(pattern).kind != "nm" else req.sparsity
    P = replace(profile, batch_size=R.batch_size)
    # common flags given on the command line win over the section: --corpus, --seqlen, --max-samples calibrate too
    given = ctx.explicit
    S = replace(S, calib_corpus=R.corpus if "corpus" in given else S.calib_corpus,
                calib_seqlen=R.seqlen if "seqlen" in given else S.calib_seqlen,
                calib_windows=R.max_samples if "max_samples" in given else S.calib_windows,
                eval_corpus=None, protect=req.protect_critical,
                zeroshot_items=S.zeroshot_items if req.zeroshot_items is None else req.zeroshot_items,
                zeroshot_tasks=req.zeroshot_tasks or S.zeroshot_tasks)
    check_hub_tasks(S.zeroshot_tasks)
    spec = grid.base_spec(S, _defaults(P), req.prune, sparsity, pattern, req.allocation or "uniform",  # type: ignore[arg-type]
                     calibration=req.calibration)
    check_shapes(spec, inventory_without_weights(model_params(ctx.model).ref), R.topk if req.protect_critical else None,
                 R.mode, S.superweights)
    if not ctx.dry_run and spec.uses_calibration:
        check_reachable(spec.corpus, f"--prune {spec.method}", "; use --corpus shakespeare (or a local text file), or "
                        "a data-free method (magnitude, random)")
    return PruneJob(spec, S, bool(req.protect_critical), req.export_pruned)


def run_job(job: PruneJob, cmd: Any, lm: LoadedModel, runs: Any, stage: Path) -> dict[str, Any]:
    """esa-runner's pruning: the study's run_model on one condition (+ dense), the critical set from the run's
    first metric and seed, evaluated on the recipe's windows; its tables into `stage`."""
    R = cmd.recipe
    protect = None
    if job.protect_critical:
        c = critical_targets(lm, runs[(R.metrics[0], R.seeds[0])].full(), topk=R.topk, mode=R.mode, metric=R.metrics[0])
        protect = (c.targets, {"label": c.label, "n_protected": len(c.table)})
    P = Profile(name=cmd.profile, corpus=R.corpus, seqlen=R.seqlen, eval_windows=R.eval_windows, batch_size=R.batch_size,
                hutchinson_probes=R.hutchinson_probes)
    mp = run_model(cmd.model, P, job.settings, lm=lm, show_progress=R.show_progress, keep=True,
                   conds=[grid.Condition(job.spec, job.protect_critical)], protect=protect)
    res, (d, p) = mp.pruned[0], mp.rows.to_dict("records")
    write_parquet(stage / "pruning.parquet", mp.rows.assign(run_id=cmd.run_id))
    write_parquet(stage / "pruning_masks.parquet", res.masks.per_matrix(lm.inventory).assign(model=cmd.model))
    write_json(stage / "pruning.json", res.summary())
    if job.export_dir:
        export_pruned(lm, res, job.export_dir, card={"esa-runner": cmd.flags})
    return {"spec": asdict(res.spec), "mask_key": res.key, "achieved_sparsity": res.achieved_sparsity,
            "calibration": res.calibration.get("mode"), "protected": mp.critical, "dense_ppl": d["ppl"], "ppl": p["ppl"],
            "dense_accuracy": d["accuracy"], "accuracy": p["accuracy"], "evaluation": mp.evaluation,
            "zeroshot": {"task": mp.zeroshot, "engine": engine(),
                         **{k: {"dense": d[k], "pruned": p[k]} for k in d if k.startswith("zs_") and k != "zs_task"}},
            "files": ["pruning.parquet", "pruning_masks.parquet", "pruning.json"], "export": job.export_dir,
            "timings": {k: v for k, v in res.timings.items() if k != "blocks"}}


STUDY = Study(name="prune", title="pruning (Phase 5, week 13a)", Request=PruneRequest, trigger=("prune",),
              settings=settings, plan=plan, run=run, criteria=criteria, findings=findings, job=job, run_job=run_job)
