"""The research guide's success criteria, evaluated from results, never typed in.

Each notebook appends `Criterion` rows to `<run_dir>/scorecard/<notebook>.json`; the run index gathers
them into one table. A criterion that cannot be evaluated has `passed=None` and says why in `note`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from esa.stats.verdicts import Criterion
from esa.store import read_json, write_json


def write_rows(run_dir: str | Path, notebook: str, rows: list[Criterion]) -> Path:
    return write_json(Path(run_dir) / "scorecard" / f"{notebook}.json", [r.as_dict() for r in rows])


def read_all(run_dir: str | Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted((Path(run_dir) / "scorecard").glob("*.json")):
        for row in read_json(path):
            row.setdefault("notebook", path.stem)
            rows.append(row)
    return rows


def as_frame(rows: list[Criterion] | list[dict[str, Any]]) -> pd.DataFrame:
    recs = [r.as_dict() if isinstance(r, Criterion) else r for r in rows]
    df = pd.DataFrame.from_records(recs)
    if not df.empty:
        df["result"] = df["passed"].map({True: "PASS", False: "FAIL"}).fillna("n/a")
    return df
