"""What one `esa-runner` invocation computes, given settings the CLI has already parsed and validated.

`run(cmd, stage)` scores the model with every metric x seed through the recipe layer (the same cache
entries the notebooks use), selects the top-k, and adds what the flags ask for: stability across seeds,
agreement between metrics, component shares, super-weight candidates, weight and architecture analyses,
figures, and the Phase 3 perturbation sweep. It writes into `stage` (each file atomically) and returns
the summary; the CLI moves the stage into place only when this succeeded.

Outputs: `topk.parquet` (one row per selected weight: model, run_id, metric, seed, param, layer, component,
kind, expert, row, col, score, rank), `summary.json`, figures (`save_plots`), and with perturbations
`perturbation.parquet`, `perturbation_windows.parquet`, `stats.json` and their figures.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import transformers

from esa.data import calibration
from esa.errors import EsaError
from esa.models import LoadedModel
from esa.perturb import build_groups, run_sweep
from esa.perturb import plots as perturb_plots
from esa.perturb.controls import CONTROLS
from esa.perturb.ops import PERTURBATIONS
from esa.phases import phase2, phase5_interpret, phase5_pruning, phase5_security, phase5_training
from esa.phases.study import Study
from esa.recipes import Recipe
from esa.sensitivity import plots, structure
from esa.sensitivity.metrics import METRICS
from esa.sensitivity.select import check_k
from esa.sensitivity.superweights import detect_superweights, match_selection
from esa.stats.inference import analyze
from esa.store import code_version, write_json, write_parquet

log = logging.getLogger(__name__)

STUDIES: list[Study] = [m.STUDY for m in (phase5_pruning, phase5_training, phase5_security, phase5_interpret)]


@dataclass(frozen=True)
class Command:
    """One validated esa-runner invocation: the model, the recipe, and which analyses to add."""

    model: str
    recipe: Recipe
    profile: str = "smoke"
    run_id: str = ""
    device: str | None = None
    device_map: str | None = None  # --device-map: accelerate's placement over the visible devices
    max_memory: dict[int | str, str] | None = None  # --max-memory, for the device map
    attn: str | None = None  # --attn: the attention kernel (default: sdpa; see Recipe.load)
    revision: str | None = None  # --revision: a hub id's branch, tag or commit
    stability_check: bool = False
    weight_analysis: bool = False
    architecture_analysis: bool = False
    save_plots: bool = False
    perturb: bool = False  # run the recipe's perturbation sweep (recipe.perturbations, controls, doses)
    perturb_scales: tuple[float, ...] = ()
    perturb_probs: tuple[float, ...] = ()
    flags: dict[str, Any] = field(default_factory=dict)  # the flags as given, for the summary
    apps: dict[str, Any] = field(default_factory=dict)  # Phase 5 study name -> its validated job (see STUDIES)

    def settings(self) -> dict[str, Any]:
        r = asdict(self.recipe)
        return {"profile": self.profile, "model": self.model, "run_id": self.run_id, **r,
                "stability_check": self.stability_check, "weight_analysis": self.weight_analysis,
                "architecture_analysis": self.architecture_analysis, "save_plots": self.save_plots,
                "perturb": self.perturb, "perturb_scales": list(self.perturb_scales),
                "perturb_probs": list(self.perturb_probs),
                "apps": {name: asdict(spec) if is_dataclass(spec) else spec for name, spec in self.apps.items()}}


def load_model(cmd: Command) -> LoadedModel:
    """The model, checked against the settings before any scoring (k fits, the corpus has the windows)."""
    R = cmd.recipe
    lm = R.load(cmd.model, device=cmd.device, device_map=cmd.device_map, max_memory=cmd.max_memory, attn=cmd.attn,
                revision=cmd.revision)
    check_k(lm.inventory, R.topk, R.mode)
    check_k(lm.inventory, R.topk, "global")
    # --max-samples larger than the corpus provides fails here, before any scoring
    calibration(lm.tokenizer, R.corpus, R.seqlen, R.max_samples, R.seeds[0], max_positions=lm.info.max_positions or None)
    return lm


def run(cmd: Command, lm: LoadedModel, stage: Path) -> dict[str, Any]:
    """Compute everything `cmd` asks for into `stage`; returns the summary (also written as summary.json)."""
    t_start = time.perf_counter()
    R = cmd.recipe
    metrics, seeds = list(R.metrics), list(R.seeds)
    runs = R.score_model(lm, cmd.model)
    table = phase2.selections(runs, R.topk, R.mode, lm)
    global_sel = {key: r.topk(R.topk, "global", lm.inventory) for key, r in runs.items()}
    first = seeds[0]
    summary: dict[str, Any] = {
        "settings": cmd.settings(), "flags": cmd.flags, "model": lm.info.as_dict(),
        "definitions": {m: METRICS[m].definition for m in metrics},
        "variants": {m: runs[(m, first)].extras.get("variant", "") for m in metrics},
        "selection": {"mode": R.mode, "k": R.topk, "tie_breaking": "equal scores -> earlier parameter, lower flat index"},
        "calibration": runs[(metrics[0], first)].extras.get("windows", {}),
        "metrics": {}, "stability": {}, "agreement": {}, "component_shares": {}, "super_weights": {},
    }
    for (metric, seed), r in runs.items():
        top = global_sel[(metric, seed)].head(10)
        summary["metrics"].setdefault(metric, {})[str(seed)] = {
            "tails": r.tails, "timings": r.timings, "cache_key": r.key, "from_cache": r.from_cache,
            "spread": r.extras.get("spread"),
            "top10_global": top[["param", "expert", "row", "col", "score"]].to_dict("records"),
        }
    if cmd.stability_check:
        stab = phase2.stability_table(runs, table, lm).set_index("metric")
        for metric in metrics:
            row = stab.loc[metric]
            summary["stability"][metric] = {
                "jaccard": {"mean": row.jaccard_mean, "std": row.jaccard_std, "min": row.jaccard_min,
                            "max": row.jaccard_max},
                "rank_correlation_union": {"mean": row.spearman_union, "n_union": int(row.n_union)}
                if row.n_union else None,
            }
    if len(metrics) > 1:
        agree = phase2.agreement_table(runs, table)
        for seed in seeds:
            summary["agreement"][str(seed)] = agree[agree.seed == seed].drop(columns="seed").to_dict("records")
    for metric in metrics:
        shares = structure.component_shares(global_sel[(metric, first)], lm.inventory)
        summary["component_shares"][metric] = {
            "selection_global_topk": shares.to_dict("records"),
            "score_mass": runs[(metric, first)].matrices.groupby("component")["share"].sum().to_dict(),
        }
    summary["super_weights"] = _super_weights(lm, runs, metrics, first, R.topk)
    if cmd.weight_analysis:
        ids = calibration(lm.tokenizer, R.corpus, R.seqlen, 1, first, max_positions=lm.info.max_positions or None).ids
        summary["weight_analysis"] = {m: structure.weight_analysis(lm.model, lm.inventory, global_sel[(m, first)], ids)
                                      for m in metrics}
    if cmd.architecture_analysis:
        summary["architecture_analysis"] = {
            m: structure.architecture_analysis(runs[(m, first)].matrices, global_sel[(m, first)]).to_dict("records")
            for m in metrics
        }
    if cmd.save_plots:
        _plots(stage, cmd, runs, global_sel, first)
    if cmd.perturb:
        scores = {s: runs[(metrics[0], s)].scores if runs[(metrics[0], s)].scores is not None
                  else runs[(metrics[0], s)].bottom_source() for s in seeds}
        summary["perturb"] = perturb(cmd, lm, table[table["metric"] == metrics[0]], scores, stage)
    for study in STUDIES:
        if study.name in cmd.apps:
            summary[study.name] = study.run_job(cmd.apps[study.name], cmd, lm, runs, stage)
    write_parquet(stage / "topk.parquet", table.assign(model=cmd.model, run_id=cmd.run_id))
    summary["timings"] = {"total_s": time.perf_counter() - t_start, "device": str(lm.device),
                          "cuda": torch.cuda.is_available()}
    summary["versions"] = versions()
    write_json(stage / "summary.json", summary)
    return summary


def _super_weights(lm: LoadedModel, runs: phase2.Runs, metrics: list[str], seed: int, k: int) -> dict[str, Any]:
    try:
        sw = detect_superweights(lm.model, lm.tokenizer, lm.inventory)
    except EsaError as e:
        return {"skipped": str(e)}
    found = {m: match_selection(sw, runs[(m, seed)].topk(min(k, 1000), "per_layer", lm.inventory)).to_dict("records")
             for m in metrics}
    return {"prompt": sw.attrs["prompt"], "per_layer": sw.to_dict("records"), "candidates_in_per_layer_topk": found}


def perturb(cmd: Command, lm: LoadedModel, selection: pd.DataFrame, scores_by_seed: dict[int, Any],
            out: Path) -> dict[str, Any]:
    """The perturbation sweep of the top-k sets and their controls (Phase 3 reuses Phase 2's sets), tested."""
    R = cmd.recipe
    seeds = list(R.seeds)
    specs = R.perturb_specs(scales=list(cmd.perturb_scales) or None, probs=list(cmd.perturb_probs) or None)
    wins = R.evaluation_windows(lm)
    t0 = time.perf_counter()
    groups = build_groups(lm.model, lm.inventory, selection, seeds, R.controls, scores_by_seed)
    t_groups = time.perf_counter() - t0
    res = run_sweep(lm.model, wins, groups, specs, batch_size=R.batch_size, show_progress=R.show_progress)
    stats = analyze(res.table, res.windows)
    summary = {
        "setup": {
            "perturbations": [s.as_dict() for s in specs], "controls": list(R.controls), "seeds": seeds,
            "metric": R.metrics[0], "topk": R.topk, "mode": R.mode, "evaluation": wins.describe(),
            "baseline": res.baseline.as_dict(), "n_conditions": len(res.table),
            "groups_seconds": t_groups, "sweep_seconds": float(res.table["seconds"].sum()),
            "definitions": {**{p: PERTURBATIONS[p].definition for p in R.perturbations},
                            **{c: CONTROLS[c].definition for c in R.controls}},
        },
        **stats,
    }
    tag = {"model": cmd.model, "metric": R.metrics[0], "run_id": cmd.run_id}
    write_parquet(out / "perturbation.parquet", res.table.assign(**tag))
    write_parquet(out / "perturbation_windows.parquet", res.windows.assign(**tag))
    write_json(out / "stats.json", summary)
    if cmd.save_plots:
        perturb_plots.save(perturb_plots.damage_bars(stats["summary"], f"{lm.info.ref}: damage per group"),
                           out / "perturb_damage.png")
        if res.table["dose"].nunique() > 1:
            perturb_plots.save(perturb_plots.dose_plot(res.table, title=f"{lm.info.ref}: dose-response"),
                               out / "perturb_dose.png")
    return {"n_conditions": len(res.table), "files": ["perturbation.parquet", "perturbation_windows.parquet",
                                                      "stats.json"], "baseline_ppl": res.baseline.ppl,
            "significant": [c["significant"] for c in stats["comparisons"]]}


def _plots(stage: Path, cmd: Command, runs: phase2.Runs, global_sel: dict[tuple[str, int], pd.DataFrame],
           seed: int) -> None:
    metrics = list(cmd.recipe.metrics)
    curves = {m: runs[(m, seed)].survival for m in metrics}
    plots.save(plots.survival_plot(curves, f"{cmd.model}: score survival"), stage / "survival.png")
    for m in metrics:
        counts = structure.layer_component_counts(global_sel[(m, seed)])
        plots.save(plots.hotspot_plot(counts, f"{m}: global top-{cmd.recipe.topk}"), stage / f"hotspots_{m}.png")
        arch = structure.architecture_analysis(runs[(m, seed)].matrices, global_sel[(m, seed)])
        plots.save(plots.architecture_plot(arch, f"{m}: attention vs FFN"), stage / f"architecture_{m}.png")


def versions() -> dict[str, str]:
    return {"esa": code_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "pandas": pd.__version__}
