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
# **The criterion, defined** (esa.phases.phase5_interpret): the share of the union of each metric's global
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
from IPython.display import display

import esa.nb
from esa.apps import interpret as interp
from esa.phases import phase5_interpret as p5
from esa.report import scorecard

ctx = esa.nb.context("phase5_week15_interpretability", profile, models, run_dir, overrides)
P = ctx.profile
S = p5.settings(P)
names = list(models) if models else p5.model_names(P, S)
print(f"profile {P.name}: models {names}, metrics {p5.metric_names(P, S)} (seed {p5.score_seed(P, S)}), "
      f"top-k {dict((m, S.topk_for(m)) for m in names)} per metric, {S.n_inputs} inputs x {S.input_seqlen} tokens, "
      f"alpha {S.alpha} (Holm), criterion roles {S.criterion_roles}")
print("reduced against the issue's full grid: " + ("; ".join(p5.reductions(P, S, names)) or "nothing"))
display(interp.catalogue()[["role", "hypothesis", "passes_per_weight"]])

# %%
results = {m: p5.analyse(m, P, S) for m in names}
for m, r in results.items():
    print(f"{m}: seconds per step {r.seconds}; catalogue {r.report.timing['n_weights']} weights, "
          f"{r.report.timing['forward_passes']} forward passes")

# %% [markdown]
# ## Role catalogue
# The headline rows (weights with the most verified roles first); the full tables (one row per weight, and one
# per weight x role with effect, CI, control, p and Holm p) are saved.

# %%
for m, r in results.items():
    ctx.save_table(interp.wide_table(r.report).assign(model=m), f"roles_{m}")
    ctx.save_table(r.report.tests.assign(model=m), f"role_tests_{m}")
    ctx.save_table(r.selection.assign(model=m), f"selection_{m}")
    display(p5.headline(r, 12))
    display(interp.role_metric_table(r.report))
    display(p5.share_table(r, S))

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
    display(r.chain.depth[["block", "max_base", "max_ablated", "max_control", "factor", "sink_base",
                           "sink_ablated"]].round(3))

# %% [markdown]
# ## Attention sinks against head sensitivity

# %%
for m, r in results.items():
    if r.sinks is None:
        print(f"{m}: {r.sinks_note}")
        continue
    ctx.save_table(r.sinks.table.assign(model=m), f"sink_heads_{m}")
    ctx.save_table(r.sinks.per_layer.assign(model=m), f"sink_layers_{m}")
    ax = p5.plot_sinks(r.sinks, m)
    ctx.savefig(ax.figure, f"sinks_{m}")
    display(r.sinks.per_component)

# %% [markdown]
# ## Knowledge localisation: probe accuracy, selectivity, the direct test

# %%
for m, r in results.items():
    loc = r.localisation
    if loc is None:
        print(f"{m}: {r.localisation_note}")
        continue
    ctx.save_table(loc.probes.assign(model=m), f"probe_accuracy_{m}")
    ctx.save_table(loc.selectivity.table.assign(model=m), f"selectivity_{m}")
    ctx.save_table(loc.direct.table.assign(model=m), f"direct_{m}")
    ctx.save_table(loc.direct.correlations.assign(model=m), f"direct_rho_{m}")
    display(loc.probes)
    display(loc.selectivity.table[["condition", "n_weights", "probe_accuracy", "drop_accuracy", "rise_answer_nll",
                                   "rise_log_ppl", "selectivity_nll", "selectivity_nll_lo", "selectivity_nll_hi",
                                   "note"]])
    display(loc.direct.correlations[loc.direct.correlations["target"] == "abs_effect"])

# %%
rows = []
for m, r in results.items():
    rows += p5.criterion_rows(m, r.share, S, r.k, f"data/phase5_week15_interpretability/roles_{m}.parquet")
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
scorecard.as_frame(rows)

# %%
for r in results.values():
    for line in p5.prose(r, S):
        print(line)
