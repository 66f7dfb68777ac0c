"""What each notebook of Phases 1-4 computes, as a Plan: the Phase 5 studies' `plan()` for the weeks that are
not yet studies. Each condition names its units (windows of `seqlen` tokens, or calibration windows), the
pass each unit costs (esa.phases.costs.KINDS) and the criterion its numbers decide; nothing is loaded. A
sequential comparison is planned at its cap (the worst case); scores a notebook reads from the cache that an
earlier notebook of the run wrote are planned where they are computed, not again. So is the micro-suite's
training (`training`): planned in the first notebook that loads a member (week 7 for its micro extras, week
9 for the Phase 4 suite, which weeks 10-12 depend on), for the members not in the cache when planned.
`run_all.py --dry-run` prints these with the seconds this machine's measured costs predict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from esa.errors import EsaError
from esa.models import micro
from esa.params import Profile
from esa.phases.study import Plan, Planned
from esa.registry import Registry

PlanFn = Callable[[Profile, Sequence[str]], Plan]
PLANS: Registry[PlanFn] = Registry("notebook plan", key=lambda f: f.__name__)

GRADIENT = ("grad_x_weight", "grad_squared", "ggn_mc_diag")  # one shared backward per calibration window
SINGLE_CONTROLS = 20  # week 7: random single weights per tested weight: the rank p-value can then reach 1/21 < 0.05
ZERO_ALONE_TARGETS = 2  # week 7: the detector's strongest candidate and the primary metric's top-1 (planned apart)


# ------------------------------------------------------------------ settings the per-model bodies share with plans
def week2_metrics(P: Profile, model: str) -> list[str]:
    """Week 2's metrics on `model`: the profile's `metrics` on its own models, `several_metrics` (when set) on
    the models week 2 adds."""
    return list(P.metrics if model in P.models or P.several_metrics is None else P.several_metrics)


def cross_model_list(P: Profile, models: Sequence[str]) -> list[str]:
    """Week 7's models: the schedule's plus the profile's `cross_model_extra`, once each."""
    return list(dict.fromkeys([*models, *P.cross_model_extra]))


def zero_alone_windows(P: Profile, model: str) -> int | None:
    """Evaluation windows of `model`'s zero-alone ranks in week 7: the profile's `zero_alone_windows` entry
    for it (the first that many perturbation windows), else None (every perturbation window). One EsaError for
    a value that is not a count of at most the perturbation windows."""
    n = (P.zero_alone_windows or {}).get(model)
    if n is None:
        return None
    full = P.perturb_eval_windows or P.eval_windows
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (full is not None and n > full):
        raise EsaError(f"profile setting zero_alone_windows.{model} = {n!r}: a count of windows from 1 to the "
                       f"perturbation windows ({full if full is not None else 'every window of the split'})")
    return n


def zero_alone_note(P: Profile, models: Sequence[str]) -> str:
    """What week 7's zero-alone ranks evaluate on per model, and why a model has fewer windows (the plan's note
    and the page's sentence)."""
    full = P.perturb_eval_windows or P.eval_windows
    fewer = {m: n for m in models if (n := zero_alone_windows(P, m)) is not None and n != full}
    out = (f"Zero-alone ranks: {SINGLE_CONTROLS} random single weights per tested weight, on "
           f"{f'all {full}' if full is not None else 'all'} perturbation windows of {P.seqlen} tokens")
    if fewer:
        out += ("; on " + ", ".join(f"{m} the first {n} ({n * P.seqlen} tokens)" for m, n in fewer.items())
                + " (profile zero_alone_windows), so that its record part fits 2 hours on 2 cores: the exact rank "
                f"p-value keeps its floor 1/{SINGLE_CONTROLS + 1} < 0.05, and each weight's damage is measured on "
                "those tokens only")
    return out


def _load(model: str) -> Planned:
    return Planned(model, "load", 1, "loads", (), kind="load")


def score_pass(P: Profile, metric: str) -> tuple[str, float]:
    """(costs kind, passes per calibration window) of scoring `metric` alone: a gradient metric one backward,
    act_mag one hooked forward, hutchinson_diag one Hessian-vector product per probe."""
    if metric == "act_mag":
        return "act", 1.0
    if metric == "hutchinson_diag":
        return "hvp", float(P.hutchinson_probes)
    return "grad", 1.0


def scoring(P: Profile, model: str, seeds: Sequence[int], metrics: Sequence[str], serves: tuple[str, ...],
             what: str = "") -> list[Planned]:
    """The scoring passes of `metrics` over the calibration windows of each seed (fused gradient metrics: one
    backward per window; Hutchinson: one product per probe and window)."""
    out = []
    for s in seeds:
        if any(m in GRADIENT for m in metrics):
            out.append(Planned(model, f"{what}gradient metrics seed {s}", P.max_samples, "calibration windows",
                               serves, kind="grad", seqlen=P.seqlen))
        if "act_mag" in metrics:
            out.append(Planned(model, f"{what}act_mag seed {s}", P.max_samples, "calibration windows", serves,
                               kind="act", seqlen=P.seqlen))
        if "hutchinson_diag" in metrics:
            out.append(Planned(model, f"{what}hutchinson_diag seed {s} ({P.hutchinson_probes} probe(s))",
                               P.max_samples, "calibration windows", serves, kind="hvp", seqlen=P.seqlen,
                               per_unit=P.hutchinson_probes))
    return out


def training(models: Sequence[str]) -> list[Planned]:
    """The training of each micro-suite member among `models` that the cache does not hold yet: its budget's
    steps, each a batch of windows at the measured `train` cost (esa.phases.costs). Trained once, then read
    by every notebook (esa.models.micro caches it by architecture, budget, data and training code)."""
    out = []
    for m in models:
        if not micro.is_micro(m):
            continue
        name, budget = micro.parse_ref(m)
        if micro.seems_trained(name, budget):
            continue
        b, steps = micro.BUDGETS[budget], micro.planned_steps(name, budget)
        out.append(Planned(m, f"training ({budget} budget: {steps} steps of {b.batch_size} x {b.seqlen} tokens)", steps,
                           "steps", (), kind="train", seqlen=b.seqlen, per_unit=b.batch_size))
    return out


def _sweep(P: Profile, model: str, n_perturbations: int, groups: Sequence[str], serves: tuple[str, ...]) -> list[Planned]:
    w = P.perturb_eval_windows or P.eval_windows or 0
    how = "up to" if P.sequential else "on"
    return [Planned(model, f"{n_perturbations} perturbation(s) x {g}, {how} {w} windows x {len(P.seeds)} seeds",
                    n_perturbations * w * len(P.seeds), "windows", serves, seqlen=P.seqlen) for g in groups]


def phase1_week0_baselines(P: Profile, models: Sequence[str]) -> Plan:
    conds = [Planned(m, f"evaluation seed {s}", P.eval_windows or 0, "windows", ("P1",), seqlen=P.seqlen)
             for m in models for s in P.seeds] + [_load(m) for m in models]
    return Plan("baselines", P, list(models), None, conds, {"windows per seed": P.eval_windows, "seeds": P.seeds})


def validation_windows(P: Profile, metric: str) -> int:
    """Week 1's calibration windows of `metric`: `validation_samples` when set (else `max_samples`), but
    hutchinson_diag keeps `max_samples`, since its resolution is bounded by its probes (make
    curvature-reliability), not by its windows."""
    return P.max_samples if metric == "hutchinson_diag" else P.validation_samples or P.max_samples


def phase2_week1_metric_validation(P: Profile, models: Sequence[str]) -> Plan:
    m, serves = models[0], ("P2.jaccard", "P2.heavy_tail", "P2.metric_overlap")
    n = validation_windows(P, "grad_x_weight")  # every metric but hutchinson_diag
    conds = []
    for k in dict.fromkeys(validation_windows(P, x) for x in P.metrics):
        conds += scoring(replace(P, max_samples=k), m, P.seeds,
                         [x for x in P.metrics if validation_windows(P, x) == k], serves)
    conds.append(Planned(m, "held-out resolution check (every metric, one pass)", n, "calibration windows",
                         ("P2.jaccard", "P2.heavy_tail"), kind="grad", seqlen=P.seqlen))
    calib = f"{n} x {P.seqlen} tokens" + (f" ({P.max_samples} for hutchinson_diag)" if n != P.max_samples
                                          and "hutchinson_diag" in P.metrics else "")
    return Plan("metric validation", P, [m], None, conds, {"calibration": calib, "seeds": P.seeds,
                                                          "metrics": P.metrics})


def phase2_week2_cross_model(P: Profile, models: Sequence[str]) -> Plan:
    conds, notes = [], []
    for m in models:
        # week 1 scored the profile's own models: its cache serves them when it ran in the same session; a
        # record chunk in a fresh session recomputes them, so they are planned (the worst case)
        own = "week 1's cache, else " if m in P.models else ""
        conds += [_load(m), *scoring(P, m, P.seeds, week2_metrics(P, m), ("P2.jaccard",), own)]
    added = [m for m in models if m not in P.models]
    dropped = [x for x in P.metrics if added and x not in week2_metrics(P, added[0])]
    if dropped:
        why = (": there it does not resolve at any affordable probe count (its held-out z is ~0; make "
               "curvature-reliability), and week 2 has no resolution check, so on more models it would only add "
               "rows judged on noise" if "hutchinson_diag" in dropped else "")
        notes.append(f"{', '.join(added)}: metrics {', '.join(week2_metrics(P, added[0]))} (profile several_metrics); "
                     f"{', '.join(dropped)} runs on {', '.join(P.models)} only, validated by week 1{why}")
    notes.append(f"{', '.join(m for m in models if m in P.models)}: week 1's cached scores when it ran in this "
                 "session (planned as computed: a fresh session recomputes them)")
    return Plan("cross-model metrics", P, list(models), None, conds, notes=notes)


def phase2_week3_global_vs_per_layer(P: Profile, models: Sequence[str]) -> Plan:
    new = [s for s in P.highres_seeds if s not in P.seeds]
    conds = scoring(P, models[0], new, P.metrics[:1], ("P2.global_within_per_layer", "P2.jaccard"), "high-res ")
    return Plan("global vs per-layer", P, list(models[:1]), None, conds,
                notes=[f"seeds {sorted(set(P.highres_seeds) & set(P.seeds))}: week 1's cached scores"])


def phase2_week4_components(P: Profile, models: Sequence[str]) -> Plan:
    conds = [Planned(m, "massive-activation forward", 1, "windows", ("P2.heavy_tail_max",), seqlen=P.seqlen)
             for m in models]
    return Plan("components", P, list(models), None, conds, notes=["scores: the week 1-2 cache"])


def phase3_week5_core_perturbation(P: Profile, models: Sequence[str]) -> Plan:
    n = len(P.perturbations) + (len(P.bit_flip_bits) - 1 if "bit_flip" in P.perturbations else 0)
    conds = [c for m in models for c in _sweep(P, m, n, ["top_k", *P.controls], ("P3.significance", "P3.sign_flip_ratio"))]
    return Plan("core perturbation", P, list(models), None, conds, {"sequential": P.sequential or "no (fixed n)"})


def phase3_week6_dose_response(P: Profile, models: Sequence[str]) -> Plan:
    n = 2 * len(P.dose_scales)  # sign_flip and gauss_noise at every dose
    groups = ["top_k", *[c for c in P.controls if c in ("random_k", "bottom_k")]]
    conds = [c for m in models for c in _sweep(P, m, n, groups, ("P3.dose_monotonic",))]
    return Plan("dose-response", P, list(models), None, conds)


def phase3_week7_cross_model(P: Profile, models: Sequence[str]) -> Plan:
    every = cross_model_list(P, models)
    evals = ZERO_ALONE_TARGETS * (1 + SINGLE_CONTROLS)  # each tested weight and its controls, zeroed alone
    conds = training(every)
    for m in every:
        conds.append(_load(m))
        conds += scoring(P, m, P.seeds, P.metrics[:1], ("P3.cross_architecture",)) if m not in models else []
        conds += _sweep(P, m, 2, ["top_k", "random_k", "bottom_k"], ("P3.cross_architecture",))
        w = zero_alone_windows(P, m) or P.perturb_eval_windows or P.eval_windows or 0
        conds.append(Planned(m, f"zero-alone: {ZERO_ALONE_TARGETS} candidates + {SINGLE_CONTROLS} random single "
                             f"weights each, on {w} window(s)", evals * w, "windows", (),
                             seqlen=P.seqlen))  # descriptive: an exact rank test per weight, no criterion
    return Plan("cross-model", P, every, None, conds, notes=[zero_alone_note(P, every)])


def phase3_week8_advanced(P: Profile, models: Sequence[str]) -> Plan:
    w = P.perturb_eval_windows or P.eval_windows or 0
    conds = []
    for m in models:
        conds.append(Planned(m, "cumulative ablation + restore-one", 10 * w, "windows", (), seqlen=P.seqlen))
        conds += _sweep(P, m, 2, ["top_k", "random_k", "bottom_k"], ("P3.ranking_stability",))
    return Plan("advanced", P, list(models), None, conds)


def _micro(P: Profile, models: Sequence[str], what: str, serves: tuple[str, ...], windows: int) -> Plan:
    conds = [Planned(m, what, windows, "windows", serves, seqlen=P.seqlen) for m in models]
    return Plan(what, P, list(models), None, conds,
                notes=["the micro-suite is trained by week 9, a dependency of this notebook: not planned again"])


def phase4_week9_parameter_scaling(P: Profile, models: Sequence[str]) -> Plan:
    plan = _micro(P, models, "sensitivity measures per model", ("P4.scaling_r2",), P.max_samples * len(P.seeds))
    plan.conditions[:0] = training(models)
    plan.notes = ["micro-suite members not in the cache are trained first (planned here; weeks 10-12 read them)"]
    return plan


def phase4_week10_architecture_comparison(P: Profile, models: Sequence[str]) -> Plan:
    return _micro(P, models, "attention vs FFN and depth", ("P4.family_differences",), P.eval_windows or 0)


def phase4_week11_scaling_validation(P: Profile, models: Sequence[str]) -> Plan:
    return _micro(P, models, "leave-one-model-out fits (from week 9)", ("P4.loo_within_20pct",), 0)


def phase4_week12_architecture_patterns(P: Profile, models: Sequence[str]) -> Plan:
    return _micro(P, models, "forward patterns", ("P4.family_differences",), 8)


for _f in (phase1_week0_baselines, phase2_week1_metric_validation, phase2_week2_cross_model,
           phase2_week3_global_vs_per_layer, phase2_week4_components, phase3_week5_core_perturbation,
           phase3_week6_dose_response, phase3_week7_cross_model, phase3_week8_advanced, phase4_week9_parameter_scaling,
           phase4_week10_architecture_comparison, phase4_week11_scaling_validation, phase4_week12_architecture_patterns):
    PLANS.register(_f, definition=(_f.__doc__ or _f.__name__.replace("_", " ")).split("\n")[0])
