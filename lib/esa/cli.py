"""`esa-runner`: the research guide's command line over lib/esa.

    esa-runner --model smollm2-135m --metric grad_x_weight --topk 100 --max-samples 8 \
        --seeds 1337,123 --stability-check --out-dir results/

Unset flags take the values of `--profile` (default: smoke). Every input is checked before any work;
outputs are built in a staging folder inside --out-dir and moved into place only when the run has
succeeded, so a failed run leaves nothing half-written. Outputs: topk.parquet (one row per selected
weight: metric, seed, param, layer, component, kind, expert, row, col, score, rank), summary.json,
figures (--save-plots), and whatever the perturbation stage writes (--perturb).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from esa.errors import EsaError, unknown

log = logging.getLogger("esa.cli")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="esa-runner", description="Extreme-sensitivity analysis of a language model.")
    p.add_argument("--profile", default="smoke", help="params/profiles/<name>.yaml giving defaults for unset flags")
    p.add_argument("--model", help="embedded name (smollm2-135m, gemma3-270m), tiny-*, .gguf, folder or hub id")
    p.add_argument("--metric", help="metric, comma list, or 'all' (grad_x_weight, grad_squared, act_mag, hutchinson_diag)")
    p.add_argument("--mode", help="per_layer (top-k in each matrix) or global (top-k over all)")
    p.add_argument("--topk", type=int, help="weights selected per matrix (per_layer) or overall (global)")
    p.add_argument("--max-samples", type=int, help="calibration windows per seed")
    p.add_argument("--seeds", help="comma-separated calibration seeds, e.g. 1337,123,999")
    p.add_argument("--stability-check", action="store_true", help="Jaccard / rank correlation across seeds")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (fp32/bf16/fp16); scores accumulate in fp32")
    p.add_argument("--save-plots", action="store_true", help="write figures into --out-dir")
    p.add_argument("--out-dir", required=True, help="folder for topk.parquet, summary.json, figures")
    p.add_argument("--perturb", help="perturbation(s), comma list (sign_flip, gauss_noise, zero, bit_flip)")
    p.add_argument("--perturb-scale", help="perturbation scale, or a comma list of scales for a dose-response sweep (e.g. 0.005,0.01,0.1)")
    p.add_argument("--perturb-prob", type=float, help="bit_flip probability per selected weight")
    p.add_argument("--controls", help="control sets, comma list (random_k, random_global, bottom_k, magnitude_k)")
    p.add_argument("--weight-analysis", action="store_true", help="massive-activation channels and magnitudes")
    p.add_argument("--architecture-analysis", action="store_true", help="attention vs FFN shares per layer")
    p.add_argument("--verbose", action="store_true", help="log progress")
    p.add_argument("--corpus", help="calibration corpus (shakespeare, wikitext2, c4, or a text file)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, help="windows per forward/backward micro-batch")
    p.add_argument("--hutchinson-probes", type=int, help="Rademacher probes for hutchinson_diag")
    p.add_argument("--per-batch", action="store_true", help="grad_x_weight as mean_b |w g_b| (default |w * mean g|)")
    p.add_argument("--no-cache", action="store_true", help="recompute scores even if cached")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the profile and check every value; raises EsaError on the first bad one."""
    from esa.models.loader import DTYPES
    from esa.params import load_profile
    from esa.sensitivity.metrics import METRICS
    from esa.sensitivity.select import MODES

    prof = load_profile(args.profile)
    args.model = args.model or prof.models[0]
    metrics = _csv(args.metric) if args.metric else list(prof.metrics[:1])
    if metrics == ["all"]:
        metrics = list(METRICS)
    for m in metrics:
        if m not in METRICS:
            raise unknown("metric", m, METRICS)
    if not metrics:
        raise EsaError("--metric is empty; accepted: " + ", ".join(METRICS))
    args.metrics = list(dict.fromkeys(metrics))
    args.mode = args.mode or prof.mode
    if args.mode not in MODES:
        raise unknown("mode", args.mode, MODES)
    args.topk = prof.topk if args.topk is None else args.topk
    if args.topk <= 0:
        raise EsaError(f"--topk must be positive, got {args.topk}")
    args.max_samples = prof.max_samples if args.max_samples is None else args.max_samples
    if args.max_samples <= 0:
        raise EsaError(f"--max-samples must be positive, got {args.max_samples}")
    if args.seeds is None:
        args.seed_list = list(prof.seeds)
    else:
        try:
            args.seed_list = [int(s) for s in _csv(args.seeds)]
        except ValueError as e:
            raise EsaError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from e
    if not args.seed_list:
        raise EsaError("--seeds is empty; give at least one seed, e.g. --seeds 1337")
    if len(set(args.seed_list)) != len(args.seed_list):
        raise EsaError(f"--seeds has duplicates: {args.seeds}")
    if args.stability_check and len(args.seed_list) < 2:
        raise EsaError("--stability-check needs at least two seeds")
    args.dtype = args.dtype or prof.dtype
    if args.dtype not in DTYPES:
        raise unknown("dtype", args.dtype, DTYPES)
    args.corpus = args.corpus or prof.corpus
    args.seqlen = args.seqlen or prof.seqlen
    if args.seqlen < 2:
        raise EsaError(f"--seqlen must be at least 2, got {args.seqlen}")
    args.batch_size = args.batch_size or prof.batch_size
    if args.batch_size <= 0:
        raise EsaError(f"--batch-size must be positive, got {args.batch_size}")
    args.hutchinson_probes = args.hutchinson_probes or prof.hutchinson_probes
    if args.hutchinson_probes <= 0:
        raise EsaError(f"--hutchinson-probes must be positive, got {args.hutchinson_probes}")
    args.perturb_list = _csv(args.perturb) if args.perturb else []
    args.perturb_scale = prof.perturb_scale if args.perturb_scale is None else args.perturb_scale
    if args.perturb_list:  # validate before any scoring work, so a typo costs nothing
        from esa.perturb.ops import parse_perturbations, parse_scales

        parse_perturbations(args.perturb_list)
        parse_scales(args.perturb_scale)
    args.perturb_prob = prof.perturb_prob if args.perturb_prob is None else args.perturb_prob
    if not 0.0 <= args.perturb_prob <= 1.0:
        raise EsaError(f"--perturb-prob must be in [0, 1], got {args.perturb_prob}")
    args.control_list = _csv(args.controls) if args.controls else list(prof.controls)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise EsaError(f"--out-dir {out} exists and is not a folder")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do the work of one invocation, writing into a staging folder; returns the summary."""
    import torch

    from esa.models import load
    from esa.sensitivity import structure
    from esa.sensitivity.engine import score_many
    from esa.sensitivity.metrics import MetricConfig
    from esa.sensitivity.select import check_k
    from esa.sensitivity.superweights import detect_superweights, match_selection
    from esa.stats import stability

    t_start = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".esa-runner-partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        t0 = time.perf_counter()
        # Hutchinson needs a double-differentiable attention: eager is always safe
        attn = "eager" if "hutchinson_diag" in args.metrics else None
        lm = load(args.model, dtype=args.dtype, device=args.device, attn_implementation=attn)
        t_load = time.perf_counter() - t0
        check_k(lm.inventory, args.topk, args.mode)
        check_k(lm.inventory, args.topk, "global")
        # --max-samples larger than the corpus provides fails here, before any scoring
        from esa.data import calibration

        calibration(lm.tokenizer, args.corpus, args.seqlen, args.max_samples, args.seed_list[0],
                    max_positions=lm.info.max_positions or None)

        cfg_base = dict(batch_size=args.batch_size, probes=args.hutchinson_probes, per_batch=args.per_batch,
                        show_progress=args.verbose)
        runs: dict[tuple[str, int], Any] = {}
        selections, global_sel = [], {}
        by_seed = {}
        for seed in args.seed_list:  # one calibration sample per seed; its gradient metrics share a pass
            log.info("scoring %s seed %d", ", ".join(args.metrics), seed)
            by_seed[seed] = score_many(lm, args.metrics, seed, corpus=args.corpus, seqlen=args.seqlen,
                                       n_samples=args.max_samples,
                                       cfgs={m: MetricConfig(**cfg_base, seed=seed) for m in args.metrics},
                                       model_ref=args.model, use_cache=not args.no_cache)
        for metric in args.metrics:
            for seed in args.seed_list:
                r = runs[(metric, seed)] = by_seed[seed][metric]
                selections.append(r.topk(args.topk, args.mode, lm.inventory))
                global_sel[(metric, seed)] = r.topk(args.topk, "global", lm.inventory)
        table = pd.concat(selections, ignore_index=True)

        summary: dict[str, Any] = {
            "settings": _settings(args), "model": lm.info.as_dict(),
            "definitions": {m: runs[(m, args.seed_list[0])].extras.get("variant", "") for m in args.metrics},
            "selection": {"mode": args.mode, "k": args.topk,
                          "tie_breaking": "equal scores -> earlier parameter, lower flat index"},
            "calibration": runs[(args.metrics[0], args.seed_list[0])].extras.get("windows", {}),
            "metrics": {}, "stability": {}, "agreement": {}, "component_shares": {}, "super_weights": {},
        }
        for (metric, seed), r in runs.items():
            top = global_sel[(metric, seed)].head(10)
            summary["metrics"].setdefault(metric, {})[str(seed)] = {
                "tails": r.tails, "timings": r.timings, "cache_key": r.key, "from_cache": r.from_cache,
                "spread": r.extras.get("spread"),
                "top10_global": top[["param", "expert", "row", "col", "score"]].to_dict("records"),
            }
        if args.stability_check:
            for metric in args.metrics:
                sels = {s: table[(table.metric == metric) & (table.seed == s)] for s in args.seed_list}
                u = stability.union_scores(sels, {s: runs[(metric, s)].scores for s in args.seed_list}, lm.inventory) \
                    if all(runs[(metric, s)].scores is not None for s in args.seed_list) else None
                summary["stability"][metric] = {
                    "jaccard": stability.pairwise_jaccard(sels),
                    "rank_correlation_union": stability.rank_correlation(u) if u is not None else None,
                }
        if len(args.metrics) > 1:
            for seed in args.seed_list:
                sels = {m: table[(table.metric == m) & (table.seed == seed)] for m in args.metrics}
                summary["agreement"][str(seed)] = stability.metric_agreement(sels).to_dict("records")
        first_seed = args.seed_list[0]
        for metric in args.metrics:
            shares = structure.component_shares(global_sel[(metric, first_seed)], lm.inventory)
            summary["component_shares"][metric] = {
                "selection_global_topk": shares.to_dict("records"),
                "score_mass": runs[(metric, first_seed)].matrices.groupby("component")["share"].sum().to_dict(),
            }
        try:
            sw = detect_superweights(lm.model, lm.tokenizer, lm.inventory)
            found = {m: match_selection(sw, runs[(m, first_seed)].topk(min(args.topk, 1000), "per_layer",
                                                                          lm.inventory)).to_dict("records")
                     for m in args.metrics}
            summary["super_weights"] = {"prompt": sw.attrs["prompt"], "per_layer": sw.to_dict("records"),
                                        "candidates_in_per_layer_topk": found}
        except EsaError as e:
            summary["super_weights"] = {"skipped": str(e)}
        if args.weight_analysis:
            ids = calibration(lm.tokenizer, args.corpus, args.seqlen, 1, first_seed,
                              max_positions=lm.info.max_positions or None).ids
            summary["weight_analysis"] = {
                m: structure.weight_analysis(lm.model, lm.inventory, global_sel[(m, first_seed)], ids)
                for m in args.metrics
            }
        if args.architecture_analysis:
            summary["architecture_analysis"] = {
                m: structure.architecture_analysis(runs[(m, first_seed)].matrices,
                                                   global_sel[(m, first_seed)]).to_dict("records")
                for m in args.metrics
            }
        if args.save_plots:
            _plots(stage, args, runs, global_sel, first_seed)
        if args.perturb_list:
            summary["perturb"] = _perturb(args, lm, table, {s: runs[(args.metrics[0], s)].scores for s in
                                                           args.seed_list}, stage)

        from esa.store import write_json, write_parquet

        write_parquet(stage / "topk.parquet", table)
        summary["timings"] = {"load_s": t_load, "total_s": time.perf_counter() - t_start,
                              "device": str(lm.device), "cuda": torch.cuda.is_available()}
        summary["versions"] = _versions()
        write_json(stage / "summary.json", summary)
        for item in stage.iterdir():  # the run succeeded: move every output into place
            os.replace(item, out / item.name)
        return summary
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _perturb(args, lm, table, scores_by_seed, stage) -> dict:
    try:
        from esa.cli_perturb import perturb_stage
    except ImportError as e:
        raise EsaError(f"--perturb needs esa.cli_perturb.perturb_stage (Phase 3), which is not available: {e}") from e
    return perturb_stage(args, lm, table, scores_by_seed, stage)


def _plots(stage: Path, args, runs, global_sel, seed: int) -> None:
    from esa.sensitivity import plots, structure

    curves = {m: runs[(m, seed)].survival for m in args.metrics}
    plots.save(plots.survival_plot(curves, f"{args.model}: score survival"), stage / "survival.png")
    for m in args.metrics:
        counts = structure.layer_component_counts(global_sel[(m, seed)])
        plots.save(plots.hotspot_plot(counts, f"{m}: global top-{args.topk}"), stage / f"hotspots_{m}.png")
        arch = structure.architecture_analysis(runs[(m, seed)].matrices, global_sel[(m, seed)])
        plots.save(plots.architecture_plot(arch, f"{m}: attention vs FFN"), stage / f"architecture_{m}.png")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ["profile", "model", "metrics", "mode", "topk", "max_samples", "seed_list", "stability_check", "dtype",
            "corpus", "seqlen", "batch_size", "hutchinson_probes", "per_batch", "perturb_list", "perturb_scale",
            "perturb_prob", "control_list", "weight_analysis", "architecture_analysis", "save_plots"]
    return {k: getattr(args, k) for k in keys}


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from esa.store import code_version

    return {"esa": code_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "pandas": pd.__version__}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("ESA_PROGRESS", "0")
    try:
        args = resolve(args)
        summary = run(args)
    except EsaError as e:
        print(f"esa-runner: error: {e}", file=sys.stderr)
        return 2
    print(_report(summary, args))
    return 0


def _report(summary: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"esa-runner: {args.model}, {', '.join(args.metrics)}, {args.mode} top-{args.topk}, "
             f"seeds {args.seed_list}, {summary['timings']['total_s']:.1f} s -> {args.out_dir}"]
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
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
