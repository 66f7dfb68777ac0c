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
# # Phase 2 · Week 4: which components hold the critical weights, and a Phase 2 summary
#
# **Question.** Within each model, are the critical weights concentrated in particular components
# (attention q/k/v/o, MLP gate/up/down, experts, router) and layers? Do they sit on the channels that
# carry massive activations (Sun et al. 2024), and are they simply the largest weights? Shares are taken
# from the *global* top-k (a per-layer selection puts k in every matrix by construction) and from the
# score mass per component, and compared with each component's share of all weights (enrichment).

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import gc

import matplotlib.pyplot as plt
import pandas as pd

import esa.nb
from esa.data import calibration
from esa.nb import say
from esa.phases import criteria, phase2
from esa.report import scorecard
from esa.sensitivity import plots, structure
from esa.stats.verdicts import Criterion, judge

ctx = esa.nb.context("phase2_week4_components", profile, models, run_dir, overrides)
P = ctx.profile
seed = P.seeds[0]
say(f"Profile *{P.name}*: models {', '.join(ctx.models)}; metrics {', '.join(P.metrics)}; the global top-{P.topk}; "
    f"seed {seed}.")

# %%
shares, archs, weights, summary = [], [], [], []
for model in ctx.models:
    lm = phase2.load_model(model, P)
    runs = phase2.score_model(lm, model, P, seeds=[seed])
    ids = calibration(lm.tokenizer, P.corpus, P.seqlen, 1, seed, max_positions=lm.info.max_positions or None).ids
    for metric in P.metrics:
        r = runs[(metric, seed)]
        glob = r.topk(P.topk, "global", lm.inventory)
        sh = structure.component_shares(glob, lm.inventory)
        mass = r.matrices.groupby("component")["share"].sum()
        sh["score_mass_share"] = sh["component"].map(mass).fillna(0.0)
        shares.append(sh.assign(model=model, metric=metric))
        archs.append(structure.architecture_analysis(r.matrices, glob).assign(model=model, metric=metric))
        wa = structure.weight_analysis(lm.model, lm.inventory, glob, ids)
        weights.append({"model": model, "metric": metric, **wa})
        counts = structure.layer_component_counts(glob)
        fig = plots.hotspot_plot(counts, f"{model} · {metric}: global top-{P.topk}", n_layers=lm.info.n_layers)
        ctx.savefig(fig, f"hotspots_{model}_{metric}", caption=f"{model} · {metric}: global top-{P.topk} weights "
                    "per layer and component (every layer shown, empty ones at zero).")
        plt.close(fig)
        best = glob.iloc[0]
        summary.append({"model": model, "metric": metric, "top1pct_over_median": r.tails["top_mean_over_median"],
                         "max_over_median": r.tails["max_over_median"], "hill_alpha": r.tails["hill_alpha"],
                         "top_weight": f"{best.param}[{best.row},{best.col}]", "top_layer": int(best.layer),
                         "top_component": best.component,
                         "leading_component": sh.iloc[0]["component"], "leading_share": sh.iloc[0]["selected_share"]})
    fig = plots.architecture_plot(archs[-1], f"{model} · {P.metrics[-1]}: attention vs FFN score mass")
    ctx.savefig(fig, f"architecture_{model}")
    plt.close(fig)
    del lm, runs
    gc.collect()
shares, archs = pd.concat(shares, ignore_index=True), pd.concat(archs, ignore_index=True)
weights, summary = pd.DataFrame(weights), pd.DataFrame(summary)
for df, name in ((shares, "component_shares"), (archs, "architecture"), (weights, "weight_analysis"), (summary, "phase2_summary")):
    ctx.save_table(df, name)
shares.pivot_table(index=["model", "component"], columns="metric", values="enrichment")

# %%
weights

# %%
fig, ax = plt.subplots(figsize=(8, 3.8))
piv = shares.pivot_table(index="component", columns="metric", values="selected_share", aggfunc="mean")
piv.plot.bar(ax=ax)
ax.legend(title="metric", fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")  # beside the bars, not over them
ax.set(ylabel=f"share of global top-{P.topk}", title="Where the critical weights sit, by component (mean over models)")
fig.tight_layout()
ctx.savefig(fig, "component_shares")
plt.show()

# %% [markdown]
# ## Phase 2 summary

# %%
summary

# %%
rows = []
for r in summary.itertuples():
    rows.append(Criterion(f"P2.heavy_tail_max.{r.model}.{r.metric}", 2,
                          "some weights score orders of magnitude above the median (max / median >= 100, our rule)",
                          float(r.max_over_median), ">= 100", judge(float(r.max_over_median), ">=", 100.0),
                          "phase2_week4_components: phase2_summary", f"top weight {r.top_weight}"))
rows = criteria.budgeted(rows, P)
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
card = scorecard.as_frame(rows)
say(scorecard.in_words(rows))

# %%
from IPython.display import Markdown  # noqa: E402

lines = []
for model in ctx.models:
    s = summary[summary.model == model]
    w = weights[weights.model == model]
    lines.append(f"**{model}**:")
    for r in s.itertuples():
        e = shares[(shares.model == model) & (shares.metric == r.metric)].iloc[0]
        ww = w[w.metric == r.metric].iloc[0]
        lines.append(
            f"- {r.metric}: max score {r.max_over_median:.3g}x the median (top-1% mean {r.top1pct_over_median:.3g}x); "
            f"top weight {r.top_weight} (layer {r.top_layer}, {r.top_component}). {e.component} holds "
            f"{e.selected_share:.0%} of the global top-{P.topk} against {e.weight_share:.0%} of the weights "
            f"({e.enrichment:.2g}x enrichment). {ww.selected_on_massive_col:.0%} of the selected dense weights read a "
            f"massive-activation input channel (such channels are {ww.massive_col_fraction_all:.2%} of all); "
            f"{ww.selected_in_top1pct_magnitude:.0%} are in their matrix's top 1% by |w|.")
heavy = int((card.result == "PASS").sum())
lines.append(f"\n{heavy} of {len(card)} model x metric pairs have a weight scoring at least 100x the median.")
Markdown("\n".join(lines))

# %%
_lead = piv.mean(axis=1).sort_values(ascending=False)
_top = summary.sort_values("max_over_median", ascending=False).iloc[0]
esa.nb.found(
    f"{_lead.index[0]} holds the largest share of the global top-{P.topk}, {_lead.iloc[0]:.0%} on average over "
    f"metrics and models ({ctx.ref('figure', 'component_shares')}).",
    f"The most extreme score is {_top.max_over_median:.3g} times the median ({_top.metric} on {_top.model}, weight "
    f"{_top.top_weight}; Phase 2 summary table above).",
    f"{heavy} of {len(card)} heavy-tail criteria pass (Criteria below).")
