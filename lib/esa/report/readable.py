"""Numbers and tables for people: 3 significant figures, "estimate [lo, hi]", headers in words with units.

The synthesis page and the report PDF format every table through `people_table` and nothing else, so
these few rules live in one place (and can be swapped for a shared table helper in one edit). The
stored tables (parquet, CSV, LaTeX) keep their machine columns and full precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

# machine column -> header in words (with unit); a column not named here is shown with _ as spaces
HEADERS: dict[str, str] = {
    "model": "Model", "family": "Family", "params": "Parameters", "n_params": "Parameters",
    "ppl": "Perplexity", "ppl_std": "Perplexity s.d.", "accuracy": "Next-token accuracy",
    "unigram_ppl": "Unigram perplexity", "gpl3_ppl": "GPT-3-style perplexity", "gpl3_expected": "Expected",
    "copy_ppl_repeated": "Perplexity on repeated text", "n_seeds": "Seeds", "tokens_per_seed": "Tokens per seed",
    "metric": "Metric", "jaccard_mean": "Top-k Jaccard across seeds", "spearman_union": "Spearman on the union",
    "perturbation": "Perturbation", "scale": "Scale", "k": "Weights perturbed (k)",
    "dlogppl_top_k": "Top-k Δ log-PPL (nats/token)", "dlogppl_random_k": "Random-k Δ log-PPL (nats/token)",
    "dlogppl_bottom_k": "Bottom-k Δ log-PPL (nats/token)", "dlogppl_magnitude_k": "Largest-|w| Δ log-PPL (nats/token)",
    "dlogppl_random_global": "Random (global) Δ log-PPL (nats/token)",
    "p_holm_top_vs_random": "p, top-k vs random-k (Holm)", "test": "Test",
    "moe": "Mixture of experts", "base_ppl": "Dense perplexity", "dlogppl_topk_zero": "Top-k zeroed Δ log-PPL (nats/token)",
    "dlogppl_random_zero": "Random-k zeroed Δ log-PPL (nats/token)", "topk_over_random": "Top-k ÷ random-k damage",
    "tail_top1pct_over_median": "Top-1% score ÷ median", "frac_selected": "Fraction selected",
    "beats_unigram": "Beats unigram", "id": "Criterion", "phase": "Phase", "measured": "Measured",
    "threshold": "Threshold", "verdict": "Verdict", "note": "Why", "notebook": "Notebook",
    "expected outcome": "Expected outcome", "answer": "Answer", "evidence": "Evidence",
    "why": "Why not judged",
}


def sig(x: Any, digits: int = 3) -> str:
    """`x` to `digits` significant figures; scientific notation only beyond 1e6 or below 1e-4, where the
    exponent is the information; integers stay whole; text passes through; missing is an en dash."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e6):
        return f"{int(x):,}"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-4):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"


def with_ci(est: Any, lo: Any, hi: Any) -> str:
    """'117 [105, 130]'; the estimate alone when the interval is missing (one seed has none)."""
    bounds = [sig(lo), sig(hi)]
    return sig(est) if "–" in bounds else f"{sig(est)} [{bounds[0]}, {bounds[1]}]"


def header(col: str) -> str:
    return HEADERS.get(col, str(col).replace("_", " "))


def people_table(df: pd.DataFrame, columns: Sequence[str] | None = None,
                 cis: Mapping[str, tuple[str, str]] | None = None) -> pd.DataFrame:
    """`df` as text for reading: chosen columns, an "est [lo, hi]" cell for each `cis` entry
    (estimate column -> (low, high) columns, which are then dropped; by default every column X that has
    X_lo and X_hi beside it), headers in words, no index."""
    cis = dict(cis) if cis is not None else {c: (f"{c}_lo", f"{c}_hi") for c in df.columns
                                             if {f"{c}_lo", f"{c}_hi"} <= set(df.columns)}
    cols = [c for c in (columns or df.columns) if c in df.columns]
    bounds = {b for pair in cis.values() for b in pair}
    out = {}
    for c in cols:
        if c in bounds:
            continue
        if c in cis and set(cis[c]) <= set(df.columns):
            lo, hi = cis[c]
            out[header(c)] = [with_ci(e, a, b) for e, a, b in zip(df[c], df[lo], df[hi], strict=True)]
        else:
            out[header(c)] = [sig(v) for v in df[c]]
    return pd.DataFrame(out).reset_index(drop=True)


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table of `df` (already text), every row, no index: what a notebook page and the PDF show."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])
