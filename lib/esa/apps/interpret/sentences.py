"""Markdown sentences computed from the numbers of each interpretability result (the week-15 findings).

One function per result: the role share (`roles_paragraph`), the super-weight chain (`chain_paragraph`),
the sink correlation (`sinks_paragraph`) and knowledge localisation (`localisation_paragraph`). A number that
is not finite reads "n/a".
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from esa.apps.interpret.chain import ChainTrace
from esa.apps.interpret.localise import Localisation
from esa.apps.interpret.sinks import SinkCorrelation


def fmt(x: Any, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, int | float) and math.isfinite(x) else "n/a"


def _ci(d: dict[str, Any], key: str = "rho") -> str:
    return f"{fmt(d[key])} [{fmt(d['ci_lo'])}, {fmt(d['ci_hi'])}]"


def roles_paragraph(model: str, share: dict[str, Any], tests: pd.DataFrame) -> str:
    """The criterion's share and which role tests pass."""
    sh = share
    out = [f"**{model}**: {sh['explained']} of {sh['n']} top critical weights ({fmt(sh['share'], '.0%')}, 95% CI "
           f"{fmt(sh['ci_lo'], '.0%')} to {fmt(sh['ci_hi'], '.0%')}) have at least one ablation-verified role "
           f"({', '.join(sh['roles'])}; Holm over {sh['m_tests']} tests on {sh['n_inputs']} inputs each); counting "
           f"the baseline-only roles too, {fmt(sh['share_any_role'], '.0%')} do."]
    counts = tests[tests["verdict"] == "pass"].groupby("role").size().sort_values(ascending=False)
    out.append("The role tests that pass: " + ", ".join(f"{r} for {n} weight(s)" for r, n in counts.items()) + "."
               if len(counts) else "No role test passes.")
    return " ".join(out)


def chain_paragraph(model: str, trace: ChainTrace, candidate: bool) -> str:
    """What zeroing the traced weight does to its channel, the sinks and stopwords, through depth."""
    c = trace.summary
    if candidate:
        out = [f"On {model}, zeroing the super-weight candidate `{c['weight']}` shrinks channel {c['channel']}'s "
               f"peak after block {c['layer']} from {c['max_after_block_base']:.4g} to "
               f"{c['max_after_block_ablated']:.4g} (x{c['factor_at_block']:.2f}; its matched control "
               f"x{c['control_factor_at_block']:.2f}); the later blocks' mean sink mass goes from "
               f"{fmt(c['sink_mass_later_base'])} to {fmt(c['sink_mass_later_ablated'])}, and the stopword mass "
               f"changes x{c['stopword_ratio']:.2f}."]
    else:
        out = [f"{model} has no super-weight candidate of the SmolLM2 kind ({c['chosen_because']}); zeroing "
               f"`{c['weight']}` changes channel {c['channel']}'s peak x{c['factor_at_block']:.2f} (its control "
               f"x{c['control_factor_at_block']:.2f}) and the stopword mass x{c['stopword_ratio']:.2f}."]
    late = trace.depth[trace.depth["block"] > c["layer"]]
    if len(late):
        out.append(f"Through depth the factor goes from x{c['factor_at_block']:.2f} at block {c['layer']} to "
                   f"x{late.iloc[-1]['factor']:.2f} at the last block (between x{late['factor'].min():.2f} and "
                   f"x{late['factor'].max():.2f}).")
    return " ".join(out)


def sinks_paragraph(model: str, sc: SinkCorrelation, metric: str) -> str:
    """Spearman of per-head sink mass with head sensitivity, over all heads and within layers."""
    o, wl = sc.overall, sc.within_layer
    return (f"On {model}, per-head sink mass and {metric} head sensitivity have Spearman rho {_ci(o)} over "
            f"{o['n']} heads, and {_ci(wl)} within layers (mean over {wl['n_layers']} layers).")


def localisation_paragraph(model: str, loc: Localisation) -> str:
    """Probe accuracy, the selectivity of each ablation, and the direct test."""
    a = loc.probes.set_index("kind").loc["all"]
    st = loc.selectivity.table.set_index("condition")
    r1, r0 = loc.direct.rho("probe_score", "abs_effect"), loc.direct.rho("generic_score", "abs_effect")
    better = math.isfinite(r1["rho"]) and math.isfinite(r0["rho"]) and r1["ci_lo"] > r0["rho"]
    return (f"On {model}, the probes are answered with accuracy {a['accuracy']:.0%} on {int(a['n'])} items (chance "
            f"{a['chance']:.0%}, exact p against chance {a['p_vs_chance']:.2g}). The selectivity of each ablation "
            "(rise of the answers' NLL per unit rise of generic log-PPL) is "
            + "; ".join(f"{cnd} {fmt(r['selectivity_nll'])} [{fmt(r['selectivity_nll_lo'])}, "
                        f"{fmt(r['selectivity_nll_hi'])}]" for cnd, r in st.iterrows())
            + f". In the direct test the probe score ranks the weights' |effect| with rho {_ci(r1)} and the generic "
            f"score with rho {_ci(r0)} (n = {r1['n']}): the probe score "
            + ("ranks the effect better." if better else "does not rank the effect better than the generic one."))
