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
# # Phase 5 · Week 13a: pruning by sensitivity against magnitude, Wanda and SparseGPT
#
# **Question.** The guide: "remove weights based on sensitivity rather than magnitude" and "ESA-guided pruning
# outperforms magnitude pruning by >15%". Every scorer prunes the same block linears to the same sparsity and is
# measured on one protocol: perplexity and next-token accuracy on non-overlapping windows of the evaluation
# split, and an offline zero-shot task (the true next line of a play among 4 candidates from the held-out
# text, scored by log-likelihood; chance 25%; `esa.zeroshot`). Confidence intervals are over calibration seeds.
#
# **Criterion, made precise.** gain = 1 − Δ/Δ_magnitude with Δ = log-PPL(pruned) − log-PPL(dense), at 50%
# unstructured, per model and calibration seed; PASS when the 95% t-interval over seeds lies above 0.15
# (`esa.phases.phase5_pruning`). "ESA-guided" = a sensitivity scorer (grad_x_weight, OBD, Hutchinson) with the
# critical set (super-weight candidates + Phase 2's top-k) never pruned. The same comparison against Wanda and
# SparseGPT stands beside it. Every table names the calibration each method used: layer-sequential (each
# block calibrated on the outputs of the already-pruned blocks, as Wanda and SparseGPT do), one-shot (one
# dense pass; the gradient scorers' default), or none (data-free).

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import pandas as pd
from IPython.display import Markdown, display

import esa.nb
from esa.apps.pruning import plots
from esa.nb import say
from esa.phases import parts
from esa.phases import phase5_pruning as pp
from esa.report import scorecard

ctx = esa.nb.context("phase5_week13_pruning", profile, models, run_dir, overrides)
study = pp.STUDY
S = study.settings(ctx.profile, None)
plan = study.plan(S, ctx.profile, None if S.models else models)  # a section that names its models wins
ctx.save_json(plan.as_dict(), "plan")  # the plan goes to the manifest's data folder, not the page
Markdown(f"The plan: {len(plan.conditions)} evaluations of {plan.setup['evaluation']['windows']} windows each on "
         f"{', '.join(plan.models)}.")

# %% [markdown]
# Each model is pruned and evaluated by one function (`esa.phases.phase5_pruning.run_model`); in the judged
# record a model can be recorded on its own as a part (`make record CHUNK=phase5_week13_pruning PART=<model>`),
# and this page then reads that part's tables instead of pruning the model again.

# %%
res, origins = parts.per_unit(ctx.run_dir, ctx.notebook, ctx.profile, plan.models)
ctx.save_json(origins, "parts")
results = {m: pp.from_result(m, r) for m, r in res.items()}
rows = pd.concat([r.rows for r in results.values()], ignore_index=True)
ctx.save_table(rows, "pruning_rows")
for m, r in results.items():
    for name, t in r.tables.items():
        if len(t) and name not in ("main", "patterns", "owl", "protection"):  # those are shown below
            ctx.save_table(t, f"{name}_{m}")
    ctx.save_json({"critical": r.critical, "evaluation": r.evaluation, "zeroshot": r.zeroshot, "restored": r.restored,
                   "seconds": r.seconds}, f"setup_{m}")
Markdown(parts.origin_sentence(origins) + "\n\n"
         + "\n".join(f"- **{m}**: {r.evaluation['n_windows']} evaluation windows of {r.evaluation['seqlen']} tokens; "
                     f"protected set {r.critical['label']} ({r.critical['n_protected']} weights); weights restored "
                     f"bit-exactly: {'yes' if r.restored else 'NO'}; {r.seconds:.0f} s." for m, r in results.items()))

# %% [markdown]
# ## The 50% table
# Perplexity is the geometric mean over calibration seeds with its 95% CI (the estimate alone with one seed);
# "Calib mode" says how each method was calibrated; the zero-shot task's chance level is in the full table.

# %%
COLS = ["method", "pattern", "protected", "calib_mode", "n_seeds", "ppl", "accuracy", "zs_accuracy"]
for m, r in results.items():
    display(ctx.table(r.tables["main"].sort_values("ppl"), f"main_{m}",
                      f"{m}: every method at {S.sparsity:.0%} sparsity, best perplexity first.", columns=COLS))

# %% [markdown]
# ## The sparsity sweep

# %%
for m, r in results.items():
    ctx.savefig(plots.sparsity_curve(r.tables["sweep"], f"{m}: perplexity vs sparsity (95% CI over seeds)"), f"sweep_{m}")
    sweep = r.tables["sweep"].pivot_table(index="method", columns="sparsity", values="ppl")
    sweep.columns = [f"PPL at {c:.0%}" for c in sweep.columns]
    display(ctx.table(sweep, f"sweep_ppl_{m}", f"{m}: perplexity per method and sparsity (geometric mean over seeds)."))

# %% [markdown]
# ## N:M patterns, OWL allocation, protected vs unprotected

# %%
for m, r in results.items():
    for name, what in (("patterns", "N:M patterns"), ("owl", "OWL layer-wise allocation"),
                       ("protection", "critical set protected or not")):
        t = r.tables[name]
        if len(t):
            display(ctx.table(t, f"{name}_{m}", f"{m}: {what}.", columns=["method", "sparsity", *COLS[1:]]))

# %% [markdown]
# ## In numbers

# %%
crit = study.criteria(results, plan, "data/phase5_week13_pruning/pruning_rows.parquet")
_, detail = pp.criterion_rows(rows, S, "")
if len(detail):
    ctx.save_table(detail, "criterion_per_seed")
scorecard.write_rows(ctx.run_dir, ctx.notebook, crit)
display(Markdown("\n\n".join(study.findings(results, plan))))
say(scorecard.in_words(crit))

# %%
found = []
for m, r in results.items():
    main = r.tables["main"].sort_values("ppl")
    dense, pruned = main[main.method == "dense"], main[main.method != "dense"]
    if not len(pruned):
        continue
    best, mag = pruned.iloc[0], pruned[pruned.method == "magnitude"]
    than = f", against {mag.ppl.iloc[0]:.3g} for magnitude pruning" if len(mag) and best.method != "magnitude" else ""
    was = f" (dense {dense.ppl.iloc[0]:.3g})" if len(dense) else ""
    found.append(f"On {m} at {S.sparsity:.0%} sparsity, {best.method} keeps the lowest perplexity, {best.ppl:.3g}"
                 f"{was}{than} ({ctx.ref('table', f'main_{m}')}, {ctx.ref('figure', f'sweep_{m}')}).")
gain = [c for c in crit if c.verdict in ("PASS", "FAIL")]
found.append(f"{len(gain)} of {len(crit)} pruning criteria could be judged on this run's numbers"
             + (" (smoke budget: the rest are machinery-only)" if S.machinery_only else "")
             + "; each is listed under Criteria with its value and threshold.")
esa.nb.found(*found[-3:])
