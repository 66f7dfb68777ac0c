"""What sequential evaluation saved in a run: per notebook and model, the evaluation windows its conditions
used, against the windows the fixed-n plan spends on the same conditions (each on all of its windows).

Read from the tables the notebooks save, so a run folder (a smoke run or the committed record) says it
without re-running anything. Only perturbed or pruned conditions count: the unperturbed baseline is
evaluated in both designs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from esa.store import read_json

# notebook -> (its table of evaluated conditions, one row each; the column with the windows that row used)
TABLES: dict[str, tuple[str, str]] = {
    "phase3_week5_core_perturbation": ("perturbation", "n_windows"),
    "phase3_week6_dose_response": ("dose_response", "n_windows"),
    "phase3_week7_cross_model": ("cross_model", "n_windows"),
    "phase5_week13_pruning": ("pruning_rows", "eval_windows"),
}
COLUMNS = ["notebook", "model", "conditions", "evaluated", "fixed_n", "fewer"]


def fixed_windows(run_dir: Path, notebook: str, settings: Mapping[str, Any]) -> int | None:
    """Windows per condition at fixed n: the notebook's saved plan where it has one (pruning), else the
    profile's cap for perturbation sweeps (perturb_eval_windows, else eval_windows); None when unknown."""
    plan = run_dir / "data" / notebook / "plan.json"
    if plan.is_file():
        n = (read_json(plan).get("setup") or {}).get("evaluation", {}).get("windows")
        if n:
            return int(n)
    n = settings.get("perturb_eval_windows") or settings.get("eval_windows")
    return int(n) if n else None


def windows_saved(run_dir: str | Path, settings: Mapping[str, Any] | None) -> pd.DataFrame:
    """One row per notebook and model that left a sequential table: its conditions, the windows they
    used, the fixed-n plan's windows for them, and the ratio (COLUMNS). Empty when none did."""
    run_dir = Path(run_dir)
    rows = []
    for nb, (name, col) in TABLES.items():
        path = run_dir / "data" / nb / f"{name}.parquet"
        cap = fixed_windows(run_dir, nb, settings or {})
        if not path.is_file() or cap is None:
            continue
        table = pd.read_parquet(path)
        if col not in table or "model" not in table:
            continue
        used = table.dropna(subset=[col])
        for model, g in used.groupby("model", sort=True):
            evaluated = int(g[col].sum())
            fixed = cap * len(g)
            rows.append({"notebook": nb, "model": model, "conditions": len(g), "evaluated": evaluated,
                         "fixed_n": fixed, "fewer": fixed / evaluated if evaluated else float("nan")})
    return pd.DataFrame(rows, columns=COLUMNS)


def in_words(table: pd.DataFrame) -> str:
    """One sentence per notebook: windows evaluated against the fixed-n plan's ("" for an empty table)."""
    parts = []
    for nb, g in table.groupby("notebook", sort=False):
        used, fixed = int(g["evaluated"].sum()), int(g["fixed_n"].sum())
        each = ", ".join(f"{r.model} {r.evaluated:,} of {r.fixed_n:,}" for r in g.itertuples())
        parts.append(f"{nb}: {used:,} evaluation windows against {fixed:,} at fixed n "
                     f"({fixed / used:.1f}x fewer; {each})" if used else f"{nb}: no windows evaluated")
    return "; ".join(parts)
