"""Command line of run_all.py: parse flags into a RunConfig and run, plan or re-render."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esa.errors import EsaError, machine_failure
from esa.params import yaml_load
from esa.phases import costs
from esa.runner import record
from esa.runner.driver import RunConfig, format_plan, generate_docs, make_plan, run, study_plans, verify_cache
from esa.runner.executors import EXECUTORS
from esa.runner.lifeline import Terminated, sigterm_as_interrupt
from esa.store import REPO_ROOT


def _overrides(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EsaError(f"--set expects KEY=VALUE (a profile setting), got {pair!r}")
        # "8" -> 8, "[1,2]" -> [1, 2], "null" -> None; malformed YAML or a !!tag: one line naming the --set
        out[key.strip()] = yaml_load(value, f"--set {pair}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_all.py",
        description="Execute the notebooks of params/schedule.yaml with papermill into reports/<run>/, render "
        "HTML with and without code, and write reports/<run>/index.html and a manifest.",
        epilog="The run id defaults to the profile name, so a rerun reuses reports/<profile>/ and skips every "
        "notebook whose source, parameters and lib/esa code are unchanged since its last successful run.",
    )
    p.add_argument(
        "--profile", default="smoke", help="params/profiles/<name>.yaml (smoke, standard, extended)"
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SEL",
        help="phase (1), phase/week (2/3) or notebook id; repeatable or comma-separated",
    )
    p.add_argument("--models", help="comma list of models for every notebook (overrides the schedule)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile setting, e.g. --set eval_windows=4 (repeatable)",
    )
    p.add_argument("--run-id", help="run folder name under reports/ (default: the profile name)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--gpu-plan", choices=sorted(costs.GPUS), default=None,
                   help="with --dry-run: predict seconds for this GPU from each pass's FLOPs and launch floor "
                        "(esa.phases.costs: planned, not measured) instead of this machine's measured costs")
    p.add_argument("--force", action="store_true", help="rerun selected notebooks even if up to date")
    p.add_argument("--fail-fast", action="store_true", help="start nothing new after the first failure")
    p.add_argument("--no-deps", action="store_true",
                   help="run only the --only selection, not the notebooks it depends on")
    p.add_argument("--jobs", type=int, default=1, help="notebooks run concurrently (one GPU each if any)")
    p.add_argument(
        "--executor",
        default="process",
        choices=sorted(EXECUTORS),
        help="process: local worker processes; slurm: submitit job arrays; local: submitit locally",
    )
    p.add_argument("--kernel", default="esa", help="Jupyter kernel name (make installs 'esa' into the venv)")
    p.add_argument("--timeout", type=float, help="per-cell time limit in seconds (default none)")
    p.add_argument(
        "--generate-docs",
        action="store_true",
        help="re-render HTML and index of a run (--run-id, default the latest) without executing",
    )
    p.add_argument(
        "--verify-cache",
        action="store_true",
        help="check every sealed cache entry first (corrupt ones are named and moved aside, so they are "
        "recomputed); every cache read is checked in any case",
    )
    p.add_argument("--record", action="store_true",
                   help="run the --only selection as one chunk of the judged record and publish what finished ok "
                        "into reports/record/ (esa.runner.record); its dependencies must be in the record already")
    p.add_argument("--part", metavar="UNIT",
                   help="with --record and --only <notebook>: record only UNIT's part of that notebook, a model "
                        "(weeks 2, 7, pruning) or <model>@seed<N> (fine-tuning) "
                        "(reports/record/parts/<notebook>/<unit>/); the notebook's chunk then reads it instead of "
                        "computing that unit (esa.phases.parts; --dry-run lists each notebook's parts)")
    p.add_argument("--verify-record", metavar="NOTEBOOK",
                   help="re-run one committed chunk of reports/record/ in a scratch folder and check its numbers "
                        "equal the committed ones")
    p.add_argument("--overwrite", action="store_true",
                   help="with --record: clear a record written by other code or another profile first")
    p.add_argument("--root", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    p.add_argument("--notebooks-dir", type=Path, help="notebook sources (default <repo>/notebooks)")
    p.add_argument("--params-dir", type=Path, help="params folder (default $ESA_PARAMS_DIR or <repo>/params)")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if args.models is not None and not models:
        raise EsaError("--models is empty; give a comma list such as smollm2-135m,gemma3-270m")
    return RunConfig(
        profile=args.profile,
        only=list(args.only),
        models=models,
        overrides=_overrides(args.overrides),
        run_id=args.run_id,
        root=args.root.resolve(),
        notebooks_dir=args.notebooks_dir,
        params_dir=args.params_dir,
        kernel=args.kernel,
        force=args.force,
        fail_fast=args.fail_fast,
        with_deps=not args.no_deps,
        jobs=args.jobs,
        executor=args.executor,
        timeout=args.timeout,
        verify_cache=args.verify_cache,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return _run(args)
    except Terminated:
        # Same clean-up as Ctrl-C (workers stopped, run marked interrupted); 128 + SIGTERM, as the shell says.
        print(
            "run_all.py: terminated (SIGTERM); the run is marked interrupted, completed notebooks are kept; "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        return 143


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if args.overwrite and not args.record:
            raise EsaError("--overwrite only applies to --record (it clears a record of other code or profile)")
        if args.part is not None and not (args.record or args.verify_record):
            raise EsaError("--part only applies to --record (it records one unit of a notebook into reports/record/) "
                           "or --verify-record (it recomputes that committed part)")
        if args.gpu_plan and not args.dry_run:
            raise EsaError(f"--gpu-plan {args.gpu_plan} only applies to --dry-run (it plans seconds, it runs nothing)")
        if args.verify_record:
            if args.part is not None:
                (diffs, exact), what = record.verify_part(cfg, args.verify_record, args.part), f"part {args.part} of"
            else:
                (diffs, exact), what = record.verify(cfg, args.verify_record), "chunk"
            for d in diffs:
                print(f"  {d}", file=sys.stderr)
            same = ("numbers equal the committed record" if exact else
                    "its judgement equals the committed record (verdicts and table shapes; another CPU's numbers differ "
                    "as listed)")
            print(f"run_all.py: {what} {args.verify_record}: "
                  + (f"{len(diffs)} difference(s) from the committed record" if diffs else same))
            return 1 if diffs else 0
        if args.record:
            if args.dry_run or args.generate_docs or args.run_id:
                raise EsaError("--record runs into reports/record/; it takes no --dry-run, --generate-docs or --run-id")
            if not cfg.only:
                raise EsaError("--record needs --only: a chunk is one notebook or a few (each under 2 h)")
            if args.part is not None:
                if args.overwrite:
                    raise EsaError("--part takes no --overwrite (a part joins the record as it is)")
                path = record.run_part(cfg, args.part)
                print(f"run_all.py: part recorded in {path}; the chunk (--only {cfg.only[0]} --record) reads it")
                return 0
            result = record.run_chunk(cfg, overwrite=args.overwrite)
            print(result.index if not result.failures else "run_all.py: the chunk failed; reports/record/ unchanged")
            return result.exit_code
        if args.generate_docs:
            index = generate_docs(cfg)
        elif args.dry_run:
            plan = make_plan(cfg)
            if cfg.verify_cache:
                verify_cache()
            print(format_plan(plan))
            print("\n".join(study_plans(plan, args.gpu_plan)))
            return 0
        else:
            result = run(cfg)
            print(result.index)
            return result.exit_code
    except EsaError as err:
        print(f"run_all.py: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        raise
    except OSError as e:
        line = machine_failure(e)
        if line is None:
            raise  # anything else is a bug: keep its traceback
        print(f"run_all.py: error: {line}; completed notebooks are kept (free space or fix the permissions, then "
              "rerun the same command to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Completed notebooks have their stamps; partial files are temporary names, removed next run.
        print(
            "run_all.py: interrupted; completed notebooks are kept (a run folder this run created with nothing "
            "finished is removed), rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    print(index)
    return 0
