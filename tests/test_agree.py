"""esa.agree: results compared exactly, or with floats to a tolerance of their size (another CPU's rounding),
while verdicts, counts and labels must stay equal."""

from __future__ import annotations

import math

import pandas as pd

from esa import agree


def test_exact_unless_a_tolerance_is_given_and_then_only_for_floats() -> None:
    a = {"verdict": "PASS", "n": 64, "mean": 6.933022, "ci": [6.1, 7.7], "p": float("nan")}
    b = {**a, "mean": 6.933022 * (1 + 1e-6)}
    assert agree.difference(a, dict(a)) is None
    assert agree.difference(a, b) == f"/mean: 6.933022 != {b['mean']!r}"
    assert agree.difference(a, b, 1e-3) is None
    assert agree.difference(a, {**b, "verdict": "FAIL"}, 1e-3) == "/verdict: 'PASS' != 'FAIL'"
    assert agree.difference(a, {**b, "n": 65}, 1e-3) == "/n: 64 != 65"  # a sequential test that stopped elsewhere
    assert agree.difference(a, {**b, "ci": [6.1]}, 1e-3) == "/ci: columns or rows differ, 2 != 1 items"
    assert agree.difference(a, {**b, "extra": 1}, 1e-3) == "/extra: columns or rows differ, in one only"


def test_a_float_below_one_is_compared_absolutely_above_one_relatively() -> None:
    # a damage of 1e-4 nats is a difference of two log-PPLs near 3.5, each rounded to about 1e-6
    assert agree.difference(-0.000109, -0.000110, 1e-3) is None
    assert agree.difference(-0.000109, 0.0021, 1e-3) is not None
    assert agree.difference(1000.0, 1000.9, 1e-3) is None and agree.difference(1000.0, 1001.1, 1e-3) is not None
    assert agree.largest({"x": [1000.0, 0.5]}, {"x": [1001.0, 0.5004]}) == max(1 / 1001, 0.0004)
    assert agree.largest({"v": "a", "n": 1}, {"v": "a", "n": 1}) == 0.0 and math.isclose(agree.largest(2.0, 2.002), 0.002 / 2.002)


def test_tables_compare_float_columns_to_the_tolerance_and_every_other_column_exactly() -> None:
    a = pd.DataFrame({"condition": ["top_k", "random_k"], "n": [16, 64], "mean": [6.933022, -0.000109],
                      "verdict": ["PASS", None]})
    b = a.assign(mean=[6.933031, -0.000108])
    assert agree.frame_difference(a, a.copy()) is None
    assert "mean" in agree.frame_difference(a, b)
    assert agree.frame_difference(a, b, 1e-3) is None
    assert agree.frame_difference(a, b.assign(mean=[7.0, -0.000108]), 1e-3) == \
        "column 'mean', row 0: 6.933022 != 7.0 (1 rows beyond rtol 0.001)"
    assert agree.frame_difference(a, b.assign(n=[16, 128]), 1e-3) == "column 'n'[1]: 64 != 128"
    assert agree.frame_difference(a, b.assign(verdict=["FAIL", None]), 1e-3) == "column 'verdict'[0]: 'PASS' != 'FAIL'"
    assert agree.frame_difference(a, b.iloc[:1], 1e-3).startswith("columns or rows differ")
    assert agree.frame_difference(a, b.assign(n=[16.0, 64.0]), 1e-3) == "column 'n': dtype int64 != float64"
