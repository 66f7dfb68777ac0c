"""The research guide's success criteria, evaluated from results, never typed in.

Each notebook appends `Criterion` rows to `<run_dir>/scorecard/<notebook>.json`; the run index gathers
them into one table. A criterion that cannot be evaluated has `passed=None` and says why in `note`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from esa.store import read_json, write_json


@dataclass
class Criterion:
    id: str  # stable key, e.g. "P1.ppl_credible"
    phase: int
    text: str  # the guide's wording
    measured: Any  # the number (or short string) it was judged on
    threshold: str  # what passing means, e.g. "> 0.4"
    passed: bool | None  # None: could not be evaluated (see note)
    evidence: str  # where the numbers come from (table / figure / notebook)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        m = d["measured"]
        if isinstance(m, float) and not math.isfinite(m):
            d["measured"] = str(m)
        elif hasattr(m, "item"):
            d["measured"] = m.item()
        return d


def judge(value: float | None, op: str, threshold: float) -> bool | None:
    """Compare with `op` in {">", ">=", "<", "<="}; None when the value is missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return {">": value > threshold, ">=": value >= threshold, "<": value < threshold,
            "<=": value <= threshold}[op]


def write_rows(run_dir: str | Path, notebook: str, rows: list[Criterion]) -> Path:
    return write_json(Path(run_dir) / "scorecard" / f"{notebook}.json", [r.as_dict() for r in rows])


def read_all(run_dir: str | Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted((Path(run_dir) / "scorecard").glob("*.json")):
        for row in read_json(path):
            row.setdefault("notebook", path.stem)
            rows.append(row)
    return rows


def as_frame(rows: list[Criterion] | list[dict[str, Any]]):
    import pandas as pd

    recs = [r.as_dict() if isinstance(r, Criterion) else r for r in rows]
    df = pd.DataFrame.from_records(recs)
    if not df.empty:
        df["result"] = df["passed"].map({True: "PASS", False: "FAIL"}).fillna("n/a")
    return df
