"""The research guide's Phase 2 and Phase 3 success criteria, judged from results into Criterion rows.

Every function takes results as produced by the pipeline (stability summaries of esa.stats.stability,
`esa.stats.inference.analyze(...)` dicts) and returns `Criterion` rows; nothing is typed in. A row is
PASS or FAIL only when the statistic is finite, its denominator is outside its noise and the sample can
reach the threshold; otherwise its verdict says which kind of "not judged" it is (esa.stats.verdicts):
- underpowered: too few seeds / windows / architectures for the threshold; the note gives the power
  calculation from the observed effect (esa.stats.power);
- not estimable: inf, NaN, a ratio whose denominator is within noise, identical (saturated) groups;
- machinery-only: the run's budget is below the guide's (`budgeted`) or the models are untrained
  (`untrained_reason`): the code ran, the number is not evidence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from esa.stats import power
from esa.stats.budget import budget_reason as stats_budget
from esa.stats.verdicts import Criterion, demote, judge, overrule

RATIO_THRESHOLD = 5.0
ALPHA = 0.01
MIN_ARCHITECTURES = 4
MIN_DISTINCT_SPLITS = 20  # a 95% range over random halves needs at least this many different halves

# The guide's sample budget, as params/profiles/standard.yaml sets it: below it, a row that rests on the
# sample is a machinery check (smoke), not a finding.
GUIDE_MAX_SAMPLES = 200
GUIDE_SEEDS = 3
GUIDE_PERTURB_WINDOWS = 16
RESTS_ON_CALIBRATION = ("P2.jaccard", "P2.metric_overlap", "P2.heavy_tail")
RESTS_ON_PERTURBATION = ("P3.",)


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


# ------------------------------------------------------------------ Phase 2
def p2_jaccard(jaccard_by_metric: Mapping[str, float | None], n_seeds: int, evidence: str) -> list[Criterion]:
    """'Jaccard > 0.4 across 3+ seeds': one row per metric (mean pairwise Jaccard of top-k sets)."""
    rows = []
    for metric, j in jaccard_by_metric.items():
        value = _finite(j)
        if n_seeds >= GUIDE_SEEDS:
            rows.append(Criterion(f"P2.jaccard.{metric}", 2, "Jaccard > 0.4 across 3+ seeds", value,
                                  "> 0.4 (3+ seeds)", judge(value, ">", 0.4), evidence))
            continue
        side = "" if value is None else f"; the {n_seeds}-seed value is {'above' if value > 0.4 else 'below'} 0.4"
        rows.append(Criterion(f"P2.jaccard.{metric}", 2, "Jaccard > 0.4 across 3+ seeds", value, "> 0.4 (3+ seeds)",
                              None, evidence, f"only {n_seeds} seed(s) run; the criterion needs {GUIDE_SEEDS} or more: "
                              f"run {GUIDE_SEEDS - n_seeds} more seed(s){side}",
                              verdict="underpowered" if value is not None else "not estimable"))
    return rows


def p2_metric_overlap(overlap: float | None, evidence: str, note: str = "") -> list[Criterion]:
    """'grad_x_weight vs grad_squared top-k overlap > 60%' (overlap as a fraction of k)."""
    value = _finite(overlap)
    why = note or ("" if value is not None else "grad_x_weight and grad_squared were not both run")
    return [Criterion("P2.metric_overlap", 2, "grad_x_weight vs grad_squared top-k overlap > 60%", value, "> 0.6",
                      judge(value, ">", 0.6), evidence, why)]


# ------------------------------------------------------------------ Phase 3 helpers
def _summary(stats: Mapping[str, Any], cond: Mapping[str, Any], group: str) -> dict[str, Any] | None:
    for s in stats.get("summary", []):
        if s["group"] == group and all(s.get(k) == cond.get(k) for k in ("perturbation", "scale", "prob")):
            return s
    return None


def _span(s: Mapping[str, Any]) -> str:
    return f"{s['mean']:.3g} nats/token, 95% CI [{s['ci_lo']:.3g}, {s['ci_hi']:.3g}] over {s['n_seeds']} seed(s)"


# ------------------------------------------------------------------ Phase 3
def p3_sign_flip_ratio(stats: Mapping[str, Any], evidence: str, control: str = "random_k") -> list[Criterion]:
    """'ΔPPL(top) ≥ 5× ΔPPL(random) for sign flip', on Δlog-PPL (nats/token: PPL differences of a collapsed
    model are astronomically large), judged as the contrast D = Δtop − 5·Δrandom by its one-sided 99% bound
    (esa.stats.contrasts): PASS when the lower bound is above 0, FAIL when the upper bound is below 0,
    underpowered otherwise, with the units the observed effect needs. A control that does nothing makes D
    large and decided, not 'not estimable'. Units: seeds when the run has >= 5, else (seed, window) pairs."""
    text = "ΔPPL(top) ≥ 5× ΔPPL(random) for sign flip (on Δlog-PPL)"
    thr = f"> 0: one-sided {1 - ALPHA:.0%} lower bound of Δtop − {RATIO_THRESHOLD:g}·Δ{control}"
    if stats.get("sequential"):
        return [_sequential_ratio(stats, evidence, control, text, thr)]
    cs = [c for c in stats.get("contrasts", []) if c["perturbation"] == "sign_flip" and c["a"] == "top_k"
          and c["b"] == control and c.get("primary") in c]
    if not cs:
        return [Criterion("P3.sign_flip_ratio", 3, text, None, thr, None, evidence,
                          f"no sign_flip top_k vs {control} contrast was run")]
    c = next((x for x in cs if x["scale"] == 1.0), max(cs, key=lambda x: x["scale"]))
    k = c[c["primary"]]
    top, ctl = _summary(stats, c, "top_k"), _summary(stats, c, control)
    means = (f"Δtop {top['mean']:.3g} and Δ{control} {ctl['mean']:.3g} nats/token over {top['n_seeds']} seed(s)"
             if top and ctl else "")
    note = (f"sign_flip scale {c['scale']:g}: D = Δtop − {RATIO_THRESHOLD:g}·Δ{control} = {k['estimate']:.3g} "
            f"[{k['lower']:.3g}, {k['upper']:.3g}] (one-sided {1 - ALPHA:.0%} bounds, {k['test']}), n = {k['n']} "
            f"{k['unit']}; {means}; {k['reason']}")
    value = _finite(k["estimate"])
    if k["decision"] in ("PASS", "FAIL"):
        return [Criterion("P3.sign_flip_ratio", 3, text, value, thr, k["decision"] == "PASS", evidence, note)]
    if value is None:
        return [Criterion("P3.sign_flip_ratio", 3, text, None, thr, None, evidence, note, verdict="not estimable")]
    more = power.units_note(k["estimate"], k["sd"], k["unit"], ALPHA)
    return [Criterion("P3.sign_flip_ratio", 3, text, value, thr, None, evidence, f"{note}; {more}",
                      verdict="underpowered")]


def _sequential_ratio(stats: Mapping[str, Any], evidence: str, control: str, text: str, thr: str) -> Criterion:
    """P3.sign_flip_ratio from a sequential sweep's decision on Δtop − 5·Δcontrol (esa.stats.sequential)."""
    rows = [r for r in stats["sequential"] if r["perturbation"] == "sign_flip" and r["a"] == "top_k"
            and r["b"] == control and r["c"] == RATIO_THRESHOLD]
    if not rows:
        return Criterion("P3.sign_flip_ratio", 3, text, None, thr, None, evidence,
                         f"no sign_flip top_k vs {control} contrast was run")
    r = next((x for x in rows if x["scale"] == 1.0), max(rows, key=lambda x: x["scale"]))
    value = _finite(r["estimate"])
    note = (f"sign_flip scale {r['scale']:g}, sequential: D = Δtop − {RATIO_THRESHOLD:g}·Δ{control} = "
            f"{_num(r['estimate'])} [{_num(r['lower'])}, {_num(r['upper'])}] at n = {r['n']} of {r['n_max']} "
            f"{r['unit']}; {r['reason']}; {r['design']}")
    if r["decision"] in ("PASS", "FAIL"):
        return Criterion("P3.sign_flip_ratio", 3, text, value, thr, r["decision"] == "PASS", evidence, note)
    return Criterion("P3.sign_flip_ratio", 3, text, value, thr, None, evidence, note,
                     verdict="underpowered" if value is not None else "not estimable")


def _num(x: Any) -> str:
    v = _finite(x)
    return f"{v:.3g}" if v is not None else str(x)


def _sequential_significance(stats: Mapping[str, Any], evidence: str, control: str, text: str, thr: str,
                             expected: list[str] | None) -> Criterion:
    """P3.significance from a sequential sweep: every usable top_k vs control comparison decided PASS at its
    alpha/m (Bonferroni over the sweep's comparisons, which the design spends over its looks)."""
    rows = [r for r in stats["sequential"] if r["a"] == "top_k" and r["b"] == control and r["c"] == 1.0]
    if not rows:
        return Criterion("P3.significance", 3, text, None, thr, None, evidence, f"no top_k vs {control} comparison was run")
    label = lambda r: r["perturbation"] + (f" x{r['scale']:g}" if r["scale"] != 1.0 else "")  # noqa: E731
    saturated = [r for r in rows if r["zero_differences"]]
    usable = [r for r in rows if not r["zero_differences"]]
    types = sorted({_base_type(r["perturbation"]) for r in rows})
    missing = sorted(set(expected or []) - set(types))
    dead = sorted(set(types) - {_base_type(r["perturbation"]) for r in usable})
    notes = [f"{label(r)}: top_k and {control} do identical damage" for r in saturated]
    notes += [f"perturbation types not run: {missing}"] if missing else []
    notes += [f"no condition of {dead} can tell top_k from {control}"] if dead else []
    n_used = sum(r["n"] for r in usable)
    level = f"{usable[0]['alpha']:.3g}" if usable else "?"
    head = (f"{len(usable)} sequential comparison(s) of {types}, each at one-sided alpha {level} (alpha {ALPHA} / m), "
            f"{n_used} (seed, window) pairs used")
    failed = [r for r in usable if r["decision"] == "FAIL"]
    open_ = [r for r in usable if r["decision"] not in ("PASS", "FAIL")]
    worst = max((r["p"] for r in usable if _finite(r["p"]) is not None), default=None)
    if failed:
        return Criterion("P3.significance", 3, text, worst, thr, False, evidence,
                         "; ".join([f"{head}; decided against top_k > {control}: "
                                    + ", ".join(label(r) for r in failed), *notes]))
    if open_:
        return Criterion("P3.significance", 3, text, worst, thr, None, evidence,
                         "; ".join([f"{head}; undecided at the cap: " + ", ".join(
                             f"{label(r)} ({r['reason']})" for r in open_), *notes]), verdict="underpowered")
    if missing or dead or not usable:
        return Criterion("P3.significance", 3, text, worst, thr, None, evidence, "; ".join([head, *notes]),
                         verdict="not estimable")
    return Criterion("P3.significance", 3, text, worst, thr, True, evidence, "; ".join([head, *notes]))


def _base_type(perturbation: str) -> str:
    return perturbation.split("[", 1)[0]  # bit_flip[lsb-exponent] is a variant of the bit_flip type


def _condition(c: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
    """One top_k vs control comparison: p, whether the test can reach alpha at all, power from its effect."""
    fam = c[c["primary"]]
    m = int(fam.get("m_holm") or 1)
    level = ALPHA / m  # Holm's first step
    seed = c.get("seed_level", {})
    win = c.get("window_level", {})
    n_seeds = int(seed.get("n") or 0)
    label = c["perturbation"] + (f" x{c['scale']:g}" if c.get("scale", 1.0) != 1.0 else "")
    out: dict[str, Any] = dict(label=label, type=_base_type(c["perturbation"]), p=_finite(c["p_primary_holm"]),
                               m=m, level=level, n_seeds=n_seeds, primary=c["primary"])
    a, b = _summary(stats, c, c["a"]), _summary(stats, c, c["b"])
    if seed.get("mean_diff") == 0 and win.get("test") == "none":
        capped = a is not None and b is not None and a.get("n_capped") and b.get("n_capped")
        out["state"] = "saturated"
        out["why"] = (f"{label}: {c['a']} and {c['b']} do identical damage"
                      + (f" (both collapse the model: log-PPL capped at {stats.get('cap', math.nan):.3g})" if capped else ""))
        return out
    n_pairs = int(win.get("n") or 0)
    if c["primary"] == "window_level":
        floor = min(1.0, m * power.wilcoxon_min_p(n_pairs))
        out["attainable"] = floor < ALPHA
        per = f"{n_seeds} seeds × {n_pairs // n_seeds} windows = " if n_seeds else ""
        out["floor"] = (f"{per}{n_pairs} (seed, window) pairs: smallest exact Wilcoxon p 2^-{n_pairs}, "
                        f"x {m} comparisons (Holm) = {floor:.3g}")
    else:
        out["attainable"] = True
    out["rbc"], out["dz"] = win.get("effect_size", math.nan), seed.get("effect_size", math.nan)
    out["need_pairs"] = power.wilcoxon_pairs_needed(out["rbc"], level)
    out["need_seeds"] = power.paired_t_seeds_needed(out["dz"], level)
    out["state"] = "ok" if out["p"] is not None else "nan"
    return out


def _shortfall(short: list[dict[str, Any]]) -> str:
    """Why the tests cannot reach alpha, and the sample the observed effects need (worst condition)."""
    c0 = short[0]
    text = (f"cannot reach p < {ALPHA} at this sample size: {c0['floor']}. At the observed effects (power "
            f"{power.POWER:.0%}, level α/m = {c0['level']:.2g}) it needs")
    pairs = [c for c in short if c["need_pairs"]]
    seeds = [c for c in short if c["need_seeds"]]
    opts = []
    if pairs:
        w = max(pairs, key=lambda c: c["need_pairs"])
        opts.append(f"≥ {w['need_pairs']} (seed, window) pairs, e.g. {power.split_pairs(w['need_pairs'], w['n_seeds'])} "
                    f"(worst: {w['label']}, rank-biserial {w['rbc']:.2f})")
    if seeds:
        w = max(seeds, key=lambda c: c["need_seeds"])
        opts.append(f"≥ {w['need_seeds']} seeds for the seed-level paired t (worst: {w['label']}, d_z {w['dz']:.3g})")
    none = [c["label"] for c in short if not c["need_pairs"] and not c["need_seeds"]]
    if none:
        opts.append(f"no sample size for {none}: the observed effect is not top_k > control")
    return f"{text} " + " or ".join(opts)


def p3_significance(stats: Mapping[str, Any], evidence: str, control: str = "random_k",
                    expected: list[str] | None = None) -> list[Criterion]:
    """'p < 0.01 across all perturbation types' (top_k > control, Holm-adjusted primary test, every type).

    A type is judged by its conditions that can tell the groups apart; a condition where both groups do
    identical damage (uniform exponent flips collapse every group) is named and left out while another
    variant of the type remains. Underpowered when a condition's test cannot reach alpha whatever the
    effect (2 seeds x 2 windows: 2^-4 x m), with the seeds x windows needed at the observed effect."""
    comps = [c for c in stats.get("comparisons", []) if c["a"] == "top_k" and c["b"] == control]
    text = "p < 0.01 across all perturbation types"
    thr = "< 0.01 (Holm-corrected)"
    if stats.get("sequential"):
        return [_sequential_significance(stats, evidence, control, text, "< 0.01 family-wise (sequential, "
                                         "Bonferroni)", expected)]
    if not comps:
        return [Criterion("P3.significance", 3, text, None, thr, None, evidence,
                          f"no top_k vs {control} comparison was run")]
    conds = [_condition(c, stats) for c in comps]
    types = sorted({c["type"] for c in conds})
    missing = sorted(set(expected or []) - set(types))
    usable = [c for c in conds if c["state"] != "saturated"]
    dead_types = sorted({c["type"] for c in conds} - {c["type"] for c in usable})
    notes = [c["why"] for c in conds if c["state"] == "saturated"]
    ps = [c["p"] for c in usable if c["p"] is not None]
    worst = max(ps) if ps else None
    m = max(c["m"] for c in conds)
    head = (f"largest Holm-adjusted p over {len(usable)} condition(s) of {types} "
            f"({usable[0]['primary'] if usable else 'n/a'} test, m = {m})")
    failed = [c for c in usable if c.get("attainable") and c["p"] is not None and c["p"] >= ALPHA]
    short = [c for c in usable if not c.get("attainable")]
    if missing:
        notes.append(f"perturbation types not run: {missing}")
    if dead_types:
        notes.append(f"no condition of {dead_types} can tell top_k from {control}")
    if failed:
        labels = ", ".join(f"{c['label']} p = {c['p']:.3g}" for c in failed)
        return [Criterion("P3.significance", 3, text, worst, thr, False, evidence,
                          "; ".join([f"{head}; not significant: {labels}", *notes]))]
    if short:
        return [Criterion("P3.significance", 3, text, worst, thr, None, evidence,
                          "; ".join([_shortfall(short), head, *notes]), verdict="underpowered")]
    if missing or dead_types or worst is None:
        return [Criterion("P3.significance", 3, text, worst, thr, None, evidence, "; ".join([head, *notes]),
                          verdict="not estimable")]
    return [Criterion("P3.significance", 3, text, worst, thr, worst < ALPHA, evidence, "; ".join([head, *notes]))]


def _steps_within_ci(stats: Mapping[str, Any], pert: str, doses: list[float], group: str) -> bool:
    """Whether every falling step of a curve stays inside the CIs of its two doses (a flat curve, not a fall)."""
    rows = {s["scale"]: s for s in stats.get("summary", []) if s["perturbation"] == pert and s["group"] == group}
    for d0, d1 in zip(doses, doses[1:], strict=False):
        a, b = rows.get(d0), rows.get(d1)
        if a is None or b is None:
            return False
        if b["mean"] < a["mean"] and b["ci_hi"] < a["ci_lo"]:
            return False
    return True


def p3_monotonic(stats: Mapping[str, Any], evidence: str) -> list[Criterion]:
    """'monotonic dose response', as the guide means it: for every perturbation run at >= 2 doses, top_k's
    mean damage rises at every dose step and lies above every control's at every dose. The ordering among
    the controls (random_k > bottom_k) is reported beside it, not judged: both sit at noise level."""
    dr = stats.get("dose_response", {})
    curves = {c["perturbation"]: c for c in dr.get("curves", []) if c["group"] == "top_k" and c.get("n_doses", 0) >= 2}
    text = "monotonic dose response (top-k rising, above the controls at every dose)"
    thr = "top_k rising at every step and above every control at every dose"
    if not curves:
        return [Criterion("P3.dose_monotonic", 3, text, None, thr, None, evidence,
                          "no perturbation was run at 2 or more doses")]
    hier = [h for h in dr.get("hierarchy", []) if h["perturbation"] in curves and len(h.get("means", [])) >= 2]
    above = [h for h in hier if h["groups"][0] == "top_k" and all(h["means"][0] > x for x in h["means"][1:])]
    rising = [p for p, c in curves.items() if c["monotonic"]]
    parts = []
    for p, c in sorted(curves.items()):
        path = " → ".join(f"{v:.3g}" for v in c.get("means", []))
        flat = "" if c["monotonic"] else (" (not rising; the falls stay within the dose CIs)"
                                          if _steps_within_ci(stats, p, c.get("doses", []), "top_k") else " (falls)")
        parts.append(f"{p}: top_k {path} nats over doses {c.get('doses')}{flat}")
    ctl_order = [h for h in hier if len(h["means"]) >= 3]
    ordered = sum(all(x > y for x, y in zip(h["means"][1:], h["means"][2:], strict=False)) for h in ctl_order)
    ctl_note = (f"control ordering {' > '.join(hier[0]['groups'][1:])} holds at {ordered}/{len(ctl_order)} doses "
                f"(not judged; largest |control mean| {max(abs(x) for h in hier for x in h['means'][1:]):.2g} nats)"
                if ctl_order else "")
    note = "; ".join([f"top_k above every control at {len(above)}/{len(hier)} doses",
                      f"rising at every step for {len(rising)}/{len(curves)} perturbations", *parts,
                      *([ctl_note] if ctl_note else [])])
    passed = len(above) == len(hier) and len(rising) == len(curves)
    return [Criterion("P3.dose_monotonic", 3, text,
                      f"{len(rising)}/{len(curves)} rising, above at {len(above)}/{len(hier)} doses", thr, passed,
                      evidence, note)]


def distinct_half_splits(n_windows: int) -> int:
    """Different ways to cut n windows into two halves (unordered when n is even)."""
    if n_windows < 2:
        return 0
    c = math.comb(n_windows, n_windows // 2)
    return c // 2 if n_windows % 2 == 0 else c


def stability_windows() -> int:
    """The fewest evaluation windows whose half-splits give MIN_DISTINCT_SPLITS distinct ones (7 for 20)."""
    return next(n for n in range(2, 64) if distinct_half_splits(n) >= MIN_DISTINCT_SPLITS)


def p3_ranking_stability(stab: Mapping[str, Any], model: str, evidence: str, threshold: float = 0.8) -> list[Criterion]:
    """'damage ranking stable across evaluation samples' (a project check): mean Spearman rho of condition
    damages between random halves of the evaluation windows. With few windows every random split is one of a
    handful, so the 95% range is degenerate: underpowered, with the windows needed."""
    cid, text = f"P3.ranking_stability.{model}", f"damage ranking stable across evaluation samples ({model})"
    thr = f"> {threshold:g} (Spearman, random halves)"
    rho = _finite(stab.get("rho_mean"))
    n_win = int(stab.get("n_windows") or 0)
    distinct = distinct_half_splits(n_win)
    if rho is None:
        return [Criterion(cid, 3, text, None, thr, None, evidence, stab.get("note") or "no finite rho",
                          verdict="not estimable")]
    need = stability_windows()
    if distinct < MIN_DISTINCT_SPLITS:
        return [Criterion(cid, 3, text, rho, thr, None, evidence,
                          f"{n_win} evaluation windows allow {distinct} distinct half-split(s), so the "
                          f"{stab.get('n_splits', '?')} random splits repeat it and their range is no spread; "
                          f"≥ {MIN_DISTINCT_SPLITS} distinct splits need ≥ {need} windows "
                          f"({distinct_half_splits(need)} splits). A project check, not a guide criterion",
                          verdict="underpowered")]
    return [Criterion(cid, 3, text, rho, thr, judge(rho, ">", threshold), evidence,
                      f"95% range over {stab.get('n_splits')} splits [{stab['rho_lo']:.2f}, {stab['rho_hi']:.2f}] "
                      f"({distinct} distinct); a project check, not a guide criterion")]


def holds(stats: Mapping[str, Any], control: str = "random_k") -> bool | None:
    """The Phase 3 claim for one model: the sign-flip ratio PASSes and top_k > control is significant in every
    condition; None when either cannot be judged (ratio over noise, underpowered tests)."""
    ratio = p3_sign_flip_ratio(stats, "", control)[0]
    if stats.get("sequential"):
        sig = p3_significance(stats, "", control)[0]
        return None if ratio.passed is None or sig.passed is None else bool(ratio.passed and sig.passed)
    comps = [c for c in stats.get("comparisons", []) if c["a"] == "top_k" and c["b"] == control]
    if ratio.passed is None or not comps:
        return None
    sig = [c["significant"] for c in comps]
    if ratio.passed is False or any(s is False for s in sig):
        return False
    return True if all(s is True for s in sig) else None


def holds_word(v: bool | None) -> str:
    """`holds()`'s answer in words."""
    return "holds" if v else "not judged" if v is None else "does not hold"


def p3_cross_architecture(per_model: Mapping[str, tuple[str, Mapping[str, Any]]], evidence: str) -> list[Criterion]:
    """'holds across ≥ 4 architectures': per_model = model -> (architecture family, analyze() dict)."""
    verdicts = {m: (fam, holds(st)) for m, (fam, st) in per_model.items()}
    archs = {fam for fam, _ in verdicts.values()}
    ok_archs = sorted({fam for fam, v in verdicts.values() if v})
    text = "holds across ≥ 4 architectures"
    note = "; ".join(f"{m} ({fam}): {holds_word(v)}"
                     for m, (fam, v) in verdicts.items())
    if len(archs) < MIN_ARCHITECTURES:
        return [Criterion("P3.cross_architecture", 3, text, len(ok_archs), ">= 4", None, evidence,
                          f"only {len(archs)} architecture(s) run ({sorted(archs)}); needs {MIN_ARCHITECTURES}: "
                          f"{MIN_ARCHITECTURES - len(archs)} more. {note}", verdict="underpowered")]
    return [Criterion("P3.cross_architecture", 3, text, len(ok_archs), ">= 4",
                      judge(float(len(ok_archs)), ">=", MIN_ARCHITECTURES), evidence, note)]


def phase3_rows(stats: Mapping[str, Any], evidence: str, expected_types: list[str] | None = None) -> list[Criterion]:
    """The per-model Phase 3 rows: sign-flip ratio, significance, dose-response."""
    return (p3_sign_flip_ratio(stats, evidence) + p3_significance(stats, evidence, expected=expected_types)
            + p3_monotonic(stats, evidence))


# ------------------------------------------------------------------ budgets
def _get(settings: Any, key: str, default: Any = None) -> Any:
    return settings.get(key, default) if isinstance(settings, Mapping) else getattr(settings, key, default)


def budget_reason(settings: Any, cid: str) -> str | None:
    """Why a row of id `cid` rests on too small a sample under profile `settings` (a Profile or its dict),
    or None. Only rows that rest on the calibration or perturbation sample are checked; a power-planned
    profile (`planned`) is judged at its own sizes."""
    if _get(settings, "planned", False):
        return None
    seeds = len(_get(settings, "seeds", []) or [])
    name = _get(settings, "name", "?")
    seqlen = _get(settings, "seqlen")
    if cid.startswith(RESTS_ON_CALIBRATION):
        n = int(_get(settings, "max_samples", 0) or 0)
        return stats_budget(f"{name} budget: ", [(
            n < GUIDE_MAX_SAMPLES or seeds < GUIDE_SEEDS,
            f"{n} calibration windows × {seqlen} tokens per seed, {seeds} seed(s) "
            f"(the guide's: {GUIDE_MAX_SAMPLES} samples, {GUIDE_SEEDS} seeds)")])
    if cid.startswith(RESTS_ON_PERTURBATION):
        w = int(_get(settings, "perturb_eval_windows") or _get(settings, "eval_windows") or 0)
        return stats_budget(f"{name} budget: ", [(
            w < GUIDE_PERTURB_WINDOWS or seeds < GUIDE_SEEDS,
            f"{seeds} seed(s) × {w} evaluation windows of {seqlen} tokens per condition "
            f"(standard: {GUIDE_SEEDS} seeds × {GUIDE_PERTURB_WINDOWS} windows)")])
    return None


def budgeted(rows: Iterable[Criterion], settings: Any) -> list[Criterion]:
    """PASS/FAIL rows resting on a sample below the guide's budget become machinery-only, with the reason.
    Rows already not judged keep their verdict (their own reason is the sharper one)."""
    out = []
    for r in rows:
        why = budget_reason(settings, r.id) if r.verdict in ("PASS", "FAIL") else None
        out.append(demote(r, "machinery-only", why) if why else r)
    return out


def untrained_reason(suite: Any) -> str | None:
    """Why a micro-suite's numbers are not evidence: models that do not beat the unigram baseline. `suite` is
    week 9's micro_suite table (columns model, eval_ppl, unigram_ppl) or None."""
    if suite is None or len(suite) == 0 or not {"eval_ppl", "unigram_ppl"} <= set(suite.columns):
        return None
    bad = suite[~(suite["eval_ppl"] < suite["unigram_ppl"])]
    if bad.empty:
        return None
    return (f"{len(bad)} of {len(suite)} micro models do not beat the unigram baseline (PPL "
            f"{float(suite['unigram_ppl'].iloc[0]):.1f}; theirs {float(bad['eval_ppl'].min()):.1f}-"
            f"{float(bad['eval_ppl'].max()):.1f}): sizes and families are compared between untrained models")


MICRO_SUITE = Path("data") / "phase4_week9_parameter_scaling" / "micro_suite.parquet"  # week 9 writes it


def untrained_in_run(run_dir: str | Path) -> str | None:
    """`untrained_reason` of the micro-suite table week 9 wrote into `run_dir` (None when it did not run)."""
    path = Path(run_dir) / MICRO_SUITE
    try:
        return untrained_reason(pd.read_parquet(path)) if path.is_file() else None
    except (OSError, ValueError):
        return None


def machinery_only(rows: Iterable[Criterion], reason: str | None) -> list[Criterion]:
    """Every row demoted to machinery-only with `reason` (None: rows unchanged)."""
    rows = list(rows)
    return rows if not reason else [demote(r, "machinery-only", reason) for r in rows]


def unresolved(rows: Iterable[Criterion], metric: str, resolution: Mapping[str, Any] | None) -> list[Criterion]:
    """PASS/FAIL rows of `metric` (its id part) judged again when the metric's own measured per-weight noise leaves
    its top-k unresolved at the sample it ran: probes (esa.sensitivity.curvature.resolution_at) or calibration
    windows (esa.sensitivity.resolution.window_resolution). An unmeasured resolution changes nothing.

    - Held-out signal short of z = 2, with a finite sample that would reach it: underpowered, with that sample
      (the profile should have planned it; the row says so rather than judging noise).
    - No held-out signal (z within noise of zero: no sample size follows): FAIL. The claim of these rows is that
      the metric identifies a set of weights that stands out; held out, its top-k does not stand above the matrix
      median, so whatever the number says (a stable or heavy-tailed ranking) is the estimator's noise."""
    rows = list(rows)
    if not resolution or resolution["resolved"] in (True, None):
        return rows
    n, unit = resolution.get("n", resolution.get("probes")), resolution.get("unit", "probes")
    need = resolution.get("needed", resolution.get("probes_needed", math.nan))
    head = f"not resolved at {n} {unit}: the top-k stands z = {resolution['z']:.2f} standard errors above the matrix median"
    out = []
    for r in rows:
        if metric not in r.id.split(".") or r.verdict not in ("PASS", "FAIL"):
            out.append(r)
        elif math.isfinite(need):
            out.append(demote(r, "underpowered", f"{head} (< 2); about {need:.3g} {unit} needed"))
        else:
            out.append(overrule(r, f"{head}: held out, it is not distinguishable from the median, so the metric "
                                   "does not identify a set that stands out"))
    return out
