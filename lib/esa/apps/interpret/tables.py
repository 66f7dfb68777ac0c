"""The tables of the role catalogue that the week-15 criterion reads: the share of the top critical weights
with an identified role, per metric, and the headline rows.

A weight counts as explained when one of its verified roles is among the `counted` roles (the criterion
counts the ablation roles (a)-(c), `roles.ABLATION_ROLES`). `role_share` is the criterion's measurement over
the weights a metric selected (the detector's own candidates are tested and shown, not counted): the share,
its Wilson 95% CI, and whether the inputs let any Holm-adjusted test pass at all (esa.stats.shares).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from esa.apps.interpret.critical import DETECTOR
from esa.apps.interpret.roles import ABLATION_ROLES, KEY, UNEXPLAINED, RoleReport, wide_table
from esa.stats.shares import holm_reachable, wilson_interval


def explained(weights: pd.DataFrame, counted: Iterable[str]) -> pd.Series:
    """Whether each weight has a verified role among `counted`."""
    c = set(counted)
    return weights["roles"].str.split(";").apply(lambda rs: bool(c & set(rs)))


def role_share(report: RoleReport, counted: Iterable[str], alpha: float) -> dict[str, Any]:
    """Share of the metrics' top weights with >= 1 verified role among `counted`, its Wilson CI, the number of
    tests and inputs, and whether the smallest attainable p could pass Holm at `alpha`."""
    counted = sorted(set(counted))
    member = report.membership
    w = report.weights.merge(member.loc[member["metric"] != DETECTOR, KEY].drop_duplicates(), on=KEY)
    n = len(w)
    k = int(explained(w, counted).sum()) if n else 0
    tests = report.tests
    decided = tests[tests["p"].notna()]
    m, n_inputs = len(decided), int(decided["n_inputs"].max()) if len(decided) else 0
    lo, hi = wilson_interval(k, n)
    out = {"n": n, "explained": k, "share": k / n if n else math.nan, "ci_lo": lo, "ci_hi": hi, "roles": counted,
           "m_tests": m, "n_inputs": n_inputs, **holm_reachable(n_inputs, m, alpha)}
    # beside it, for reading only: the same share counting every tested role (baseline-only d-f too)
    tested = [r for r in report.config["roles"] if r != UNEXPLAINED]
    out["share_any_role"] = float(explained(w, tested).mean()) if n else math.nan
    return out


def share_table(model: str, report: RoleReport, counted: Iterable[str]) -> pd.DataFrame:
    """Per metric (and all the criterion counts): share of its top weights with a counted role, Wilson CI."""
    rows = []
    w = report.weights.merge(report.membership, on=KEY)
    for metric, g in [*w.groupby("metric"), ("all (criterion)", w[w["metric"] != DETECTOR].drop_duplicates(KEY))]:
        n, k = len(g), int(explained(g, counted).sum())
        lo, hi = wilson_interval(k, n)
        rows.append({"model": model, "metric": metric, "n": n, "explained": k, "share": k / n if n else math.nan,
                     "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(rows)


def headline(report: RoleReport, rows: int = 12) -> pd.DataFrame:
    """The catalogue's headline rows: weights with an identified role first (most roles, then the largest
    shrink factor), capped at `rows`; the full table is `wide_table(report)`."""
    wide = wide_table(report)
    cols = ["label", "metrics", "roles"] + [c for c in (f"{r}_effect" for r in ABLATION_ROLES) if c in wide]
    shrink = wide.get("creates_massive_effect", pd.Series(np.nan, index=wide.index)).fillna(0)
    order = wide.assign(_s=shrink).sort_values(["n_roles", "_s"], ascending=False, kind="mergesort")
    return order[cols].head(rows).reset_index(drop=True)
