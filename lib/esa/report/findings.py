"""What a run found, in sentences computed from its own tables: the findings block of the index.

Everything is read from `reports/<run>/data/<notebook>/...` and the scorecard, defensively: a notebook
that did not run (or a table it does not write yet, as Phase 5's are being built) drops its sentence and
is named as missing; nothing here is typed in. Per model: the strongest critical weight and what zeroing
it does against controls, where the critical weights concentrate, top-k vs the magnitude control (said
plainly when magnitude does more damage), what failed and why, and Phase 5's rows when they exist.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from esa.report.scorecard import judged
from esa.stats import power
from esa.stats.verdicts import verdict_of

ALPHA = 0.01
W1, W2, W4 = "phase2_week1_metric_validation", "phase2_week2_cross_model", "phase2_week4_components"
W5, W8, P1 = "phase3_week5_core_perturbation", "phase3_week8_advanced", "phase1_week0_baselines"
# the hero figure: the first of these that the run drew (pattern under figures/<run>/)
HERO = (f"{W5}/damage_{{model}}.png", f"{W8}/cumulative_ablation.png", f"{W4}/component_shares.png",
        f"{P1}/baselines.png")


@dataclass
class ModelFindings:
    model: str
    sentences: list[str] = field(default_factory=list)
    ids: list[list[str]] = field(default_factory=list)  # per sentence, the criterion ids it rests on (may be empty)


@dataclass
class Findings:
    banner: str
    models: list[ModelFindings]
    hero: Path | None = None
    hero_caption: str = ""
    missing: list[str] = field(default_factory=list)  # data the sentences would use, absent from this run


# ------------------------------------------------------------------ defensive readers
def _parquet(run_dir: Path, notebook: str, name: str) -> pd.DataFrame | None:
    path = run_dir / "data" / notebook / f"{name}.parquet"
    try:
        return pd.read_parquet(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _settings(run_dir: Path, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    if settings:
        return dict(settings)
    man = _json(run_dir / "manifest.json") or {}
    return dict(man.get("profile_settings") or {})


# ------------------------------------------------------------------ the banner
def holm_m(run_dir: Path) -> int | None:
    """The number of comparisons Holm corrects over in week 5 (the largest over its models), if it ran."""
    ms = []
    for p in sorted((run_dir / "data" / W5).glob("stats_*.json")):
        st = _json(p) or {}
        ms += [int(c.get("window_level", c.get("seed_level", {})).get("m_holm") or 0) for c in st.get("comparisons", [])]
    return max(ms) if ms else None


def provenance(run_dir: Path) -> list[str]:
    """Per Phase 1 model, where its weights came from (embedded GGUF quantisation, dtype as loaded)."""
    t = _parquet(run_dir, P1, "summary")
    if t is None or "model" not in t.columns:
        return []
    out = []
    for r in t.to_dict("records"):
        tok = str(r.get("tokenizer", ""))
        quant = next((q for q in ("Q4_1", "Q4_K_M", "Q4_0", "Q8_0", "F16", "BF16") if q.lower() in tok.lower()), None)
        src = str(r.get("source", ""))
        out.append(f"{r['model']}: {src}" + (f" {quant} GGUF, dequantised" if quant else ""))
    return out


def profile_banner(settings: Mapping[str, Any], m: int | None = None) -> str:
    """'smoke: 2 seeds × 2 windows; statistics cannot reach α = 0.01', computed from the profile: the
    window-level test over seeds × windows pairs has an exact floor 2^-n, times Holm's m comparisons."""
    name = settings.get("name", "?")
    seeds = len(settings.get("seeds") or [])
    w = int(settings.get("perturb_eval_windows") or settings.get("eval_windows") or 0)
    head = (f"{name}: {seeds} seeds × {w} windows per perturbation condition, {settings.get('max_samples')} "
            f"calibration windows × {settings.get('seqlen')} tokens per seed, {settings.get('dtype')}")
    if not seeds or not w:
        return head
    n = seeds * w
    floor = (m or 1) * power.wilcoxon_min_p(n)
    if seeds < 5 and floor >= ALPHA:  # below 5 seeds the window-level test is primary (esa.stats.inference)
        return (f"{head}; statistics cannot reach α = {ALPHA:g} (smallest Holm-adjusted window-test p = "
                f"{m or 1} × 2^-{n} = {min(floor, 1.0):.3g})")
    return f"{head}; tests can reach α = {ALPHA:g}"


# ------------------------------------------------------------------ per-model sentences
def _top_weights(run_dir: Path, model: str, first_model: str | None) -> pd.DataFrame | None:
    t = _parquet(run_dir, W2, "top_weights")
    if t is not None and "model" in t.columns and model in set(t["model"]):
        return t[t["model"] == model]
    t = _parquet(run_dir, W1, "top_weights")
    return t if t is not None and model == first_model else None


def _strongest(run_dir: Path, model: str, first_model: str | None, stats: Mapping[str, Any] | None) -> str | None:
    tops = _top_weights(run_dir, model, first_model)
    if tops is None or tops.empty:
        return None
    r1 = tops[tops["rank"] == 1]
    key = Counter(zip(r1["param"], r1["row"], r1["col"], strict=True)).most_common(1)[0][0]
    metrics = sorted(set(r1[(r1["param"] == key[0]) & (r1["row"] == key[1]) & (r1["col"] == key[2])]["metric"]))
    name = f"{key[0]}[{key[1]}, {key[2]}]"
    text = f"The strongest critical weight is {name}, ranked first by {len(metrics)} metric(s) ({', '.join(metrics)})"
    sw = _parquet(run_dir, W1, "super_weights") if model == first_model else None
    if sw is not None and {"param", "row", "col", "candidate"} <= set(sw.columns):
        hit = sw[(sw["param"] == key[0]) & (sw["row"] == key[1]) & (sw["col"] == key[2])]
        if len(hit):
            text += (" and flagged by the super-weight detector" if bool(hit["candidate"].iloc[0]) else
                     " (the super-weight detector does not flag it)")
    cum = _parquet(run_dir, W8, f"cumulative_{model}")
    base = _num((stats or {}).get("baseline", {}).get("ppl"))
    if cum is not None and len(cum):
        c = cum.sort_values("n_weights").iloc[0]
        if int(c["n_weights"]) == 1:
            text += (f"; zeroing it alone takes PPL from {base:.3g} to {float(c['ppl']):.4g} "
                     f"(+{float(c['delta_log_ppl']):.2f} nats/token)" if base else
                     f"; zeroing it alone adds {float(c['delta_log_ppl']):.2f} nats/token")
    summ = pd.DataFrame((stats or {}).get("summary", []))
    if len(summ):
        z = summ[summ["perturbation"] == "zero"].set_index("group")
        if {"top_k", "random_k"} <= set(z.index):
            k, rk = int(z.loc["top_k", "k"]), z.loc["random_k"]
            span = f"{rk['mean']:.2g} nats, 95% CI [{rk['ci_lo']:.2g}, {rk['ci_hi']:.2g}]"
            noise = rk["ci_lo"] <= 0 <= rk["ci_hi"]
            text += (f"; zeroing all {k:,} top-k weights adds {z.loc['top_k', 'mean']:.3g} nats/token, while {k:,} "
                     f"matched random weights (random_k) " + (f"do no measurable damage ({span})" if noise else
                                                             f"add {span}"))
    return text + "."


def _concentration(run_dir: Path, model: str, first_model: str | None) -> str | None:
    parts = []
    tops = _top_weights(run_dir, model, first_model)
    if tops is not None and len(tops):
        chans = Counter(list(tops["row"]) + list(tops["col"]))
        ch, n = chans.most_common(1)[0]
        share = float(((tops["row"] == ch) | (tops["col"] == ch)).mean())
        per = int(tops.groupby(["metric", "seed"]).size().max()) if {"metric", "seed"} <= set(tops.columns) else len(tops)
        if share >= 0.25:
            parts.append(f"hidden channel {ch} recurs as a row or column in {share:.0%} of the top-{per} weights "
                         f"of every metric and seed ({len(tops)} in all)")
    cs = _parquet(run_dir, W4, "component_shares")
    if cs is not None and {"model", "metric", "component", "enrichment"} <= set(cs.columns):
        g = cs[(cs["model"] == model) & (cs["metric"] == "grad_x_weight")]
        if len(g):
            best = g.sort_values("enrichment", ascending=False).iloc[0]
            parts.append(f"by component, {best['component']} holds {best['selected_share']:.0%} of the grad_x_weight "
                         f"top-k against {best['weight_share']:.0%} of the weights ({best['enrichment']:.1f}× enriched)")
    return ("Critical weights concentrate: " + "; ".join(parts) + ".") if parts else None


def _vs_magnitude(stats: Mapping[str, Any] | None) -> str | None:
    summ = pd.DataFrame((stats or {}).get("summary", []))
    if summ.empty or "magnitude_k" not in set(summ["group"]):
        return None
    worse, better = [], []
    for (pert, _scale), g in summ.groupby(["perturbation", "scale"], sort=True):
        m = g.set_index("group")["mean"]
        if {"top_k", "magnitude_k"} <= set(m.index) and not math.isclose(m["top_k"], m["magnitude_k"], rel_tol=1e-9):
            (worse if m["magnitude_k"] > m["top_k"] else better).append(
                f"{pert} {m['top_k']:.3g} vs {m['magnitude_k']:.3g}")
    text = []
    if worse:
        text.append("The magnitude control (top-k by |w|) does more damage than the sensitivity top-k under "
                    + "; ".join(worse) + " nats/token (top-k vs magnitude_k): on these, weight size alone "
                    "finds weights at least as critical")
    if better:
        text.append(("the sensitivity top-k does more damage under " if worse else
                     "The sensitivity top-k does more damage than the magnitude control under ") + "; ".join(better))
    return "; ".join(text) + "." if text else None


def _failures(rows: list[dict[str, Any]], model: str) -> str | None:
    mine = [r for r in rows if r["id"].endswith(f".{model}") or f".{model}." in r["id"]]
    if not mine:
        return None

    def cite(r: dict[str, Any]) -> str:
        return f"{r['id'].replace('.' + model, '')} ({_short(r.get('measured'))} vs {r.get('threshold')})"

    fails = [cite(r) for r in mine if verdict_of(r) == "FAIL"]
    face = [cite(r) for r in mine if verdict_of(r) != "FAIL" and r.get("face_value") == "FAIL"]
    open_ = Counter(verdict_of(r) for r in mine if verdict_of(r) not in ("PASS", "FAIL"))
    text = f"Failed: {'; '.join(fails)}." if fails else f"No criterion failed as judged on {model}."
    if face:
        text += f" At face value these would fail, but rest on too small a sample to count: {'; '.join(face)}."
    if open_:
        text += " Not judged: " + ", ".join(f"{n} {v}" for v, n in open_.most_common()) + " (reasons in the scorecard)."
    return text


def _short(x: Any) -> str:
    v = _num(x)
    return f"{v:.3g}" if v is not None else str(x)


# Phase 5's criterion families (the id's second field), in words
APPLICATIONS = {"prune_gain": "Pruning guided by critical weights", "reproduce": "Reproducing published pruning",
                "ft": "Sparse fine-tuning of critical weights", "security": "Attacks on critical weights",
                "interpret_roles": "Interpretable roles of critical weights"}


def _phase5(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """One sentence per Phase 5 application: how many of its criteria were judged and how they came out,
    and the deciding row (a FAIL, else a PASS, else the first) in words with its value and threshold.
    Returns (sentence, the ids it rests on)."""
    fams: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("phase") == 5:
            fams.setdefault(str(r["id"]).split(".")[1] if "." in str(r["id"]) else str(r["id"]), []).append(r)
    out = []
    for fam, rs in fams.items():
        c = Counter(verdict_of(r) for r in rs)
        judged_n = c["PASS"] + c["FAIL"]
        key = next((r for v in ("FAIL", "PASS") for r in rs if verdict_of(r) == v), rs[0])
        tally = ", ".join(f"{n} {v}" for v, n in c.most_common())
        what = str(key.get("text") or key["id"])
        text = (f"{APPLICATIONS.get(fam, fam.replace('_', ' ').capitalize())}: {judged_n} of {len(rs)} "
                f"criteri{'on' if len(rs) == 1 else 'a'} could be judged ({tally}). "
                f"{'Failed' if verdict_of(key) == 'FAIL' else 'Passed' if verdict_of(key) == 'PASS' else 'For example'}"
                f": “{what}”, measured {_short(key.get('measured'))} against {key.get('threshold')}"
                + (f", {verdict_of(key)}" if verdict_of(key) not in ("PASS", "FAIL") else "") + ".")
        out.append((text, [str(r["id"]) for r in rs]))
    return out


def _models(run_dir: Path) -> tuple[list[str], str | None]:
    """Models with Phase 2-3 results (week 5 stats files, week 2 tables), the first being week 1's."""
    man = _json(run_dir / "manifest.json") or {}
    by_nb = {e.get("notebook"): (e.get("parameters") or {}).get("models") or [] for e in man.get("notebooks", [])}
    first = (by_nb.get(W1) or [None])[0]
    models = [p.stem.removeprefix("stats_") for p in sorted((run_dir / "data" / W5).glob("stats_*.json"))]
    t = _parquet(run_dir, W2, "top_weights")
    if t is not None and "model" in t.columns:
        models += [m for m in dict.fromkeys(t["model"]) if m not in models]
    if first and first not in models and (run_dir / "data" / W1).is_dir():
        models.insert(0, first)
    return models, first


def collect(run_dir: str | Path, fig_dir: str | Path | None = None,
            settings: Mapping[str, Any] | None = None, rows: list[dict[str, Any]] | None = None) -> Findings:
    """The findings of one run folder (and its figures folder, for the hero figure); `rows`: the judged
    scorecard when the caller has read it already."""
    run_dir = Path(run_dir)
    s = _settings(run_dir, settings)
    rows = judged(run_dir, s or None) if rows is None else rows
    models, first = _models(run_dir)
    out, missing = [], []
    for model in models:
        stats = _json(run_dir / "data" / W5 / f"stats_{model}.json")
        sentences = [x for x in (_strongest(run_dir, model, first, stats), _concentration(run_dir, model, first),
                                 _vs_magnitude(stats), _failures(rows, model)) if x]
        if stats is None:
            missing.append(f"{W5} for {model}")
        if sentences:
            out.append(ModelFindings(model, sentences))
    p5 = _phase5(rows)
    if p5:
        out.append(ModelFindings("Phase 5", [t for t, _ in p5], [ids for _, ids in p5]))
    banner = profile_banner(s, holm_m(run_dir))
    prov = provenance(run_dir)
    if prov:
        banner += ". Weights: " + "; ".join(prov)
    hero, caption = None, ""
    if fig_dir is not None:
        for pat in HERO:
            for model in models or [""]:
                p = Path(fig_dir) / pat.format(model=model)
                if p.is_file():
                    hero, caption = p, f"{p.parent.name}: {p.stem}"
                    break
            if hero:
                break
    return Findings(banner, out, hero, caption, missing)
