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
# # Phase 3 · Week 5: core perturbation tests
#
# **Question.** Do the weights Phase 2 ranks highest matter causally? We perturb the top-k set (from
# Phase 2's cache, never recomputed) with each perturbation, and the same number of other weights
# (controls: random per matrix, random global, bottom-k by score, top-k by |w|), evaluate, and restore
# bit-exactly. Damage = delta log-PPL (nats/token) against the unperturbed model on the same windows.
# Statistics (esa.stats.inference): bootstrap CIs over seeds, paired tests by seed and by window,
# Holm correction across every comparison of this notebook.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import logging

import pandas as pd
from IPython.display import display

import esa.nb
from esa.nb import say
from esa.perturb import plots
from esa.phases import criteria, phase3
from esa.report import scorecard
from esa.report.tables import number
from esa.stats.inference import comparisons_frame

ctx = esa.nb.context("phase3_week5_core_perturbation", profile, models, run_dir, overrides)
P = ctx.profile
specs = phase3.specs_from_profile(P)
logging.getLogger(ctx.notebook).info("plan: models %s, perturbations %s, controls %s, top-k %s (%s), seeds %s",
                                     ctx.models, [s.label() for s in specs], P.controls, P.topk, P.mode, P.seeds)
say(f"Profile *{P.name}*: {len(ctx.models)} model(s) ({', '.join(ctx.models)}), {len(specs)} perturbations "
    f"({', '.join(s.label() for s in specs)}), controls {', '.join(P.controls)}; the top-{P.topk} "
    f"({P.mode}) against as many other weights, over {len(P.seeds)} seed(s) and "
    f"{P.perturb_eval_windows or P.eval_windows} evaluation windows of {P.seqlen} tokens.")

# %%
runs = {m: phase3.sweep_model(m, P, specs) for m in ctx.models}
table = pd.concat([r.table for r in runs.values()], ignore_index=True)
ctx.save_table(pd.concat([r.windows for r in runs.values()], ignore_index=True), "perturbation_windows")
for m, r in runs.items():
    ctx.save_json({"baseline": r.baseline.as_dict(), "from_cache": r.from_cache, **r.stats}, f"stats_{m}")
display(say(*(f"{m}: the unperturbed model's perplexity is {r.baseline.ppl:.3g}; the top-k sets were "
              f"{'read from Phase 2' if r.from_cache else 'scored afresh (no Phase 2 cache)'}; the sweep took "
              f"{r.seconds:.0f} s." for m, r in runs.items())))
ctx.table(table, "perturbation", "Every run: perplexity and damage per model, perturbation, group and seed.",
          columns=["model", "perturbation", "group", "seed", "k", "ppl", "delta_log_ppl", "unchanged_share"])

# %% [markdown]
# ## What each group holds
# Flipping the sign of, or zeroing, an exactly-zero weight changes nothing: a group made mostly of zeros
# (a bottom_k on a quantised checkpoint) is harmless under those perturbations by construction.

# %%
comp = pd.concat([r.composition for r in runs.values()], ignore_index=True)
ctx.save_table(comp, "group_composition")  # per seed; the synthesis reads it
held = comp.groupby(["model", "group"])[["n", "zero_share", "median_abs_w"]].mean()
display(ctx.table(held, "group_composition_mean", "What each weight group holds (mean over seeds)."))
zeros = [(m, g, z) for (m, g), z in held["zero_share"].items() if z >= 0.5]
say(*(f"On {m}, {z:.0%} of {g} are exactly zero, so sign flips, zeroing and exponent bit flips leave them "
      f"unchanged; only Gaussian noise tests that group." for m, g, z in zeros))

# %% [markdown]
# ## Damage per group, with 95% bootstrap CIs over seeds

# %%
for m, r in runs.items():
    s = pd.DataFrame(r.stats["summary"])
    display(ctx.table(s, f"summary_{m}", f"{m}: mean damage per perturbation and group, 95% bootstrap CI over seeds.",
                      columns=["perturbation", "group", "n_seeds", "mean", "mean_delta_ppl", "n_capped", "unchanged_share"],
                      headers={"mean": "Δ log-PPL (nats/token)"}))
    _sf = s[s.perturbation == "sign_flip"].set_index("group")["mean"]
    ctx.savefig(plots.damage_bars(s, f"{m}: damage per group"), f"damage_{m}",
                caption=f"{m}: mean damage per group and perturbation, 95% bootstrap CIs over seeds.",
                takeaway=("Sign flip: " + ", ".join(f"{g} {v:.3g}" for g, v in _sf.items()) + " nats/token.")
                if len(_sf) else "")

# %% [markdown]
# ## Ratios and tests
# Tests are Holm-corrected across every comparison of this notebook, per model; the primary test is the
# seed-level one with enough seeds, else the window-level one. The full method notes are in the JSON
# summary of each model.

# %%
for m, r in runs.items():
    display(ctx.table(pd.DataFrame(r.stats["ratios"]), f"ratios_{m}",
                      f"{m}: damage of one group over another (Δ log-PPL), 95% bootstrap CI.",
                      columns=["perturbation", "numerator", "denominator", "ratio_delta_log_ppl"],
                      ci={"ratio_delta_log_ppl": ("log_ci_lo", "log_ci_hi")}))
    display(ctx.table(comparisons_frame(r.stats), f"tests_{m}", f"{m}: is the first group damaged more? "
                      "One-sided tests, Holm-corrected.",
                      columns=["perturbation", "a", "b", "primary", "p_primary_holm", "significant",
                               "dose_matched", "per_changed_weight_p"]))

# %%
rows = []
for m, r in runs.items():
    ev = f"data/phase3_week5_core_perturbation/stats_{m}.json"
    for c in criteria.phase3_rows(r.stats, ev, expected_types=["sign_flip", "gauss_noise", "zero", "bit_flip"]):
        if c.id != "P3.dose_monotonic":  # dose-response is week 6's
            c.id, c.text = f"{c.id}.{m}", f"{c.text} ({m})"
            rows.append(c)
rows = criteria.budgeted(rows, P)
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
say(scorecard.in_words(rows))

# %%
card = {c.id: c for c in rows}
findings = []
for m, r in runs.items():
    s = pd.DataFrame(r.stats["summary"])
    sf = s[(s.perturbation == "sign_flip")].set_index("group")["mean"]
    tv = comparisons_frame(r.stats)
    tv = tv[(tv.a == "top_k") & (tv.b == "random_k")]
    ratio = card.get(f"P3.sign_flip_ratio.{m}")
    findings.append(
        f"On {m}, a sign flip of the top-{P.topk} adds {number(sf.get('top_k', float('nan')))} nats/token against "
        f"{number(sf.get('random_k', float('nan')))} for as many random weights ({ctx.ref('figure', f'damage_{m}')}); top-k beats random in "
        f"{int(tv['significant'].fillna(False).sum())} of {len(tv)} perturbation conditions after Holm "
        f"correction ({ctx.ref('table', f'tests_{m}')}), and the sign-flip ratio criterion reads "
        f"{ratio.verdict if ratio else 'not run'}.")
esa.nb.found(*findings[:3])
