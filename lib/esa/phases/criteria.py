"""The research guide's Phase 2 and Phase 3 success criteria, judged from results into Criterion rows.

Every function takes results as produced by the pipeline (stability summaries of esa.stats.stability,
`esa.stats.inference.analyze(...)` dicts) and returns `Criterion` rows; nothing is typed in. A criterion
that cannot be judged from what was run (too few seeds, a metric or perturbation not run, too few
architectures) has `passed=None` and says why in `note`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from esa.stats.verdicts import Criterion, judge

RATIO_THRESHOLD = 5.0
ALPHA = 0.01
MIN_ARCHITECTURES = 4


def p2_jaccard(jaccard_by_metric: Mapping[str, float | None], n_seeds: int, evidence: str) -> list[Criterion]:
    """'Jaccard > 0.4 across 3+ seeds': one row per metric (mean pairwise Jaccard of top-k sets)."""
    rows = []
    for metric, j in jaccard_by_metric.items():
        value = None if j is None or (isinstance(j, float) and math.isnan(j)) else float(j)
        passed = judge(value, ">", 0.4) if n_seeds >= 3 else None
        note = "" if n_seeds >= 3 else f"only {n_seeds} seed(s) run; the criterion needs 3 or more (measured value shown)"
        rows.append(Criterion(f"P2.jaccard.{metric}", 2, "Jaccard > 0.4 across 3+ seeds", value, "> 0.4 (3+ seeds)",
                              passed, evidence, note))
    return rows


def p2_metric_overlap(overlap: float | None, evidence: str, note: str = "") -> list[Criterion]:
    """'grad_x_weight vs grad_squared top-k overlap > 60%' (overlap as a fraction of k)."""
    value = None if overlap is None or (isinstance(overlap, float) and math.isnan(overlap)) else float(overlap)
    why = note or ("" if value is not None else "grad_x_weight and grad_squared were not both run")
    return [Criterion("P2.metric_overlap", 2, "grad_x_weight vs grad_squared top-k overlap > 60%", value, "> 0.6",
                      judge(value, ">", 0.6), evidence, why)]


def _sign_flip_ratio(stats: Mapping[str, Any], control: str = "random_k") -> tuple[float | None, dict | None]:
    rs = [r for r in stats.get("ratios", []) if r["perturbation"] == "sign_flip" and r["numerator"] == "top_k"
          and r["denominator"] == control]
    if not rs:
        return None, None
    # the guide's plain sign flip is scale 1; otherwise judge at the largest scale run
    r = next((x for x in rs if x["scale"] == 1.0), max(rs, key=lambda x: x["scale"]))
    return float(r["ratio_delta_ppl"]), r


def p3_sign_flip_ratio(stats: Mapping[str, Any], evidence: str, control: str = "random_k") -> list[Criterion]:
    """'ΔPPL(top) ≥ 5× ΔPPL(random) for sign flip' (ratio of mean delta-PPL over seeds; CI in the note)."""
    value, r = _sign_flip_ratio(stats, control)
    if r is None:
        return [Criterion("P3.sign_flip_ratio", 3, "ΔPPL(top) ≥ 5× ΔPPL(random) for sign flip", None, ">= 5",
                          None, evidence, f"no sign_flip top_k vs {control} comparison was run")]
    note = (f"scale {r['scale']:g}; 95% CI [{r['ci_lo']:.3g}, {r['ci_hi']:.3g}]; "
            f"log-PPL ratio {r['ratio_delta_log_ppl']:.3g}")
    if value is not None and math.isnan(value):
        note += "; ratio undefined (neither group raised the PPL)"
    return [Criterion("P3.sign_flip_ratio", 3, "ΔPPL(top) ≥ 5× ΔPPL(random) for sign flip", value, ">= 5",
                      judge(value, ">=", RATIO_THRESHOLD), evidence, note)]


def p3_significance(stats: Mapping[str, Any], evidence: str, control: str = "random_k",
                    expected: list[str] | None = None) -> list[Criterion]:
    """'p < 0.01 across all perturbation types' (top_k vs control, Holm-adjusted primary p, largest over types)."""
    comps = [c for c in stats.get("comparisons", []) if c["a"] == "top_k" and c["b"] == control]
    text = "p < 0.01 across all perturbation types"
    if not comps:
        return [Criterion("P3.significance", 3, text, None, "< 0.01 (Holm)", None, evidence,
                          f"no top_k vs {control} comparison was run")]
    worst = max(comps, key=lambda c: c["p_primary_holm"] if not math.isnan(c["p_primary_holm"]) else math.inf)
    p = worst["p_primary_holm"]
    types = sorted({c["perturbation"] for c in comps})
    missing = sorted(set(expected or []) - set(types))
    passed = judge(p, "<", ALPHA) if not math.isnan(p) else None
    # direction matters: a significant *one-sided* test already means top_k > control
    note = (f"largest Holm-adjusted p over {len(comps)} condition(s) of {types} (worst: {worst['perturbation']}, "
            f"{worst['primary']} test, m = {worst[worst['primary']].get('m_holm')})")
    if missing:
        note += f"; perturbation types not run: {missing}"
        passed = False if passed is False else None
    return [Criterion("P3.significance", 3, text, p, "< 0.01 (Holm-corrected)", passed, evidence, note)]


def p3_monotonic(stats: Mapping[str, Any], evidence: str) -> list[Criterion]:
    """'monotonic dose response': top_k's damage rises with every dose step for each perturbation with
    >= 2 doses, and top > random > bottom holds at every dose."""
    dr = stats.get("dose_response", {})
    curves = [c for c in dr.get("curves", []) if c["group"] == "top_k" and c.get("n_doses", 0) >= 2]
    text = "monotonic dose response"
    if not curves:
        return [Criterion("P3.dose_monotonic", 3, text, None, "rising at every step; hierarchy at every dose", None,
                          evidence, "no perturbation was run at 2 or more doses")]
    perts = {c["perturbation"] for c in curves}
    hier = [h for h in dr.get("hierarchy", []) if h["perturbation"] in perts and h["holds"] is not None]
    n_mono = sum(bool(c["monotonic"]) for c in curves)
    n_hier = sum(bool(h["holds"]) for h in hier)
    rho = min(c["rho"] for c in curves)
    passed = n_mono == len(curves) and n_hier == len(hier)
    note = (f"{n_mono}/{len(curves)} top_k curves rise at every dose step (min Spearman rho {rho:.2f}); "
            f"hierarchy {' > '.join(hier[0]['groups']) if hier else 'n/a'} holds at {n_hier}/{len(hier)} doses")
    return [Criterion("P3.dose_monotonic", 3, text, f"{n_mono}/{len(curves)} curves, {n_hier}/{len(hier)} doses",
                      "all", passed, evidence, note)]


def holds(stats: Mapping[str, Any], control: str = "random_k") -> bool | None:
    """The Phase 3 claim for one model: sign-flip ratio >= 5 and top_k > control significant for every type."""
    ratio, _ = _sign_flip_ratio(stats, control)
    comps = [c for c in stats.get("comparisons", []) if c["a"] == "top_k" and c["b"] == control]
    if ratio is None or not comps:
        return None
    return bool(ratio >= RATIO_THRESHOLD and all(c["significant"] for c in comps))


def p3_cross_architecture(per_model: Mapping[str, tuple[str, Mapping[str, Any]]], evidence: str) -> list[Criterion]:
    """'holds across ≥ 4 architectures': per_model = model -> (architecture family, analyze() dict)."""
    verdicts = {m: (fam, holds(st)) for m, (fam, st) in per_model.items()}
    archs = {fam for fam, _ in verdicts.values()}
    ok_archs = sorted({fam for fam, v in verdicts.values() if v})
    text = "holds across ≥ 4 architectures"
    note = "; ".join(f"{m} ({fam}): {'holds' if v else 'n/a' if v is None else 'does not hold'}"
                     for m, (fam, v) in verdicts.items())
    if len(archs) < MIN_ARCHITECTURES:
        return [Criterion("P3.cross_architecture", 3, text, len(ok_archs), ">= 4", None, evidence,
                          f"only {len(archs)} architecture(s) run ({sorted(archs)}); needs {MIN_ARCHITECTURES}. {note}")]
    return [Criterion("P3.cross_architecture", 3, text, len(ok_archs), ">= 4",
                      judge(float(len(ok_archs)), ">=", MIN_ARCHITECTURES), evidence, note)]


def phase3_rows(stats: Mapping[str, Any], evidence: str, expected_types: list[str] | None = None) -> list[Criterion]:
    """The per-model Phase 3 rows: sign-flip ratio, significance, dose-response."""
    return (p3_sign_flip_ratio(stats, evidence) + p3_significance(stats, evidence, expected=expected_types)
            + p3_monotonic(stats, evidence))
