"""The headless runner behind run_all.py: schedule -> papermill executions -> HTML, manifest, index.

Modules: `schedule` (selection and order), `state` (up-to-date keys, stamps, lock), `notebook` (one
notebook: jupytext -> papermill -> nbconvert), `task` (the JSON-able unit every executor runs),
`executors` (process pool, submitit local/slurm), `manifest`, `driver` (the run), `cli` (flags).
"""

from __future__ import annotations

from esa.runner.driver import RunConfig, RunResult, generate_docs, make_plan, run

__all__ = ["RunConfig", "RunResult", "generate_docs", "make_plan", "run"]
