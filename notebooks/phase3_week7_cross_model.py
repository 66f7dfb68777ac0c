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
# # Phase 3 · Week 7: cross-model
#
# **Question.** Does the effect hold across architectures? The week-5 sweep (sign flip and zero, top-k
# vs random_k and bottom_k) runs on every configured model plus the profile's `cross_model_extra`: at
# smoke the tiny MoE model (`tiny-mixtral`, where expert slices are matrices of their own), at standard
# Qwen2.5-Coder-0.5B and the trained micro-mixtral, so that four architectures are run offline. Tiny models
# are random-initialised: they test the machinery on that architecture, not a trained network's critical weights.
# For each model it also asks the headline question: is there a super weight, and does zeroing it alone do
# more damage than zeroing a random weight of its matrix?

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import gc

import pandas as pd
from IPython.display import Markdown, display

import esa.nb
from esa.nb import say
from esa.perturb import plots
from esa.phases import criteria, parts, phase3, plans
from esa.report import scorecard
from esa.report.tables import number

ctx = esa.nb.context("phase3_week7_cross_model", profile, models, run_dir, overrides)
P = ctx.profile
model_list = plans.cross_model_list(P, ctx.models)
say(f"Models {', '.join(model_list)}; perturbations {', '.join(s.label() for s in phase3.cross_model_specs(P))}; "
    f"the top-k against {', '.join(phase3.cross_model_controls(P))}; seeds {', '.join(map(str, P.seeds))}.")

# %% [markdown]
# Each model's sweep and zero-alone ranks come from one function (`esa.phases.phase3.cross_model_one`); in the
# judged record a model can be recorded on its own as a part (`make record CHUNK=phase3_week7_cross_model
# PART=<model>`), and this page then reads that part instead of computing the model again.

# %%
res, origins = parts.per_unit(ctx.run_dir, ctx.notebook, P, model_list, on_unit=lambda m, r: gc.collect())
ctx.save_json(origins, "parts")
table = pd.concat([r["table"] for r in res.values()], ignore_index=True)
ctx.save_table(table, "cross_model")
rows = []
for m, r in res.items():
    ctx.save_json({"baseline": r["baseline"], "family": r["family"], **r["stats"]}, f"stats_{m}")
    rows.append(pd.DataFrame(r["stats"]["summary"]).assign(model=m, family=r["family"]))  # k is in the table
summary = pd.concat(rows, ignore_index=True)
ks = [f"{m}: the top-{r['k']} per matrix" + ("" if r["k"] == P.topk else f" (the profile's {P.topk}, capped by its "
                                                                         "smallest matrix)") for m, r in res.items()]
display(say(parts.origin_sentence(origins), "; ".join(ks) + "."))
ctx.table(summary, "damage_summary", "Mean damage per model, perturbation and group, 95% bootstrap CI over seeds.",
          columns=["model", "family", "perturbation", "group", "n_seeds", "mean", "mean_delta_ppl", "unchanged_share"],
          headers={"mean": "Δ log-PPL (nats/token)", "family": "Family"})

# %% [markdown]
# Damage per group, one panel per model (delta log-PPL in nats/token, 95% bootstrap CIs over seeds).

# %%
for m, r in res.items():
    fig = plots.damage_bars(summary[summary.model == m], f"{m} ({r['family']}): damage per group")
    ctx.savefig(fig, f"damage_{m}")

# %% [markdown]
# **Does each model have a super weight, and does zeroing it alone matter?** The super-weight detector's
# strongest candidate and the primary metric's top-1 weight, each zeroed alone on the same evaluation windows,
# against random nonzero single weights of the same matrix. p is the exact one-sided rank p-value over those
# controls; with 20 controls its floor is 1/21.

# %%
alone = pd.concat([r["zero_alone"] for r in res.values()], ignore_index=True)
ctx.save_table(alone, "zero_alone")
display(say(plans.zero_alone_note(P, model_list) + "."))
phase3.zero_alone_view(alone)

# %%
Markdown("\n".join(phase3.zero_alone_lines(alone, {m: r["detector"] for m, r in res.items()})))

# %%
verdicts = {m: (r["family"], r["stats"]) for m, r in res.items()}
cards = criteria.budgeted(criteria.p3_cross_architecture(verdicts, "data/phase3_week7_cross_model/"), P)
scorecard.write_rows(ctx.run_dir, ctx.notebook, cards)
say(scorecard.in_words(cards))

# %%
held = {m: criteria.holds(r["stats"]) for m, r in res.items()}
Markdown(f"The Phase 3 claim (sign-flip ΔPPL ratio ≥ 5 and top_k > random_k significant for every perturbation) holds "
         f"for {sum(bool(v) for v in held.values())} of {len(held)} models; "
         f"{len({r['family'] for r in res.values()})} architectures were run.\n\n"
         + "\n".join(f"- {m} ({res[m]['family']}): {criteria.holds_word(v)}" for m, v in held.items()))

# %%
_sf = summary[summary.perturbation.str.startswith("sign_flip")].pivot_table(index="model", columns="group", values="mean")
esa.nb.found(
    *[f"On {m} ({res[m]['family']}), a sign flip of the top-k adds {number(_sf.loc[m, 'top_k'])} nats/token against "
      f"{number(_sf.loc[m, 'random_k'])} for random weights ({ctx.ref('figure', f'damage_{m}')})."
      for m in _sf.index if {"top_k", "random_k"} <= set(_sf.columns)][:2],
    f"The Phase 3 claim holds for {sum(bool(v) for v in held.values())} of {len(held)} models "
    f"({ctx.ref('table', 'damage_summary')}; Criteria below).")
