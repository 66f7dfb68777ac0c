"""Phase 2 (weeks 1-4): what the notebooks compute, as functions (the notebooks only call these and show the results).

`score_model` runs (or reads from the cache) every metric x seed of a profile on one model, through the
recipe layer; the table builders turn those runs into the stability, agreement, tail, component and
super-weight tables, and `phase2_criteria` judges the guide's Phase 2 success criteria from them.
Week 2's per-model body (`cross_model_one`: those tables for one model, not its score maps) is a record part
(esa.phases.parts): the notebook and `make record ... PART=<model>` call the same function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import pandas as pd

from esa.errors import EsaError
from esa.models import LoadedModel
from esa.params import Profile
from esa.phases import criteria, parts
from esa.phases.plans import validation_windows, week2_metrics
from esa.recipes import Recipe
from esa.sensitivity import resolution
from esa.sensitivity.engine import ScoreRun
from esa.sensitivity.superweights import detect_superweights
from esa.stats import stability
from esa.stats.verdicts import Criterion, judge

log = logging.getLogger(__name__)

Runs = dict[tuple[str, int], ScoreRun]
# the metric name of obd_selections' rows: the derived score `obd` (esa.sensitivity.metrics.OBD, the same
# quantity as the pruning method `obd`) under the name the phase-2 tables have always given it
OBD_LABEL = "grad_squared_x_w2"
HEAVY_TAIL_RATIO = 10.0  # our rule for "orders of magnitude above the rest": top-1% mean >= 10 x median


def load_model(name: str, P: Profile) -> LoadedModel:
    # SDPA, as every phase loads it; Hutchinson's double backward switches to SDPA's math kernel itself
    return Recipe.of(P).load(name)


def score_model(lm: LoadedModel, name: str, P: Profile, metrics: list[str] | None = None,
                seeds: list[int] | None = None, n_samples: int | None = None) -> Runs:
    t0 = time.perf_counter()
    runs = Recipe.of(P).score_model(lm, name, metrics, seeds, n_samples)
    log.info("%s: %d metric x seed runs in %.1f s", name, len(runs), time.perf_counter() - t0)
    return runs


def validation_profile(P: Profile) -> Profile:
    """Week 1's profile: `validation_samples` calibration windows per seed when set (else `max_samples`)."""
    return replace(P, max_samples=P.validation_samples) if P.validation_samples else P


def validation_runs(lm: LoadedModel, name: str, P: Profile) -> Runs:
    """Week 1's scores: every metric of the profile at its `validation_windows`, in the profile's metric order."""
    runs: Runs = {}
    for n in dict.fromkeys(validation_windows(P, m) for m in P.metrics):
        runs.update(score_model(lm, name, P, [m for m in P.metrics if validation_windows(P, m) == n], n_samples=n))
    return {(m, s): runs[(m, s)] for m in P.metrics for s in P.seeds if (m, s) in runs}


def selections(runs: Runs, k: int, mode: str, lm: LoadedModel) -> pd.DataFrame:
    return pd.concat([r.topk(k, mode, lm.inventory) for r in runs.values()], ignore_index=True)


def _sel(table: pd.DataFrame, metric: str, seed: int) -> pd.DataFrame:
    return table[(table["metric"] == metric) & (table["seed"] == seed)]


def stability_table(runs: Runs, table: pd.DataFrame, lm: LoadedModel) -> pd.DataFrame:
    """Per metric: mean pairwise Jaccard across seeds (with spread) and Spearman on the union."""
    rows = []
    for metric in dict.fromkeys(m for m, _ in runs):
        seeds = [s for m, s in runs if m == metric]
        if len(seeds) < 2:
            continue
        sels = {s: _sel(table, metric, s) for s in seeds}
        j = stability.pairwise_jaccard(sels)
        row = {"metric": metric, "n_seeds": len(seeds), "jaccard_mean": j["mean"], "jaccard_std": j["std"],
               "jaccard_min": j["min"], "jaccard_max": j["max"], "spearman_union": float("nan"), "n_union": 0,
               "n_beyond_depth": 0, "spearman_note": ""}
        if all(runs[(metric, s)].scores is not None for s in seeds):
            u = stability.union_scores(sels, {s: runs[(metric, s)].scores for s in seeds}, lm.inventory)
        else:  # each seed's score where the weight is among its stored candidates, NaN where it is not
            u = candidate_union(sels, {s: runs[(metric, s)].top for s in seeds})
        beyond = int(u[[f"seed_{s}" for s in seeds]].isna().any(axis=1).sum())
        row["n_beyond_depth"] = beyond
        if beyond == 0:  # every union weight is among every seed's stored candidates: the exact statistic
            rc = stability.rank_correlation(u)
            row.update(spearman_union=rc["mean"], n_union=rc["n_union"])
        else:
            row.update(n_union=len(u), spearman_note=f"not estimable: {beyond} of the {len(u)} union weights rank "
                       f"below another seed's {runs[(metric, seeds[0])].depth} stored candidates; needs the full "
                       f"maps (keep_scores) or candidate_depth > {runs[(metric, seeds[0])].depth}")
        rows.append(row)
    return pd.DataFrame(rows)


def candidate_union(selections: dict[int, pd.DataFrame], tops: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """`stability.union_scores` from stored top candidates: one row per weight of the union of the seeds'
    top-k sets (in the same order), a `seed_<s>` column per seed, NaN where that seed did not store it."""
    key = stability.KEY
    u = pd.concat([df[key] for df in selections.values()]).drop_duplicates().reset_index(drop=True)
    for seed, top in tops.items():
        u = u.merge(top[key + ["score"]].rename(columns={"score": f"seed_{seed}"}), on=key, how="left")
    return u


def metric_resolutions(lm: LoadedModel, P: Profile, probe_resolution: dict[str, Any] | None = None,
                       seed: int | None = None) -> dict[str, dict[str, Any]]:
    """Per metric, whether it resolves its own top-k at the profile's calibration sample (held out over
    windows, `esa.sensitivity.resolution`); hutchinson_diag's comes from its probe streams when given."""
    R = Recipe.of(P)
    seed = P.seeds[0] if seed is None else seed
    ids = R.calibration(seed).windows(lm.tokenizer, max_positions=lm.info.max_positions or None).ids
    # one pass over the windows for every metric; the gradient metrics share each window's backward
    out = resolution.window_resolutions(lm.model, lm.inventory, ids, [m for m in P.metrics if m != "hutchinson_diag"],
                                        R.metric_config(seed), P.topk)
    if probe_resolution is not None and "hutchinson_diag" in P.metrics:
        out["hutchinson_diag"] = resolution.from_probes(probe_resolution)
    return out


def resolution_table(resolutions: dict[str, dict[str, Any]]) -> pd.DataFrame:
    cols = ["metric", "unit", "n", "z", "resolved", "needed", "note"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in resolutions.values()], columns=cols)


def obd_selections(runs: Runs, lm: LoadedModel, k: int, mode: str) -> pd.DataFrame:
    """Per seed, the top-k by grad_squared x w^2 (metric name OBD_LABEL), derived from the cached grad_squared
    scores and the weights at scoring time (`Metric.derived`), so it costs no extra pass. Empty if grad_squared
    (without times_w2) was not run, and for a calibration sample of one micro-batch, where
    g^2 * w^2 = (g * w)^2 ranks exactly as |grad_x_weight| and the comparison would be 100% by construction."""
    parts = []
    for (metric, seed), r in runs.items():
        if metric != "grad_squared" or "obd" not in r.derived:
            continue
        if r.settings["n_samples"] <= r.settings["metric_settings"]["batch_size"]:  # one micro-batch
            log.warning("grad_squared x w^2 not derived for seed %d: one micro-batch of %d windows makes it "
                        "(grad x weight)^2, the same ranking as grad_x_weight", seed, r.settings["n_samples"])
            continue
        parts.append(r.derived_topk("obd", k, mode).assign(metric=OBD_LABEL, seed=seed))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def agreement_table(runs: Runs, table: pd.DataFrame, derived: pd.DataFrame | None = None) -> pd.DataFrame:
    """Overlap and Jaccard between metrics, per seed, and their mean over seeds. `derived`: more selections
    (e.g. `obd_selections`) with their own metric names, compared like the rest."""
    seeds = sorted({s for _, s in runs})
    metrics = list(dict.fromkeys(m for m, _ in runs))
    parts = []
    for seed in seeds:
        sels = {m: _sel(table, m, seed) for m in metrics if (m, seed) in runs}
        if derived is not None and len(derived):
            sels.update({m: _sel(derived, m, seed) for m in dict.fromkeys(derived["metric"])
                         if len(_sel(derived, m, seed))})
        if len(sels) > 1:
            parts.append(stability.metric_agreement(sels).assign(seed=seed))
    if not parts:
        return pd.DataFrame(columns=["metric_a", "metric_b", "overlap", "jaccard", "k", "seed"])
    return pd.concat(parts, ignore_index=True)


def tails_table(runs: Runs) -> pd.DataFrame:
    rows = []
    for (metric, seed), r in runs.items():
        t = r.tails
        rows.append({"metric": metric, "seed": seed, "median": t["median"], "top1pct_mean": t["top_mean"],
                     "max": t["max"], "top1pct_over_median": t["top_mean_over_median"],
                     "max_over_median": t["max_over_median"], "hill_alpha": t["hill_alpha"],
                     "metric_s": r.timings.get("metric_s", float("nan")), "from_cache": r.from_cache})
    return pd.DataFrame(rows)


def top_weights(runs: Runs, lm: LoadedModel, n: int = 5) -> pd.DataFrame:
    """The n highest-scoring weights of the whole model per metric and seed (global ranking)."""
    parts = [r.topk(n, "global", lm.inventory) for r in runs.values()]
    df = pd.concat(parts, ignore_index=True)
    return df[["metric", "seed", "rank", "param", "layer", "component", "expert", "row", "col", "score"]]


def superweight_table(lm: LoadedModel, runs: Runs) -> pd.DataFrame:
    """Data-free super-weight candidates per layer, with each metric's per-matrix rank of that weight."""
    sw = detect_superweights(lm.model, lm.tokenizer, lm.inventory)
    seed = min(s for _, s in runs)
    for metric in dict.fromkeys(m for m, _ in runs):
        cands = runs[(metric, seed)].top  # each matrix's top candidates (cached depth)
        ranks = cands.set_index(["param", "row", "col"])["rank"]
        sw[f"rank_{metric}"] = [ranks.get((p, r, c), pd.NA) for p, r, c in zip(sw["param"], sw["row"], sw["col"],
                                                                               strict=True)]
    return sw


def metric_pair(agree: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """The agreement rows of metrics a and b, in either order."""
    return agree[((agree.metric_a == a) & (agree.metric_b == b)) | ((agree.metric_a == b) & (agree.metric_b == a))]


def phase2_criteria(stab: pd.DataFrame, agree: pd.DataFrame, tails: pd.DataFrame, model: str,
                    evidence: str) -> list[Criterion]:
    """The guide's criteria (Jaccard > 0.4 over 3+ seeds; grad_x_weight vs grad_squared overlap > 60%) and
    our heavy-tail rule, one model at a time."""
    n_seeds = int(stab["n_seeds"].max()) if len(stab) else 0
    rows = criteria.p2_jaccard(dict(zip(stab["metric"], stab["jaccard_mean"], strict=True)), n_seeds, evidence)
    pair = metric_pair(agree, "grad_squared", "grad_x_weight")
    rows += criteria.p2_metric_overlap(float(pair["overlap"].mean()) if len(pair) else None, evidence)
    obd = metric_pair(agree, OBD_LABEL, "grad_x_weight")
    if len(obd):  # the same criterion with the Fisher metric's OBD variant (its optional x w^2)
        value = float(obd["overlap"].mean())
        rows.append(Criterion("P2.metric_overlap_obd", 2,
                              "grad_x_weight vs grad_squared x w^2 (OBD) top-k overlap > 60% (our addition)", value,
                              "> 0.6", judge(value, ">", 0.6), evidence,
                              "derived from the cached grad_squared scores and the weights; mean over seeds"))
    for metric, grp in tails.groupby("metric", sort=False):
        value = float(grp["top1pct_over_median"].median())
        rows.append(Criterion(f"P2.heavy_tail.{metric}", 2,
                              "scores are heavy-tailed: top-1% mean far above the median (our rule)", value,
                              f">= {HEAVY_TAIL_RATIO:g}", judge(value, ">=", HEAVY_TAIL_RATIO), evidence,
                              f"median over seeds; Hill alpha {grp['hill_alpha'].median():.2f}"))
    for r in rows:
        r.id = f"{r.id}.{model}"
    return rows


def describe_runs(runs: Runs) -> dict[str, Any]:
    any_run = next(iter(runs.values()))
    return {"windows": any_run.extras.get("windows"), "definitions": {m: r.extras.get("variant") for (m, _), r in
                                                                       runs.items()}}


def mode_comparison(runs: Runs, lm: LoadedModel, ks: list[int], metric: str) -> pd.DataFrame:
    """Per k and mode: stability (mean pairwise Jaccard over seeds), matrices hit by the first seed scored, and
    global ⊆ per-layer union."""
    seeds = list(dict.fromkeys(s for m, s in runs if m == metric))  # scoring order: the first is the profile's first
    rows = []
    for k in ks:
        sels = {mode: {s: runs[(metric, s)].topk(k, mode, lm.inventory) for s in seeds} for mode in ("per_layer", "global")}
        contained = all(stability.weight_set(sels["global"][s]) <= stability.weight_set(sels["per_layer"][s])
                        for s in seeds)
        for mode, by_seed in sels.items():
            j = stability.pairwise_jaccard(by_seed) if len(seeds) > 1 else {"mean": float("nan"), "std": float("nan")}
            first = by_seed[seeds[0]]
            rows.append({"k": k, "mode": mode, "n_selected": len(first), "jaccard_mean": j["mean"],
                         "jaccard_std": j["std"], "matrices_hit": first.groupby(["param", "expert"]).ngroups,
                         "global_within_per_layer_union": contained})
    return pd.DataFrame(rows)


def concentration(selection: pd.DataFrame, n_matrices: int) -> dict[str, float]:
    """How concentrated a global selection is over matrices: share held by the busiest 10% of matrices."""
    counts = selection.groupby(["param", "expert"]).size().sort_values(ascending=False).to_numpy()
    top = max(1, int(round(0.1 * n_matrices)))
    return {"matrices_hit": int(len(counts)), "n_matrices": n_matrices,
            "share_in_busiest_10pct": float(counts[:top].sum() / max(1, counts.sum())),
            "largest_matrix_share": float(counts[0] / counts.sum()) if len(counts) else float("nan")}


# ------------------------------------------------------------------ week 2: one model, as a record part
CROSS_MODEL = "phase2_week2_cross_model"
_CROSS_KEYS = ("corpus", "dtype", "seqlen", "max_samples", "seeds", "topk", "mode", "batch_size", "candidate_depth",
               "keep_scores")


def cross_model_settings(P: Profile, model: str) -> dict[str, Any]:
    """What determines `cross_model_one(P, model)` (a part's settings)."""
    metrics = week2_metrics(P, model)
    return parts.model_settings(P, model, _CROSS_KEYS, metrics=metrics,
                                hutchinson_probes=P.hutchinson_probes if "hutchinson_diag" in metrics else None)


def cross_model_one(P: Profile, model: str) -> dict[str, Any]:
    """Week 2's body for one model: every metric x seed scored (or read from the cache), and the tables the
    page and later notebooks read; `topk` (the full per-matrix selection) is not stored in a part."""
    lm = load_model(model, P)
    runs = score_model(lm, model, P, metrics=week2_metrics(P, model))
    table = selections(runs, P.topk, P.mode, lm)
    obd = obd_selections(runs, lm, P.topk, P.mode)  # grad_squared x w^2, free from the cached Fisher scores
    out: dict[str, Any] = {
        "topk": table, "tails": tails_table(runs), "stability": stability_table(runs, table, lm),
        "agreement": agreement_table(runs, table, derived=obd), "top_weights": top_weights(runs, lm, n=3),
        "survival": runs[(week2_metrics(P, model)[0], P.seeds[0])].survival,
        "info": {"family": lm.info.family, "layers": lm.info.n_layers,
                 "weights_studied_M": lm.info.n_weights_studied / 1e6, "moe": lm.info.moe},
        "super_weights_skipped": None}
    try:
        out["super_weights"] = superweight_table(lm, runs)
    except EsaError as e:  # a model without dense down projections (MoE): said on the page
        out["super_weights_skipped"] = str(e)
    return out


parts.SPECS.register(parts.PartSpec(CROSS_MODEL, lambda P, models: list(models), cross_model_settings,
                                    cross_model_one, transient=("topk",)))
