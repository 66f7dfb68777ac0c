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
from IPython.display import Image, Markdown, display

import esa.nb
from esa.report import synthesis

ctx = esa.nb.context("phase5_week16_synthesis", profile, models, run_dir, overrides)
P = ctx.profile
syn = synthesis.synthesize(ctx.run_dir, ctx.fig_dir.parent, P.as_dict())
gone = syn["missing"]
print(f"profile {P.name}: run {ctx.run_dir.name}; {len(gone['present'])} notebooks with results; "
      f"missing phases {gone['phases'] or 'none'}; missing notebooks {gone['notebooks'] or 'none'}")

# %% [markdown]
# ## The answer, outcome by outcome

# %%
ctx.save_table(syn["answers"], "answers")
display(Markdown(syn["headline"]))
syn["answers"]

# %% [markdown]
# ## One table per phase

# %%
for phase, table in syn["tables"].items():
    display(Markdown(f"### Phase {phase}: {synthesis.PHASE_NAMES[phase]}"))
    if table is None or table.empty:
        display(Markdown(f"*Phase {phase} left no table in this run.*"))
        continue
    ctx.save_table(table, f"phase{phase}")
    display(table)

# %% [markdown]
# ## The scorecard across all phases (each criterion once)

# %%
ctx.save_table(syn["counts"], "verdict_counts")
ctx.save_table(syn["scorecard"].astype({"measured": str}), "scorecard")
fig = synthesis.counts_figure(syn["counts"])
ctx.savefig(fig, "scorecard_by_phase")
syn["scorecard"]

# %% [markdown]
# ## Limitations (computed from this run)

# %%
display(Markdown("\n".join(f"- {line}" for line in syn["limitations"])))

# %% [markdown]
# ## Each phase's key figure

# %%
figs = syn["figures"]
ctx.savefig(synthesis.figure_grid(figs), "key_figures")
for phase, path in figs.items():
    if path is not None:
        display(Markdown(f"**Phase {phase}** ({synthesis.PHASE_NAMES[phase]}): `{path.parent.name}/{path.name}`"))
        display(Image(filename=str(path), width=720))

# %%
c = syn["counts"].sum(numeric_only=True)
ans = syn["answers"].set_index("phase")["answer"]
lines = [f"{int(c.get('PASS', 0))} PASS, {int(c.get('FAIL', 0))} FAIL, {int(c.get('underpowered', 0))} underpowered, "
         f"{int(c.get('not estimable', 0))} not estimable, {int(c.get('machinery-only', 0))} machinery-only "
         f"over {int(c.drop('phase', errors='ignore').sum())} unique criteria."]
lines += [f"- Phase {p} ({synthesis.PHASE_NAMES[p]}): {a}." for p, a in ans.items()]
if gone["phases"]:
    lines.append(f"\nNot in this run: phase(s) {gone['phases']}, so their outcomes are unanswered here.")
Markdown("\n".join(lines))
