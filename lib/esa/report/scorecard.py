"""The research guide's success criteria, evaluated from results, never typed in.

Each notebook appends `Criterion` rows to `<run_dir>/scorecard/<notebook>.json`; the run index gathers
them into one table. Every criterion is judged once: a notebook drops rows another notebook of the run
already wrote (`unseen`), and `unique` keeps the first of any repeated id (schedule order) when reading.
Verdicts: PASS / FAIL / underpowered / not estimable / machinery-only (esa.stats.verdicts).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd

from esa.phases.criteria import budget_reason, untrained_in_run
from esa.report.artefacts import CRITERIA_MARK
from esa.report.tables import number
from esa.stats.verdicts import VERDICTS, Criterion, verdict_of
from esa.store import read_json, write_json


def write_rows(run_dir: str | Path, notebook: str, rows: list[Criterion]) -> Path:
    """Write one notebook's rows (a repeated id within them keeps its first row)."""
    seen: set[str] = set()
    kept = [r for r in rows if not (r.id in seen or seen.add(r.id))]
    return write_json(Path(run_dir) / "scorecard" / f"{notebook}.json", [r.as_dict() for r in kept])


def _order(notebook: str) -> tuple[int, int, str]:
    """Schedule order from the notebook id (phase<P>_week<W>_...): week 10 sorts after week 9."""
    m = re.match(r"phase(\d+)_week(\d+)", notebook)
    return (int(m.group(1)), int(m.group(2)), notebook) if m else (99, 99, notebook)


def read_all(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored row of the run, in schedule order, each with its `notebook` and `verdict`."""
    rows: list[dict[str, Any]] = []
    paths = sorted((Path(run_dir) / "scorecard").glob("*.json"), key=lambda p: _order(p.stem))
    for path in paths:
        for row in read_json(path):
            row.setdefault("notebook", path.stem)
            row["verdict"] = verdict_of(row)
            rows.append(row)
    return rows


def unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of each id (rows in schedule order); later repeats are named in `also_in`."""
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["id"] in first:
            first[r["id"]].setdefault("also_in", []).append(r.get("notebook"))
        else:
            first[r["id"]] = dict(r)
    return list(first.values())


def unseen(run_dir: str | Path, notebook: str, rows: list[Criterion]) -> list[Criterion]:
    """`rows` less those whose id another notebook of the run already judged (the source of truth stays the
    notebook that ran first in the schedule, e.g. week 1 for the embedded model's Phase 2 rows)."""
    others = {r["id"] for r in read_all(run_dir) if r.get("notebook") != notebook}
    return [r for r in rows if r.id not in others]


def rejudge(rows: list[dict[str, Any]], settings: Any, untrained: str | None = None) -> list[dict[str, Any]]:
    """Stored rows with the budget rule (esa.phases.criteria.budgeted) and, for Phase 4, the untrained-suite
    rule applied, so a run whose notebooks predate them reads the same as a fresh one; rows already
    demoted are left as they are."""
    out = []
    for r in rows:
        why = budget_reason(settings, r["id"]) if settings and verdict_of(r) in ("PASS", "FAIL") else None
        if untrained and r.get("phase") == 4 and verdict_of(r) != "machinery-only":
            why = untrained
        if why:
            face = verdict_of(r) if verdict_of(r) in ("PASS", "FAIL") else r.get("face_value", "")
            was = f" (the number alone reads {face})" if face else f" (also {verdict_of(r)})"
            r = dict(r, verdict="machinery-only", passed=None, face_value=face,
                     note=f"{why}{was}" + (f". {r['note']}" if r.get("note") else ""))
        out.append(r)
    return out


def judged(run_dir: str | Path, settings: Any = None) -> list[dict[str, Any]]:
    """The run's scorecard as the index shows it: unique ids, budget rule applied (settings: a Profile or the
    manifest's profile_settings; None reads them from the manifest)."""
    run_dir = Path(run_dir)
    if not (run_dir / "scorecard").is_dir():
        return []
    if settings is None:
        try:
            settings = read_json(run_dir / "manifest.json").get("profile_settings")
        except (OSError, ValueError):
            settings = None
    return rejudge(unique(read_all(run_dir)), settings, untrained_in_run(run_dir))


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rows per verdict, every verdict present (0 when none)."""
    c = Counter(verdict_of(r) for r in rows)
    return {v: int(c.get(v, 0)) for v in VERDICTS}


def as_frame(rows: list[Criterion] | list[dict[str, Any]]) -> pd.DataFrame:
    """A table of rows with `result` = the verdict; an empty table still has every column."""
    recs = [r.as_dict() if isinstance(r, Criterion) else r for r in rows]
    if not recs:
        return pd.DataFrame(columns=[*(f.name for f in fields(Criterion)), "result"])
    df = pd.DataFrame.from_records(recs)
    df["result"] = [verdict_of(r) for r in recs]
    return df


def in_words(rows: list[Criterion] | list[dict[str, Any]]) -> str:
    """A page's closing "Criteria" section in Markdown: per criterion its wording, the verdict in bold, the
    measured value against its threshold, any note, and the criterion id in small type."""
    recs = [r.as_dict() if isinstance(r, Criterion) else dict(r) for r in rows]
    if not recs:
        return f"{CRITERIA_MARK}\n## Criteria\n\nThis page judges no criterion of the guide in this run."
    c = counts(recs)
    tally = ", ".join(f"{n} {v}" for v, n in c.items() if n)
    lines = [f"{CRITERIA_MARK}\n## Criteria\n\n{len(recs)} criteri{'a' if len(recs) != 1 else 'on'} judged here: {tally}.\n"]
    for r in recs:
        measured = _measured(r.get("measured"))
        note = f" {str(r['note']).rstrip('.')}." if r.get("note") else ""
        lines.append(
            f"- **{verdict_of(r)}**: {str(r.get('text', '')).rstrip('.')}. Measured {measured}; passing needs "
            f"{r.get('threshold', '') or 'no threshold'}.{note} <small><code>{r.get('id', '')}</code></small>"
        )
    return "\n".join(lines) + "\n"


def _measured(value: Any) -> str:
    if isinstance(value, float):
        return number(value)
    return str(value) if value not in (None, "") else "nothing"
