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
# # Phase 4 · Week 11: can the scaling tool be trusted?
#
# **Question.** When the true exponent is known, does `esa.analysis.scaling` recover it, do its
# confidence intervals cover it at the stated rate, and how large are leave-one-model-out (LOO) errors
# with as few models as we have? Then: what do LOO predictions look like on the real per-model results of
# week 9, and does the guide's "prediction within 20%" hold?

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

import esa.nb
from esa.analysis import scaling
from esa.nb import say
from esa.phases import criteria, phase4
from esa.report import scorecard

ctx = esa.nb.context("phase4_week11_scaling_validation", profile, models, run_dir, overrides)
P = ctx.profile
N_REP = 60 if P.name == "smoke" else 300

# %% [markdown]
# ## Synthetic suites with a known exponent
# Sizes geometric over 3·10⁴-3·10⁸ parameters; y = N^b · lognormal noise. Each row: `N_REP` synthetic
# suites of `n_models` models.

# %%
grid = [(n, b, s) for n in (4, 5, 8) for b in (-0.3, 0.5) for s in (0.05, 0.2)]
synth = pd.DataFrame([scaling.synthetic_recovery(n, b, s, n_rep=N_REP, n_boot=200, seed=i)
                      for i, (n, b, s) in enumerate(grid)])
ctx.table(synth, "synthetic_recovery", f"Recovery of a known exponent by suites of synthetic models "
          f"({N_REP} suites per row).")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for (noise, sub), marker in zip(synth.groupby("noise"), "os", strict=True):
    axes[0].scatter(sub.n_models, sub.coverage_bootstrap, marker=marker, label=f"bootstrap, noise {noise}")
    axes[0].scatter(sub.n_models, sub.coverage_t, marker=marker, facecolors="none", label=f"t-interval, noise {noise}")
    axes[1].scatter(sub.n_models, sub.median_loo_max_error, marker=marker, label=f"noise {noise}")
axes[0].axhline(0.95, color="k", lw=0.8)
axes[0].set(xlabel="models in the suite", ylabel="CI coverage of the true exponent", title="Coverage (nominal 95%)")
axes[1].axhline(0.2, color="k", lw=0.8)
axes[1].set(xlabel="models in the suite", ylabel="median of max LOO rel. error", title="LOO error")
for ax in axes:
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")  # beside the points, not over them
fig.tight_layout()
ctx.savefig(fig, "synthetic_validation")

# %% [markdown]
# ## Leave-one-model-out on the real results
# Read from week 9's output in this run folder; if week 9 has not run here, the measures are collected now.

# %%
measures, _, source = phase4.week9_results(ctx.run_dir, models, P)
MEASURE = "dlogppl_topk_zero"
fits_all = scaling.scaling_fits(measures, [MEASURE], n_boot=1000)
ctx.save_table(fits_all, "real_fits_all_models")
# the criteria are judged on one homogeneous suite when it is large enough (see scaling.criteria_basis)
judged, basis = scaling.criteria_basis(measures)
fits = scaling.scaling_fits(judged, [MEASURE], n_boot=1000)
loo = scaling.loo_table(judged, [MEASURE])
ctx.save_table(fits, "real_fits")
display(say(f"The criteria are judged on {basis}."))
display(ctx.table(pd.concat([fits_all.assign(models="all"), fits.assign(models="judged")]), "real_fits_shown",
                  "Power-law fit of top-k damage against parameters, on all models and on the judged suite.",
                  columns=["models", "x", "n_models", "exponent", "r2", "loo_max_error"],
                  headers={"models": "Models fitted", "x": "Against", "n_models": "Models", "exponent": "Exponent b",
                           "r2": "R²", "loo_max_error": "Largest leave-one-out error"}))
ctx.table(loo, "real_loo", "Leave-one-model-out: each model's error when the fit is made without it.")

# %%
rows = scaling.scaling_criteria(fits, MEASURE, evidence=f"{ctx.notebook}: real_fits / real_loo", basis=basis)
rows = criteria.machinery_only(rows, criteria.untrained_in_run(ctx.run_dir))  # untrained micro models: no evidence
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
card = scorecard.as_frame(rows)
say(scorecard.in_words(rows))

# %%
from IPython.display import Markdown  # noqa: E402

five = synth[synth.n_models == 5]
f = fits[fits.x == "n_params"].iloc[0]
text = [
    f"With 5 models, bootstrap CIs covered the true exponent in {five.coverage_bootstrap.min():.0%}-"
    f"{five.coverage_bootstrap.max():.0%} of synthetic suites (t-intervals: {five.coverage_t.min():.0%}-"
    f"{five.coverage_t.max():.0%}; nominal 95%); the exponent's bias was at most {five.bias.abs().max():.3f}. "
    f"The bootstrap under-covers with few models (few distinct resamples), so with < 8 models the t-interval "
    f"is the more honest of the two.",
    f"On the real results ({source}), {basis}: {scaling.describe_fit(f)}",
    f"Over all {len(measures)} models: {scaling.describe_fit(fits_all[fits_all.x == 'n_params'].iloc[0])}",
    f"Largest LOO miss: {loo.loc[loo.rel_error.idxmax(), 'model']} ({loo.rel_error.max():.0%})." if len(loo) else
    "Too few models for leave-one-out.",
]
Markdown("\n\n".join(text))

# %%
esa.nb.found(
    f"With 5 models, bootstrap CIs covered the true exponent in {five.coverage_bootstrap.min():.0%}-"
    f"{five.coverage_bootstrap.max():.0%} of synthetic suites against a nominal 95% "
    f"({ctx.ref('figure', 'synthetic_validation')}, {ctx.ref('table', 'synthetic_recovery')}).",
    f"On the judged suite the damage exponent is {f.exponent:.2f} with R² {f.r2:.2f} over {int(f.n_models)} models "
    f"({ctx.ref('table', 'real_fits_shown')}).")
