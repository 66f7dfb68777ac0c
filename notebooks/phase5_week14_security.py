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
# # Phase 5 · Week 14: security of critical weights
#
# **Question.** Are the critical weights (Phase 2's top-k) more vulnerable to bit flips, hardware faults
# and bounded weight perturbations than random weights of the same number, and does protecting them help?
# Can a backdoor be seen in the sensitivity maps of fine-tuned models?
#
# **Storage formats.** Every flip is a real bit of a real stored value: bf16, fp16 and fp32 as stored, and
# simulated int8 with one scale per output channel (quantise, flip, dequantise). In float storage almost
# every weight is a one-flip single point of failure through its exponent MSB (|w| < 2 becomes ~1e38),
# so the first table measures that share, and the critical-vs-random comparisons are made where one
# flip's damage is bounded: int8 (a flip moves a weight by at most its row's range).
#
# **The criterion, defined** (esa.phases.phase5_security; verdicts: esa.stats.vulnerability): the critical
# set is at least c times as vulnerable as random-k (matched per matrix; c = `criterion_factor`, 1 by
# default), judged three ways as a contrast D, never as a ratio over a control that may do nothing: flips
# the bit search needs to reach PPL ×100 (D = random − c·critical, paired by attack seed), damage per trial
# of random bounded faults inside the set (D = critical − c·random, trials paired), and the PGD loss
# increase under an L∞ budget (D = critical − c·random, paired by attack seed). PASS when D's one-sided
# (1 − alpha) lower bound is above 0, FAIL when its upper bound is below 0; underpowered, not estimable or
# machinery-only with the reason when the numbers cannot carry a verdict. The ratio of means is shown beside,
# as a description. With the profile's `sequential`, the fault pairs run in looks and stop once the
# comparison is decided (its bounds hold at whichever look stopped it); the plan names the looks.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import pandas as pd
from IPython.display import Markdown, display

import esa.nb
from esa.apps.security import plots
from esa.nb import say
from esa.phases import phase5_security as sec5
from esa.report import scorecard
from esa.stats.vulnerability import vulnerability_table

ctx = esa.nb.context("phase5_week14_security", profile, models, run_dir, overrides)
study = sec5.STUDY
S = study.settings(ctx.profile, None)
plan = study.plan(S, ctx.profile, ctx.models)
ctx.save_json(plan.as_dict(), "plan")
c, h = plan.setup["critical_set"], plan.setup["heldout"]
why = sec5.budget_reason(S)
Markdown(f"The plan: {len(plan.conditions)} conditions on {', '.join(plan.models)}. The critical set is the "
         f"{c['mode']} top-{c['topk']} of {c['metric']} (seed {c['score_seed']}); the attack searches "
         f"{S.attack_format} with a budget of {S.max_flips} flips over {len(S.attack_seeds)} attack seeds; every "
         f"condition is judged on {h['windows']} held-out window(s) of {h['seqlen']} tokens."
         + (f" The verdicts are a machinery check ({why})." if why else ""))

# %% [markdown]
# ## Single flips, attacks, faults, protection and PGD, per model

# %%
results = study.run(plan)
Markdown("\n".join(f"- **{m}**: base perplexity {r.base['ppl']:.1f} on the held-out windows; critical set "
                   f"{r.critical['n_weights']:,} weights ({r.critical['fraction']:.3%}), scores from the cache: "
                   f"{'yes' if r.critical['from_cache'] else 'no'}; weights restored bit-exactly after every analysis: "
                   f"{'yes' if r.weights_restored else 'NO'}; seconds: "
                   + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in r.seconds.items()) + "."
                   for m, r in results.items()))

# %%
collapse = pd.concat([r.collapse for r in results.values()], ignore_index=True)
ctx.save_table(pd.concat([r.collapse_weights for r in results.values()], ignore_index=True), "collapse_weights")
display(ctx.table(collapse, "collapse_share", "Share of weights whose single worst bit flip collapses the model, "
                  "95% CI.", columns=["model", "format", "bits", "n", "n_collapsed", "share", "n_nonfinite", "base_ppl"],
                  ci={"share": ("lo", "hi")},
                  headers={"format": "Format", "bits": "Bits", "n": "Weights tried", "n_collapsed": "Collapsed",
                           "share": "Share collapsed", "n_nonfinite": "Non-finite"}))
ctx.savefig(plots.collapse_bars(collapse, "share of weights whose single worst flip collapses the model"),
            "collapse_share")

# %%
for m, r in results.items():
    ctx.save_table(r.attacks.table.assign(model=m), f"attack_runs_{m}")
    ctx.save_table(r.attacks.history.assign(model=m), f"attack_history_{m}")
    display(ctx.table(r.attacks.summary.assign(model=m), f"attack_summary_{m}",
                      f"{m}: the bit-flip attack per search space, summarised over attack seeds."))
    ctx.savefig(plots.attack_curves(r.attacks.history, r.base["log_ppl"], f"{m}: bit-flip attack, {S.attack_format}"),
                f"attack_{m}")

# %%
for m, r in results.items():
    ctx.save_table(r.fault_trials, f"fault_trials_{m}")
    ctx.save_table(r.set_faults, f"set_faults_{m}")
    ctx.save_table(r.protection, f"protection_{m}")
    display(ctx.table(r.faults, f"faults_{m}", f"{m}: random bit faults per format and rate, catastrophic rate with its "
                      "95% CI.", columns=["format", "rate", "n_trials", "mean_flips", "n_catastrophic",
                                          "catastrophic_rate", "damage_median", "catastrophes_hit_critical"],
                      ci={"catastrophic_rate": ("catastrophic_lo", "catastrophic_hi")}))
    display(r.set_faults.groupby("set")[["damage", "catastrophic", "n_inf", "n_nan"]].mean())
    for key, seq in r.sequential.items():  # a comparison decided in looks: each look, and the pairs it used
        display(ctx.table(seq.history, f"{key}_looks_{m}", f"{m}: the {key} comparison look by look; "
                          f"{seq.describe()}; {seq.n} of {seq.n_max} {seq.unit} evaluated (fixed n: {seq.n_max})."))
    if len(r.protection):
        display(ctx.table(r.protection, f"protection_{m}", f"{m}: faults with a protected set.",
                          columns=["protected", "kind", "protected_fraction", "mean_flips", "mean_flips_stopped",
                                   "catastrophic_rate"],
                          ci={"catastrophic_rate": ("catastrophic_lo", "catastrophic_hi")}))
    ctx.savefig(plots.fault_plot(r.faults, r.protection, f"{m}: faults and protection"), f"faults_{m}")

# %%
for m, r in results.items():
    ctx.save_table(r.adversarial, f"pgd_{m}")
    display(r.adversarial.groupby(["set", "eps"])[["loss_increase", "heldout_damage", "frac_unmoved"]].mean())
    ctx.savefig(plots.pgd_plot(r.adversarial, f"{m}: PGD in weight space ({S.pgd_radius} radius)"), f"pgd_{m}")

# %% [markdown]
# ## Backdoor detection
#
# Clean and backdoored twins fine-tuned from one micro-suite model (same windows, order and seed; the
# backdoored twin sees a poisoned fraction mapping a trigger to a fixed continuation). The detector
# scores each model's sensitivity-map statistics against the clean models; the baseline uses spectral
# statistics of the weight deltas.

# %%
bd = sec5.backdoor(ctx.profile, S)
ctx.save_table(bd.twins, "backdoor_twins")
ctx.save_table(bd.detection, "backdoor_detection")
ctx.save_table(bd.scores, "backdoor_scores")
display(bd.twins.groupby("label")[["asr", "false_trigger_rate", "heldout_loss"]].mean())
display(bd.detection)
ctx.savefig(plots.detector_plot(bd.scores, f"backdoor detection on {S.backdoor_base} twins"), "backdoor")

# %% [markdown]
# ## Critical against random, in numbers

# %%
judged = pd.concat([vulnerability_table(m, r.vulnerability) for m, r in results.items()], ignore_index=True)
display(ctx.table(judged, "vulnerability", "Critical against random: each contrast, its one-sided bounds and verdict, "
                  "and the ratio of means beside."))
crit = study.criteria(results, plan, "data/phase5_week14_security/vulnerability.parquet")
scorecard.write_rows(ctx.run_dir, ctx.notebook, crit)
display(Markdown("\n\n".join([*study.findings(results, plan), sec5.backdoor_findings(bd)])))
say(scorecard.in_words(crit))

# %%
_c = collapse.sort_values("share", ascending=False)
esa.nb.found(
    *[f"On {r.model} in {r.format}, the single worst bit flip collapses the model for {r.share:.1%} of the weights "
      f"tried ({r.n_collapsed} of {r.n}; {ctx.ref('figure', 'collapse_share')}, {ctx.ref('table', 'collapse_share')})."
      for r in _c.head(2).itertuples()],
    f"{sum(c.verdict == 'PASS' for c in crit)} of {len(crit)} security criteria pass on this run (Criteria below).")
