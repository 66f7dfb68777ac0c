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
# # Phase 2 · Week 3: global vs per-layer selection, and a high-resolution top-k
#
# **Question.** Are the critical weights spread over every matrix (what `per_layer` assumes, k per
# matrix) or concentrated in a few matrices (what `global` reveals, k over the whole model)? How stable
# are both selections across calibration samples, and does stability hold at a larger k (the profile's
# `highres_topk`, with `highres_seeds`)? By construction the global top-k lies inside the union of the
# per-layer top-k at the same k; the notebook checks it on the real scores.

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
from esa.nb import say
from esa.phases import criteria, phase2
from esa.report import scorecard
from esa.stats.verdicts import Criterion

ctx = esa.nb.context("phase2_week3_global_vs_per_layer", profile, models, run_dir, overrides)
P = ctx.profile
model, metric = ctx.models[0], P.metrics[0]
ks = sorted({max(1, P.topk // 4), P.topk, P.highres_topk})
say(f"Profile *{P.name}*: model {model}, metric {metric}, seeds {', '.join(map(str, P.highres_seeds))}, "
    f"k in {', '.join(map(str, ks))}.")

# %%
lm = phase2.load_model(model, P)
runs = phase2.score_model(lm, model, P, metrics=[metric], seeds=P.highres_seeds)
comp = phase2.mode_comparison(runs, lm, ks, metric)
ctx.table(comp, "mode_comparison", f"{metric}: seed stability of the global and per-layer top-k at each k.")

# %%
n_mats = sum(s.n_experts or 1 for s in lm.inventory)
glob = runs[(metric, P.highres_seeds[0])].topk(P.highres_topk, "global", lm.inventory)
ctx.save_table(glob, "global_highres")
conc = phase2.concentration(glob, n_mats)
by_comp = glob.groupby(["layer", "component"]).size().rename("count").reset_index()

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
sns.lineplot(data=comp, x="k", y="jaccard_mean", hue="mode", marker="o", ax=axes[0])
axes[0].set(xscale="log", title=f"{metric}: stability across {len(P.highres_seeds)} seeds", ylabel="mean pairwise Jaccard")
sns.barplot(data=by_comp, x="layer", y="count", hue="component", ax=axes[1])
axes[1].set(title=f"global top-{P.highres_topk}: where it sits")
axes[1].tick_params(axis="x", labelsize=6)
axes[1].legend(title="component", fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")  # off the tallest bar
fig.tight_layout()
_j = comp[comp.k == comp.k.max()].set_index("mode")["jaccard_mean"]
ctx.savefig(fig, "global_vs_per_layer", caption=f"{metric}: seed stability of global vs per-layer top-k (left); "
            f"layers and components of the global top-{P.highres_topk} (right).",
            takeaway=f"At k={comp.k.max()}, mean Jaccard " + ", ".join(f"{m} {v:.2f}" for m, v in _j.items()) + ".")
plt.show()

# %%
hi = comp[comp.k == P.highres_topk].set_index("mode")
contained = bool(comp["global_within_per_layer_union"].all())
rows = [
    Criterion(f"P2.global_within_per_layer.{model}", 2, "global top-k ⊆ union of per-layer top-k (same k), every seed",
              contained, "True", contained, "phase2_week3_global_vs_per_layer: mode_comparison"),
]
rows += phase2.phase2_criteria(
    pd.DataFrame({"metric": [f"{metric}@k{P.highres_topk}_{m}" for m in hi.index], "n_seeds": len(P.highres_seeds),
                  "jaccard_mean": hi["jaccard_mean"].to_numpy()}),
    pd.DataFrame(columns=["metric_a", "metric_b", "overlap"]), pd.DataFrame(columns=["metric", "top1pct_over_median", "hill_alpha"]),
    model, "phase2_week3_global_vs_per_layer: high-resolution stability")
rows = criteria.budgeted([r for r in rows if r.id.startswith(("P2.global_within", "P2.jaccard"))], P)
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
card = scorecard.as_frame(rows)
say(scorecard.in_words(rows))

# %%
from IPython.display import Markdown  # noqa: E402

g, pl = hi.loc["global"], hi.loc["per_layer"]
busiest = by_comp.sort_values("count", ascending=False).iloc[0]
Markdown(
    f"On **{model}** with {metric}, the global top-{P.highres_topk} touches {conc['matrices_hit']} of {n_mats} "
    f"matrices; the busiest 10% of matrices hold {conc['share_in_busiest_10pct']:.0%} of it and the single "
    f"busiest cell is layer {busiest.layer} {busiest.component} ({busiest['count']} weights). Across "
    f"{len(P.highres_seeds)} seeds, the mean pairwise Jaccard at k={P.highres_topk} is {g.jaccard_mean:.3f} for "
    f"global and {pl.jaccard_mean:.3f} for per-layer selection. The global top-k "
    f"{'lies' if contained else 'does NOT lie'} inside the per-layer union at every k and seed tested."
)

# %%
_fig, _tab = ctx.ref("figure", "global_vs_per_layer"), ctx.ref("table", "mode_comparison")
esa.nb.found(
    f"At k={P.highres_topk}, the global top-k of {metric} is {'more' if g.jaccard_mean > pl.jaccard_mean else 'less'} "
    f"stable across seeds than the per-layer one: mean Jaccard {g.jaccard_mean:.3g} against {pl.jaccard_mean:.3g} "
    f"({_fig}, {_tab}).",
    f"The global top-{P.highres_topk} touches {conc['matrices_hit']} of {n_mats} matrices, and the busiest 10% of "
    f"matrices hold {conc['share_in_busiest_10pct']:.0%} of it ({_fig}, right).")
