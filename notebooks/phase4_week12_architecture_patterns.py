# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (esa)
#     language: python
#     name: esa
# ---

# %% [markdown]
# # Phase 4 · Week 12: architecture-specific patterns and the Phase 4 scorecard
#
# **Question.** Beyond attention-vs-FFN averages (week 10): in each model, where is the single most critical
# weight, how concentrated is the critical mass, which components carry it, does the model have a
# super weight (Yu et al. 2024) and is it the weight the metric ranks first, and in the MoE, do the experts
# the router uses most carry the most sensitivity? Then the Phase 4 scorecard: the scaling rows of week 11
# and the family-difference row of this notebook, all computed from results.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

import esa.nb
from esa.analysis import architecture, patterns
from esa.nb import say
from esa.phases import criteria, phase4
from esa.report import scorecard

ctx = esa.nb.context("phase4_week12_architecture_patterns", profile, models, run_dir, overrides)
P = ctx.profile
measures, tables, source = phase4.week9_results(ctx.run_dir, models, P)
refs = list(measures.model)
topk = architecture.combine_topk(tables)
n_layers = dict(zip(measures.model, measures.n_layers, strict=True))
say(f"{len(refs)} models ({', '.join(refs)}), read from {source}.")

# %% [markdown]
# ## The single most critical weight of each model
# `score_over_topk_median`: how far the top weight stands above the median of the model's own top-k
# (per-layer k, all matrices); `same_across_seeds`: every calibration sample picks the same weight.

# %%
top = patterns.top_weights(topk, n_layers)
ctx.table(top, "top_weights", "The single most critical weight of each model and seed.",
          columns=["model", "seed", "param", "component", "layer", "rel_depth", "row", "col", "score_over_topk_median",
                   "same_across_seeds"],
          headers={"param": "Parameter", "component": "Component", "rel_depth": "Relative depth", "row": "Row",
                   "col": "Column", "score_over_topk_median": "Score / top-k median",
                   "same_across_seeds": "Same weight every seed"})

# %% [markdown]
# ## Which components carry the critical mass, and how concentrated it is

# %%
shares = patterns.component_shares(topk)
conc = patterns.concentration(topk, top_frac=0.01)
ctx.save_table(shares, "component_shares")
ctx.save_table(conc, "concentration")
ORDER = ["attention q", "attention k", "attention v", "attention o", "mlp gate", "mlp up", "mlp down",
         "expert gate_up", "expert down", "router router"]
heat = shares.assign(label=shares.kind + " " + shares.component).pivot_table(
    index="model", columns="label", values="score_share", aggfunc="sum").fillna(0.0)
heat = heat.reindex(index=[m for m in measures.sort_values("n_params").model if m in heat.index],
                    columns=[c for c in ORDER if c in heat.columns] + [c for c in heat.columns if c not in ORDER])
heat.columns = [c.replace("attention ", "attn ").replace("router router", "router") for c in heat.columns]
fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(heat) + 2.2), gridspec_kw={"width_ratios": [3, 1]})
sns.heatmap(heat, annot=True, fmt=".0%", cmap="mako_r", cbar=False, ax=axes[0], annot_kws={"size": 7})
axes[0].set(title="Share of top-k score mass by component", xlabel="", ylabel="")
c = conc.groupby("model", as_index=False)[["share_top_frac", "share_top1", "gini"]].mean()
sns.barplot(data=c, y="model", x="share_top_frac", ax=axes[1], color="C1", order=list(heat.index))
axes[1].set(xlabel="mass held by the top 1% of the top-k", ylabel="", xlim=(0, 1))
fig.tight_layout()
ctx.savefig(fig, "components_concentration")
c

# %% [markdown]
# ## Super weights and MoE routing
# The data-free detector reads the largest |input| and |output| of every dense `mlp.down_proj` on one short
# prompt; a candidate needs both spikes ≥ 5× the median over layers. MoE experts have no dense down
# projection, so the detector does not apply there; instead the router's load per expert (tokens routed on
# calibration windows) is compared with the expert's mean top-k score.

# %%
presence, routing = phase4.forward_patterns(refs, P)
match = patterns.match_top_to_superweights(top, presence)
presence = presence.merge(match, on="model", how="left")
ctx.save_table(presence, "superweights")
moe = architecture.moe_breakdown(topk, routing if len(routing) else None)
ctx.save_table(routing, "routing_load")
ctx.save_table(moe["per_expert"], "moe_per_expert")
ctx.save_table(moe["load_vs_sensitivity"], "moe_load_vs_sensitivity")
presence

# %%
if len(routing) and "tokens" in moe["per_expert"].columns:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    sns.scatterplot(data=moe["per_expert"], x="tokens", y="mean_score", hue="layer", style="model", ax=ax)
    ax.set(xlabel="tokens routed to the expert (calibration)", ylabel="mean top-k score of the expert",
           yscale="log", title="MoE: routing load vs sensitivity")
    fig.tight_layout()
    ctx.savefig(fig, "moe_load_vs_sensitivity")
moe["load_vs_sensitivity"]

# %% [markdown]
# ## Phase 4 scorecard
# This notebook judges the family-difference criterion from week 10's comparisons (recomputed here if
# week 10 has not run); the scaling rows come from week 11's scorecard file in the same run folder.

# %%
week10 = ctx.run_dir / "data" / "phase4_week10_architecture_comparison" / "tests.parquet"
if week10.exists():
    tests = pd.read_parquet(week10)
    tests_source = "phase4_week10_architecture_comparison: tests"
else:
    meta = measures[["model", "family", "moe", "n_layers"]]
    tests = architecture.compare_architectures(tables, meta, n_perm=5000)["tests"]
    tests_source = f"{ctx.notebook} (week 10 output not found; recomputed)"
rows = patterns.family_criteria(tests, evidence=tests_source)
rows = criteria.machinery_only(rows, criteria.untrained_in_run(ctx.run_dir))  # untrained micro models: no evidence
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
others = [r for r in scorecard.read_all(ctx.run_dir) if r.get("phase") == 4 and r.get("notebook") != ctx.notebook]
card = scorecard.as_frame(others + [r.as_dict() | {"notebook": ctx.notebook} for r in rows])
say(scorecard.in_words(rows), "\n\nThe other Phase 4 criteria of this run are judged on their own pages "
    f"({len(others)} rows, weeks 9-11).")

# %%
from IPython.display import Markdown  # noqa: E402

lines = []
for m, sub in top.groupby("model", sort=False):
    t = sub.iloc[0]
    where = f"{t.param} [{t.row}, {t.col}]" + (f" expert {t.expert}" if t.expert >= 0 else "")
    lines.append(f"- **{m}**: top weight {where} (relative depth {t.rel_depth:.2f}), "
                 f"{sub.score_over_topk_median.median():.0f}× its top-k median; "
                 f"{'the same weight in every seed' if t.same_across_seeds else 'seeds disagree on it'}.")
dom = shares.loc[shares.groupby("model")["score_share"].idxmax()]
lines.append("\nDominant component by score mass: " + "; ".join(
    f"{r.model} {r.component} ({r.score_share:.0%})" for r in dom.itertuples()) + ".")
lines.append(f"\nThe top 1% of each model's top-k holds {c.share_top_frac.min():.0%}-{c.share_top_frac.max():.0%} "
             f"of its score mass (Gini {c.gini.min():.2f}-{c.gini.max():.2f}).")
app = presence[presence.applicable]
for r in app.itertuples():
    verdict = ("is" if r.superweight_is_top1 else "is not")
    lines.append(f"- {r.model}: {r.n_candidates} super-weight candidate layer(s); strongest output spike "
                 f"{r.out_spike_over_layer_median:.1f}× the layer median at layer {r.layer} [{r.row}, {r.col}], "
                 f"which {verdict} the metric's top-ranked weight ({r.seeds_agreeing}/{r.seeds} seeds).")
for r in moe["load_vs_sensitivity"].itertuples():
    lines.append(f"- {r.model}: Spearman ρ between routing load and expert sensitivity = {r.spearman_rho:+.2f} "
                 f"(p = {r.p:.2g}, n = {r.n} experts × layers).")
if P.name == "smoke":
    lines.append("\n*Smoke profile: the micro-suite is undertrained, so these patterns check the machinery only.*")
Markdown("\n".join(lines))

# %%
_d = dom.sort_values("score_share", ascending=False).iloc[0]
esa.nb.found(
    f"The component with the most top-k score mass is {_d.component} on {_d.model}, with {_d.score_share:.0%} "
    f"({ctx.ref('figure', 'components_concentration')}).",
    f"The top 1% of each model's top-k holds {c.share_top_frac.min():.0%}-{c.share_top_frac.max():.0%} of its score "
    f"mass ({ctx.ref('figure', 'components_concentration')}, right).",
    f"{int(top.groupby('model').same_across_seeds.all().sum())} of {top.model.nunique()} models keep the same top "
    f"weight in every seed ({ctx.ref('table', 'top_weights')}).")
