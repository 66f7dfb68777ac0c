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
import pandas as pd
from IPython.display import display

import esa.nb
from esa.perturb import plots
from esa.phases import criteria, phase3
from esa.report import scorecard
from esa.stats.inference import comparisons_frame

ctx = esa.nb.context("phase3_week5_core_perturbation", profile, models, run_dir, overrides)
P = ctx.profile
specs = phase3.specs_from_profile(P)
print(f"profile {P.name}: models {ctx.models}, perturbations {[s.label() for s in specs]}, controls {P.controls}, "
      f"top-k {P.topk} ({P.mode}), seeds {P.seeds}, {P.perturb_eval_windows or P.eval_windows} eval windows x {P.seqlen}")

# %%
runs = {m: phase3.sweep_model(m, P, specs) for m in ctx.models}
table = pd.concat([r.table for r in runs.values()], ignore_index=True)
ctx.save_table(table, "perturbation")
ctx.save_table(pd.concat([r.windows for r in runs.values()], ignore_index=True), "perturbation_windows")
for m, r in runs.items():
    ctx.save_json({"baseline": r.baseline.as_dict(), "from_cache": r.from_cache, **r.stats}, f"stats_{m}")
    print(f"{m}: baseline PPL {r.baseline.ppl:.2f}; top-k sets from Phase 2 cache: {r.from_cache}; {r.seconds:.0f} s")
table[["model", "perturbation", "scale", "prob", "group", "seed", "k", "ppl", "delta_log_ppl", "n_nonfinite_windows",
       "n_inf_weights", "n_nan_weights", "unchanged_share"]]

# %% [markdown]
# ## What each group holds
# Flipping the sign of, or zeroing, an exactly-zero weight changes nothing: a group made mostly of zeros
# (a bottom_k on a quantised checkpoint) is harmless under those perturbations by construction.

# %%
comp = pd.concat([r.composition for r in runs.values()], ignore_index=True)
ctx.save_table(comp, "group_composition")
display(comp.groupby(["model", "group"])[["n", "zero_share", "median_abs_w"]].mean())
for (m, g), z in comp.groupby(["model", "group"])["zero_share"].mean().items():
    if z >= 0.5:
        print(f"{m}: {z:.0%} of {g} are exactly-zero weights, so sign_flip, zero and exponent bit flips leave "
              f"them unchanged; only gauss_noise tests that group.")

# %% [markdown]
# ## Damage per group, with 95% bootstrap CIs over seeds

# %%
for m, r in runs.items():
    s = pd.DataFrame(r.stats["summary"])
    display(s[["perturbation", "scale", "prob", "group", "n_seeds", "mean", "ci_lo", "ci_hi", "mean_delta_ppl",
               "n_capped", "unchanged_share"]])
    _sf = s[s.perturbation == "sign_flip"].set_index("group")["mean"]
    ctx.savefig(plots.damage_bars(s, f"{m}: damage per group"), f"damage_{m}",
                caption=f"{m}: mean damage per group and perturbation, 95% bootstrap CIs over seeds.",
                takeaway=("Sign flip: " + ", ".join(f"{g} {v:.3g}" for g, v in _sf.items()) + " nats/token.")
                if len(_sf) else "")

# %% [markdown]
# ## Ratios and tests (Holm-corrected across every comparison of this notebook, per model)

# %%
for m, r in runs.items():
    print(m)
    display(pd.DataFrame(r.stats["ratios"]))
    display(comparisons_frame(r.stats))
    print("\n".join(r.stats["notes"]))

# %% [markdown]
# ## Scorecard

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
scorecard.as_frame(rows)

# %%
for m, r in runs.items():
    s = pd.DataFrame(r.stats["summary"])
    sf = s[(s.perturbation == "sign_flip")].set_index("group")["mean"]
    comps = comparisons_frame(r.stats)
    tv = comps[(comps.a == "top_k") & (comps.b == "random_k")]
    card = {c.id: c for c in rows}
    ratio, sig = card.get(f"P3.sign_flip_ratio.{m}"), card.get(f"P3.significance.{m}")
    print(f"{m}: a sign flip of the top-{P.topk} per matrix adds {sf.get('top_k', float('nan')):.4f} nats/token "
          f"(random_k: {sf.get('random_k', float('nan')):.4f}, bottom_k: {sf.get('bottom_k', float('nan')):.4f}); "
          f"sign-flip ratio criterion (on Δlog-PPL): {ratio.verdict if ratio else 'not run'}"
          f"{f' ({ratio.measured})' if ratio else ''}. "
          f"top_k > random_k is significant (Holm, alpha 0.01) in {int(tv['significant'].fillna(False).sum())} of "
          f"{len(tv)} perturbation conditions (primary test: {', '.join(sorted(set(tv['primary'])))}); "
          f"significance criterion: {sig.verdict if sig else 'not run'}.")
