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
# # Phase 3 · Week 6: dose-response
#
# **Question.** Does damage rise with the size of the perturbation, and does the hierarchy
# top-k > random > bottom hold at every dose? sign_flip and gauss_noise are swept over the profile's
# `dose_scales`, bit_flip over probabilities; monotonicity = the mean damage rises at every step
# (Spearman's rho over all (seed, dose) points reported alongside).
#
# **Reading the doses.** sign_flip at scale s maps w to -s·w (README, "Methods"), so at the guide's small doses
# (0.005-0.1) it is close to zeroing the weight: its curve starts near the damage of zero-ablation and
# rises only by the reversed remainder. gauss_noise adds N(0, (s·σ)²) with σ the matrix's standard
# deviation, so at these doses it is a small perturbation of a handful of weights per matrix.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import pandas as pd
from IPython.display import display

import esa.nb
from esa.nb import say
from esa.perturb import PerturbSpec, plots
from esa.phases import criteria, phase3
from esa.report import scorecard

ctx = esa.nb.context("phase3_week6_dose_response", profile, models, run_dir, overrides)
P = ctx.profile
controls = [c for c in P.controls if c in ("random_k", "bottom_k")]
specs = [PerturbSpec(p, scale=s) for p in ("sign_flip", "gauss_noise") if p in P.perturbations for s in P.dose_scales]
say(f"Profile *{P.name}*: models {', '.join(ctx.models)}; doses {', '.join(map(str, P.dose_scales))}; the top-k "
    f"against {', '.join(controls)}; seeds {', '.join(map(str, P.seeds))}.")

# %%
runs = {m: phase3.sweep_model(m, P, specs, controls=controls) for m in ctx.models}
table = pd.concat([r.table for r in runs.values()], ignore_index=True)
ctx.save_table(table, "dose_response")
for m, r in runs.items():
    ctx.save_json({"baseline": r.baseline.as_dict(), **r.stats}, f"stats_{m}")
    ctx.savefig(plots.dose_plot(r.table, title=f"{m}: dose-response"), f"dose_{m}")
    display(ctx.table(pd.DataFrame(r.stats["dose_response"]["curves"]), f"curves_{m}",
                      f"{m}: does each group's damage rise with the dose? (Spearman ρ over doses)"))
    display(ctx.table(pd.DataFrame(r.stats["dose_response"]["hierarchy"]), f"hierarchy_{m}",
                      f"{m}: mean damage per group at each (perturbation, dose) point."))

# %%
rows = []
for m, r in runs.items():
    for c in criteria.p3_monotonic(r.stats, f"data/phase3_week6_dose_response/stats_{m}.json"):
        c.id, c.text = f"{c.id}.{m}", f"{c.text} ({m})"
        rows.append(c)
rows = criteria.budgeted(rows, P)
scorecard.write_rows(ctx.run_dir, ctx.notebook, rows)
say(scorecard.in_words(rows))

# %%
found = []
for m, r in runs.items():
    top = [c for c in r.stats["dose_response"]["curves"] if c["group"] == "top_k"]
    hier = r.stats["dose_response"]["hierarchy"]
    rhos = ", ".join(f"{c['perturbation']} {c['rho']:.2f}" for c in top)
    found.append(f"On {m}, the top-k curve rises at every dose step for {sum(bool(c['monotonic']) for c in top)} of "
          f"{len(top)} perturbations (Spearman rho: {rhos}); "
          f"top-k lies above every control at {sum(h['means'][0] > max(h['means'][1:]) for h in hier)} of {len(hier)} "
          f"(perturbation, dose) points; the full order top > random > bottom (controls at noise level) holds at "
          f"{sum(bool(h['holds']) for h in hier)} ({ctx.ref('figure', f'dose_{m}')}, {ctx.ref('table', f'hierarchy_{m}')}).")
    zeros = r.composition.groupby("group")["zero_share"].mean()
    display(say(f"{m}: exactly-zero weights per group (a sign flip leaves them unchanged): "
                + ", ".join(f"{g} {z:.0%}" for g, z in zeros.items()) + "."))
esa.nb.found(*found[:3])
