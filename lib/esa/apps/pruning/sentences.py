"""A pruning study's numbers said in sentences (Markdown), for a notebook's findings."""

from __future__ import annotations

from typing import Any

import pandas as pd


def paragraph(model: str, tables: dict[str, pd.DataFrame], critical: dict[str, Any], detail: pd.DataFrame,
              sparsity: float, min_damage: float) -> str:
    """One model's findings: the ranking at `sparsity`, each method against its baselines (the per-seed
    gains of `detail`), what protecting the critical set changed, and the zero-shot accuracies."""
    main = tables["main"]
    dense = main[main["method"] == "dense"]["ppl"].iloc[0]
    pruned = main[main["method"] != "dense"].sort_values("ppl")
    lines = [f"**{model}** has a dense perplexity of {dense:.2f}; at {sparsity:.0%} unstructured sparsity the "
             "methods rank " + ", ".join(f"{r.method} {r.ppl:.1f} ({r.calib_mode})" for r in pruned.itertuples()) + "."]
    if not detail.empty:
        for (m, base, prot), g in detail.groupby(["method", "baseline", "protected_method"]):
            tag = f"{m}{'+protect' if prot else ''}"
            ok = g[g["estimable"] & (g["delta_log_ppl_baseline"] > min_damage)]
            if ok.empty:
                lines.append(f"{tag} against {base} is not estimable: {base} does no damage above "
                             f"{min_damage:g} nats, or a log-PPL is not finite.")
                continue
            gain = float(ok["gain"].mean())
            word = "loses to" if gain < 0 else "beats"
            lines.append(f"{tag} {word} {base} with {abs(gain):.0%} {'more' if gain < 0 else 'less'} damage "
                         f"(Δ log-PPL against dense, mean over {len(ok)} seed(s)).")
    prot = tables["protection"]
    if not prot.empty:
        for m in prot["method"].unique():
            q = prot[(prot["method"] == m)]
            a, b = q[q["protected"] != "none"], q[q["protected"] == "none"]
            if len(a) and len(b):
                lines.append(f"Protecting {critical['n_protected']} critical weights ({critical['label']}) "
                             f"changes {m}'s perplexity from {b['ppl'].iloc[0]:.2f} to {a['ppl'].iloc[0]:.2f}.")
    zs = main[main["method"] == "dense"]
    if "zs_accuracy" in zs:
        lines.append(f"On the zero-shot next-line task ({int(zs['zs_items'].iloc[0])} items, chance "
                     f"{zs['zs_chance'].iloc[0]:.0%}) the dense model scores {zs['zs_accuracy'].iloc[0]:.0%}, and "
                     + ", ".join(f"{r.method} {r.zs_accuracy:.0%}" for r in pruned.itertuples()) + ".")
    return " ".join(lines)
