"""Tables for people: what a no-code page shows of a DataFrame (the files keep every row and digit).

One helper, `people(df)`, turns a results frame into text cells a reader can take in: no index column,
headers in words with units (`HEADERS`, else the column name spelled out), 3 significant figures,
an estimate and its CI in one cell as "117 [105, 130]", scientific notation only beyond 10^6 or below
10^-3 (where the exponent is the information). `html(df)` renders that through pandas' Styler with the
index hidden, and splits a frame wider than `MAX_COLUMNS` into stacked tables that repeat its key
columns, so nothing scrolls sideways at 1400 px. CSV, LaTeX and parquet are written elsewhere
(esa.report.artefacts) from the raw frame.

Why pandas' Styler and not great-tables or itables: great-tables (1.1) draws the nicest publication
tables (spanners, `fmt_number(n_sigfig=3)`, LaTeX out) but brings nine packages into the environment
here (htmltools, faicons, multimark with a compiled cffi part, websockets, importlib shims), all for
formatting we do in twenty lines; itables is an interactive JavaScript grid, which is what the pages
must not be (a reader of a static page or of the PDF sees the whole table, not a paged widget). The
Styler ships with pandas, needs only jinja2 (already installed with torch and nbconvert), hides the
index, and writes HTML and LaTeX from one object, so the pages and the PDF get the same table.
"""

from __future__ import annotations

import html as _html
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

SIG = 3  # significant figures a page shows
MAX_COLUMNS = 8  # beyond this a table is split into stacked parts (about 150 px a column at 1400 px)
PLAIN_RANGE = (1e-3, 1e6)  # magnitudes written without an exponent

# Column names the phases use, in words with their units. A column not listed is spelled out.
HEADERS: dict[str, str] = {
    "model": "Model",
    "perturbation": "Perturbation",
    "group": "Weight group",
    "seed": "Seed",
    "k": "Weights perturbed (k)",
    "scale": "Scale",
    "prob": "Probability",
    "ppl": "Perplexity",
    "dense_ppl": "Dense perplexity",
    "baseline_ppl": "Baseline perplexity",
    "delta_log_ppl": "Δ log-PPL (nats/token)",
    "mean_delta_ppl": "Δ PPL",
    "n_seeds": "Seeds",
    "n_capped": "Capped runs",
    "n_nonfinite_windows": "Non-finite windows",
    "n_inf_weights": "Inf weights",
    "n_nan_weights": "NaN weights",
    "unchanged_share": "Share left unchanged (bf16 rounding)",
    "dose_matched": "Unchanged shares within 5 points",
    "per_changed_weight_p": "p per changed weight",
    "n": "Weights",
    "zero_share": "Share exactly zero",
    "median_abs_w": "Median |w|",
    "sparsity": "Sparsity",
    "method": "Method",
    "metric": "Metric",
    "layer": "Layer",
    "params": "Parameters",
    "n_params": "Parameters",
    "seconds": "Time (s)",
    "p_primary_holm": "p (primary test, Holm)",
    "p_holm": "p (Holm)",
    "p_value": "p",
    "significant": "Significant",
    "ratio": "Ratio",
    "accuracy": "Accuracy",
    "acc": "Accuracy",
    "text": "Criterion",
    "measured": "Measured",
    "threshold": "Threshold",
    "result": "Verdict",
    "verdict": "Verdict",
    "note": "Note",
    "evidence": "Evidence",
    "numerator": "Numerator group",
    "denominator": "Denominator group",
    "ratio_delta_log_ppl": "Damage ratio (Δ log-PPL)",
    "ratio_delta_ppl": "Damage ratio (Δ PPL)",
    "a": "Group",
    "b": "Against",
    "primary": "Primary test",
    "seed_level_p_holm": "p, seeds (Holm)",
    "window_level_p_holm": "p, windows (Holm)",
    "seed_level_effect_size": "Effect size, seeds",
    "window_level_effect_size": "Effect size, windows",
    # the synthesis and the report PDF
    "family": "Family",
    "ppl_std": "Perplexity s.d.",
    "unigram_ppl": "Unigram perplexity",
    "gpl3_ppl": "GPT-3-style perplexity",
    "gpl3_expected": "Expected",
    "copy_ppl_repeated": "Perplexity on repeated text",
    "tokens_per_seed": "Tokens per seed",
    "jaccard_mean": "Top-k Jaccard across seeds",
    "spearman_union": "Spearman on the union",
    "dlogppl_top_k": "Top-k Δ log-PPL (nats/token)",
    "dlogppl_random_k": "Random-k Δ log-PPL (nats/token)",
    "dlogppl_bottom_k": "Bottom-k Δ log-PPL (nats/token)",
    "dlogppl_magnitude_k": "Largest-|w| Δ log-PPL (nats/token)",
    "dlogppl_random_global": "Random (global) Δ log-PPL (nats/token)",
    "p_holm_top_vs_random": "p, top-k vs random-k (Holm)",
    "test": "Test",
    "moe": "Mixture of experts",
    "base_ppl": "Dense perplexity",
    "dlogppl_topk_zero": "Top-k zeroed Δ log-PPL (nats/token)",
    "dlogppl_random_zero": "Random-k zeroed Δ log-PPL (nats/token)",
    "topk_over_random": "Top-k ÷ random-k damage",
    "tail_top1pct_over_median": "Top-1% score ÷ median",
    "frac_selected": "Fraction selected",
    "beats_unigram": "Beats unigram",
    "id": "Criterion",
    "phase": "Phase",
    "notebook": "Notebook",
    "expected outcome": "Expected outcome",
    "answer": "Answer",
    "why": "Why not judged",
}
# Columns that name a thing by number (seed 1337, layer 12): written as they are, without separators.
IDENTIFIERS = {"seed", "layer", "row", "col", "block", "expert", "rank", "step", "head"}
# Spelled-out abbreviations inside a machine name ("p_primary_holm" -> "p primary Holm").
_WORDS = {"ppl": "PPL", "ci": "CI", "lo": "low", "hi": "high", "holm": "Holm", "mlp": "MLP", "ft": "FT",
          "lora": "LoRA", "n": "number of", "pct": "%", "abs": "|·|", "std": "SD", "sd": "SD"}
# Pairs of columns that bound an estimate: (estimate, low, high) found by these name patterns.
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_CI_SUFFIXES = (("_ci_lo", "_ci_hi"), ("_lo", "_hi"), ("_low", "_high"))


def number(x: Any, sig: int = SIG) -> str:
    """One value as a reader wants it: 3 significant figures, an exponent only where it means something.

    Integers stay whole (with thousands separators); NaN and None read "–"; infinities "∞".
    """
    if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if not isinstance(x, (float, np.floating)):
        return str(x)
    x = float(x)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    if not PLAIN_RANGE[0] <= abs(x) < PLAIN_RANGE[1]:
        mant, exp = f"{x:.{sig - 1}e}".split("e")
        return f"{mant.replace('-', '−')} × 10{str(int(exp)).translate(_SUPERSCRIPT)}"
    digits = sig - 1 - math.floor(math.log10(abs(x)))
    rounded = round(x, digits)
    # Rounding can carry into a new digit (999.7 -> 1000): recount so 3 figures stay 3.
    if rounded != 0 and math.floor(math.log10(abs(rounded))) != math.floor(math.log10(abs(x))):
        digits -= 1
        rounded = round(x, digits)
    text = f"{rounded:,.{max(digits, 0)}f}"
    return text.replace("-", "−")


def with_ci(estimate: Any, lo: Any, hi: Any, sig: int = SIG) -> str:
    """"117 [105, 130]"; the estimate alone when the interval is missing (one seed gives no CI)."""
    est = number(estimate, sig)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (lo, hi)):
        return est
    return f"{est} [{number(lo, sig)}, {number(hi, sig)}]"


def header(column: Any) -> str:
    """A column's header in words (HEADERS, else its name with abbreviations spelled out)."""
    name = str(column)
    if name in HEADERS:
        return HEADERS[name]
    words = [_WORDS.get(w, w) for w in re.split(r"[_\s]+", name) if w]
    text = " ".join(words)
    return text[:1].upper() + text[1:] if text else name


def _ci_triples(columns: list[str]) -> list[tuple[str, str, str]]:
    """(estimate, low, high) column triples: mean + ci_lo/ci_hi, or x + x_lo/x_hi and the like."""
    found = []
    cols = set(columns)
    if {"ci_lo", "ci_hi"} <= cols:
        est = next((c for c in ("mean", "estimate", "median", "value") if c in cols), None)
        if est:
            found.append((est, "ci_lo", "ci_hi"))
    for c in columns:
        for lo_s, hi_s in _CI_SUFFIXES:
            if f"{c}{lo_s}" in cols and f"{c}{hi_s}" in cols:
                found.append((c, f"{c}{lo_s}", f"{c}{hi_s}"))
                break
    return found


def people(
    df: pd.DataFrame,
    columns: Iterable[str] | None = None,
    headers: Mapping[str, str] | None = None,
    sig: int = SIG,
    ci: Mapping[str, tuple[str, str]] | None = None,
) -> pd.DataFrame:
    """`df` as text cells for a page: a named index becomes columns, CIs join their estimate, numbers
    get `sig` figures, headers are words. `columns` picks (and orders) the raw columns to show; `ci` names
    bounds the naming rules do not find ({"ratio": ("log_ci_lo", "log_ci_hi")})."""
    if any(n is not None for n in df.index.names):
        df = df.reset_index()
    df = df.reset_index(drop=True)
    df.columns = [str(c) for c in df.columns]
    triples = [(e, lo, hi) for e, (lo, hi) in (ci or {}).items()] + _ci_triples(list(df.columns))
    bounds = {c for _, lo, hi in triples for c in (lo, hi)}
    chosen = [c for c in (columns or df.columns) if c in df.columns and c not in bounds]
    out = {}
    for c in chosen:
        t = next((t for t in triples if t[0] == c), None)
        if t:
            out[c] = [with_ci(e, lo, hi, sig) for e, lo, hi in zip(df[t[0]], df[t[1]], df[t[2]], strict=True)]
        elif c in IDENTIFIERS:
            out[c] = [number(v) if v is None or isinstance(v, float) and math.isnan(v) else str(v) for v in df[c]]
        else:
            out[c] = [_cell(v, sig) for v in df[c]]
    names = {**HEADERS, **(headers or {})}
    frame = pd.DataFrame(out, index=range(len(df)))
    frame.columns = [names.get(c, header(c)) + (" [95% CI]" if any(t[0] == c for t in triples) else "")
                     for c in chosen]
    return frame


def _cell(v: Any, sig: int) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return ", ".join(_cell(x, sig) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k} {_cell(x, sig)}" for k, x in v.items())
    return number(v, sig)


def _keys(frame: pd.DataFrame) -> list[str]:
    """Leading text columns that name a row (model, perturbation, group): repeated in each split part."""
    keys = []
    for c in frame.columns[: MAX_COLUMNS // 2]:
        if frame[c].map(lambda s: not re.fullmatch(r"[−\d.,× \[\]–∞⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+", str(s))).all():
            keys.append(c)
        else:
            break
    return keys


def parts(frame: pd.DataFrame, max_columns: int = MAX_COLUMNS) -> list[pd.DataFrame]:
    """A wide people-frame as stacked parts of at most `max_columns` columns, each with the key columns."""
    if frame.shape[1] <= max_columns:
        return [frame]
    keys = _keys(frame)[: max_columns - 1]
    rest = [c for c in frame.columns if c not in keys]
    step = max_columns - len(keys)
    return [frame[keys + rest[i: i + step]] for i in range(0, len(rest), step)]


def html(
    df: pd.DataFrame,
    caption: str = "",
    columns: Iterable[str] | None = None,
    headers: Mapping[str, str] | None = None,
    footer: str = "",
    ci: Mapping[str, tuple[str, str]] | None = None,
) -> str:
    """The table as the page shows it: Styler HTML without the index, split when wide, then `footer`."""
    frame = people(df, columns, headers, ci=ci)
    pieces = parts(frame)
    out = []
    for i, part in enumerate(pieces):
        sty = part.style.hide(axis="index").set_table_attributes('class="esa-table"')
        words = [c for c in part.columns if c in _keys(part)]
        if words:  # names read from the left, numbers line up on the right (the stylesheet's default)
            sty = sty.set_properties(subset=words, **{"text-align": "left"})
        if caption and i == 0:
            sty = sty.set_caption(_html.escape(caption))
        out.append(sty.to_html())
    more = f" (split into {len(pieces)} parts to fit the page)" if len(pieces) > 1 else ""
    tail = f'<p class="esa-table-note"><small>{footer}{more}</small></p>' if footer or more else ""
    return '<div class="esa-tables">' + "".join(out) + tail + "</div>"


def latex(df: pd.DataFrame, caption: str = "", columns: Iterable[str] | None = None,
          ci: Mapping[str, tuple[str, str]] | None = None) -> str:
    """The same people-table as LaTeX (booktabs), for the report PDF."""
    frame = people(df, columns, ci=ci)
    sty = frame.style.hide(axis="index")
    return sty.to_latex(hrules=True, caption=caption or None)


class Table:
    """A people-table as a display object: Jupyter shows `_repr_html_`, LaTeX exports `_repr_latex_`."""

    def __init__(self, df: pd.DataFrame, caption: str = "", columns: Iterable[str] | None = None,
                 headers: Mapping[str, str] | None = None, footer: str = "",
                 ci: Mapping[str, tuple[str, str]] | None = None) -> None:
        self.df, self.caption, self.footer, self.ci = df, caption, footer, ci
        self.columns = list(columns) if columns is not None else None
        self.headers = headers

    def _repr_html_(self) -> str:
        return html(self.df, self.caption, self.columns, self.headers, self.footer, self.ci)

    def _repr_latex_(self) -> str:
        return latex(self.df, self.caption, self.columns, self.ci)


def markdown(df: pd.DataFrame) -> str:
    """A pipe table of `df` (already text, e.g. from `people`), every row, no index: for Markdown prose
    and the report PDF."""
    head = "| " + " | ".join(md_cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def md_cell(v: Any) -> str:
    """One cell of a Markdown pipe table: its pipes escaped and its line breaks made spaces."""
    return str(v).replace("|", "\\|").replace("\n", " ")
