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
# # Phase 5 · Week 16: synthesis
#
# **Question.** Does the model depend on a small fraction (<1%) of its weights, so that perturbing them
# does far more damage than perturbing as many others, in a way that scales with size and architecture and
# can be put to use? This notebook loads no model: it reads this run's tables, figures and scorecard
# (`esa.report.synthesis`) and answers each expected outcome from the verdicts of the criteria that test
# it. A criterion counts only when it is PASS or FAIL; underpowered, not estimable and machinery-only rows
# say why they cannot count. Phases that left nothing in the run are named, not guessed.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
from IPython.display import Markdown, display

import esa.nb
from esa.report import savings, synthesis
from esa.report.tables import markdown, people

ctx = esa.nb.context("phase5_week16_synthesis", profile, models, run_dir, overrides)
P = ctx.profile
syn = synthesis.synthesize(ctx.run_dir, ctx.fig_dir.parent, P.as_dict())
gone = syn["missing"]
display(Markdown(f"Profile **{P.name}**, run `{ctx.run_dir.name}`: {len(gone['present'])} notebooks left results. "
                 + (f"Phases with no output: {', '.join(map(str, gone['phases']))}. " if gone["phases"] else "")
                 + syn["headline"]))

# %% [markdown]
# ## Results, outcome by outcome
# Each paragraph gives the answer, the figures and tables that carry it, and what would change it.

# %%
ctx.save_table(syn["answers"], "answers")
Markdown("\n\n".join(syn["paragraphs"]))

# %% [markdown]
# ## What the runs found against the hypothesis

# %%
found = syn["contradictions"]
Markdown("\n".join(f"- {line}" for line in found) if found else
         "No control did more damage than the sensitivity top-k, and no criterion failed as judged.")

# %% [markdown]
# ## Claims and evidence

# %%
ctx.save_table(syn["claims"].astype({"measured": str}), "claims")
Markdown(f"**Table {synthesis.TABLE_CLAIMS}.** Every criterion of the run (the scorecard, each criterion once): "
         "its value against its threshold, its verdict, why it could not be judged where it could not, and the "
         "figures and table that carry its evidence.\n\n" + markdown(people(syn["claims"])))

# %% [markdown]
# ## One table per phase

# %%
for phase, table in syn["tables"].items():
    number = synthesis.phase_table_number(phase)
    display(Markdown(f"### Phase {phase}: {synthesis.PHASE_NAMES[phase]}"))
    if table is None or table.empty:
        display(Markdown(f"*Phase {phase} left no table in this run.*"))
        continue
    ctx.save_table(table, f"phase{phase}")
    display(Markdown(f"**Table {number}.** Phase {phase} in this run.\n\n" + markdown(people(table))))

# %% [markdown]
# ## The verdicts by phase

# %%
ctx.save_table(syn["counts"], "verdict_counts")
ctx.save_table(syn["scorecard"].astype({"measured": str}), "scorecard")
fig = synthesis.counts_figure(syn["counts"])
ctx.savefig(fig, "scorecard_by_phase")
Markdown(f"**Table {synthesis.TABLE_COUNTS}.** Criteria per phase by verdict (every row is in table "
         f"{synthesis.TABLE_CLAIMS}).\n\n" + markdown(people(syn["counts"])))

# %% [markdown]
# ## What sequential evaluation saved
# Evaluation windows the perturbed and pruned conditions used, against the fixed-n plan that evaluates each
# condition on all of its windows (`esa.report.savings`, from the tables the notebooks saved).

# %%
saved = savings.windows_saved(ctx.run_dir, P.as_dict())
ctx.save_table(saved, "windows_saved")
HEADERS = {"evaluated": "Windows evaluated", "fixed_n": "At fixed n", "fewer": "Times fewer"}
Markdown(f"**Table {synthesis.TABLE_SAVINGS}.** Windows evaluated per notebook and model, against the fixed-n "
         f"plan. {savings.in_words(saved)}.\n\n" + markdown(people(saved, headers=HEADERS)) if len(saved) else
         "No notebook of this run left a sequential table.")

# %% [markdown]
# ## Limitations (computed from this run)

# %%
Markdown("\n".join(f"- {line}" for line in syn["limitations"]))

# %% [markdown]
# ## Each phase's key figure

# %%
ctx.savefig(synthesis.figure_grid(syn["figures"]), "key_figures", caption="The key figure of each phase in this run.",
            takeaway=synthesis.key_figure_takeaway(ctx.run_dir, syn["figures"]))
