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
# # Phase 5 · Week 15: what the critical weights compute
#
# **Question.** Which computational roles do the top critical weights play, how do they relate to attention
# sinks, and do they localise knowledge? Each role is a hypothesis with an ablation test: zero the weight in
# place (bit-exact restore), zero a matched control (a random weight of the same matrix), and compare over
# held-out inputs (one-sided Wilcoxon, Holm across the whole catalogue). Roles (a) creates a massive
# activation, (b) feeds an attention sink, (c) suppresses stopwords are ablation tests; (d) bias-like
# output, (e) reads a massive channel, (f) first-token handling read the baseline only; (g) is "unexplained".
#
# **The criterion, defined** (esa.phases.phase5_interpret, verdict by esa.stats.shares): the share of the union of each metric's global
# top-k weights with at least one *ablation-verified* role (a-c) at Holm-adjusted p < alpha, with a Wilson CI.
# FAIL below 50%; PASS only when the CI's lower bound is at 50% or more; underpowered when the inputs are too
# few for any test to pass, when too few weights were tested, or when the CI straddles 50%. The super-weight
# detector's candidates are tested and shown but counted only where a metric ranks them.
#
# **Localisation** (Hase et al. 2023): calibrate the metric on an offline Shakespeare fact probe set, zero its
# top-k, and compare the probe damage per unit of generic damage with generic-calibrated top-k and random-k;
# then test directly whether a weight's probe score predicts its own ablation effect.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
from IPython.display import Markdown, display

import esa.nb
from esa.apps import interpret as interp
from esa.nb import say
from esa.phases import phase5_interpret as p5
from esa.report import scorecard

ctx = esa.nb.context("phase5_week15_interpretability", profile, models, run_dir, overrides)
study = p5.STUDY
S = study.settings(ctx.profile, None)
plan = study.plan(S, ctx.profile, list(models) if models else None)
ctx.save_json(plan.as_dict(), "plan")
display(interp.catalogue()[["role", "hypothesis", "passes_per_weight"]])
Markdown(f"The plan: {len(plan.conditions)} conditions on {', '.join(plan.models)}, on the scores of "
         f"{', '.join(plan.setup['scores']['metrics'])} (calibration seed {plan.setup['scores']['seed']}); role tests on "
         f"{plan.setup['roles']['inputs']} at Holm-adjusted alpha {S.alpha:g}, the criterion counting "
         f"{', '.join(S.criterion_roles)}. Reduced against the issue's full grid: "
         + ("; ".join(plan.notes) or "nothing") + ".")

# %%
results = study.run(plan)
Markdown("\n".join(f"- **{m}**: {r.report.timing['n_weights']} weights in the catalogue, "
                   f"{r.report.timing['forward_passes']} forward passes; seconds per step: "
                   + ", ".join(f"{step} {sec:.1f}" for step, sec in r.seconds.items()) + "." for m, r in results.items()))

# %% [markdown]
# ## Role catalogue
# The headline rows (weights with the most verified roles first); the full tables (one row per weight, and one
# per weight x role with effect, CI, control, p and Holm p) are saved.

# %%
for m, r in results.items():
    ctx.save_table(interp.wide_table(r.report).assign(model=m), f"roles_{m}")
    ctx.save_table(r.report.tests.assign(model=m), f"role_tests_{m}")
    ctx.save_table(r.selection.assign(model=m), f"selection_{m}")
    display(interp.headline(r.report, 12))
    display(interp.role_metric_table(r.report))
    display(interp.share_table(m, r.report, S.criterion_roles))

# %% [markdown]
# ## The super-weight chain through depth
# Baseline, the weight zeroed, and its matched control zeroed, on one sentence: the channel's peak after every
# block and the mean attention mass on the sink.

# %%
for m, r in results.items():
    ctx.save_table(r.chain.depth.assign(model=m), f"chain_{m}")
    ctx.save_json(r.chain.summary, f"chain_{m}")
    axes = interp.plot_chain(r.chain)
    ctx.savefig(axes[0].figure, f"chain_{m}")
    display(ctx.table(r.chain.depth.assign(model=m), f"chain_depth_{m}",
                      f"{m}: the channel's peak and the sink's attention mass after every block.",
                      columns=["block", "max_base", "max_ablated", "max_control", "factor", "sink_base", "sink_ablated"],
                      headers={"block": "Block", "max_base": "Peak, baseline", "max_ablated": "Peak, weight zeroed",
                               "max_control": "Peak, control zeroed", "factor": "Factor",
                               "sink_base": "Sink mass, baseline", "sink_ablated": "Sink mass, weight zeroed"}))

# %% [markdown]
# ## Attention sinks against head sensitivity

# %%
for m, r in results.items():
    if r.sinks is None:
        display(Markdown(f"The sink analysis of {m} was {r.sinks_note}."))
        continue
    ctx.save_table(r.sinks.table.assign(model=m), f"sink_heads_{m}")
    ctx.save_table(r.sinks.per_layer.assign(model=m), f"sink_layers_{m}")
    ax = interp.plot_sinks(r.sinks, m)
    ctx.savefig(ax.figure, f"sinks_{m}")
    display(r.sinks.per_component)

# %% [markdown]
# ## Knowledge localisation: probe accuracy, selectivity, the direct test

# %%
for m, r in results.items():
    loc = r.localisation
    if loc is None:
        display(Markdown(f"Localisation on {m}: {r.localisation_note}."))
        continue
    ctx.save_table(loc.probes.assign(model=m), f"probe_accuracy_{m}")
    ctx.save_table(loc.selectivity.table.assign(model=m), f"selectivity_{m}")
    ctx.save_table(loc.direct.table.assign(model=m), f"direct_{m}")
    ctx.save_table(loc.direct.correlations.assign(model=m), f"direct_rho_{m}")
    display(loc.probes)
    display(ctx.table(loc.selectivity.table.assign(model=m), f"selectivity_shown_{m}",
                      f"{m}: what zeroing each weight set does to the probe's facts and to the text at large.",
                      columns=["condition", "n_weights", "probe_accuracy", "drop_accuracy", "rise_answer_nll",
                               "rise_log_ppl", "selectivity_nll", "note"]))
    display(loc.direct.correlations[loc.direct.correlations["target"] == "abs_effect"])

# %% [markdown]
# ## In numbers

# %%
crit = study.criteria(results, plan, "data/phase5_week15_interpretability/roles_{model}.parquet")
scorecard.write_rows(ctx.run_dir, ctx.notebook, crit)
display(Markdown("\n\n".join(study.findings(results, plan))))
say(scorecard.in_words(crit))

# %%
found = []
for m, r in results.items():
    d = r.chain.depth
    if len(d):
        found.append(f"On {m}, zeroing the super weight takes the channel's largest peak over depth from "
                     f"{d.max_base.max():.3g} to {d.max_ablated.max():.3g}, against {d.max_control.max():.3g} for its "
                     f"matched control ({ctx.ref('figure', f'chain_{m}')}, {ctx.ref('table', f'chain_depth_{m}')}).")
found.append(f"{sum(c.verdict == 'PASS' for c in crit)} of {len(crit)} interpretability criteria pass on this run "
             "(Criteria below).")
esa.nb.found(*found[-3:])
