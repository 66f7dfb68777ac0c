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
# # Phase 2 · Week 1: validating the four sensitivity metrics on the embedded default model
#
# **Question.** Does the embedded default model have weights whose sensitivity scores stand orders of
# magnitude above the rest, where are they, and do the four metrics (and different calibration samples)
# agree on which weights they are?
#
# **Definitions** (README, "Methods"; written into every run's tables): `grad_x_weight` = |w · g| with g the
# gradient of the mean calibration loss; `grad_squared` = mean over micro-batches of g_b² (empirical
# Fisher); `act_mag` = |W_ij| · ||X_j||₂ (Wanda); `hutchinson_diag` = ½ · diag(H) · w² with diag(H) from
# Rademacher probes. Scores accumulate in fp32. Weights under study: every 2-D weight of the transformer
# blocks' linear layers. Seeds change the calibration sample.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import matplotlib.pyplot as plt

import esa.nb
from esa.nb import say
from esa.phases import criteria, phase2
from esa.report import scorecard
from esa.sensitivity import plots

ctx = esa.nb.context("phase2_week1_metric_validation", profile, models, run_dir, overrides)
P = ctx.profile
model = ctx.models[0]  # week 1: the embedded default (the first model of the profile)
windows = {m: phase2.validation_windows(P, m) for m in P.metrics}
say(f"Profile *{P.name}*: model {model}, metrics {', '.join(P.metrics)}, seeds {', '.join(map(str, P.seeds))}; "
    + ", ".join(f"{n} calibration windows for {', '.join(m for m in P.metrics if windows[m] == n)}"
                for n in dict.fromkeys(windows.values()))
    + f" ({P.seqlen} tokens each, {P.corpus}), top-{P.topk} ({P.mode}), {P.hutchinson_probes} Hutchinson probes.")

# %%
lm = phase2.load_model(model, P)
runs = phase2.validation_runs(lm, model, P)
table = phase2.selections(runs, P.topk, P.mode, lm)
ctx.save_table(table, "topk")
info = phase2.describe_runs(runs)
say(f"Calibration windows: {info['windows']}.",
    "\n\n" + "\n".join(f"- **{m}**: {v}" for m, v in info["definitions"].items()))

# %% [markdown]
# ## Heavy tails: how far above the median do the top scores sit?

# %%
tails = phase2.tails_table(runs)
ctx.save_table(tails, "tails")
tails

# %%
fig = plots.survival_plot({m: runs[(m, P.seeds[0])].survival for m in P.metrics},
                          f"{model}: P(|score| >= t), seed {P.seeds[0]}")
ctx.savefig(fig, "survival")
plt.show()

# %% [markdown]
# ## The highest-ranked weights of the whole model (global ranking)

# %%
top = phase2.top_weights(runs, lm, n=5)
ctx.save_table(top, "top_weights")
top[top.seed == P.seeds[0]]

# %% [markdown]
# ## Stability across calibration samples and agreement between metrics

# %%
stab = phase2.stability_table(runs, table, lm)
# grad_squared x w^2 (the OBD saliency) comes free from the cached grad_squared scores and the weights
agree = phase2.agreement_table(runs, table, derived=phase2.obd_selections(runs, lm, P.topk, P.mode))
ctx.save_table(stab, "stability")
ctx.save_table(agree, "agreement")
stab

# %%
agree_mean = agree.groupby(["metric_a", "metric_b"], as_index=False)[["overlap", "jaccard"]].mean()
agree_mean

# %% [markdown]
# ## Data-free super-weight detector (Yu et al. 2024) beside the metrics
# One forward pass on a short prompt; per layer, the largest |input| channel of `mlp.down_proj` gives the
# column and the largest |output| the row. `rank_<metric>` is that weight's rank inside its own matrix
# for each metric (empty: not among the matrix's top cached candidates).

# %%
sw = phase2.superweight_table(lm, runs)
ctx.save_table(sw, "super_weights")
sw.sort_values("out_max", ascending=False).head(8)

# %% [markdown]
# ## Can the Hutchinson diagonal resolve its own top-k? (its measured noise on this model)
# Two independent streams of probes on the same calibration window(s), one forward: their per-matrix top-k
# Jaccard and relative disagreement as the probes grow, the per-weight signal-to-noise (|mean| / standard
# error), and beside it the Monte-Carlo GGN diagonal (`ggn_mc_diag`: diag(GGN) = Fisher, **not** diag(H)) at
# an equal number of products. The size follows the profile (`curvature.reliability_budget`). When the top-k
# does not stand 2 standard errors above its matrix median at the profile's probes, hutchinson_diag's rows
# below are judged again (next section).

# %%
from esa import data  # noqa: E402
from esa.sensitivity import curvature, curvature_plots  # noqa: E402

budget = curvature.reliability_budget(P.hutchinson_probes, P.seqlen)
cal = data.calibration(lm.tokenizer, P.corpus, budget["seqlen"], budget["windows"], P.seeds[0])
rel = curvature.reliability(lm.model, lm.inventory, cal.ids, budget["probes"], topk=P.topk)
rel_curve, rel_summary = curvature.tables(rel)
ctx.save_table(rel_curve, "curvature_reliability")
ctx.save_table(rel_summary, "curvature_snr")
fig = curvature_plots.reliability_plot(rel_curve, f"{model}: two probe streams, {budget['windows']} x "
                                                  f"{budget['seqlen']} tokens")
ctx.savefig(fig, "curvature_reliability")
plt.show()
resolution = (curvature.resolution_at(rel["summary"]["hutchinson"], P.hutchinson_probes)
              if "hutchinson_diag" in P.metrics else None)
# the page's columns; every column (and the Jaccard fit's reason) is in curvature_snr.csv and the prose below
rel_summary[["estimator", "quantity", "products", "snr_topk_median", "z_topk_vs_median", "probes_needed_z2",
             "probes_for_jaccard_0.4", "seconds_per_product"]]

# %% [markdown]
# ### The deeper measurement behind the profiles' probe counts
# The run above measures only what its profile affords. `make curvature-reliability` records the same curve to
# 64 products per stream on both embedded models (under `reports/bench/`); the `hutchinson_probes` comments in
# `params/profiles/*.yaml` rest on it. Shown when this machine has one.

# %%
from IPython.display import Markdown  # noqa: E402

Markdown("\n".join(curvature.record_lines(curvature.read_record(ctx.run_dir.parent / "bench", model), model)))

# %% [markdown]
# ## Does every metric resolve its top-k at this calibration sample?
# The same held-out rule for every metric: even calibration windows pick each matrix's top-k, odd windows judge
# it, and the per-window spread gives the standard error (`esa.sensitivity.resolution`, on six matrices spread
# over depth and components, one pass over the windows for all metrics; Hutchinson's probe noise comes from the
# two probe streams above). A metric whose top-k does not stand 2 standard errors above its matrix median at the
# run's sample is "underpowered" in the rows below, with the windows (or probes) it would need; one with no
# held-out signal at all (z within noise of zero, so no sample size follows) FAILs them: it does not identify a
# set of weights that stands out, whatever its stability or tail number reads. Week 1 scores every metric but
# hutchinson_diag on the profile's `validation_samples` windows, sized so that grad_squared resolves.

# %%
resolutions = phase2.metric_resolutions(lm, phase2.validation_profile(P), resolution)
res_table = phase2.resolution_table(resolutions)
ctx.save_table(res_table, "metric_resolution")
res_table[["metric", "unit", "n", "z", "resolved", "needed", "note"]]

# %%
rows = phase2.phase2_criteria(stab, agree, tails, model, "phase2_week1_metric_validation: stability, agreement, tails")
for m, r in resolutions.items():
    rows = criteria.unresolved(rows, m, r)  # a ranking its own noise does not resolve: underpowered, or FAIL
rows = criteria.budgeted(rows, phase2.validation_profile(P))  # below the guide's sample: machinery-only, with the reason
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
card = scorecard.as_frame(rows)
say(scorecard.in_words(rows))

# %%
first = tails[tails.seed == P.seeds[0]].set_index("metric")
lines = [f"On **{model}** ({lm.info.n_weights_studied / 1e6:.1f}M weights under study, {P.max_samples} calibration "
         f"windows of {P.seqlen} tokens per seed, seeds {P.seeds}):"]
for m in P.metrics:
    t = first.loc[m]
    best = top[(top.metric == m) & (top.seed == P.seeds[0]) & (top["rank"] == 1)].iloc[0]
    lines.append(f"- **{m}**: the top-1% mean is {t.top1pct_over_median:.3g}x the median and the single largest "
                 f"score {t.max_over_median:.3g}x (Hill tail index {t.hill_alpha:.2f}); the top weight is "
                 f"`{best.param}` [{best.row}, {best.col}] (layer {best.layer}, {best.component}).")
for r in stab.itertuples():
    rho = (f"{r.spearman_union:.3f}" if r.n_beyond_depth == 0 else
           f"not estimable ({r.n_beyond_depth} of {r.n_union} union weights rank below another seed's stored "
           "candidates)")
    lines.append(f"- {r.metric} across {r.n_seeds} seeds: mean pairwise Jaccard of the top-{P.topk} sets "
                 f"{r.jaccard_mean:.3f} (range {r.jaccard_min:.3f}-{r.jaccard_max:.3f}), Spearman on the union "
                 f"{rho}.")
if len(agree_mean):
    best_pair = agree_mean.sort_values("overlap", ascending=False).iloc[0]
    lines.append(f"- Metric agreement: the closest pair is {best_pair.metric_a} / {best_pair.metric_b} "
                 f"(overlap {best_pair.overlap:.1%}).")
pair = {frozenset((r.metric_a, r.metric_b)): r.overlap for r in agree_mean.itertuples()}
fisher = pair.get(frozenset(("grad_squared", "grad_x_weight")))
obd = pair.get(frozenset((phase2.OBD_LABEL, "grad_x_weight")))
if fisher is not None and obd is not None:
    lines.append(f"- grad_x_weight vs grad_squared: overlap {fisher:.1%} (the guide asks > 60%); weighting the "
                 f"Fisher diagonal by w^2 (the OBD saliency, derived from the same scores) "
                 f"{'raises' if obd > fisher else 'changes'} it to {obd:.1%}.")
cand = sw[sw.candidate]
lines.append(f"- The data-free detector flags {len(cand)} layer(s) with input and output spikes >= 5x the median "
             f"layer's" + (": " + ", ".join(f"layer {c.layer} [{c.row}, {c.col}] (in {c.in_max:.3g}, out "
                                                f"{c.out_max:.3g})" for c in cand.itertuples()) if len(cand) else "")
             + ".")
lines += curvature.summary_lines(rel, resolution)
n_pass = int((card.result == "PASS").sum())
lines.append(f"\n{n_pass} of {len(card)} criteria pass; {int((~card.result.isin(['PASS', 'FAIL'])).sum())} cannot be "
             "judged from this run (verdict and reason in the notes).")
Markdown("\n".join(lines))

# %%
first_metric = P.metrics[0]
_found = [f"The scores are heavy-tailed: for {first_metric} the top 1% averages "
          f"{first.loc[first_metric].top1pct_over_median:.3g} times the median ({ctx.ref('figure', 'survival')})."]
if len(stab):
    s0 = stab.sort_values("jaccard_mean").iloc[0]
    _found.append(f"The least stable metric across calibration seeds is {s0.metric}, with a mean top-{P.topk} "
                  f"Jaccard of {s0.jaccard_mean:.3g} between seeds (stability table above).")
if len(agree_mean):
    _found.append(f"The two metrics that agree most are {best_pair.metric_a} and {best_pair.metric_b}, "
                  f"sharing {best_pair.overlap:.0%} of their top-k (agreement table above).")
esa.nb.found(*_found)
