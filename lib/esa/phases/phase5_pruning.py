"""Phase 5, week 13a (pruning): every scorer side by side at equal sparsity, one evaluation, one criterion.

The profile section `pruning` (`Settings`) says what one model's study runs; `conditions` expands it into
pruning conditions (the 50% table, the sparsity sweep, N:M, OWL, protected vs unprotected, each over the
calibration seeds; seed-free conditions once), `run_model` prunes and evaluates each in place (masks
restored bit-exactly after each) and returns `ModelPruning` with its tidy rows and summary tables, and
`criterion_rows` judges the guide's ">15% better than magnitude":

    gain = 1 - Delta_method / Delta_baseline,  Delta = log-PPL(pruned) - log-PPL(dense),

at the section's `sparsity` (50%) unstructured, per model and calibration seed (esa.apps.pruning.criterion),
summarised as the mean over seeds with a 95% t-interval. PASS: the interval's lower end is above the
threshold (0.15); FAIL: its upper end is below; underpowered: fewer than 2 seeds, or the interval contains
the threshold; not estimable: the baseline does no damage above `min_damage` (a denominator within noise)
or a log-PPL is not finite. The same comparison against Wanda and SparseGPT is shown beside it.

`APP` is the esa-runner plug-in: `--prune METHOD --sparsity S --pattern unstructured|2:4|4:8 --allocation
uniform|owl --protect-critical [--calibration sequential|one-shot] [--export-pruned DIR] [--dry-run]`.
Every value is checked in `resolve`, before any model is loaded; `--dry-run` prints the plan of the
profile's pruning section (at `--profile extended`: the GPU reproduction of the Wanda README's Llama-2-7B
row) with every setting checked, and exits without loading a model.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from esa.apps.pruning import (
    PruneSpec,
    criterion,
    critical_targets,
    evaluate_condition,
    export_pruned,
    get_method,
    prune,
    results_table,
)
from esa.apps.pruning.patterns import check_divides, parse_pattern
from esa.apps.pruning.prune import pruned_specs
from esa.data import check_corpus, evaluation
from esa.errors import EsaError, unknown
from esa.models.inventory import WeightSpec
from esa.models.loader import LoadedModel, inventory_without_weights
from esa.params import Profile, check_seed, model_params, section
from esa.perturb.apply import weights_hash
from esa.phases.apps import App
from esa.recipes import Recipe
from esa.sensitivity.metrics import METRICS
from esa.sensitivity.select import MODES
from esa.stats.verdicts import Criterion
from esa.store import write_json, write_parquet
from esa.zeroshot import ZeroShotTask, build_next_line

SENSITIVITY = ("grad_x_weight", "obd", "hutchinson_diag")  # the scorers the guide calls "ESA"
HUB_CORPORA = ("wikitext2", "c4")


@dataclass(frozen=True)
class Settings:
    """The profile section `pruning` (every key optional; None means "the profile's value")."""

    models: list[str] | None = None  # None: the profile's models (or the notebook's `models`)
    methods: list[str] = field(default_factory=lambda: ["magnitude", "wanda", "sparsegpt", "grad_x_weight", "obd",
                                                        "hutchinson_diag", "random"])
    sparsity: float = 0.5  # the main table and the criterion
    sweep: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    sweep_methods: list[str] | None = None  # None: methods
    patterns: list[str] = field(default_factory=lambda: ["2:4", "4:8"])
    pattern_methods: list[str] | None = None  # None: methods
    owl_sparsity: float = 0.7
    owl_methods: list[str] = field(default_factory=lambda: ["wanda"])  # each also run uniform at owl_sparsity
    protect: bool = True  # ESA-guided: the same scorers with the critical set never pruned
    protect_methods: list[str] = field(default_factory=lambda: ["grad_x_weight", "obd", "magnitude"])
    protect_metric: str = "grad_x_weight"  # whose top-k (Phase 2 score cache, first profile seed) is protected
    protect_topk: int | None = None  # None: the profile's topk
    protect_mode: str | None = None  # None: the profile's mode
    superweights: bool = True  # the super-weight detector's candidates are protected too
    calibration: str | None = None  # "sequential" | "one-shot"; None: each method's default (gradients: one-shot)
    calib_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    calib_windows: int = 8
    calib_seqlen: int | None = None
    calib_corpus: str | None = None
    eval_windows: int | None = None  # None: the profile's eval_windows (null there: every window)
    eval_seqlen: int | None = None
    eval_corpus: str | None = None
    zeroshot_items: int = 64  # 0: no zero-shot task
    zeroshot_corpus: str = "shakespeare"  # the next-line task needs a play's speeches
    esa_methods: list[str] = field(default_factory=lambda: list(SENSITIVITY))  # judged by the criterion
    threshold: float = 0.15
    min_damage: float = 0.01  # nats: a baseline damaging less is a denominator within noise
    batch_size: int | None = None
    machinery_only: bool = False  # smoke budgets: verdicts are machinery-only (the numbers are still shown)
    reference: dict[str, Any] = field(default_factory=dict)  # published PPL: {pattern: {method: ppl}}
    reference_source: str = ""
    reference_tolerance: float = 0.1  # PPL


def settings(profile: Profile) -> Settings:
    """The validated section (types by esa.params.section, meaning here): one EsaError on the first bad value."""
    S = section(profile, "pruning", Settings)
    check_settings(S, profile)
    return S


def _methods(names: list[str], what: str) -> None:
    for m in names:
        get_method(m)  # unknown -> one line with the registered ones
    if len(set(names)) != len(names):
        raise EsaError(f"pruning.{what} has duplicates: {names}")


def _fraction(value: float, what: str) -> None:
    if not (math.isfinite(value) and 0 < value < 1):
        raise EsaError(f"pruning.{what} must be a sparsity in (0, 1) (the share of weights pruned), got {value!r}")


def check_settings(S: Settings, P: Profile) -> None:
    if not S.methods:
        raise EsaError("pruning.methods is empty; accepted: registered pruning methods, e.g. magnitude, wanda")
    _methods(S.methods, "methods")
    for what in ("sweep_methods", "pattern_methods", "owl_methods", "protect_methods", "esa_methods"):
        _methods(getattr(S, what) or [], what)
    _fraction(S.sparsity, "sparsity")
    _fraction(S.owl_sparsity, "owl_sparsity")
    for s in S.sweep:
        _fraction(s, "sweep")
    for p in S.patterns:
        if parse_pattern(p).kind != "nm":
            raise EsaError(f"pruning.patterns lists N:M patterns (e.g. 2:4); {p!r} is not one")
    if S.protect_metric not in METRICS:
        raise unknown("pruning.protect_metric", S.protect_metric, METRICS)
    if (S.protect_mode or P.mode) not in MODES:
        raise unknown("pruning.protect_mode", S.protect_mode, MODES)
    if (S.protect_topk if S.protect_topk is not None else P.topk) < 0:
        raise EsaError(f"pruning.protect_topk must be >= 0, got {S.protect_topk}")
    if not S.calib_seeds:
        raise EsaError("pruning.calib_seeds is empty; give at least one seed, e.g. [0]")
    for s in S.calib_seeds:
        check_seed(s, "pruning.calib_seeds")
    if len(set(S.calib_seeds)) != len(S.calib_seeds):
        raise EsaError(f"pruning.calib_seeds has duplicates: {S.calib_seeds}")
    for name in ("calib_windows", "zeroshot_items"):
        low = 1 if name == "calib_windows" else 0
        if getattr(S, name) < low:
            raise EsaError(f"pruning.{name} must be an integer >= {low}, got {getattr(S, name)}")
    for name in ("calib_seqlen", "eval_seqlen", "eval_windows", "batch_size"):
        v = getattr(S, name)
        if v is not None and v < (2 if "seqlen" in name else 1):
            raise EsaError(f"pruning.{name} must be a positive integer or null, got {v}")
    for c in (S.calib_corpus, S.eval_corpus, S.zeroshot_corpus):
        if c is not None:
            check_corpus(c)
    if not (math.isfinite(S.threshold) and S.min_damage >= 0 and S.reference_tolerance > 0):
        raise EsaError("pruning.threshold must be finite, min_damage >= 0 and reference_tolerance > 0")
    for pat, by_method in S.reference.items():
        parse_pattern(pat)
        if not isinstance(by_method, dict):
            raise EsaError(f"pruning.reference.{pat} must map method (or 'dense') to a PPL, got {by_method!r}")
        for m in by_method:
            if m != "dense":
                get_method(m)
    conditions(S, P)  # every PruneSpec is built (and so checked) here


# ---------------------------------------------------------------- conditions
@dataclass(frozen=True)
class Condition:
    spec: PruneSpec
    protected: bool = False

    def key(self) -> tuple:
        return (tuple(sorted(asdict(self.spec).items())), self.protected)


def base_spec(S: Settings, P: Profile, method: str, sparsity: float | None, pattern: str = "unstructured",
              allocation: str = "uniform", seed: int | None = None, calibration: str | None = None) -> PruneSpec:
    method_obj = get_method(method)
    calib = calibration or S.calibration
    if calib is not None and method_obj.needs == "weights":
        calib = None  # data-free: the mode does not apply
    return PruneSpec(method, sparsity=sparsity, pattern=pattern, allocation=allocation, calibration=calib,
                     corpus=S.calib_corpus or P.corpus, seqlen=S.calib_seqlen or P.seqlen, n_calib=S.calib_windows,
                     calib_seed=S.calib_seeds[0] if seed is None else seed, batch_size=S.batch_size or P.batch_size,
                     probes=P.hutchinson_probes)


def seed_dependent(spec: PruneSpec) -> bool:
    """Whether the calibration seed changes the masks (data-free magnitude does not; random does)."""
    return spec.uses_calibration or spec.method == "random"


def conditions(S: Settings, P: Profile) -> list[Condition]:
    """Every (spec, protected) the section asks for, each over the calibration seeds, without repeats."""
    wanted: list[tuple[str, float | None, str, str, bool]] = []  # method, sparsity, pattern, allocation, protected
    wanted += [(m, S.sparsity, "unstructured", "uniform", False) for m in S.methods]
    wanted += [(m, s, "unstructured", "uniform", False) for m in (S.sweep_methods or S.methods) for s in S.sweep]
    wanted += [(m, None, p, "uniform", False) for m in (S.pattern_methods or S.methods) for p in S.patterns]
    for m in S.owl_methods:
        wanted += [(m, S.owl_sparsity, "unstructured", a, False) for a in ("uniform", "owl")]
    if S.protect:
        wanted += [(m, S.sparsity, "unstructured", "uniform", True) for m in S.protect_methods]
        wanted += [(m, S.sparsity, "unstructured", "uniform", False) for m in S.protect_methods]
    out: dict[tuple, Condition] = {}
    for method, sp, pat, alloc, protected in wanted:
        for seed in S.calib_seeds:
            spec = base_spec(S, P, method, sp, pat, alloc, seed)
            if not seed_dependent(spec) and seed != S.calib_seeds[0]:
                continue
            c = Condition(spec, protected)
            out.setdefault(c.key(), c)
    return list(out.values())


def plan(S: Settings, P: Profile, models: list[str] | None = None) -> dict[str, Any]:
    """What a run of the section computes, without loading anything (the dry run prints it)."""
    conds = conditions(S, P)
    corpora = {S.calib_corpus or P.corpus, S.eval_corpus or P.corpus} | ({S.zeroshot_corpus} if S.zeroshot_items else set())
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return {
        "profile": P.name, "models": list(models or S.models or P.models),
        "n_conditions": len(conds), "n_evaluations_per_model": len(conds) + 1,
        "calibration": {"corpus": S.calib_corpus or P.corpus, "seqlen": S.calib_seqlen or P.seqlen,
                        "windows": S.calib_windows, "seeds": list(S.calib_seeds),
                        "mode": S.calibration or "each method's default (sequential; gradient scorers one-shot)"},
        "evaluation": {"corpus": S.eval_corpus or P.corpus, "seqlen": S.eval_seqlen or P.seqlen,
                       "windows": S.eval_windows if S.eval_windows is not None else P.eval_windows,
                       "zeroshot_items": S.zeroshot_items, "zeroshot_corpus": S.zeroshot_corpus},
        "needs_hub": sorted(c for c in corpora if c in HUB_CORPORA) + [
            m for m in (models or S.models or P.models) if "/" in model_params(m).ref],
        "hub_offline": offline,
        "conditions": [c.spec.label() + (" [protected]" if c.protected else "") + f" seed={c.spec.calib_seed}"
                       f" calib={c.spec.calibration}" for c in conds],
        "reference": S.reference, "reference_source": S.reference_source,
        "reference_tolerance": S.reference_tolerance,
    }


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"pruning plan, profile {p['profile']}: models {p['models']}; {p['n_conditions']} conditions "
             f"(+ dense) per model",
             f"  calibration: {p['calibration']}", f"  evaluation: {p['evaluation']}"]
    if p["needs_hub"]:
        lines.append(f"  needs the hub (or a local HF cache) for: {p['needs_hub']}"
                     + (" -- HF_HUB_OFFLINE=1 is set here" if p["hub_offline"] else ""))
    if p["reference"]:
        lines.append(f"  reference ({p['reference_source']}): {p['reference']}; pass = within "
                     f"{p['reference_tolerance']:g} PPL of each published number")
    lines += [f"  - {c}" for c in p["conditions"]]
    return "\n".join(lines)


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
    sw = S.superweights
    try:
        crit = critical_targets(lm, scores, topk=k, mode=mode, superweights=sw, metric=S.protect_metric)
        note = ""
    except EsaError as e:  # e.g. an architecture the detector cannot read: protect the top-k alone
        if not (sw and k):
            raise
        crit = critical_targets(lm, scores, topk=k, mode=mode, superweights=False, metric=S.protect_metric)
        note = f"super-weight detector skipped: {e}"
    info = {"label": crit.label, "n_protected": len(crit.table), "metric": S.protect_metric, "topk": k, "mode": mode,
            "score_seed": P.seeds[0], "scores_from_cache": from_cache, "note": note,
            "by_source": crit.table["source"].value_counts().to_dict()}
    return crit.targets, info


def run_model(name: str, P: Profile, S: Settings | None = None, lm: LoadedModel | None = None,
              show_progress: bool = False) -> ModelPruning:
    """Every condition of the section on model `name`: prune, evaluate in place, restore (checked)."""
    t0 = time.perf_counter()
    S = S or settings(P)
    conds = conditions(S, P)
    eager = any(c.spec.method == "hutchinson_diag" for c in conds) or (S.protect and S.protect_metric == "hutchinson_diag")
    lm = lm or Recipe.of(P).load(name, eager=True if eager else None)
    before = weights_hash(lm.model)
    windows = eval_windows(lm, S, P)
    task: ZeroShotTask | None = build_next_line(S.zeroshot_corpus, n_items=S.zeroshot_items) if S.zeroshot_items else None
    protect, crit = ({}, {"label": "none", "n_protected": 0})
    if S.protect and any(c.protected for c in conds):
        protect, crit = protected_set(lm, name, S, P)
    bs = S.batch_size or P.batch_size
    rows = [evaluate_condition(lm, None, windows, task, batch_size=bs, show_progress=show_progress)]
    for c in conds:
        spec = replace(c.spec, protect=crit["label"]) if c.protected else c.spec
        res = prune(lm, spec, protect=protect if c.protected else None, model_ref=name, show_progress=show_progress)
        rows.append(evaluate_condition(lm, res, windows, task, batch_size=bs, show_progress=show_progress))
    for r in rows:
        r["model"] = name
    table = results_table(rows)
    restored = weights_hash(lm.model) == before
    if not restored:
        raise EsaError(f"{name}: the weights differ from the dense model after pruning and evaluation "
                       "(a mask was not restored bit-exactly)")
    return ModelPruning(name, table, summary_tables(table, S), crit, windows.describe(),
                        task.describe() if task is not None else {}, restored, time.perf_counter() - t0)


# ---------------------------------------------------------------- tables
def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval over seeds; lo = hi = NaN with fewer than 2 values."""
    from scipy import stats as st

    x = np.asarray(x, dtype=float)
    mean = float(x.mean()) if x.size else math.nan
    if x.size < 2 or not np.isfinite(x).all():
        return mean, math.nan, math.nan
    half = float(st.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


CONDITION = ["model", "method", "sparsity", "pattern", "group", "allocation", "protected", "calib_mode"]


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: PPL (geometric mean over seeds, 95% CI from log-PPL), accuracies, seeds."""
    out = []
    for key, g in rows.groupby(CONDITION, sort=False, dropna=False):
        lp, lo, hi = t_interval(g["log_ppl"].to_numpy())
        rec = dict(zip(CONDITION, key, strict=True))
        rec.update({"ppl": math.exp(lp) if math.isfinite(lp) else math.inf,
                    "ppl_lo": math.exp(lo) if math.isfinite(lo) else math.nan,
                    "ppl_hi": math.exp(hi) if math.isfinite(hi) else math.nan,
                    "log_ppl": lp, "accuracy": float(g["accuracy"].mean()),
                    "achieved_sparsity": float(g["achieved_sparsity"].mean()), "n_seeds": len(g),
                    "calib_seeds": ",".join(str(s) for s in sorted(g["calib_seed"].unique()))})
        if "zs_accuracy" in g:
            rec.update({"zs_accuracy": float(g["zs_accuracy"].mean()), "zs_accuracy_norm": float(g["zs_accuracy_norm"].mean()),
                        "zs_chance": float(g["zs_chance"].iloc[0]), "zs_items": int(g["zs_items"].iloc[0])})
        out.append(rec)
    return pd.DataFrame(out)


def summary_tables(table: pd.DataFrame, S: Settings) -> dict[str, pd.DataFrame]:
    """The notebook's tables: main (50%), sweep, patterns, owl, protection; each says its calibration mode."""
    dense = table["method"] == "dense"
    unstr = table["pattern"] == "unstructured"
    uni = table["allocation"] == "uniform"
    none = table["protected"] == "none"
    at = table["sparsity"].sub(S.sparsity).abs() < 1e-9
    main = summarize(table[dense | (unstr & uni & none & at)])
    sweep = summarize(table[dense | (unstr & uni & none & table["method"].isin(S.sweep_methods or S.methods))])
    nm = summarize(table[dense | ~unstr | (unstr & uni & none & at & table["method"].isin(S.pattern_methods or S.methods))])
    owl_at = table["sparsity"].sub(S.owl_sparsity).abs() < 1e-9
    owl = summarize(table[dense | (unstr & none & owl_at & table["method"].isin(S.owl_methods))])
    prot = summarize(table[dense | (unstr & uni & at & table["method"].isin(S.protect_methods))]) if S.protect else pd.DataFrame()
    return {"main": main, "sweep": sweep, "patterns": nm, "owl": owl, "protection": prot}


# ---------------------------------------------------------------- the criterion
@dataclass
class Verdict:
    measured: float | None
    lo: float
    hi: float
    n: int
    passed: bool | None
    verdict: str
    note: str


def gain_verdict(gains: list[float], baseline_damage: list[float], threshold: float = 0.15,
                 min_damage: float = 0.01, machinery_only: bool = False) -> Verdict:
    """PASS / FAIL / underpowered / not estimable / machinery-only from per-seed gains (module docstring)."""
    g = np.asarray(gains, dtype=float)
    d = np.asarray(baseline_damage, dtype=float)
    if g.size == 0:
        return Verdict(None, math.nan, math.nan, 0, None, "not estimable", "no matched (method, baseline) pair was run")
    if not (np.isfinite(g).all() and np.isfinite(d).all()):
        return Verdict(None, math.nan, math.nan, int(g.size), None, "not estimable",
                       "a log-PPL is not finite or the baseline did no positive damage")
    if (d <= min_damage).any():
        return Verdict(float(g.mean()), math.nan, math.nan, int(g.size), None, "not estimable",
                       f"baseline damage {d.min():.3g} nats <= {min_damage:g}: the denominator is within noise")
    mean, lo, hi = t_interval(g)
    ci = f"mean over {g.size} calibration seed(s) {mean:.3f}, 95% t-CI [{lo:.3f}, {hi:.3f}]"
    if g.size < 2:
        passed, verdict, note = None, "underpowered", f"one calibration seed (gain {mean:.3f}): no CI; needs >= 2"
    elif lo > threshold:
        passed, verdict, note = True, "PASS", ci
    elif hi < threshold:
        passed, verdict, note = False, "FAIL", ci
    else:
        passed, verdict, note = None, "underpowered", f"{ci} contains the threshold {threshold:g}"
    if machinery_only:
        return Verdict(mean, lo, hi, int(g.size), None, "machinery-only",
                       f"smoke budget, the number is not evidence (would read {verdict}): {note}")
    return Verdict(mean, lo, hi, int(g.size), passed, verdict, note)


def comparison(table: pd.DataFrame, method: str, baseline: str, S: Settings, protected: bool) -> pd.DataFrame:
    """Per-seed gains of `method` (protected or not) against the unprotected `baseline`, uniform, at S.sparsity."""
    t = table[(table["allocation"] == "uniform") | (table["method"] == "dense")]
    m_rows = t[(t["method"] == method) & ((t["protected"] != "none") if protected else (t["protected"] == "none"))]
    b_rows = t[(t["method"] == baseline) & (t["protected"] == "none")]
    sub = pd.concat([t[t["method"] == "dense"], m_rows, b_rows], ignore_index=True)
    if method == baseline or m_rows.empty or b_rows.empty:
        return pd.DataFrame()
    return criterion(sub, method, baseline, sparsity=S.sparsity, pattern="unstructured")


def criterion_rows(table: pd.DataFrame, S: Settings, evidence: str) -> tuple[list[Criterion], pd.DataFrame]:
    """Scorecard rows: each ESA scorer (protected if run, else plain) vs magnitude (the guide's criterion),
    and beside it vs Wanda and SparseGPT; plus the per-seed gains they rest on."""
    rows, detail = [], []
    for model in table["model"].unique():
        tm = table[table["model"] == model]
        for m in S.esa_methods:
            protected = bool(S.protect and m in S.protect_methods and (tm["method"].eq(m) & tm["protected"].ne("none")).any())
            for base in ("magnitude", "wanda", "sparsegpt"):
                if base == m:
                    continue
                cmp = comparison(tm, m, base, S, protected)
                if not cmp.empty:
                    detail.append(cmp.assign(protected_method=protected))
                gains = cmp["gain"].tolist() if not cmp.empty else []
                dmg = cmp["delta_log_ppl_baseline"].tolist() if not cmp.empty else []
                v = gain_verdict(gains, dmg, S.threshold, S.min_damage, S.machinery_only)
                tag = f"{m}{'+protect' if protected else ''}"
                text = (f"ESA-guided pruning outperforms {base} pruning by >{S.threshold:.0%} ({tag}, {model}, "
                        f"{S.sparsity:.0%} unstructured)")
                if base != "magnitude":
                    text = f"beside the criterion: {tag} vs {base} ({model}, {S.sparsity:.0%} unstructured)"
                note = (f"gain = 1 - Δlog-PPL({tag}) / Δlog-PPL({base}) vs dense; {v.note}")
                rows.append(Criterion(f"P5.prune_gain.{tag}.vs_{base}.{model}", 5, text,
                                      None if v.measured is None else round(v.measured, 4), f"> {S.threshold:g} (95% CI)",
                                      v.passed, evidence, note, verdict=v.verdict))
    return rows, (pd.concat(detail, ignore_index=True) if detail else pd.DataFrame())


def reference_rows(mp: ModelPruning, S: Settings, evidence: str) -> list[Criterion]:
    """The GPU reproduction: each published PPL matched within `reference_tolerance` (first calibration seed)."""
    out = []
    t = mp.rows
    for pat, by_method in S.reference.items():
        for method, published in by_method.items():
            if method == "dense":
                sel = t[t["method"] == "dense"]
            else:
                sparsity = S.sparsity if pat == "unstructured" else parse_pattern(pat).sparsity
                sel = t[(t["method"] == method) & (t["pattern"] == parse_pattern(pat).label) & (t["protected"] == "none")
                        & (t["allocation"] == "uniform") & (t["sparsity"].sub(sparsity).abs() < 1e-9)
                        & (t["calib_seed"] == S.calib_seeds[0])]
            got = float(sel["ppl"].iloc[0]) if len(sel) else None
            passed = None if got is None or not math.isfinite(got) else abs(got - float(published)) <= S.reference_tolerance
            out.append(Criterion(f"P5.reproduce.{mp.model}.{pat}.{method}", 5,
                                 f"reproduce {S.reference_source or 'the published'} {method} {pat} PPL {published}",
                                 got, f"within {S.reference_tolerance:g} of {published}", passed, evidence,
                                 "" if got is not None else "condition not run", verdict="" if got is not None else "not estimable"))
    return out


def prose(mp: ModelPruning, S: Settings, detail: pd.DataFrame) -> list[str]:
    """Sentences computed from the numbers (the notebook prints them)."""
    main = mp.tables["main"]
    dense = main[main["method"] == "dense"]["ppl"].iloc[0]
    pruned = main[main["method"] != "dense"].sort_values("ppl")
    lines = [f"{mp.model}: dense PPL {dense:.2f}; at {S.sparsity:.0%} unstructured the ranking is "
             + ", ".join(f"{r.method} {r.ppl:.1f} ({r.calib_mode})" for r in pruned.itertuples()) + "."]
    if not detail.empty:
        for (m, base, prot), g in detail[detail["model"] == mp.model].groupby(["method", "baseline", "protected_method"]):
            tag = f"{m}{'+protect' if prot else ''}"
            ok = g[g["estimable"] & (g["delta_log_ppl_baseline"] > S.min_damage)]
            if ok.empty:
                lines.append(f"  {tag} vs {base}: not estimable ({base} does no damage above {S.min_damage:g} nats "
                             "or a log-PPL is not finite).")
                continue
            gain = float(ok["gain"].mean())
            word = "loses to" if gain < 0 else "beats"
            lines.append(f"  {tag} {word} {base}: {abs(gain):.0%} {'more' if gain < 0 else 'less'} damage "
                         f"(Δlog-PPL vs dense, mean over {len(ok)} seed(s)) at {S.sparsity:.0%}.")
    prot = mp.tables["protection"]
    if not prot.empty:
        for m in prot["method"].unique():
            p = prot[(prot["method"] == m)]
            a, b = p[p["protected"] != "none"], p[p["protected"] == "none"]
            if len(a) and len(b):
                lines.append(f"  protecting {mp.critical['n_protected']} critical weights ({mp.critical['label']}) "
                             f"changes {m}'s PPL from {b['ppl'].iloc[0]:.2f} to {a['ppl'].iloc[0]:.2f}.")
    zs = main[main["method"] == "dense"]
    if "zs_accuracy" in zs:
        lines.append(f"  zero-shot next-line accuracy (chance {zs['zs_chance'].iloc[0]:.0%}, {int(zs['zs_items'].iloc[0])} "
                     f"items): dense {zs['zs_accuracy'].iloc[0]:.0%}, "
                     + ", ".join(f"{r.method} {r.zs_accuracy:.0%}" for r in pruned.itertuples()) + ".")
    return lines


# ---------------------------------------------------------------- esa-runner
@dataclass(frozen=True)
class PruneJob:
    """esa-runner's pruning request, validated: the condition, its protection, evaluation and export."""

    spec: PruneSpec
    protect_critical: bool = False
    export_dir: str | None = None
    eval_windows: int | None = None
    eval_seqlen: int | None = None


_FLAGS = ("sparsity", "pattern", "allocation", "protect_critical", "calibration", "export_pruned")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning (Phase 5, week 13a)")
    g.add_argument("--prune", metavar="METHOD", help="prune with a registered scorer or sparsegpt (magnitude, wanda, "
                                                     "sparsegpt, grad_x_weight, obd, hutchinson_diag, random)")
    g.add_argument("--sparsity", help="share of weights pruned, in (0, 1) (default: the profile's pruning.sparsity)")
    g.add_argument("--pattern", help="unstructured | N:M, e.g. 2:4, 4:8 (N pruned in every M inputs of a row)")
    g.add_argument("--allocation", help="uniform | owl (layer-wise sparsity)")
    g.add_argument("--protect-critical", action="store_true",
                   help="never prune the critical set: super-weight candidates + the top-k of the first --metric")
    g.add_argument("--calibration", help="sequential | one-shot (default: the method's)")
    g.add_argument("--export-pruned", metavar="DIR", help="also save the pruned model as a safetensors folder")
    if "--dry-run" not in p._option_string_actions:  # another Phase 5 app may share the flag
        g.add_argument("--dry-run", action="store_true",
                       help="with --prune: print the profile's pruning plan, check it, exit without loading a model")


def _parse_sparsity(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise EsaError(f"--sparsity must be a number in (0, 1) (the share of weights pruned), got {text!r}") from None


def preload_inventory(name: str) -> list[WeightSpec] | None:
    """The weight shapes without loading any weight (esa.models.inventory_without_weights); None when unknown."""
    return inventory_without_weights(model_params(name).ref)


def check_fits(spec: PruneSpec, specs: list[WeightSpec], k: int, mode: str, superweights: bool) -> None:
    """Refuse a protected set larger than what the sparsity keeps, from the shapes alone (worst case within
    the comparison group is checked on the real indices later; this is the count that can never fit)."""
    n_sw = 1 if superweights else 0
    for s in specs:
        keep = s.numel - round(spec.sparsity * s.numel)
        need = (k if mode == "per_layer" else 0) + n_sw
        if need > keep:
            raise EsaError(f"--protect-critical protects {need} weights of {s.name} (top-{k} per matrix"
                           f"{' + a super-weight' if n_sw else ''}), more than the {keep} that sparsity "
                           f"{spec.sparsity:g} keeps; lower --topk or --sparsity")
    if mode == "global":
        keep = sum(s.numel for s in specs) - round(spec.sparsity * sum(s.numel for s in specs))
        if k > keep:
            raise EsaError(f"--protect-critical protects the global top-{k}, more than the {keep} weights sparsity "
                           f"{spec.sparsity:g} keeps; lower --topk or --sparsity")


def check_computable(spec: PruneSpec, model: str) -> None:
    """A method that needs calibration text it cannot get (a hub corpus offline, not in the local cache)."""
    if spec.uses_calibration and spec.corpus in HUB_CORPORA and os.environ.get("HF_HUB_OFFLINE") == "1":
        from datasets import config as dconfig

        cached = Path(dconfig.HF_DATASETS_CACHE)
        name = {"wikitext2": "wikitext", "c4": "allenai___c4"}[spec.corpus]
        if not any(cached.glob(f"{name}*")):
            raise EsaError(f"--prune {spec.method} needs calibration text from {spec.corpus!r}, which is neither "
                           f"cached under {cached} nor reachable (HF_HUB_OFFLINE=1); its scores cannot be computed "
                           f"for {model}. Use --corpus shakespeare (or a local text file), or a data-free method "
                           "(magnitude, random)")


def resolve(args: argparse.Namespace, profile: Profile) -> PruneJob | None:
    method = getattr(args, "prune", None)
    given = [f for f in _FLAGS if getattr(args, f, None) not in (None, False)]
    dry = bool(getattr(args, "dry_run", False))
    if method is None:
        if given:
            raise EsaError(f"--{given[0].replace('_', '-')} needs --prune METHOD (it only changes pruning)")
        return None
    S = settings(profile)
    get_method(method)
    pattern = args.pattern or "unstructured"
    pat = parse_pattern(pattern)
    sparsity = _parse_sparsity(args.sparsity)
    if sparsity is None and pat.kind != "nm":
        sparsity = S.sparsity
    if args.calibration is not None and args.calibration not in ("sequential", "one-shot"):
        raise unknown("--calibration", args.calibration, ("sequential", "one-shot"))
    P = replace(profile, batch_size=args.batch_size or profile.batch_size)
    # flags given on the command line win over the section: --corpus, --seqlen, --max-samples calibrate pruning too
    S = replace(S, calib_corpus=args.corpus or S.calib_corpus, calib_seqlen=args.seqlen or S.calib_seqlen,
                calib_windows=args.max_samples or S.calib_windows)
    spec = base_spec(S, P, method, sparsity, pattern, args.allocation or "uniform", calibration=args.calibration)
    model = args.model or profile.models[0]
    specs = preload_inventory(model)
    if specs is not None:
        todo = pruned_specs(specs, spec)
        check_divides(spec.pattern_obj, todo)
        if args.protect_critical:
            check_fits(spec, todo, args.topk if args.topk is not None else profile.topk, args.mode or profile.mode,
                       S.superweights)
    if args.export_pruned and Path(args.export_pruned).exists():
        raise EsaError(f"--export-pruned {args.export_pruned} exists; give a new folder")
    if dry:
        p = plan(S, P, [args.model] if args.model else None)
        print(format_plan(p))
        print(f"esa-runner --prune: {spec.label()} calib={spec.calibration}: settings checked, nothing loaded (dry run)")
        raise SystemExit(0)
    check_computable(spec, model)
    return PruneJob(spec, bool(args.protect_critical), args.export_pruned, S.eval_windows, S.eval_seqlen)


def run(job: PruneJob, cmd: Any, lm: LoadedModel, runs: Any, stage: Path) -> dict[str, Any]:
    """esa-runner's pruning: dense + the pruned condition on the recipe's evaluation windows, into `stage`."""
    R = cmd.recipe
    before = weights_hash(lm.model)
    protect, crit = None, {"label": "none", "n_protected": 0}
    spec = job.spec
    if job.protect_critical:
        metric, seed = R.metrics[0], R.seeds[0]
        scores = runs[(metric, seed)].full()
        c = critical_targets(lm, scores, topk=R.topk, mode=R.mode, metric=metric)
        protect, crit = c.targets, {"label": c.label, "n_protected": len(c.table)}
        spec = replace(spec, protect=c.label)
    wins = evaluation(lm.tokenizer, R.corpus, job.eval_seqlen or R.seqlen,
                      n_windows=job.eval_windows if job.eval_windows is not None else R.eval_windows, seed=0,
                      max_positions=lm.info.max_positions or None)
    res = prune(lm, spec, protect=protect, model_ref=cmd.model, show_progress=R.show_progress)
    rows = [evaluate_condition(lm, None, wins, batch_size=R.batch_size),
            evaluate_condition(lm, res, wins, batch_size=R.batch_size)]
    table = results_table(rows).assign(model=cmd.model, run_id=cmd.run_id)
    write_parquet(stage / "pruning.parquet", table)
    write_parquet(stage / "pruning_masks.parquet", res.masks.per_matrix(lm.inventory).assign(model=cmd.model))
    write_json(stage / "pruning.json", res.summary())
    files = ["pruning.parquet", "pruning_masks.parquet", "pruning.json"]
    if job.export_dir:
        export_pruned(lm, res, job.export_dir, card={"esa-runner": cmd.flags})
    if weights_hash(lm.model) != before:
        raise EsaError("pruning left the model changed (a mask was not restored bit-exactly)")
    d, p = rows
    return {"spec": asdict(spec), "mask_key": res.key, "achieved_sparsity": res.achieved_sparsity,
            "calibration": res.calibration.get("mode"), "protected": crit, "dense_ppl": d["ppl"], "ppl": p["ppl"],
            "dense_accuracy": d["accuracy"], "accuracy": p["accuracy"], "evaluation": wins.describe(),
            "files": files, "export": job.export_dir, "timings": {k: v for k, v in res.timings.items() if k != "blocks"}}


APP = App(name="prune", add_arguments=add_arguments, resolve=resolve, run=run)
