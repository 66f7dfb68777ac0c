"""A grid's results said in sentences (Markdown), every number read from its summary tables.

`sentences` says, per density and selection, what sparse fine-tuning of the selection's top-k did to the
held-out target and the source perplexity and whether it beats or loses to each control, LoRA at equal
count and full fine-tuning (a loss is said as a loss); what each protection did to forgetting and to the
gain; how far the tracked super weight moved and where the massive activation ended; which arms could not
run, and why.
"""

from __future__ import annotations

import math

import pandas as pd

from esa.apps.training.grid import Arm, GridSettings, Result, reference
from esa.apps.training.tables import protection_table, summary_table


def sentences(res: Result, S: GridSettings) -> list[str]:
    """The sentences of one model's grid (the model's name in bold in the first)."""
    summ = summary_table(res.final)
    ok = summ[summ["n_seeds"] > 0].set_index("arm") if len(summ) else summ
    source = res.data.get("source", {}).get("corpus", "source")
    out = []
    for d in S.densities:
        for s in S.selections:
            a = Arm("sparse", s, d).label
            if a not in ok.index:
                continue
            line = (f"**{res.model}**, density {d:g}: sparse fine-tuning of the {s} top-k moves the held-out "
                    f"{S.domain.upper()} perplexity from {ok.loc[a, 'target_ppl_0']:.2f} to "
                    f"{ok.loc[a, 'target_ppl']:.2f} (a gain of {ok.loc[a, 'gain']:+.4f} nats per token) and the "
                    f"{source} perplexity from {ok.loc[a, 'source_ppl_0']:.2f} to {ok.loc[a, 'source_ppl']:.2f}")
            others = [o for o in (Arm("sparse", "random_k", d).label, Arm("sparse", "magnitude_k", d).label,
                                  Arm("lora", density=d).label, "full")
                      if o in ok.index and o != a and math.isfinite(ok.loc[o].get("gain", math.nan))]
            line += "".join(f"; it {'beats' if ok.loc[a, 'gain'] > ok.loc[o, 'gain'] else 'loses to'} {o} (gain "
                            f"{ok.loc[o, 'gain']:+.4f}, perplexity {ok.loc[o, 'target_ppl']:.2f})" for o in others)
            out.append(line + ".")
    out += _protection(protection_table(summ, reference(S)) if len(summ) else summ)
    if "super_weight_rel_drift" in summ and summ["super_weight_rel_drift"].notna().any():
        top = summ.loc[summ["super_weight_rel_drift"].idxmax()]
        act = summ["massive_act_ratio"] if "massive_act_ratio" in summ else pd.Series(dtype=float)
        out.append(f"The tracked super weight moved by at most {top['super_weight_rel_drift']:.2%} of its value "
                   f"({top['arm']})" + (f"; the massive-activation channel's largest activation ends at "
                                        f"{act.min():.3f} to {act.max():.3f} times its base value."
                                        if act.notna().any() else "."))
    errors = summ.set_index("arm")["error"] if len(summ) and "error" in summ else pd.Series(dtype=str)
    return out + [f"{arm} could not run: {e}." for arm, e in errors.items() if e]


def _protection(prot: pd.DataFrame) -> list[str]:
    """Each protection against the unprotected reference (the table's first row)."""
    if len(prot) < 2:
        return []
    ref, out = prot.iloc[0], []
    for _, r in prot.iloc[1:].iterrows():
        if not math.isfinite(r.get("forgetting", math.nan)):
            continue
        kept = f" ({r['gain_kept']:.0%} of it kept)" if math.isfinite(r.get("gain_kept", math.nan)) else ""
        out.append(f"With {r['arm']} the model forgets {r['forgetting']:+.4f} nats per token, "
                   f"{'less' if r['forgetting'] < ref['forgetting'] else 'more'} than the unprotected run's "
                   f"{ref['forgetting']:+.4f}, and gains {r['gain']:+.4f} against {ref['gain']:+.4f}{kept}.")
    return out
