"""`esa-runner`: the research guide's command line. It parses and validates flags, then calls the phases layer.

    esa-runner --model smollm2-135m --metric grad_x_weight --topk 50 --max-samples 50 --seeds 1337 --verbose

Unset flags take the values of `--profile` (default: smoke). Every flag is checked before anything is
loaded, and a bad one is refused with one line naming the value and what is accepted. Without `--out-dir`
the outputs go to `outputs/esa/<model>/<metric>_<mode>_k<k>/`, and the path is printed at the end. Outputs
are built in a staging folder inside the out dir and moved into place only when the run has succeeded; a
folder holding another configuration's outputs is refused unless `--overwrite` is given, and a second
esa-runner on the same folder is refused while the first runs. The work itself is `esa.phases.command`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from esa.data import check_corpus
from esa.dispatch import check_device
from esa.errors import EsaError, machine_failure, unknown
from esa.models import DTYPES, EMBEDDED
from esa.models.loader import (
    ATTN_KERNELS,
    DEVICE_MAPS,
    check_attn,
    check_device_map,
    check_local_model,
    is_hub_ref,
    parse_max_memory,
    placement,
)
from esa.params import check_seed, load_profile, model_params
from esa.perturb.controls import CONTROLS, parse_controls
from esa.perturb.ops import PERTURBATIONS, PerturbSpec, parse_perturbations, parse_scales
from esa.phases import command, memplan
from esa.phases.study import RunContext, Study, check_request, flag_name, options
from esa.progress import quiet
from esa.recipes import Recipe
from esa.sensitivity.metrics import METRICS
from esa.sensitivity.select import MODES
from esa.store import atomic_folder, check_cache_writable, folder_lock, write_json

log = logging.getLogger("esa.cli")

# the common flags a study may take as the user's explicit choice over its profile section (RunContext.explicit)
_COMMON = ("corpus", "seqlen", "max_samples", "batch_size", "topk", "mode", "metric", "dtype", "seeds")
MANIFEST = "esa-runner.json"  # the settings of the outputs in an out dir


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="esa-runner", description="Extreme-sensitivity analysis of a language model.")
    p.add_argument("--profile", default="smoke", help="params/profiles/<name>.yaml giving defaults for unset flags")
    p.add_argument("--model", help=f"embedded name ({', '.join(EMBEDDED)}), tiny-*, .gguf, folder or hub id")
    p.add_argument("--metric", help=f"metric, comma list, or 'all' ({', '.join(METRICS)})")
    p.add_argument("--mode", help="per_layer (top-k in each matrix) or global (top-k over all)")
    p.add_argument("--topk", type=int, help="weights selected per matrix (per_layer) or overall (global)")
    p.add_argument("--max-samples", type=int, help="calibration windows per seed")
    p.add_argument("--seeds", help="comma-separated calibration seeds, e.g. 1337,123,999")
    p.add_argument("--stability-check", action="store_true", help="Jaccard / rank correlation across seeds")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (fp32/bf16/fp16); scores accumulate in fp32")
    p.add_argument("--save-plots", action="store_true", help="write figures into the out dir")
    p.add_argument("--out-dir", help="folder for topk.parquet, summary.json, figures "
                                     "(default: outputs/esa/<model>/<metric>_<mode>_k<k>/)")
    p.add_argument("--overwrite", action="store_true", help="clear an out dir that holds another run's outputs")
    p.add_argument("--run-id", help="a name for this run, written into every table (default: a timestamp)")
    p.add_argument("--perturb", help=f"perturbation(s), comma list ({', '.join(PERTURBATIONS)})")
    p.add_argument("--perturb-scale", help="perturbation scale, or a comma list of scales for a dose-response sweep "
                                           "(e.g. 0.005,0.01,0.1); needs --perturb")
    p.add_argument("--perturb-prob", help="bit_flip probability per selected weight (or a comma list); needs --perturb")
    p.add_argument("--controls", help=f"control sets, comma list ({', '.join(CONTROLS)}); needs --perturb")
    p.add_argument("--weight-analysis", action="store_true", help="massive-activation channels and magnitudes")
    p.add_argument("--architecture-analysis", action="store_true", help="attention vs FFN shares per layer")
    p.add_argument("--verbose", action="store_true", help="log what is being done")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also ESA_PROGRESS=0)")
    p.add_argument("--corpus", help="calibration corpus (shakespeare, wikitext2, c4, or a text file)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, help="windows per forward/backward micro-batch")
    p.add_argument("--hutchinson-probes", type=int, help="Rademacher probes for hutchinson_diag")
    p.add_argument("--per-batch", action="store_true", help="grad_x_weight as mean_b |w g_b| (default |w * mean g|)")
    p.add_argument("--no-cache", action="store_true", help="recompute scores even if cached (and rewrite the entry)")
    p.add_argument("--keep-scores", action="store_true",
                   help="cache entries also keep every weight's score (bf16, 2 bytes a weight; default: candidates only)")
    p.add_argument("--candidate-depth", type=int, default=None,
                   help="top/bottom candidates per matrix a cache entry stores (default: the profile's, 1000)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available); wins over a params file's "
                   "device_map")
    p.add_argument("--device-map", help=f"spread the model over the visible devices ({', '.join(DEVICE_MAPS)}); "
                   "not with --device")
    p.add_argument("--max-memory", help="per-device budget for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    p.add_argument("--attn", help=f"attention kernel ({', '.join(ATTN_KERNELS)}; default sdpa, the Hessian pass "
                   "switches to SDPA's math kernel itself)")
    p.add_argument("--revision", help="branch, tag or commit of a hub id")
    p.add_argument("--dry-run", action="store_true",
                   help="print what the run would compute (each requested study's plan), check it, load nothing")
    for study in command.STUDIES:  # Phase 5: --prune, --finetune, --attack/--faults, --roles (esa.phases.phase5_*)
        add_study_flags(p, study)
    return p


# ---------------------------------------------------------------- a study's flags, from its Request's fields
def _base_type(hint: Any) -> Any:
    """int / float / str / bool / list[...] behind an optional hint."""
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    return hint


def add_study_flags(p: argparse.ArgumentParser, study: Study) -> None:
    """One flag per `option` field of the study's Request; help lists the registry's names as they are now."""
    g = p.add_argument_group(study.title)
    hints = get_type_hints(study.Request)
    for f, opt in options(study.Request):
        text = opt.help + (f" ({', '.join(opt.choices())})" if opt.choices is not None else "")
        kind = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f"{study.name}__{f.name}", "help": text}
        if kind is bool:
            kw["action"] = "store_true"
        elif opt.const is not None:
            kw.update(nargs="?", const=opt.const)
        if kind is not bool:
            kw["metavar"] = opt.metavar or f.name.upper()
        g.add_argument(flag_name(f), **kw)


def _typed(flag: str, text: Any, hint: Any, accepts: str | None = None) -> Any:
    """A flag's text as the Request field's type; a bad value is one EsaError naming the flag and what it
    accepts (the option's `accepts`, or the type's)."""
    kind = _base_type(hint)
    if text is None or kind is bool or not isinstance(text, str):
        return text
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        values = _csv(text)
        if not values:
            raise EsaError(f"{flag} is empty; give {accepts or 'a comma list'}")
        return [_typed(flag, v, item, accepts or "a comma list of numbers") for v in values]
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            what = accepts or ("a whole number" if kind is int else "a number")
            raise EsaError(f"{flag} must be {what}, got {text!r}") from None
    return text


def study_request(args: argparse.Namespace, study: Study) -> Any:
    """The study's Request built from the parsed flags (each converted to its field's type)."""
    hints = get_type_hints(study.Request)
    values = {}
    for f, opt in options(study.Request):
        v = _typed(flag_name(f), getattr(args, f"{study.name}__{f.name}", None), hints[f.name], opt.accepts)
        if v is not None and opt.check is not None and not isinstance(v, bool):
            opt.check(v, flag_name(f))
        values[f.name] = v
    return study.Request(**{k: v for k, v in values.items() if v is not None})


def _positive(name: str, value: int | None, default: int, minimum: int = 1) -> int:
    """A size flag: the profile's value when unset; zero or negative is refused, never replaced."""
    if value is None:
        return default
    if value < minimum:
        raise EsaError(f"--{name} must be at least {minimum}, got {value}")
    return value


def _seeds(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return list(default)
    try:
        seeds = [int(s) for s in _csv(text)]
    except ValueError as e:
        raise EsaError(f"--seeds must be comma-separated integers, got {text!r}") from e
    if not seeds:
        raise EsaError("--seeds is empty; give at least one seed, e.g. --seeds 1337")
    for s in seeds:
        check_seed(s, "--seeds")
    if len(set(seeds)) != len(seeds):
        raise EsaError(f"--seeds has duplicates: {text}")
    return seeds


def resolve(args: argparse.Namespace) -> command.Command:
    """Every flag checked and merged with the profile, before anything is loaded; raises EsaError on the first bad one."""
    prof = load_profile(args.profile)
    metrics = _csv(args.metric) if args.metric else list(prof.metrics[:1])
    if metrics == ["all"]:
        metrics = list(METRICS)
    if not metrics:
        raise EsaError("--metric is empty; accepted: " + ", ".join(METRICS))
    for m in metrics:
        METRICS.lookup(m)
    mode = args.mode or prof.mode
    if mode not in MODES:
        raise unknown("mode", mode, MODES)
    dtype = args.dtype or prof.dtype
    if dtype not in DTYPES:
        raise unknown("dtype", dtype, DTYPES)
    seeds = _seeds(args.seeds, prof.seeds)
    if args.stability_check and len(seeds) < 2:
        raise EsaError("--stability-check needs at least two seeds")
    corpus = args.corpus or prof.corpus
    check_corpus(corpus)
    check_device(args.device)
    perturbations = parse_perturbations(args.perturb) if args.perturb else []
    for flag in ("perturb_scale", "perturb_prob", "controls"):
        if getattr(args, flag) is not None and not perturbations:
            raise EsaError(f"--{flag.replace('_', '-')} needs --perturb (it only changes the perturbation sweep)")
    scales = parse_scales(args.perturb_scale) if args.perturb_scale is not None else [prof.perturb_scale]
    probs = parse_scales(args.perturb_prob) if args.perturb_prob is not None else [prof.perturb_prob]
    for p in probs:
        PerturbSpec("bit_flip", prob=p)  # validates 0 <= p <= 1 with the standard message
    controls = parse_controls(args.controls) if args.controls is not None else list(prof.controls)
    recipe = Recipe.of(
        prof, corpus=corpus, dtype=dtype, seqlen=_positive("seqlen", args.seqlen, prof.seqlen, 2),
        max_samples=_positive("max-samples", args.max_samples, prof.max_samples), seeds=seeds,
        topk=_positive("topk", args.topk, prof.topk), mode=mode, metrics=list(dict.fromkeys(metrics)),
        hutchinson_probes=_positive("hutchinson-probes", args.hutchinson_probes, prof.hutchinson_probes),
        batch_size=_positive("batch-size", args.batch_size, prof.batch_size), per_batch=args.per_batch,
        perturbations=perturbations or list(prof.perturbations), controls=controls,
        refresh_cache=args.no_cache, keep_scores=args.keep_scores or prof.keep_scores,
        candidate_depth=_positive("candidate-depth", args.candidate_depth, prof.candidate_depth), show_progress=not args.quiet and os.environ.get("ESA_PROGRESS", "1") != "0",
    )
    if recipe.topk > recipe.candidate_depth and not recipe.keep_scores:
        raise EsaError(f"--topk {recipe.topk} is deeper than the {recipe.candidate_depth} candidates a cache entry "
                       f"stores per matrix: add --candidate-depth {recipe.topk} or --keep-scores")
    model = args.model or prof.models[0]
    mp = model_params(model)
    check_local_model(mp.ref)
    device_map = check_device_map(args.device_map)
    placement(args.device, device_map, None, "")  # --device with --device-map: refused here, before any work
    max_memory = parse_max_memory(args.max_memory)
    if max_memory is not None and device_map is None and mp.device_map is None:
        raise EsaError("--max-memory budgets a device map; add --device-map (accepted: " + ", ".join(DEVICE_MAPS) + ")")
    if args.revision is not None and not is_hub_ref(mp.ref):
        raise EsaError(f"--revision picks a version of a hub id; {mp.ref!r} is not one (an embedded, test or local model)")
    explicit = frozenset(k for k in _COMMON if getattr(args, k, None) not in (None, False))
    ctx = RunContext(prof, model, recipe, explicit, dry_run=args.dry_run)
    apps = {}
    for study in command.STUDIES:
        request = study_request(args, study)
        if check_request(study, request):
            apps[study.name] = study.job(request, ctx)
    flags = {k.split("__")[-1]: v for k, v in vars(args).items() if v not in (None, False)}
    return command.Command(
        model=model, recipe=recipe, profile=args.profile,
        run_id=args.run_id or time.strftime("%Y%m%d-%H%M%S"), device=args.device, device_map=device_map,
        max_memory=max_memory, attn=check_attn(args.attn), revision=args.revision,
        stability_check=args.stability_check, weight_analysis=args.weight_analysis,
        architecture_analysis=args.architecture_analysis, save_plots=args.save_plots, perturb=bool(perturbations),
        perturb_scales=tuple(scales), perturb_probs=tuple(probs), flags=flags, apps=apps)


def default_out_dir(cmd: command.Command) -> Path:
    """outputs/esa/<model>/<metric>_<mode>_k<k>/, as the research guide lays results out."""
    r = cmd.recipe
    metric = "all" if set(r.metrics) == set(METRICS) and len(r.metrics) > 1 else "+".join(r.metrics)
    model = cmd.model.replace("/", "--").replace(os.sep, "--").strip(".-") or "model"
    return Path("outputs") / "esa" / model / f"{metric}_{r.mode}_k{r.topk}"


def _comparable(cmd: command.Command) -> dict[str, Any]:
    """The settings that decide an out dir's content (not the run id)."""
    s = cmd.settings()
    s.pop("run_id")
    return json.loads(json.dumps(s, default=str))


def prepare_out_dir(out: Path) -> bool:
    """Check (before any work) that `out` is a writable folder, creating it; returns whether it was created here."""
    if out.exists() and not out.is_dir():
        raise EsaError(f"--out-dir {out} exists and is not a folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise EsaError(f"--out-dir {out} lies under {parent}, which is a file")
    if str(out.resolve()).startswith(("/proc", "/sys")):
        raise EsaError(f"--out-dir {out} is inside a virtual file system; choose a normal folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EsaError(f"--out-dir {out} cannot be created: {e.strerror or e}") from e
    if not os.access(out, os.W_OK):
        raise EsaError(f"--out-dir {out} is not writable")
    return created


def claim_out_dir(out: Path, cmd: command.Command, overwrite: bool) -> None:
    """With the out dir locked: refuse another configuration's outputs unless `overwrite`, which clears them."""
    content = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not content:
        return
    if overwrite:
        for p in content:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    manifest = out / MANIFEST
    mine = _comparable(cmd)
    theirs = json.loads(manifest.read_text()).get("settings") if manifest.is_file() else None
    if theirs != mine:
        what = "outputs of another configuration" if theirs else "files esa-runner did not write"
        diff = sorted(k for k in mine if theirs and theirs.get(k) != mine[k])
        raise EsaError(f"--out-dir {out} holds {what}{f' (differs in {diff})' if diff else ''}; "
                       "give a new --out-dir, or --overwrite to clear it")


def execute(cmd: command.Command, out: Path) -> dict[str, Any]:
    """Run `cmd` into a staging folder inside `out` (esa.store.atomic_folder), which moves every output into
    place only when the run has succeeded, and first removes the staging folders of runners that were killed."""
    with atomic_folder(out, into=True) as stage:
        t0 = time.perf_counter()
        lm = command.load_model(cmd)
        load_s = time.perf_counter() - t0
        summary = command.run(cmd, lm, stage)
        summary["timings"]["load_s"] = load_s
        write_json(stage / "summary.json", summary)
        write_json(stage / MANIFEST, {"settings": _comparable(cmd), "run_id": cmd.run_id,
                                      "files": sorted(p.name for p in stage.iterdir())})
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        quiet()
    out: Path | None = None
    created = False
    try:
        cmd = resolve(args)
        if args.dry_run:
            print("\n".join(dry_run_lines(cmd, args)))
            return 0
        out = Path(args.out_dir) if args.out_dir else default_out_dir(cmd)
        check_cache_writable()  # every output target is checked before the model loads
        created = prepare_out_dir(out)
        with folder_lock(out, what="out dir", hint="give another --out-dir", command="esa-runner"):
            claim_out_dir(out, cmd, args.overwrite)
            summary = execute(cmd, out)
    except EsaError as e:
        _drop_if_empty(out, created)
        print(f"esa-runner: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        line = machine_failure(e)
        if line is None:
            raise  # anything else is a bug: keep its traceback
        _drop_if_empty(out, created)
        print(f"esa-runner: error: {line}; nothing of this run was kept (free space or fix the permissions, then "
              "rerun)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        removed = _drop_if_empty(out, created)
        where = ("" if out is None else f"; the out dir {out} it created was removed" if removed
                 else f"; {out} holds only what earlier runs finished")
        print(f"esa-runner: interrupted (Ctrl-C): nothing of this run was kept (outputs are moved into place only "
              f"when a run finishes){where}", file=sys.stderr)
        return 130
    print(_report(summary, cmd, out))
    return 0


def dry_run_lines(cmd: command.Command, args: argparse.Namespace) -> list[str]:
    """What the run would compute, from settings alone: each requested study's plan, or the scoring run's."""
    prof = load_profile(args.profile)
    r = cmd.recipe
    lines = [f"esa-runner (dry run): {cmd.model}, profile {cmd.profile}; scores {', '.join(r.metrics)} x seeds "
             f"{list(r.seeds)} on {r.max_samples} x {r.seqlen} calibration tokens, {r.mode} top-{r.topk}"]
    for study in command.STUDIES:
        if study.name in cmd.apps:
            job = cmd.apps[study.name]
            plan = study.plan(job.settings, prof, [args.model] if args.model else None)
            lines += plan.lines() + [f"esa-runner {flag_name_of(study)}: {job.describe()}: settings checked"]
    try:  # the profile's passes (every metric it lists: the notebooks run them all), on the meta device
        lines += memplan.lines(cmd.model, r.but(metrics=list(dict.fromkeys([*r.metrics, *prof.metrics]))),
                               profile=prof)
    except EsaError as e:
        lines.append(str(e))
    lines.append("nothing loaded (dry run)")
    return lines


def flag_name_of(study: Study) -> str:
    return " / ".join("--" + t.replace("_", "-") for t in study.trigger)


def _drop_if_empty(out: Path | None, created: bool) -> bool:
    """Remove an out dir this run created that holds nothing finished (only its lock files); True if removed."""
    if out is not None and created and out.is_dir() and not _has_outputs(out):
        shutil.rmtree(out, ignore_errors=True)
        return True
    return False


def _has_outputs(out: Path) -> bool:
    return any(not p.name.startswith(".") for p in out.iterdir())


def _report(summary: dict[str, Any], cmd: command.Command, out: Path) -> str:
    r = cmd.recipe
    lines = [f"esa-runner: {cmd.model}, {', '.join(r.metrics)}, {r.mode} top-{r.topk}, "
             f"seeds {list(r.seeds)}, {summary['timings']['total_s']:.1f} s"]
    for metric, by_seed in summary["metrics"].items():
        seed, info = next(iter(by_seed.items()))
        t = info["tails"]
        lines.append(f"  {metric} (seed {seed}): top-1% mean / median = {t['top_mean_over_median']:.3g}, "
                     f"max / median = {t['max_over_median']:.3g}, Hill alpha = {t['hill_alpha']:.3g}")
        for rec in info["top10_global"][:3]:
            lines.append(f"    {rec['param']}[{rec['row']}, {rec['col']}] score {rec['score']:.4g}")
        if metric in summary["stability"]:
            j = summary["stability"][metric]["jaccard"]
            lines.append(f"    stability: mean pairwise Jaccard {j['mean']:.3f} (sd {j['std']:.3f})")
    if p := summary.get("prune"):
        s = p["spec"]
        lines.append(f"  prune {s['method']} {s['pattern']} (achieved sparsity {p['achieved_sparsity']:.3f}): "
                     f"PPL {p['dense_ppl']:.4g} dense -> {p['ppl']:.4g}")
        zs = p.get("zeroshot", {})
        for key in [k for k in zs if k.endswith("acc") or k == "zs_accuracy"]:
            name = zs["task"].get("task", "next_line") if key == "zs_accuracy" else key[3:-4]
            n = f", {zs['task']['n_items']} items, chance {zs['task']['chance']:.0%}" if key == "zs_accuracy" else ""
            lines.append(f"    zero-shot {name} ({zs['engine']}{n}): accuracy {zs[key]['dense']:.3f} dense -> "
                         f"{zs[key]['pruned']:.3f}")
    lines.append(f"outputs: {out.resolve()}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
