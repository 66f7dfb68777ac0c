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
# # Phase 4 · Week 9: how does weight sensitivity scale with model size?
#
# **Question.** As models grow, does the damage done by zeroing the top-k most sensitive weights, and the
# heaviness of the score tail, follow a power law in parameter count?
#
# **Models.** The micro-suite (four Llama models of geometrically spaced sizes and one Mixtral MoE matched
# to `micro-llama-176k`'s active parameters), all trained identically here (`esa.models.micro`), plus the
# embedded models beyond the smoke profile. The smoke profile uses the *undertrained* smoke suite: its
# numbers check the machinery only. MoE models are fitted against total and active parameters.
#
# **Measures** (`esa.analysis.collect`): Δlog-PPL of zeroing the per-layer top-k (grad_x_weight), the same
# for a matched random set, their ratio, and tail statistics of the scores.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import matplotlib.pyplot as plt
import numpy as np

import esa.nb
from esa.analysis import scaling
from esa.models import micro
from esa.nb import say
from esa.phases import phase4
from esa.report import scorecard

ctx = esa.nb.context("phase4_week9_parameter_scaling", profile, models, run_dir, overrides)
P = ctx.profile
refs = list(models) if models else phase4.phase4_models(P)
say(f"Profile *{P.name}*: {len(refs)} models ({', '.join(refs)}); corpus {P.corpus}, windows of {P.seqlen} tokens, "
    f"seeds {', '.join(map(str, P.seeds))}, top-{P.topk} ({P.mode}).")

# %% [markdown]
# ## The micro-suite: training cost and whether each model learned anything
# Perplexity is per byte (byte-level tokenizer); the unigram baseline knows byte frequencies only.

# %%
budget = P.name if P.name in micro.BUDGETS else "standard"
micro_names = [r.partition(micro.SEP)[0] for r in refs if micro.is_micro(r)]
suite = phase4.suite_report(budget, micro_names, seqlen=P.seqlen, eval_windows=P.eval_windows) if micro_names else None
if suite is not None:
    ctx.save_table(suite, "micro_suite")
suite

# %%
measures, topk_tables = phase4.collect(refs, P)
for name, t in topk_tables.items():
    ctx.save_table(t, f"topk_{name.replace('@', '_')}")
ctx.table(measures, "measures", "Each model's size, perplexity and sensitivity measures.",
          columns=["model", "n_params", "n_params_active", "base_ppl", "dlogppl_topk_zero", "dlogppl_random_zero",
                   "topk_over_random", "tail_top1pct_over_median", "frac_selected"],
          headers={"dlogppl_topk_zero": "Δ log-PPL, top-k zeroed (nats/token)",
                   "dlogppl_random_zero": "Δ log-PPL, random-k zeroed (nats/token)",
                   "topk_over_random": "Top-k / random damage", "base_ppl": "Perplexity",
                   "n_params_active": "Active parameters", "tail_top1pct_over_median": "Top-1% score / median",
                   "frac_selected": "Share of weights selected"})

# %%
MEASURES = ["dlogppl_topk_zero", "topk_over_random", "tail_top1pct_over_median", "tail_max_over_median"]
fits = scaling.scaling_fits(measures, MEASURES, n_boot=1000)
ctx.table(fits, "fits", "Power-law fits of each measure against parameters (exponent b with its 95% bootstrap CI).",
          columns=["measure", "x", "n_models", "exponent", "r2", "loo_mean_error", "descriptive_only"],
          headers={"x": "Against", "n_models": "Models", "exponent": "Exponent b", "r2": "R²",
                   "loo_mean_error": "Leave-one-out error", "descriptive_only": "Descriptive only"})

# %%
from matplotlib.ticker import LogLocator, NullFormatter

fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 3.6))
for ax, m in zip(axes, MEASURES, strict=True):
    for xc, marker in (("n_params", "o"), ("n_params_active", "x")):
        ok = measures[m] > 0
        ax.scatter(measures.loc[ok, xc], measures.loc[ok, m], marker=marker, label=xc)
        f = fits[(fits.measure == m) & (fits.x == xc)].iloc[0]
        xs = np.geomspace(measures[xc].min(), measures[xc].max(), 50)
        ax.plot(xs, f.prefactor * xs**f.exponent, lw=1, label=f"{xc}: b={f.exponent:.2f}, R²={f.r2:.2f}")
    ax.set(xscale="log", yscale="log", title=m, xlabel="parameters", ylabel=m)
    # A log axis spanning less than a decade labels its minor ticks too, and they overlap: label 1, 2, 5 only.
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=7)
fig.tight_layout()
_f = fits[fits.x == "n_params"].set_index("measure")["exponent"]
ctx.savefig(fig, "scaling_fits", caption="Power-law fits of each sensitivity measure against parameter count "
            "(o: total, x: active parameters).",
            takeaway="Exponents on total parameters: " + ", ".join(f"{m} b={b:.2f}" for m, b in _f.items()) + ".")

# %%
from IPython.display import Markdown, display  # noqa: E402

lines = [scaling.describe_fit(r) for _, r in fits[fits.x == "n_params"].iterrows()]
judged, basis = scaling.criteria_basis(measures)
if len(judged) < len(measures):  # a fit across suites can look lawful from two clusters alone: show the suite's own
    own = scaling.scaling_fits(judged, MEASURES[:1], n_boot=1000)
    lines.append(f"**Within one suite** ({basis}): " + scaling.describe_fit(own[own.x == "n_params"].iloc[0]))
if suite is not None:
    beat = suite[suite.eval_ppl < suite.unigram_ppl]
    lines.append(f"\nMicro-suite ({budget} budget): {len(beat)} of {len(suite)} models beat the unigram baseline "
                 f"(PPL {suite.unigram_ppl.iloc[0]:.1f}); eval PPL ranges {suite.eval_ppl.min():.1f}-"
                 f"{suite.eval_ppl.max():.1f}; training took {suite.train_seconds.sum():.0f} s in total "
                 f"({suite.train_tokens.sum() / 1e6:.2f}M tokens).")
moe = measures[measures.moe]
if len(moe):
    lines.append(f"\nMoE counted two ways: {', '.join(moe.model)} has {moe.n_params.iloc[0]:,} total and "
                 f"{moe.n_params_active.iloc[0]:,} active parameters; fits against both are in the table.")
lines.append(f"\nThe per-layer k is fixed, so the selected fraction falls from {measures.frac_selected.max():.2%} to "
             f"{measures.frac_selected.min():.2%} with size: a confound of every damage-vs-size exponent here.")
display(Markdown("\n\n".join(lines)))
say(scorecard.in_words([r for r in scorecard.read_all(ctx.run_dir) if r.get("notebook") == ctx.notebook]))

# %%
_b = fits[(fits.x == "n_params") & (fits.measure == MEASURES[0])]
esa.nb.found(
    *([f"Damage from zeroing the top-k scales with parameters as N^{_b.exponent.iloc[0]:.2f} "
       f"(R² {_b.r2.iloc[0]:.2f}, {int(_b.n_models.iloc[0])} models; {ctx.ref('figure', 'scaling_fits')}, "
       f"{ctx.ref('table', 'fits')})."] if len(_b) else []),
    f"The selected share of weights falls from {measures.frac_selected.max():.2%} to {measures.frac_selected.min():.2%} "
    f"with size, a confound of every exponent here ({ctx.ref('table', 'measures')}).")
