"""The run: plan (what runs, what is up to date), execute through an executor, write manifest and index.

The default run id is the profile name (reports/smoke/, reports/standard/, ...): reruns of the same
profile reuse the run folder, so notebooks whose key is unchanged are skipped and the index gathers
every notebook ever completed there. Give `--run-id` for a separate folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esa import store
from esa.errors import EsaError, unknown
from esa.params import check_plain_name, is_plain_name, load_profile, params_dir
from esa.runner import executors, schedule
from esa.runner import notebook as nbrun
from esa.runner.index import write_index
from esa.runner.layout import figures_dir, outputs
from esa.runner.manifest import environment
from esa.runner.state import (
    all_stamps,
    code_hash,
    file_hash,
    is_up_to_date,
    notebook_key,
    read_stamp,
    remove_partial_files,
    run_lock,
)
from esa.runner.task import Task
from esa.store import REPO_ROOT, write_json

if TYPE_CHECKING:
    from esa.params import Profile
    from esa.phases.study import Plan as StudyPlan


@dataclass
class RunConfig:
    profile: str = "smoke"
    only: list[str] = field(default_factory=list)
    models: list[str] | None = None  # overrides every schedule entry's models
    overrides: dict[str, Any] = field(default_factory=dict)  # profile settings, validated by load_profile
    run_id: str | None = None  # None: the profile name
    root: Path = REPO_ROOT  # kernel cwd; reports/ and figures/ live here
    notebooks_dir: Path | None = None  # None: <root>/notebooks
    params_dir: Path | None = None  # None: $ESA_PARAMS_DIR or <root>/params
    kernel: str = "esa"
    force: bool = False
    fail_fast: bool = False
    with_deps: bool = True  # False: run the --only selection without pulling in its dependencies
    jobs: int = 1
    executor: str = "process"
    timeout: float | None = None  # per-cell seconds
    verify_cache: bool = False  # check every cache entry first (reads are always checked)

    @property
    def run_name(self) -> str:
        """The run folder's name: --run-id, else the profile's name (a profile given as a path: its file's stem)."""
        return self.run_id or (self.profile if is_plain_name(self.profile) else Path(self.profile).stem)

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / "reports" / self.run_name


@dataclass
class PlanItem:
    entry: schedule.Entry
    task: Task
    action: str  # "run" | "skip"
    reason: str


@dataclass
class Plan:
    config: RunConfig
    items: list[PlanItem]
    added_dependencies: list[str]
    profile: dict[str, Any]

    @property
    def to_run(self) -> list[PlanItem]:
        return [i for i in self.items if i.action == "run"]


def _resolve_params_dir(cfg: RunConfig) -> Path:
    if cfg.params_dir is not None:
        return Path(cfg.params_dir).resolve()
    if "ESA_PARAMS_DIR" in os.environ:
        return params_dir().resolve()
    return (Path(cfg.root) / "params").resolve()


def _rel(path: Path, root: Path) -> str:
    """A path relative to the repo root when inside it, so keys survive moving the checkout."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _gpus(models: list[str], profile: Any, study: str | None) -> int:
    """GPUs a notebook of `models` under `profile` needs: every metric of the profile at its settings, and the
    passes of its Phase 5 `study` (pruning, fine-tuning, security, interpretability)."""
    from esa.phases import memplan
    from esa.recipes import Recipe

    return memplan.gpus_for(models, Recipe.of(profile), profile=profile, study=study)


def make_plan(cfg: RunConfig) -> Plan:
    """Resolve the schedule for `cfg`; every bad input is an EsaError raised before anything runs."""
    if cfg.jobs < 1:
        raise EsaError(f"--jobs must be >= 1, got {cfg.jobs}")
    if cfg.timeout is not None and not cfg.timeout > 0:  # not > 0 also catches NaN
        raise EsaError(f"--timeout must be a number of seconds > 0, got {cfg.timeout:g}; leave it out for no limit")
    check_plain_name(cfg.run_name, "--run-id" if cfg.run_id else "the run name (from --profile)")
    executors.get_executor(cfg.executor)
    pdir = _resolve_params_dir(cfg)
    if not (pdir / "schedule.yaml").is_file():
        raise EsaError(f"no schedule.yaml in params dir {pdir}")
    os.environ["ESA_PARAMS_DIR"] = str(pdir)  # esa.params and the kernels read the same params
    profile = load_profile(cfg.profile, cfg.overrides)
    check_models(cfg.models, pdir)
    chosen, added = schedule.select(schedule.entries(), cfg.only, cfg.with_deps)
    in_plan = {e.id for e in chosen}
    root = Path(cfg.root).resolve()
    nb_dir = Path(cfg.notebooks_dir or root / "notebooks").resolve()
    run_dir = cfg.run_dir.resolve()
    code = code_hash()
    # a notebook gets the GPUs its memory plan needs on a GPU machine or a SLURM cluster (sized per job array)
    gpu_machine = cfg.executor == "slurm" or bool(executors.visible_gpus())
    keys: dict[str, str] = {}
    items: list[PlanItem] = []
    for entry in chosen:
        source = nb_dir / f"{check_plain_name(entry.id, 'schedule entry id')}.py"
        nbrun.check_parameters_cell(nbrun.read_source(source), source)
        models = schedule.resolve_models(entry, profile, cfg.models)
        parameters = {
            "profile": cfg.profile,
            "models": models,
            "run_dir": _rel(run_dir, root),
            "overrides": dict(cfg.overrides),
        }
        model_files = {}
        for m in models:
            path = pdir / "models" / f"{m}.yaml"
            model_files[m] = path.read_text() if path.is_file() else None
        key = notebook_key(
            file_hash(source),
            parameters,
            profile.as_dict(),
            model_files,
            code,
            [keys[d] for d in entry.depends_on if d in in_plan],
            cfg.kernel,
        )
        keys[entry.id] = key
        task = Task(
            notebook=entry.id,
            title=entry.title,
            phase=entry.phase,
            week=entry.week,
            source=str(source),
            root=str(root),
            run_dir=str(run_dir),
            params_dir=str(pdir),
            kernel=cfg.kernel,
            parameters=parameters,
            key=key,
            depends_on=[d for d in entry.depends_on if d in in_plan],
            timeout=cfg.timeout,
            gpus=_gpus(models, profile, entry.study) if gpu_machine else 1,
        )
        # --force applies to what was asked for, not to dependencies pulled in to satisfy it.
        action, reason = _decide(cfg.force and entry.id not in added, run_dir, entry.id, key)
        items.append(PlanItem(entry, task, action, reason))
    # A notebook whose dependency reruns must rerun too (its inputs change even if its key would not).
    rerun = {i.entry.id for i in items if i.action == "run"}
    for item in items:
        if item.action == "skip" and any(d in rerun for d in item.entry.depends_on):
            item.action, item.reason = "run", "a dependency reruns"
            rerun.add(item.entry.id)
    return Plan(cfg, items, added, profile.as_dict())


def check_models(models: list[str] | None, pdir: Path) -> None:
    """Each --models name must be a params/models file, a known model, a hub id or an existing path."""
    files = {p.stem for p in (pdir / "models").glob("*.yaml")}
    rest = [m for m in models or [] if m not in files and not _is_reference(m)]
    if not rest:
        return
    # Deferred: esa.models imports torch and transformers (seconds), needed only for names no file defines.
    from esa.models import known_models
    from esa.models.micro import is_micro, parse_ref

    known = set(known_models())
    for name in rest:
        if is_micro(name):
            parse_ref(name)  # an unknown budget after '@' is an error too
        elif name not in known:
            hint = "Also accepted: a hub id (org/name), a local model folder or a .gguf file"
            raise unknown("model", name, files | known, hint=hint)


def _is_reference(name: str) -> bool:
    """A hub id (org/name) or a path that exists: passed to esa.models.load as is."""
    parts = name.split("/")
    hub_id = len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
    return hub_id or Path(name).expanduser().exists()


def _decide(force: bool, run_dir: Path, notebook: str, key: str) -> tuple[str, str]:
    if force:
        return "run", "--force"
    if is_up_to_date(run_dir, notebook, key, outputs(run_dir, notebook).executed):
        return "skip", "up to date"
    stamp = read_stamp(run_dir, notebook)
    if stamp is None:
        return "run", "no completed run"
    if stamp.get("status") != "ok":
        return "run", "last run failed"
    return "run", "source, parameters or code changed"


def format_plan(plan: Plan) -> str:
    cfg = plan.config
    lines = [
        f"run {cfg.run_name!r}: profile {cfg.profile}, {len(plan.items)} notebook(s), "
        f"{len(plan.to_run)} to run, executor {cfg.executor}, jobs {cfg.jobs}, kernel {cfg.kernel}",
        f"  run folder: {cfg.run_dir}",
    ]
    if plan.added_dependencies:
        lines.append(f"  added as dependencies of the selection: {', '.join(plan.added_dependencies)}")
    if cfg.executor != "process" and plan.to_run:
        levels = executors._levels([i.task for i in plan.to_run])
        lines.append(
            f"  submitit {cfg.executor}: {len(levels)} job array(s) of sizes {[len(lv) for lv in levels]}"
        )
        if cfg.executor == "slurm":
            cluster = executors.cluster_config(Path(plan.items[0].task.params_dir), "slurm")
            header = executors.sbatch_preview(
                cluster, cfg.run_dir / "submitit", max(len(lv) for lv in levels)
            )
            lines.extend("    " + line for line in header.splitlines())
    for n, item in enumerate(plan.items, 1):
        e = item.entry
        deps = f"  after {', '.join(item.task.depends_on)}" if item.task.depends_on else ""
        lines.append(
            f"  {n:>2}. [{e.phase_week:>4}] {e.id:<40} {item.action:<4} ({item.reason})  "
            f"models={','.join(item.task.parameters['models'])}{deps}"
        )
    return "\n".join(lines)


def predicted_plan(item: PlanItem, profile: Profile, measured: Any) -> StudyPlan | None:
    """A plan item's notebook's plan, a study's (schedule.yaml `study:`) or the week's (esa.phases.plans), with
    the seconds predicted from `measured` costs (esa.phases.costs; None: none predicted); None when the
    notebook has no plan. Loads nothing."""
    from esa.phases.command import STUDIES
    from esa.phases.plans import PLANS

    study = next((s for s in STUDIES if s.name == item.entry.study), None)
    if study is not None:
        S = study.settings(profile, None)
        models = None if getattr(S, "models", None) else item.task.parameters["models"]  # a section's models win
        return study.plan(S, profile, models).predict(measured)
    if item.entry.id in PLANS:
        return PLANS[item.entry.id](profile, item.task.parameters["models"]).predict(measured)
    return None


def study_plans(plan: Plan, gpu: str | None = None) -> list[str]:
    """Per notebook of the plan: its `predicted_plan`: its conditions, n, the criterion each serves and the
    seconds predicted from this machine's measured costs (esa.phases.costs), or from `gpu`'s FLOP plan
    (esa.phases.costs.GPUS: no GPU measured); loads nothing."""
    from esa.phases import costs, parts

    measured = costs.PlannedGpu(costs.GPUS[gpu]) if gpu else costs.load()
    profile = load_profile(plan.config.profile, plan.config.overrides)
    where = f"on the planned {gpu.upper()}" if gpu else "on this machine"
    if gpu:
        lines = [f"costs: planned for {measured.machine['cpu']}"]
    else:
        lines = [("costs: " + (f"measured on {measured.machine.get('cores')} cores, {measured.machine.get('cpu')}"
                               + ("" if measured.same_machine() else " (another machine: predictions are that "
                                                                     "machine's)"))
                  if measured else "costs: none measured here (make costs): no seconds predicted")]
    total, trained = 0.0, set[str]()
    for item in plan.items:
        p = predicted_plan(item, profile, measured)
        if p is None:
            lines.append(f"{item.entry.id}: no plan (it reads what the notebooks before it computed)")
            continue
        # a micro-suite member trained by an earlier notebook of this run is read from the cache after it
        p.conditions = [c for c in p.conditions if c.kind != "train" or c.priced not in trained]
        trained |= {c.priced for c in p.conditions if c.kind == "train"}
        total += p.seconds() or 0.0
        lines += [f"{item.entry.id}:"] + ["  " + ln for ln in p.lines(where=where)]
        # a notebook with parts: each part's prediction, and which the judged record holds already
        record = Path(plan.config.root) / "reports" / "record"
        lines += ["  " + ln for ln in parts.plan_lines(p, item.entry.id, profile, item.task.parameters["models"],
                                                      record)]
    lines.append(f"predicted for the studies above: {total / 60:.0f} min {where}" if measured else "")
    return lines


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class RunResult:
    exit_code: int
    index: Path
    results: dict[str, dict[str, Any]]
    failures: list[str]


def run(cfg: RunConfig) -> RunResult:
    """Execute the plan; failures are collected (others still run unless fail_fast); exit code 1 on any."""
    plan = make_plan(cfg)
    run_dir = cfg.run_dir.resolve()
    for target, what in ((run_dir, "run folder"), (figures_dir(Path(cfg.root), cfg.run_name), "figures folder")):
        problem = store.write_problem(target)
        if problem:
            raise EsaError(f"the {what} {target} cannot be written: {problem}")
    store.check_cache_writable()
    _log(format_plan(plan))
    if plan.to_run:
        nbrun.check_kernel(cfg.kernel)
        executors.preflight(cfg.executor)
    started = time.time()
    created = [p for p in (run_dir, figures_dir(Path(cfg.root), cfg.run_name)) if not p.exists()]
    done: dict[str, dict[str, Any]] = {}
    try:
        return _run_locked(cfg, plan, run_dir, started, done, fresh=run_dir in created)
    except KeyboardInterrupt:
        if created and not done:  # Ctrl-C before anything finished: leave no folder this run made (its lock too)
            for folder in created:
                shutil.rmtree(folder, ignore_errors=True)
        raise


def _run_locked(cfg: RunConfig, plan: Plan, run_dir: Path, started: float, done: dict[str, dict[str, Any]],
                fresh: bool) -> RunResult:
    with run_lock(run_dir):
        if cfg.verify_cache:
            verify_cache()
        for folder in (run_dir, figures_dir(Path(cfg.root), cfg.run_name)):
            if folder.is_dir():
                for path in remove_partial_files(folder):
                    _log(f"  removed partial file left by an interrupted run: {path}")
        total = len(plan.to_run)
        counter = {"n": 0}

        def on_done(result: dict[str, Any]) -> None:
            counter["n"] += 1
            done[result["notebook"]] = result
            status = result.get("status")
            extra = f" ({result['reason']})" if result.get("reason") else ""
            _log(
                f"[{counter['n']}/{total}] {result['notebook']}: {status} in {result.get('seconds', 0):.1f} s{extra}"
            )
            if status == "failed" and result.get("failure"):
                _log("  " + result["failure"]["summary"].replace("\n", "\n  "))

        opts = executors.ExecOptions(
            run_dir=run_dir,
            jobs=cfg.jobs,
            fail_fast=cfg.fail_fast,
            params_dir=Path(plan.items[0].task.params_dir) if plan.items else None,
            cluster=executors.cluster_config(Path(os.environ["ESA_PARAMS_DIR"]), cfg.executor)
            if cfg.executor != "process"
            else {},
        )
        try:
            results = executors.get_executor(cfg.executor)([i.task for i in plan.to_run], opts, on_done)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (esa.runner.lifeline): the workers are stopped by now
            if done or not fresh:  # nothing finished in a folder this run made: the caller removes it instead
                _mark_interrupted(plan, done, started)
            raise
        for item in plan.items:
            if item.action == "skip":
                _log(f"  {item.entry.id}: up to date, skipped")
        finished = time.time()
        write_manifest(plan, results, started, finished)
        index = build_index(cfg)
    failures = [
        r["failure"]["summary"] if r.get("failure") else f"{name}: {r.get('status')} ({r.get('reason', '')})"
        for name, r in results.items()
        if r.get("status") != "ok"
    ]
    if failures:
        _log(f"\n{len(failures)} notebook(s) did not finish ok:")
        for f in failures:
            _log("  - " + f.replace("\n", "\n    "))
    return RunResult(1 if failures else 0, index, results, failures)


def _mark_interrupted(plan: Plan, done: dict[str, dict[str, Any]], started: float) -> None:
    """Write the manifest of an interrupted run: what finished, what did not; the stamps stay as they are."""
    results = dict(done)
    for item in plan.to_run:
        if item.entry.id not in results:
            results[item.entry.id] = {
                "notebook": item.entry.id,
                "status": "interrupted",
                "reason": "the run was interrupted before it finished; rerun the same command to resume",
            }
    try:
        write_manifest(plan, results, started, time.time(), status="interrupted")
        build_index(cfg=plan.config)
    except Exception as err:  # noqa: BLE001 - best effort: must not hide the interrupt itself
        _log(f"  could not write the manifest of the interrupted run: {type(err).__name__}: {err}")


def verify_cache() -> list[tuple[Path, str]]:
    """--verify-cache: hash every sealed cache entry; corrupt ones are named and quarantined (recomputed)."""
    _log(f"verifying the cache under {store.cache_root()} (every file's size, header and digest)")
    bad = store.verify_cache()
    for entry, reason in bad:
        _log(f"  corrupt, moved aside (it will be recomputed): {entry}: {reason}")
    _log(f"  {len(bad)} corrupt entr{'y' if len(bad) == 1 else 'ies'}")
    return bad


def write_manifest(
    plan: Plan,
    results: dict[str, dict[str, Any]],
    started: float,
    finished: float,
    status: str | None = None,
) -> Path:
    """The run's manifest; `status` is ok | failed | interrupted (default: from the results)."""
    cfg = plan.config
    if status is None:
        status = "ok" if all(r.get("status") == "ok" for r in results.values()) else "failed"
    run_dir = cfg.run_dir.resolve()
    actions = {i.entry.id: ("executed" if i.action == "run" else "skipped (up to date)") for i in plan.items}
    notebooks = []
    for name, stamp in all_stamps(run_dir).items():
        entry = {
            k: stamp.get(k)
            for k in (
                "notebook",
                "title",
                "phase",
                "week",
                "status",
                "started",
                "seconds",
                "key",
                "parameters",
                "cuda_visible_devices",
            )
        }
        entry["this_invocation"] = actions.get(name, "not selected")
        if stamp.get("failure"):
            entry["failure"] = stamp["failure"].get("summary")
        notebooks.append(entry)
    by_name = {n["notebook"]: n for n in notebooks}
    for name, res in results.items():  # not run or interrupted: no stamp was written in this invocation
        if res.get("status") not in ("not run", "interrupted"):
            continue
        if name in by_name:  # the stamp of an earlier invocation stays; say what happened in this one
            by_name[name].update(this_invocation=res["status"], reason=res.get("reason"))
        else:
            status = res["status"]
            notebooks.append(
                {"notebook": name, "status": status, "reason": res.get("reason"), "this_invocation": status}
            )
    manifest = {
        "run_id": cfg.run_name,
        "status": status,
        "profile": cfg.profile,
        "profile_settings": plan.profile,
        "models": cfg.models,
        "overrides": cfg.overrides,
        "only": cfg.only,
        "executor": cfg.executor,
        "jobs": cfg.jobs,
        "kernel": cfg.kernel,
        "force": cfg.force,
        "verify_cache": cfg.verify_cache,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
        "wall_seconds": round(finished - started, 2),
        "command": sys.argv,
        "environment": environment(),
        "code_hash": code_hash(),
        "notebooks": notebooks,
    }
    return write_json(run_dir / "manifest.json", manifest)


def build_index(cfg: RunConfig) -> Path:
    order: list[str] = []
    with contextlib.suppress(EsaError):  # a broken schedule must not stop the index: use stamp order
        order = [e.id for e in schedule.entries()]
    return write_index(cfg.run_dir.resolve(), figures_dir(Path(cfg.root), cfg.run_name).resolve(), order)


def latest_run(root: Path) -> str:
    manifests = sorted((root / "reports").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        raise EsaError(f"no run with a manifest under {root / 'reports'}; run run_all.py first")
    return manifests[-1].parent.name


def generate_docs(cfg: RunConfig) -> Path:
    """Re-render both HTMLs of every executed notebook of a run and its index, without executing.

    The run is `cfg.run_id` if given, else the run whose manifest was written last.
    """
    if cfg.run_id is None:
        cfg.run_id = latest_run(Path(cfg.root))
    run_dir = cfg.run_dir.resolve()
    if not run_dir.is_dir():
        raise EsaError(f"no run folder {run_dir}")
    with run_lock(run_dir):
        for name in all_stamps(run_dir):
            out = outputs(run_dir, name)
            if out.executed.is_file():
                nbrun.render_html(out.executed, out.html, out.html_nocode)
                _log(f"  rendered {name}")
        return build_index(cfg)
