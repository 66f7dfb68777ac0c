"""One notebook run as a self-contained, JSON-able task, and the function every executor calls.

`run_task(spec)` is what a `--jobs` worker process, a submitit local job and a SLURM array task all
execute: write the unexecuted notebook, execute it, render both HTMLs, write the stamp (last). It never
raises for a notebook failure: the failure is in the returned stamp, so one bad notebook cannot take
an executor down with it.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esa.runner import notebook as nbrun
from esa.runner.layout import outputs
from esa.runner.state import write_stamp


@dataclass
class Task:
    notebook: str
    title: str
    phase: int
    week: int
    source: str  # the jupytext .py
    root: str  # kernel cwd (repo root)
    run_dir: str  # absolute
    params_dir: str
    kernel: str
    parameters: dict[str, Any]  # injected by papermill: profile, models, run_dir, overrides
    key: str  # up-to-date key (esa.runner.state.notebook_key)
    depends_on: list[str] = field(default_factory=list)
    timeout: float | None = None  # per-cell seconds, None: no limit
    gpus: int = 1  # GPUs its memory plan needs (esa.phases.memplan), given to it on a GPU machine
    gpu_ids: list[str] = field(default_factory=list)  # the ones it got (set by the executor; empty: none)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_task(spec: dict[str, Any] | Task) -> dict[str, Any]:
    """Execute one notebook task; return (and write) its stamp."""
    task = spec if isinstance(spec, Task) else Task(**spec)
    # Kernels inherit the environment: make the params the runner resolved visible to the notebook, and give it
    # the GPUs the executor assigned (a device map inside the notebook spreads the model over all of them)
    os.environ["ESA_PARAMS_DIR"] = task.params_dir
    if task.gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(task.gpu_ids)
    run_dir = Path(task.run_dir)
    out = outputs(run_dir, task.notebook)
    started = time.time()
    failure: nbrun.Failure | None
    try:
        nbrun.write_input(Path(task.source), out.input, task.kernel)
        failure = nbrun.execute(
            task.notebook,
            out.input,
            out.executed,
            task.parameters,
            task.kernel,
            Path(task.root),
            task.timeout,
        )
    except Exception as err:  # noqa: BLE001 - reported in the stamp, with the notebook's name
        failure = nbrun.Failure(task.notebook, f"{type(err).__name__}: {err}")
    exec_s = time.time() - started
    render_error = ""
    if out.executed.is_file():
        try:
            nbrun.render_html(out.executed, out.html, out.html_nocode)
        except Exception as err:  # noqa: BLE001
            render_error = f"{type(err).__name__}: {err}"
    stamp = {
        "notebook": task.notebook,
        "title": task.title,
        "phase": task.phase,
        "week": task.week,
        "status": "failed" if failure or render_error else "ok",
        "key": task.key,
        "parameters": task.parameters,
        "kernel": task.kernel,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(exec_s, 2),
        "render_seconds": round(time.time() - started - exec_s, 2),
        "host": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "failure": failure.as_dict() if failure else None,
        "render_error": render_error or None,
    }
    write_stamp(run_dir, task.notebook, stamp)
    return stamp
