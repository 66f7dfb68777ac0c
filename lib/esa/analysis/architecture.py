"""Architecture analyzer: where in a model its critical weights sit, and how that differs across models.

Input: top-k selection tables (the project-wide schema: metric, seed, param, layer, component, kind,
expert, row, col, score, rank), one per model, given as {model: table} or one table with a `model`
column; plus, optionally, per-model metadata (family, n_layers, moe, instruct, base model).

Ratios are computed from *scores*, not only from counts: with `per_layer` selection every weight
matrix contributes exactly k rows, so counts per kind only restate the inventory. Scores of different
models live on different scales (loss, tokenizer, width), so comparisons across models use
scale-free quantities: the attention/FFN ratio of mean top-k scores, the share of score mass, and
ranks within a model.

Statistics: family differences by permutation test (difference of means of per-layer log attention/FFN
ratios) and Mann-Whitney U, Holm-corrected across every comparison returned together. Layers of one
model are not independent replicates, and each family here is one or a few models, so every
comparison carries its confounds in the output.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from esa.errors import EsaError
from esa.stats.inference import holm

TOPK_COLUMNS = ("metric", "seed", "param", "layer", "component", "kind", "expert", "row", "col", "score", "rank")
FFN_KINDS = ("mlp", "expert")
RUN_HINT = "esa-runner --model {model} --metric {metric} (Phase 2 sensitivity + top-k selection)"

CONFOUNDS = {
    "family": "families differ in size, depth, training data and tokenizer, not only in architecture; layers "
              "of one model are not independent replicates (the permutation test treats them as such)",
    "dense_vs_moe": "the MoE and dense models share data, tokenizer and active size only if they come from the "
                    "same suite (the micro-suite); expert scores are per expert slice, which sees fewer tokens",
    "instruct_vs_base": "instruction tuning also changes data and length of training; matched matrices are "
                        "paired, but matrices within a model are correlated",
    "depth": "relative depth pools models with different layer counts; early/late layers also differ in "
             "norm statistics that inflate activation-aware scores",
}


# ---------------------------------------------------------------- input
def combine_topk(tables: Mapping[str, pd.DataFrame] | pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """One table with a `model` column; checks schema, >= 2 models, one metric and one k across models."""
    if isinstance(tables, pd.DataFrame):
        if "model" not in tables.columns:
            raise EsaError("a single top-k table needs a `model` column; or pass {model: table}")
        df = tables.copy()
    else:
        empty = [m for m, t in tables.items() if t is None or len(t) == 0]
        if empty:
            raise EsaError(f"model(s) {empty} have no top-k results; produce them with "
                           f"`{RUN_HINT.format(model=empty[0], metric=metric or 'grad_x_weight')}`")
        for m, t in tables.items():
            lacking = [c for c in TOPK_COLUMNS if c not in t.columns]
            if lacking:
                raise EsaError(f"top-k table of {m!r} lacks column(s) {lacking}; expected the schema of "
                               "esa.sensitivity.select.select_topk")
        df = pd.concat([t.assign(model=m) for m, t in tables.items()], ignore_index=True) if tables else pd.DataFrame()
    if df.empty:
        raise EsaError(f"no top-k results given; produce them with `{RUN_HINT.format(model='<model>', metric='grad_x_weight')}`")
    missing = [c for c in TOPK_COLUMNS if c not in df.columns]
    if missing:
        raise EsaError(f"top-k table lacks column(s) {missing}; expected the schema of esa.sensitivity.select.select_topk")
    if metric is not None:
        have = set(df["metric"])
        lacking = sorted(set(df["model"]) - set(df.loc[df["metric"] == metric, "model"]))
        if lacking:
            raise EsaError(f"model(s) {lacking} have no top-k rows for metric {metric!r} (present: {sorted(have)}); "
                           f"run `{RUN_HINT.format(model=lacking[0], metric=metric)}`")
        df = df[df["metric"] == metric]
    metrics = df.groupby("model")["metric"].unique()
    mixed = {m: list(v) for m, v in metrics.items() if len(v) > 1}
    if mixed or df["metric"].nunique() > 1:
        raise EsaError(f"mixed metrics across models ({metrics.map(list).to_dict()}); pass metric=... or rerun "
                       f"with one metric: `{RUN_HINT.format(model='<model>', metric='<metric>')}`")
    models = sorted(df["model"].unique())
    if len(models) < 2:
        raise EsaError(f"architecture comparison needs at least two models, got {models}; run "
                       f"`{RUN_HINT.format(model='<another model>', metric=df['metric'].iloc[0])}`")
    # k = rows per weight matrix (expert slices are matrices) and seed; must agree across models
    k = df.groupby(["model", "seed", "param", "expert"]).size().groupby("model").max()
    if k.nunique() > 1:
        raise EsaError(f"mixed k across models ({k.to_dict()}); rerun the odd ones with the same --topk, e.g. "
                       f"`{RUN_HINT.format(model=k.idxmin(), metric=df['metric'].iloc[0])} --topk {k.max()}`")
    return df.reset_index(drop=True)


def _family_kind(kind: pd.Series) -> pd.Series:
    return kind.where(~kind.isin(FFN_KINDS), "ffn")


# ---------------------------------------------------------------- per-model summaries
def attention_ffn_ratio(topk: pd.DataFrame) -> pd.DataFrame:
    """Per model and seed: mean top-k score in attention vs FFN (MLP + experts), their ratio, score shares."""
    df = topk.assign(group=_family_kind(topk["kind"]))
    g = df.groupby(["model", "seed", "group"])["score"].agg(["mean", "sum", "size"]).unstack("group")
    out = pd.DataFrame(index=g.index)
    for grp in ("attention", "ffn", "router"):
        if ("mean", grp) in g.columns:
            out[f"{grp}_mean_score"] = g[("mean", grp)]
            out[f"{grp}_rows"] = g[("size", grp)].fillna(0).astype(int)
    total = g["sum"].sum(axis=1)
    for grp in ("attention", "ffn"):
        if ("sum", grp) in g.columns:
            out[f"{grp}_score_share"] = g[("sum", grp)] / total
    if {"attention_mean_score", "ffn_mean_score"} <= set(out.columns):
        out["attn_ffn_ratio"] = out["attention_mean_score"] / out["ffn_mean_score"]
    return out.reset_index()


def layer_progression(topk: pd.DataFrame, n_layers: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Per model, layer and kind group: mean top-k score, its rank within the model, relative depth."""
    df = topk[topk["layer"] >= 0].assign(group=_family_kind(topk["kind"]))
    g = df.groupby(["model", "layer", "group"])["score"].mean().rename("mean_score").reset_index()
    depth = {m: (n_layers or {}).get(m, int(sub["layer"].max()) + 1) for m, sub in g.groupby("model")}
    g["rel_depth"] = [lay / max(1, depth[m] - 1) for m, lay in zip(g["model"], g["layer"], strict=True)]
    # scale-free: each model's scores normalised by its own median layer score
    g["score_vs_model_median"] = g["mean_score"] / g.groupby("model")["mean_score"].transform("median")
    return g


def depth_trend(progression: pd.DataFrame) -> pd.DataFrame:
    """Per model and group: Spearman correlation of mean top-k score with layer index."""
    rows = []
    for (m, grp), sub in progression.groupby(["model", "group"]):
        rho, p = (stats.spearmanr(sub["layer"], sub["mean_score"]) if len(sub) >= 3 else (np.nan, np.nan))
        rows.append(dict(model=m, group=grp, n_layers=len(sub), spearman_rho=float(rho), p=float(p),
                         peak_layer=int(sub.loc[sub["mean_score"].idxmax(), "layer"])))
    return pd.DataFrame(rows)


def moe_breakdown(topk: pd.DataFrame, routing_counts: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """For MoE models: score by kind (expert / attention / router), and per expert vs its routing load.

    `routing_counts`: optional table model, layer, expert, tokens (how many tokens the router sent to each
    expert on the calibration data). Returns {"by_kind", "per_expert", "load_vs_sensitivity"}.
    """
    moe_models = sorted(topk.loc[topk["kind"] == "expert", "model"].unique())
    sub = topk[topk["model"].isin(moe_models)]
    by_kind = (sub.groupby(["model", "kind"])["score"].agg(mean_score="mean", rows="size", score_sum="sum")
               .reset_index())
    if len(by_kind):
        by_kind["score_share"] = by_kind["score_sum"] / by_kind.groupby("model")["score_sum"].transform("sum")
    per_expert = (sub[sub["kind"] == "expert"].groupby(["model", "layer", "expert"])["score"]
                  .agg(mean_score="mean", max_score="max").reset_index())
    load = pd.DataFrame(columns=["model", "n", "spearman_rho", "p"])
    if routing_counts is not None and len(per_expert):
        need = {"model", "layer", "expert", "tokens"}
        if not need <= set(routing_counts.columns):
            raise EsaError(f"routing_counts needs columns {sorted(need)}, got {list(routing_counts.columns)}")
        per_expert = per_expert.merge(routing_counts[list(need)], on=["model", "layer", "expert"], how="left")
        rows = []
        for m, s in per_expert.dropna(subset=["tokens"]).groupby("model"):
            rho, p = stats.spearmanr(s["tokens"], s["mean_score"]) if len(s) >= 3 else (np.nan, np.nan)
            rows.append(dict(model=m, n=len(s), spearman_rho=float(rho), p=float(p)))
        load = pd.DataFrame(rows)
    return {"by_kind": by_kind, "per_expert": per_expert, "load_vs_sensitivity": load}


# ---------------------------------------------------------------- statistics
def permutation_test(a: Any, b: Any, n_perm: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Two-sided permutation test of mean(a) - mean(b); returns (difference, p) with p >= 1/(n_perm+1)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        raise EsaError(f"a permutation test needs at least two values per group (got {len(a)} and {len(b)})")
    res = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                                 permutation_type="independent", n_resamples=n_perm, alternative="two-sided",
                                 vectorized=True, random_state=np.random.default_rng(seed))
    return float(a.mean() - b.mean()), float(res.pvalue)


def per_layer_log_ratio(topk: pd.DataFrame) -> pd.DataFrame:
    """Per model, seed and layer: log(mean attention score / mean FFN score) — a scale-free observation."""
    df = topk[topk["layer"] >= 0].assign(group=_family_kind(topk["kind"]))
    g = df.groupby(["model", "seed", "layer", "group"])["score"].mean().unstack("group")
    if not {"attention", "ffn"} <= set(g.columns):
        raise EsaError("attention/FFN comparison needs top-k rows of both attention and MLP/expert weights")
    g = g[(g["attention"] > 0) & (g["ffn"] > 0)]
    # seeds are averaged: the unit compared across families is the layer of a model
    out = np.log(g["attention"] / g["ffn"]).rename("log_attn_ffn").reset_index()
    return out.groupby(["model", "layer"], as_index=False)["log_attn_ffn"].mean()


def compare_groups(values: pd.DataFrame, group_col: str, value_col: str, confound: str, n_perm: int = 10_000,
                   seed: int = 0) -> pd.DataFrame:
    """Pairwise comparisons of `value_col` between the levels of `group_col`: permutation and Mann-Whitney."""
    levels = sorted(values[group_col].dropna().unique())
    rows = []
    for g1, g2 in itertools.combinations(levels, 2):
        a = values.loc[values[group_col] == g1, value_col].to_numpy(float)
        b = values.loc[values[group_col] == g2, value_col].to_numpy(float)
        diff, p_perm = permutation_test(a, b, n_perm=n_perm, seed=seed)
        u, p_mw = stats.mannwhitneyu(a, b, alternative="two-sided")
        rbc = 1 - 2 * u / (len(a) * len(b))  # rank-biserial correlation
        rows.append(dict(comparison=f"{g1} vs {g2}", group_col=group_col, measure=value_col, n_a=len(a), n_b=len(b),
                         mean_a=float(a.mean()), mean_b=float(b.mean()), diff=diff, p_perm=p_perm, mw_u=float(u),
                         p_mw=float(p_mw), rank_biserial=float(-rbc), confounds=confound))
    return pd.DataFrame(rows)


def instruct_vs_base(topk: pd.DataFrame, pairs: Mapping[str, str]) -> pd.DataFrame:
    """Paired Wilcoxon over matched weight matrices: mean top-k score of instruct vs its base model.

    `pairs` maps instruct model -> base model; pairs with a model absent from `topk` are skipped (listed in
    the `note` column). Scores are compared as log ratios per matrix so scale differences cancel.
    """
    rows = []
    present = set(topk["model"])
    for inst, base in pairs.items():
        if inst not in present or base not in present:
            rows.append(dict(instruct=inst, base=base, n_matrices=0, note="not both present; skipped"))
            continue
        m = [topk[topk["model"] == x].groupby(["param", "expert"])["score"].mean() for x in (inst, base)]
        joined = pd.concat(m, axis=1, keys=["inst", "base"]).dropna()
        joined = joined[(joined["inst"] > 0) & (joined["base"] > 0)]
        lr = np.log(joined["inst"] / joined["base"])
        stat, p = stats.wilcoxon(lr) if len(lr) >= 5 else (np.nan, np.nan)
        rows.append(dict(instruct=inst, base=base, n_matrices=len(lr), median_log_ratio=float(lr.median()),
                         wilcoxon=float(stat), p=float(p), note="", confounds=CONFOUNDS["instruct_vs_base"]))
    return pd.DataFrame(rows)


def compare_architectures(
    tables: Mapping[str, pd.DataFrame] | pd.DataFrame,
    meta: pd.DataFrame | None = None,
    metric: str | None = None,
    routing_counts: pd.DataFrame | None = None,
    instruct_pairs: Mapping[str, str] | None = None,
    n_perm: int = 10_000,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """The guide's ArchitectureAnalyzer.compare_architectures: every comparison, tidy, with confounds.

    `meta`: optional table model, family, moe, n_layers (from esa.models ModelInfo). Without it each model
    is its own family. Returns {"attn_ffn", "progression", "depth_trend", "moe_by_kind", "moe_per_expert",
    "moe_load", "tests", "instruct_vs_base"}; `tests` holds the family and dense-vs-MoE comparisons with
    Holm-adjusted p-values across all of them.
    """
    topk = combine_topk(tables, metric)
    meta = meta if meta is not None else pd.DataFrame({"model": sorted(topk["model"].unique())})
    meta = meta.set_index("model")
    n_layers = meta["n_layers"].to_dict() if "n_layers" in meta.columns else None
    prog = layer_progression(topk, n_layers)
    moe = moe_breakdown(topk, routing_counts)
    obs = per_layer_log_ratio(topk)
    fam = meta["family"].to_dict() if "family" in meta.columns else {}
    obs["family"] = obs["model"].map(lambda m: fam.get(m, m))
    tests = [compare_groups(obs, "family", "log_attn_ffn", CONFOUNDS["family"], n_perm, seed)]
    moe_flag = (meta["moe"].to_dict() if "moe" in meta.columns
                else {m: m in set(moe["by_kind"]["model"]) for m in obs["model"].unique()})
    obs["moe"] = obs["model"].map(lambda m: "moe" if moe_flag.get(m) else "dense")
    # dense vs MoE is a separate comparison only when it splits the models differently from family
    same_split = obs.groupby("family")["moe"].nunique().max() == 1 and obs.groupby("moe")["family"].nunique().max() == 1
    if obs["moe"].nunique() == 2 and not same_split:
        tests.append(compare_groups(obs, "moe", "log_attn_ffn", CONFOUNDS["dense_vs_moe"], n_perm, seed))
    tests_df = pd.concat([t for t in tests if len(t)], ignore_index=True) if any(len(t) for t in tests) else pd.DataFrame()
    if len(tests_df):
        # one Holm implementation for the project (NaN p-values stay NaN and do not count toward m)
        tests_df["p_perm_holm"] = holm(tests_df["p_perm"].tolist())
        tests_df["p_mw_holm"] = holm(tests_df["p_mw"].tolist())
    return {
        "attn_ffn": attention_ffn_ratio(topk),
        "progression": prog,
        "depth_trend": depth_trend(prog),
        "moe_by_kind": moe["by_kind"],
        "moe_per_expert": moe["per_expert"],
        "moe_load": moe["load_vs_sensitivity"],
        "tests": tests_df,
        "instruct_vs_base": instruct_vs_base(topk, instruct_pairs or {}),
        "layer_observations": obs,
    }
