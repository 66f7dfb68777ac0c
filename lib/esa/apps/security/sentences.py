"""What the security tables say, as sentences computed from them (nothing typed in).

One function per table of esa.apps.security (collapse shares, attack summaries and histories, the judged
vulnerability contrasts of esa.stats.vulnerability, fault campaigns, protection curves, the backdoor twin study);
each returns plain sentences, Markdown-ready, for a study's findings (esa.phases.phase5_security);
`paragraph` is one model's (`compare.ModelSecurity`) in that order, `backdoor_paragraph` the twin study's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from esa.apps.security.compare import Knobs, ModelSecurity
from esa.apps.security.formats import FORMATS
from esa.apps.security.poison import BackdoorResult
from esa.stats.sequential import SequentialResult, fixed_n_equivalent

WORKING_ASR = 0.5  # below this mean ASR the backdoors did not take, and detecting them means nothing


def collapse(table: pd.DataFrame, factor: float) -> str:
    """The share of sampled weights whose single worst flip collapses the model, per format."""
    return ("The share of sampled weights whose single worst flip (float: exponent MSB; int8: code MSB) takes the "
            f"perplexity to at least {factor:g} times the base is "
            + "; ".join(f"{r.format} {r.share:.0%} [{r.lo:.0%}, {r.hi:.0%}] of {r.n}" for r in table.itertuples())
            + ".")


def _flips(v: float, censored: bool) -> str:
    return f"more than {v - 1:.0f}" if censored else f"{v:.3g}"


def attacks(summary: pd.DataFrame, history: pd.DataFrame, goal: float, fmt: str,
            critical_fraction: float) -> list[str]:
    """Mean flips to PPL x `goal` per attacked set, and how many of the unrestricted search's flips hit the
    critical set."""
    out = []
    g = summary[summary["goal"] == f"ppl_x{goal:g}"].set_index("set")
    if len(g):
        out.append(f"The mean number of flips to reach {goal:g} times the perplexity in {fmt} is "
                   + "; ".join(f"{k} {_flips(v.flips_mean, bool(v.censored))} (reached in {v.n_reached} of "
                               f"{v.n_runs} seeds)" for k, v in g.iterrows())
                   + " (\"more than\": the flip budget ran out first).")
    if "in_critical" in history and "all" in set(history["set"]):
        a = history[history["set"] == "all"]
        out.append(f"Of the {len(a)} flips the unrestricted search chose, {int(a['in_critical'].sum())} hit the "
                   f"critical set ({critical_fraction:.3%} of the weights).")
    return out


def vulnerability(by: Mapping[str, Any]) -> list[str]:
    """The judged contrasts (attack, faults: a Vulnerability each; adversarial: eps -> Vulnerability), each
    with its verdict and the numbers behind it."""
    what = [("the bit search (flips needed)", by["attack"]), ("bounded faults (damage per trial)", by["faults"])]
    what += [(f"PGD at L-inf {eps:g} (loss increase)", v) for eps, v in by["adversarial"].items()]
    return [f"Critical against random under {label}: {v.verdict}; {v.note}." for label, v in what]


def sequential(results: Mapping[str, SequentialResult]) -> list[str]:
    """The units the comparisons decided in looks used, against the fixed-n plan (every one at its cap)."""
    if not results:
        return []
    s = fixed_n_equivalent(list(results.values()))
    unit = next(iter(results.values())).unit
    how = "; ".join(f"{k} {r.decision}" + (f" at look {r.look}" if r.look else "") for k, r in results.items())
    return [f"Run in looks ({how}): {s['n_sequential']} {unit} evaluated against {s['n_fixed']} for the "
            f"fixed-n plan ({s['saved_fraction']:.0%} saved)."]


def faults(table: pd.DataFrame) -> list[str]:
    """Per format: the catastrophic-trial rate over the per-bit rates, and what the catastrophes flipped."""
    out = []
    for fmt, g in table.groupby("format"):
        simulated = FORMATS[str(fmt)].simulated
        worst = g.sort_values("rate").iloc[-1]
        share = worst["catastrophes_hit_top_bit" if simulated else "catastrophes_hit_exponent"]
        out.append(f"Random faults in {fmt} make {g['catastrophic_rate'].min():.0%} to "
                   f"{g['catastrophic_rate'].max():.0%} of trials catastrophic over per-bit rates "
                   f"{g['rate'].min():.0e} to {g['rate'].max():.0e}; at {worst['rate']:.0e} a trial has "
                   f"{worst['mean_flips']:.3g} flips"
                   + ("" if math.isnan(share) else f", and {share:.0%} of catastrophes include "
                                                   f"{'a code-MSB' if simulated else 'an exponent'} flip") + ".")
    return out


def protection(table: pd.DataFrame, mode: str, fmt: str, rate: float) -> list[str]:
    """Unprotected vs the largest guarded critical fraction vs an equal random guard."""
    if not len(table):
        return []
    none = table[table["protected"] == "none"].iloc[0]
    top = table[table["kind"] == "critical"].sort_values("requested_fraction").iloc[-1]
    rnd = table[(table["kind"] == "random") & (table["requested_fraction"] == top["requested_fraction"])].iloc[0]
    return [f"Under {mode} protection in {fmt} at rate {rate:g}, {none['catastrophic_rate']:.0%} of unprotected "
            f"trials are catastrophic; guarding the top {top['requested_fraction']:.2%} critical weights gives "
            f"{top['catastrophic_rate']:.0%}, an equal random set {rnd['catastrophic_rate']:.0%}."]


def backdoor(twins: pd.DataFrame, detection: pd.DataFrame, settings: Mapping[str, Any]) -> list[str]:
    """The twins' attack success rate (saying when the backdoors did not take) and each detector's AUROC."""
    asr = twins.groupby("label")["asr"].mean()
    took, clean = float(asr.get(1, math.nan)), float(asr.get(0, math.nan))
    out = [f"The attack success rate is {took:.0%} on backdoored twins and {clean:.0%} on clean twins "
           f"({settings['n_prompts']} held-out prompts with the trigger, {settings['steps']} fine-tuning steps of "
           f"{settings['base']})."]
    if not (took >= WORKING_ASR):
        out.append(f"The backdoors did not take (mean ASR {took:.0%} < {WORKING_ASR:.0%}): the AUROCs test the "
                   "detector's machinery, not its power.")
    return out + [f"The {d.detector} detector reaches an AUROC of {d.auroc:.2f} [{d.lo:.2f}, {d.hi:.2f}] on "
                  f"{d.n_clean} clean and {d.n_backdoored} backdoored twins" + (f" ({d.note})" if d.note else "") + "."
                  for d in detection.itertuples()]


def paragraph(r: ModelSecurity, S: Knobs) -> str:
    """One model's findings: the base, collapse shares, attacks, the judged contrasts, faults and protection
    (Markdown)."""
    return " ".join([f"**{r.model}** (base perplexity {r.base['ppl']:.1f} on the held-out windows; critical set "
                     f"{r.critical['n_weights']:,} weights, {r.critical['fraction']:.3%} of those studied).",
                     collapse(r.collapse, S.collapse_factor),
                     *attacks(r.attacks.summary, r.attacks.history, S.criterion_goal, S.attack_format,
                              r.critical["fraction"]),
                     *vulnerability(r.vulnerability), *sequential(r.sequential), *faults(r.faults),
                     *protection(r.protection, S.protect_mode, S.protect_format, S.protect_rate)])


def backdoor_paragraph(bd: BackdoorResult) -> str:
    """The backdoor twin study's findings (Markdown)."""
    return " ".join(["**Backdoor detection.**", *backdoor(bd.twins, bd.detection, bd.settings)])
