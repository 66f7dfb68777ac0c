"""The people-tables of the pages (esa.report.tables): figures, CIs, headers in words, no index, no width."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from esa.report import tables
from esa.report.scorecard import in_words
from esa.stats.verdicts import Criterion


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (117.234, "117"),
        (0.0012345, "0.00123"),
        (1.090870e08, "1.09 × 10⁸"),
        (5.893999e24, "5.89 × 10²⁴"),
        (2.5e-5, "2.50 × 10⁻⁵"),
        (-0.5, "−0.500"),
        (12345.6, "12,300"),
        (0.99999, "1.00"),
        (3, "3"),
        (np.int64(123456), "123,456"),
        (float("nan"), "–"),
        (None, "–"),
        (math.inf, "∞"),
        (True, "yes"),
        ("wanda", "wanda"),
    ],
)
def test_numbers_have_three_significant_figures_and_exponents_only_at_the_extremes(value, text):
    assert tables.number(value) == text


def test_an_estimate_carries_its_ci_and_a_missing_ci_is_left_out():
    assert tables.with_ci(117.2, 105.1, 130.4) == "117 [105, 130]"
    assert tables.with_ci(117.2, float("nan"), float("nan")) == "117"


def test_people_joins_cis_names_headers_in_words_and_drops_the_index():
    df = pd.DataFrame({"model": ["a", "b"], "mean": [117.2, 3.1], "ci_lo": [105.1, np.nan],
                       "ci_hi": [130.2, np.nan], "p_primary_holm": [1e-5, 0.2], "dlogppl_random_global": [1.0, 2.0]},
                      index=[7, 9])
    out = tables.people(df)
    assert list(out.columns) == ["Model", "Mean [95% CI]", "p (primary test, Holm)", "Random (global) Δ log-PPL (nats/token)"]
    assert tables.people(df, headers={"mean": "Δ log-PPL (nats/token)"}).columns[1] == "Δ log-PPL (nats/token) [95% CI]"
    assert out.iloc[0, 1] == "117 [105, 130]" and out.iloc[1, 1] == "3.10"
    assert out.iloc[0, 2] == "1.00 × 10⁻⁵"
    page = tables.html(df)
    assert "<th" in page and "row_heading" not in page and ">7<" not in page  # no index column
    assert "rows ×" not in page and "ci_lo" not in page


def test_a_named_index_becomes_columns_and_explicit_bounds_join_their_estimate():
    df = pd.DataFrame({"model": ["a"], "group": ["top_k"], "ratio": [2.0], "log_ci_lo": [1.5], "log_ci_hi": [2.5]})
    out = tables.people(df.set_index(["model", "group"]), ci={"ratio": ("log_ci_lo", "log_ci_hi")})
    assert list(out.columns) == ["Model", "Weight group", "Ratio [95% CI]"]
    assert out.iloc[0].tolist() == ["a", "top_k", "2.00 [1.50, 2.50]"]


def test_a_wide_table_is_split_into_parts_that_repeat_its_key_columns():
    df = pd.DataFrame({"model": ["a", "b"], **{f"m{i}": [float(i), 2.0 * i] for i in range(20)}})
    parts = tables.parts(tables.people(df))
    assert len(parts) == 3 and all(p.shape[1] <= tables.MAX_COLUMNS for p in parts)
    assert all(p.columns[0] == "Model" for p in parts)
    shown = {c for p in parts for c in p.columns}
    assert len(shown) == 21
    assert tables.html(df).count("<table") == 3


def test_criteria_in_words_name_verdict_value_threshold_and_id_in_small_type():
    rows = [Criterion("P3.sign_flip_ratio.m", 3, "Sign flip of top-k hurts more than random", 12.345, "> 10", True,
                      "data/x.json"),
            Criterion("P3.significance.m", 3, "top-k beats random", math.nan, "p < 0.01", None, "x",
                      note="one seed", verdict="underpowered")]
    text = in_words(rows)
    assert "2 criteria judged here: 1 PASS, 1 underpowered." in text
    assert "- **PASS**: Sign flip of top-k hurts more than random. Measured 12.3; passing needs > 10." in text
    assert re.search(r"one seed\. <small><code>P3\.significance\.m</code></small>", text)
    assert "judges no criterion" in in_words([])


def test_identifiers_are_written_as_they_are():
    out = tables.people(pd.DataFrame({"seed": [1337, 123], "layer": [12, 3], "n_tokens": [2040, 99]}))
    assert out.to_dict("list") == {"Seed": ["1337", "123"], "Layer": ["12", "3"], "Number of tokens": ["2,040", "99"]}


def test_a_shown_groupby_keeps_its_keys_in_the_saved_files(tmp_path):
    import esa.nb

    ctx = esa.nb.context("phase3_week5_demo", run_dir=tmp_path / "run")
    held = pd.DataFrame({"model": ["a", "a"], "group": ["top_k", "random_k"], "z": [0.1, 0.2]}).groupby(
        ["model", "group"])[["z"]].mean()
    shown = ctx.table(held, "held", "Held.")
    assert list(pd.read_parquet(ctx.data_dir / "held.parquet").columns) == ["model", "group", "z"]
    assert "Table 5.1. Held." in shown._repr_html_() and ctx.ref("table", "held") == "Table 5.1"
