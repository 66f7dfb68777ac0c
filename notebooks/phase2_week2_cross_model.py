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
# # Phase 2 · Week 2: the same metrics across every configured model
#
# **Question.** Does every model of the profile have weights whose scores stand orders of magnitude above
# the rest, where in the network do they sit, and are the findings as stable across calibration samples
# as on the default model? Scores are reused from the cache when week 1 (or an earlier run) computed them
# with the same model, data, metric, seed, dtype and code version.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import gc
import logging

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

import esa.nb
from esa.nb import say
from esa.phases import criteria, parts, phase2, plans
from esa.report import scorecard
from esa.sensitivity import plots

ctx = esa.nb.context("phase2_week2_cross_model", profile, models, run_dir, overrides)
P = ctx.profile
_plan = plans.PLANS[ctx.notebook](P, ctx.models)
say(f"Profile *{P.name}*: models {', '.join(ctx.models)}; seeds {', '.join(map(str, P.seeds))}; top-{P.topk} "
    f"({P.mode}); metrics: " + "; ".join(f"{m} {', '.join(plans.week2_metrics(P, m))}" for m in ctx.models) + ".",
    *[n[0].upper() + n[1:] + "." for n in _plan.notes])

# %% [markdown]
# Each model's scores and tables come from one function (`esa.phases.phase2.cross_model_one`); in the judged
# record a model can be recorded on its own as a part (`make record CHUNK=phase2_week2_cross_model
# PART=<model>`), which keeps that model's tables (not its score maps nor its full top-k table), and this page
# then reads that part instead of scoring the model again.

# %%
res, origins = parts.per_unit(ctx.run_dir, ctx.notebook, P, ctx.models, on_unit=lambda m, r: gc.collect())
ctx.save_json(origins, "parts")
tails, tops, stabs, agrees, sws, infos, rows = [], [], [], [], [], [], []
curves = {}
for model, r in res.items():
    if "topk" in r:  # computed on this page (a part keeps only the tables below)
        ctx.save_table(r.pop("topk"), f"topk_{model}")
    t, s, a = r["tails"], r["stability"], r["agreement"]
    tails.append(t.assign(model=model))
    stabs.append(s.assign(model=model))
    agrees.append(a.assign(model=model))
    tops.append(r["top_weights"].assign(model=model))
    if r.get("super_weights") is not None:
        sws.append(r["super_weights"].assign(model=model))
    else:  # a model without dense down projections (MoE): say so, keep going
        logging.getLogger(ctx.notebook).warning(f"{model}: super-weight detector skipped ({r['super_weights_skipped']})")
    curves[model] = r["survival"]
    infos.append({"model": model, **r["info"]})
    rows += phase2.phase2_criteria(s, a, t, model, "phase2_week2_cross_model")
tails, stabs, agrees, tops = (pd.concat(x, ignore_index=True) for x in (tails, stabs, agrees, tops))
sws = pd.concat(sws, ignore_index=True) if sws else pd.DataFrame()
for df, name in ((tails, "tails"), (stabs, "stability"), (agrees, "agreement"), (tops, "top_weights"), (sws, "super_weights")):
    ctx.save_table(df, name)
display(say(parts.origin_sentence(origins)))
pd.DataFrame(infos)

# %%
tail_summary = tails.groupby(["model", "metric"], as_index=False)[["top1pct_over_median", "max_over_median", "hill_alpha"]].median()
tail_summary

# %%
fig = plots.survival_plot(curves, f"{P.metrics[0]}: P(|score| >= t) by model, seed {P.seeds[0]}")
ctx.savefig(fig, "survival_by_model")
plt.show()

# %%
tops[(tops.seed == P.seeds[0]) & (tops["rank"] == 1)][["model", "metric", "param", "layer", "component", "row", "col", "score"]]

# %%
stabs

# %%
# each criterion is judged once: rows week 1 already wrote for the same model are not repeated here
fresh = scorecard.unseen(ctx.run_dir, ctx.notebook, rows)
_already = (f"{len(rows) - len(fresh)} of the {len(rows)} criteria computed here were already judged by an earlier "
            f"notebook of this run, so {len(fresh)} are judged on this page.")
rows = criteria.budgeted(fresh, P)
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
card = scorecard.as_frame(rows)
say(_already, "\n\n" + scorecard.in_words(rows))

# %%
from IPython.display import Markdown  # noqa: E402

lines = []
for model in ctx.models:
    ts = tail_summary[tail_summary.model == model].set_index("metric")
    m0 = P.metrics[0]
    best = tops[(tops.model == model) & (tops.metric == m0) & (tops.seed == P.seeds[0]) & (tops["rank"] == 1)].iloc[0]
    heavy = [m for m in ts.index if ts.loc[m, "top1pct_over_median"] >= phase2.HEAVY_TAIL_RATIO]
    st = stabs[(stabs.model == model) & (stabs.metric == m0)]
    jac = f"{st.jaccard_mean.iloc[0]:.3f}" if len(st) else "n/a (one seed)"
    lines.append(
        f"- **{model}**: {len(heavy)} of {len(ts)} metrics have a top-1% mean at least {phase2.HEAVY_TAIL_RATIO:g}x "
        f"the median ({', '.join(heavy) or 'none'}); for {m0} the ratio is {ts.loc[m0, 'top1pct_over_median']:.3g} "
        f"and the top weight is `{best.param}` [{best.row}, {best.col}] (layer {best.layer}, {best.component}); "
        f"{m0} top-{P.topk} Jaccard across seeds {jac}.")
    ag = agrees[agrees.model == model]
    fisher_ov = phase2.metric_pair(ag, "grad_squared", "grad_x_weight")["overlap"]
    obd_ov = phase2.metric_pair(ag, phase2.OBD_LABEL, "grad_x_weight")["overlap"]
    if len(fisher_ov) and len(obd_ov):
        lines.append(f"  grad_x_weight vs grad_squared top-k overlap {fisher_ov.mean():.1%} (the guide asks > 60%); "
                     f"weighting the Fisher diagonal by w^2 (OBD) "
                     f"{'raises' if obd_ov.mean() > fisher_ov.mean() else 'changes'} it to {obd_ov.mean():.1%}.")
n_pass = int((card.result == "PASS").sum())
lines.append(f"\n{n_pass} of {len(card)} criteria pass over {len(ctx.models)} model(s).")
Markdown("\n".join(lines))

# %%
_fig = ctx.ref("figure", "survival_by_model")
_ts = tail_summary[tail_summary.metric == P.metrics[0]].sort_values("top1pct_over_median", ascending=False)
esa.nb.found(
    *[f"On {r.model}, the top 1% of {r.metric} scores averages {r.top1pct_over_median:.3g} times the median "
      f"({_fig})." for r in _ts.head(2).itertuples()],
    f"{n_pass} of {len(card)} criteria judged on this page pass (Criteria below).")
