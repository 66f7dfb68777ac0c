"""How the tasks of a run are executed: a registry of engines with one signature.

- `process` (default): a `concurrent.futures.ProcessPoolExecutor` with `--jobs` worker processes; a task
  is submitted once the tasks it depends on have finished `ok`. On a GPU machine a task waits for as many
  free GPUs as its memory plan needs (`Task.gpus`, from esa.phases.memplan) and its kernel sees exactly
  those (CUDA_VISIBLE_DEVICES); one that needs more than the machine has is not run, with the numbers.
  On CPU it still runs notebooks in parallel.
- `slurm`: the same tasks as submitit job arrays, one array per dependency level (a level is submitted
  when the previous one has finished), with partition / GPUs / time from params/cluster.yaml.
- `local`: submitit's local executor, the same code path as `slurm` without a cluster (used by tests).

Every engine calls `esa.runner.task.run_task` and reports each finished task through `on_done`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esa.errors import EsaError
from esa.params import yaml_load
from esa.progress import CPU_SHARE_ENV
from esa.registry import Registry
from esa.runner.lifeline import die_with_parent
from esa.runner.manifest import gpus
from esa.runner.task import Task, run_task

Result = dict[str, Any]
OnDone = Callable[[Result], None]


@dataclass
class ExecOptions:
    run_dir: Path
    jobs: int = 1
    fail_fast: bool = False
    params_dir: Path | None = None
    cluster: dict[str, Any] = field(default_factory=dict)  # params/cluster.yaml section of the executor


def not_run(task: Task, reason: str) -> Result:
    return {"notebook": task.notebook, "status": "not run", "reason": reason, "seconds": 0.0, "failure": None}


def crashed(task: Task, message: str) -> Result:
    return {
        "notebook": task.notebook,
        "status": "failed",
        "seconds": 0.0,
        "failure": {"message": message, "cell": None, "summary": f"{task.notebook} failed: {message}"},
    }


def _blocked_by(task: Task, results: dict[str, Result]) -> str | None:
    """Name of a dependency in this run that did not finish ok (deps outside the run are up to date)."""
    for dep in task.depends_on:
        if dep in results and results[dep].get("status") != "ok":
            return dep
    return None


# ---------------------------------------------------------------- process pool (--jobs)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else those nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    # gpus(): nvidia-smi -L, one line per GPU
    return [str(i) for i in range(len(gpus()))]


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_threads_per_worker(jobs: int) -> int:
    """CPU threads each of `jobs` concurrent notebooks starts with: the usable cores, shared out.

    Without it every kernel's torch starts one thread per core, and two notebooks on two cores fight
    over them; `CpuShare` then follows how many are running.
    """
    return max(1, usable_cores() // max(1, jobs))


class CpuShare:
    """The file behind CPU_SHARE_ENV: the cores over the notebooks running now, rewritten as that changes.

    Off (None path) with GPUs, with --jobs 1, or when the user set OMP_NUM_THREADS themselves."""

    def __init__(self, run_dir: Path, jobs: int, gpus: list[str]) -> None:
        on = jobs > 1 and not gpus and not any(os.environ.get(v) for v in THREAD_VARS)
        self.path = Path(run_dir) / "state" / "cpu-share" if on else None
        self.cores, self.value = usable_cores(), 0

    def update(self, running: int) -> None:
        threads = max(1, self.cores // max(1, running))
        if self.path is None or threads == self.value:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(f"{threads}\n")
        os.replace(tmp, self.path)  # a kernel never reads half a number
        self.value = threads

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            os.environ.pop(CPU_SHARE_ENV, None)


class GpuPool:
    """The visible GPUs, handed out per task: `take(n)` the n lowest free ids (None while fewer are free)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids, self.free = list(ids), list(ids)

    def take(self, n: int) -> list[str] | None:
        if n > len(self.free):
            return None
        got, self.free = self.free[:n], self.free[n:]
        return got

    def give(self, ids: list[str]) -> None:
        self.free = [g for g in self.ids if g in set(self.free) | set(ids)]


def _pin_worker(slots: Any, gpus: list[str], threads: int | None = None) -> None:
    """Take a worker slot; pin this process (and its kernels) to its share of the CPU. GPUs go per task
    (`GpuPool`, `Task.gpu_ids`)."""
    slots.get()
    if not gpus and threads:
        for var in THREAD_VARS:  # read by torch when the kernel imports it; a user's own setting wins
            os.environ.setdefault(var, str(threads))


def _init_worker(slots: Any, gpus: list[str], parent_pid: int, threads: int | None = None) -> None:
    """Pool initializer: die with the runner (even when it is SIGKILLed), then take a slot and a GPU."""
    die_with_parent(parent_pid)
    _pin_worker(slots, gpus, threads)


@contextlib.contextmanager
def _workers_stopped_on_interrupt(pool: ProcessPoolExecutor) -> Iterator[None]:
    """On Ctrl-C, terminate the workers instead of waiting for their notebooks to finish.

    A worker may not act on its own SIGINT in time (the signal can land on one of its helper threads), and
    the pool's exit would then wait for the whole notebook. Each kernel follows its worker
    (JPY_PARENT_PID) and exits with it; the unfinished output keeps its temporary name and is removed by
    the next run.
    """
    try:
        yield
    except KeyboardInterrupt:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def run_processes(tasks: list[Task], opts: ExecOptions, on_done: OnDone) -> dict[str, Result]:
    results: dict[str, Result] = {}
    pending = list(tasks)  # already in dependency order
    ctx = mp.get_context("spawn")  # fork after importing torch/zmq threads is unsafe
    slots = ctx.Queue()
    for i in range(opts.jobs):
        slots.put(i)
    stop_reason = ""

    def finish(task: Task, result: Result) -> None:
        nonlocal stop_reason
        results[task.notebook] = result
        on_done(result)
        if opts.fail_fast and result.get("status") == "failed" and not stop_reason:
            stop_reason = f"--fail-fast after {task.notebook} failed"

    gpu_ids = visible_gpus()
    gpu_pool = GpuPool(gpu_ids)
    held: dict[str, list[str]] = {}  # notebook -> the GPUs it holds
    share = CpuShare(opts.run_dir, opts.jobs, gpu_ids)
    if share.path is not None:
        os.environ[CPU_SHARE_ENV] = str(share.path)  # the spawned workers and their kernels inherit it
    with ProcessPoolExecutor(
        max_workers=opts.jobs,
        mp_context=ctx,
        initializer=_init_worker,
        # the kernels' starting threads (torch's, and any other OpenMP library's), where CpuShare is on
        initargs=(slots, gpu_ids, os.getpid(), cpu_threads_per_worker(opts.jobs) if share.path else None),
    ) as pool, _workers_stopped_on_interrupt(pool), contextlib.closing(share):
        running: dict[Any, Task] = {}
        while pending or running:
            for task in list(pending):
                if stop_reason:
                    break
                if len(running) >= opts.jobs:
                    break
                if any(
                    d in {t.notebook for t in pending} | {t.notebook for t in running.values()}
                    for d in task.depends_on
                ):
                    continue  # a dependency has not finished yet
                dep = _blocked_by(task, results)
                if dep:
                    pending.remove(task)
                    finish(task, not_run(task, f"dependency {dep} did not finish ok"))
                    continue
                if gpu_ids and task.gpus > len(gpu_ids):
                    pending.remove(task)
                    finish(task, not_run(task, f"its memory plan needs {task.gpus} GPUs, {len(gpu_ids)} are visible "
                                               "(esa-runner --dry-run shows the plan per pass)"))
                    continue
                got = gpu_pool.take(task.gpus) if gpu_ids else []
                if got is None:
                    continue  # waits for GPUs to be freed
                pending.remove(task)
                spec = {**task.as_dict(), "gpu_ids": got}
                running[pool.submit(run_task, spec)] = task
                held[task.notebook] = got
            share.update(len(running))
            if not running:
                break
            # A bounded wait: a process-directed SIGINT may land on one of the pool's helper threads, and
            # the main thread only runs the Python handler once it runs bytecode again.
            done, _ = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
            for fut in done:
                task = running.pop(fut)
                gpu_pool.give(held.pop(task.notebook, []))
                try:
                    finish(task, fut.result())
                except Exception as err:  # noqa: BLE001 - a dead worker process is a failure of its task
                    finish(task, crashed(task, f"worker process died: {type(err).__name__}: {err}"))
    for task in pending:
        finish(task, not_run(task, stop_reason or "not started"))
    return results


# ---------------------------------------------------------------- submitit (--executor local|slurm)

# params/cluster.yaml keys -> submitit AutoExecutor parameters.
_SUBMITIT_KEYS = {
    "partition": "slurm_partition",
    "gpus": "gpus_per_node",
    "time_min": "timeout_min",
    "cpus": "cpus_per_task",
    "mem_gb": "mem_gb",
    "array_parallelism": "slurm_array_parallelism",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "constraint": "slurm_constraint",
    "extra": "slurm_additional_parameters",
}


def cluster_config(params_dir: Path, executor: str) -> dict[str, Any]:
    """The `executor` section of params/cluster.yaml as submitit parameters (defaults if absent)."""
    path = params_dir / "cluster.yaml"
    data = (yaml_load(path.read_text(), str(path)) or {}) if path.is_file() else {}
    section = dict(data.get(executor) or {})
    bad = sorted(set(section) - set(_SUBMITIT_KEYS))
    if bad:
        raise EsaError(f"{path}: unknown {executor} setting(s) {bad}; accepted: {sorted(_SUBMITIT_KEYS)}")
    section.setdefault("time_min", 60)
    return {_SUBMITIT_KEYS[k]: v for k, v in section.items() if v is not None}


def preflight(executor: str) -> None:
    """Checks that need no task: fail before the run starts, not after planning and locking."""
    get_executor(executor)
    if executor == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise EsaError(
            "--executor slurm needs SLURM (sbatch and srun on PATH); use --executor local to run the same "
            "submitit path on this machine"
        )


def sbatch_preview(cluster: dict[str, Any], folder: Path, n_tasks: int) -> str:
    """The #SBATCH header submitit would write for `cluster` (shown by --dry-run; needs no cluster)."""
    from submitit.slurm import slurm

    generic = {
        "name": "job_name",
        "timeout_min": "time",
        "mem_gb": "mem",
        "cpus_per_task": "cpus_per_task",
        "gpus_per_node": "gpus_per_node",
    }
    kwargs: dict[str, Any] = {}
    for key, value in cluster.items():
        name = key.removeprefix("slurm_") if key.startswith("slurm_") else generic.get(key, key)
        kwargs[name] = slurm._convert_mem(value) if name == "mem" else value
    kwargs.pop("job_name", None)
    text = slurm._make_sbatch_string(
        command="<python -m submitit.core._submit ...>",
        folder=folder,
        job_name="esa-notebook",
        map_count=n_tasks,
        **kwargs,
    )
    return "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH"))


def _levels(tasks: list[Task]) -> list[list[Task]]:
    """Group tasks into dependency levels: level n depends only on levels < n (or outside the run)."""
    ids = {t.notebook for t in tasks}
    level: dict[str, int] = {}
    for t in tasks:  # tasks are in dependency order, so deps already have a level
        level[t.notebook] = 1 + max((level[d] for d in t.depends_on if d in ids), default=-1)
    return [[t for t in tasks if level[t.notebook] == n] for n in range(max(level.values(), default=-1) + 1)]


@contextlib.contextmanager
def _jobs_cancelled_on_interrupt(jobs: list[Any]) -> Iterator[None]:
    """On Ctrl-C or SIGTERM, cancel the array's unfinished jobs (local processes or SLURM jobs): a job
    left running would finish its notebook in the run folder while a rerun races it."""
    try:
        yield
    except KeyboardInterrupt:
        for job in jobs:
            # SLURM: scancel. Local: SIGINT to submitit's controller, which then SIGKILLs its task (a task
            # ignores SIGTERM: submitit bypasses it, as SLURM sends it before pre-emption). Sent to every
            # job: asking a job whether it is done may itself fail, and cancelling a finished one is a no-op.
            with contextlib.suppress(Exception):
                job.cancel(check=False)
        _reap_local_controllers(jobs)
        raise


def _reap_local_controllers(jobs: list[Any], grace_s: float = 10.0) -> None:
    """A local controller that has not exited `grace_s` after its SIGINT (a loaded machine, or a signal
    that landed while it was busy) is killed; its task follows by its parent-death signal (_local_job)."""
    deadline = time.monotonic() + grace_s
    for job in jobs:
        proc = getattr(job, "_process", None)  # submitit's LocalJob keeps its controller's Popen here
        if proc is None:
            continue
        with contextlib.suppress(Exception):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(timeout=5)


def _local_job(spec: dict[str, Any]) -> dict[str, Any]:
    """A task under submitit's local controller: it dies with the controller (which dies with the runner's
    cancel), so a notebook never outlives the run that started it, even when a signal goes astray."""
    die_with_parent(os.getppid())
    return run_task(spec)


def _run_submitit(tasks: list[Task], opts: ExecOptions, on_done: OnDone, cluster: str) -> dict[str, Result]:
    import submitit

    preflight(cluster)
    executor = submitit.AutoExecutor(folder=opts.run_dir / "submitit" / "%j", cluster=cluster)
    executor.update_parameters(name="esa-notebook", **opts.cluster)
    results: dict[str, Result] = {}
    stop_reason = ""
    for wave in _levels(tasks):
        runnable = []
        for task in wave:
            dep = _blocked_by(task, results)
            reason = stop_reason or (f"dependency {dep} did not finish ok" if dep else "")
            if reason:
                results[task.notebook] = not_run(task, reason)
                on_done(results[task.notebook])
            else:
                runnable.append(task)
        if not runnable:
            continue
        fn = _local_job if cluster == "local" else run_task
        if cluster == "slurm":  # the array's tasks get the GPUs its most demanding notebook's plan needs
            need = max([int(opts.cluster.get("gpus_per_node", 1) or 0), *(t.gpus for t in runnable)])
            executor.update_parameters(gpus_per_node=need)
        jobs = executor.map_array(fn, [t.as_dict() for t in runnable])
        for task, job in zip(runnable, jobs, strict=True):
            try:
                with _jobs_cancelled_on_interrupt(jobs):
                    result = job.result()
            except Exception as err:  # noqa: BLE001 - the job itself died (time limit, node failure)
                result = crashed(task, f"submitit job {job.job_id} failed: {type(err).__name__}: {err}")
            result["job_id"] = job.job_id
            results[task.notebook] = result
            on_done(result)
            if opts.fail_fast and result.get("status") == "failed" and not stop_reason:
                stop_reason = f"--fail-fast after {task.notebook} failed"
    return results


def run_submitit_local(tasks: list[Task], opts: ExecOptions, on_done: OnDone) -> dict[str, Result]:
    return _run_submitit(tasks, opts, on_done, "local")


def run_submitit_slurm(tasks: list[Task], opts: ExecOptions, on_done: OnDone) -> dict[str, Result]:
    return _run_submitit(tasks, opts, on_done, "slurm")


Executor = Callable[[list[Task], ExecOptions, OnDone], dict[str, Result]]
EXECUTORS: Registry[Executor] = Registry("executor")
EXECUTORS.register(run_processes, "process", "worker processes on this machine (--jobs), one GPU each where "
                   "there are GPUs")
EXECUTORS.register(run_submitit_local, "local",
                   "submitit's local executor: the slurm code path without a cluster")
EXECUTORS.register(run_submitit_slurm, "slurm", "submitit job arrays on a Slurm cluster, one array per "
                   "dependency level (params/cluster.yaml)")


def get_executor(name: str) -> Executor:
    return EXECUTORS.lookup(name)
