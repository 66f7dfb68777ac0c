"""The `--perturb` stage of esa-runner: sweep the top-k sets and their controls, test, write results.

`perturb_stage(args, lm, selection_df, scores_by_seed, out_dir)` is called by esa.cli once the top-k
tables exist (Phase 3 reuses Phase 2's sets; nothing is recomputed here). It writes into `out_dir`
(each file atomically): `perturbation.parquet` (one row per condition), `perturbation_windows.parquet`
(per-window NLL of each condition), `stats.json` (esa.stats.inference.analyze plus the setup), and with
--save-plots `perturb_damage.png` and, with several scales, `perturb_dose.png`.

Conditions: sign_flip and gauss_noise at every scale of --perturb-scale (a number or a comma list: a
dose-response), zero once, bit_flip at --perturb-prob (exponent bits; a comma list of probabilities is a
dose too). Groups: top_k of each seed and each control of --controls, drawn with that seed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from esa.errors import EsaError

log = logging.getLogger("esa.cli_perturb")


def _names(args: Any, list_attr: str, raw_attr: str) -> list[str] | str | None:
    v = getattr(args, list_attr, None)
    return v if v else getattr(args, raw_attr, None)


def specs_for(perturbations: list[str], scales: list[float], probs: list[float],
              bits: str | list[str] = "exponent") -> list:
    """The PerturbSpec list of a sweep: scale doses for sign_flip/gauss_noise, prob doses (x bit choices) for bit_flip."""
    from esa.perturb import PerturbSpec

    out = []
    for name in perturbations:
        if name in ("sign_flip", "gauss_noise"):
            out += [PerturbSpec(name, scale=s) for s in scales]
        elif name == "bit_flip":
            out += [PerturbSpec(name, prob=p, bits=b) for b in ([bits] if isinstance(bits, str) else bits) for p in probs]
        else:
            out.append(PerturbSpec(name))
    return out


def perturb_stage(args: Any, lm: Any, selection_df: pd.DataFrame, scores_by_seed: dict[int, Any],
                  out_dir: str | Path) -> dict[str, Any]:
    """Run the perturbation sweep for esa-runner; returns the summary it also writes to stats.json."""
    from esa.data import evaluation
    from esa.perturb import build_groups, parse_controls, parse_perturbations, parse_scales, run_sweep
    from esa.perturb.ops import PerturbSpec
    from esa.stats.inference import analyze
    from esa.store import write_json, write_parquet

    out = Path(out_dir)
    perts = parse_perturbations(_names(args, "perturb_list", "perturb") or "")
    scales = parse_scales(getattr(args, "perturb_scale", 1.0))
    probs = parse_scales(getattr(args, "perturb_prob", 0.5))
    for p in probs:
        PerturbSpec("bit_flip", prob=p)  # validates 0 <= p <= 1 with the standard message
    controls = parse_controls(_names(args, "control_list", "controls"))
    seeds = [int(s) for s in (getattr(args, "seed_list", None) or getattr(args, "seeds", None) or [])]
    if not seeds:
        raise EsaError("the perturbation stage needs at least one seed")
    if "bottom_k" in controls and not all(scores_by_seed.get(s) is not None for s in seeds):
        raise EsaError("control bottom_k needs the scores of every seed; they were not kept (model too large)")
    sel = selection_df
    metrics = getattr(args, "metrics", None)
    if metrics and "metric" in sel:
        sel = sel[sel["metric"] == metrics[0]]
    eval_windows = getattr(args, "eval_windows", None)
    if eval_windows is None:
        from esa.params import load_profile

        eval_windows = load_profile(getattr(args, "profile", "smoke")).eval_windows
    wins = evaluation(lm.tokenizer, args.corpus, args.seqlen, n_windows=eval_windows, seed=0,
                      max_positions=lm.info.max_positions or None)
    specs = specs_for(perts, scales, probs)
    t0 = time.perf_counter()
    groups = build_groups(lm.model, lm.inventory, sel, seeds, controls, scores_by_seed)
    t_groups = time.perf_counter() - t0
    res = run_sweep(lm.model, wins, groups, specs, batch_size=args.batch_size,
                    show_progress=bool(getattr(args, "verbose", False)))
    stats = analyze(res.table, res.windows)
    summary = {
        "setup": {
            "perturbations": [s.as_dict() for s in specs], "controls": controls, "seeds": seeds,
            "metric": metrics[0] if metrics else None, "topk": getattr(args, "topk", None),
            "mode": getattr(args, "mode", None), "evaluation": wins.describe(),
            "baseline": res.baseline.as_dict(), "n_conditions": len(res.table),
            "groups_seconds": t_groups, "sweep_seconds": float(res.table["seconds"].sum()),
            "definitions": {
                "sign_flip": "w -> -scale * w", "gauss_noise": "w + N(0, (scale * std(matrix))^2)",
                "zero": "w -> 0", "bit_flip": "with probability prob, flip one exponent bit of the stored value",
                "random_k": "per matrix, the top-k's count drawn uniformly (seeded) outside the top-k",
                "random_global": "the top-k's total count drawn uniformly over all studied weights outside it",
                "bottom_k": "per matrix, the top-k's count of lowest scores",
                "magnitude_k": "per matrix, the top-k's count of largest |w|",
            },
        },
        **stats,
    }
    write_parquet(out / "perturbation.parquet", res.table)
    write_parquet(out / "perturbation_windows.parquet", res.windows)
    write_json(out / "stats.json", summary)
    if getattr(args, "save_plots", False):
        from esa.perturb import plots

        plots.save(plots.damage_bars(stats["summary"], f"{lm.info.ref}: damage per group"),
                   out / "perturb_damage.png")
        if res.table["dose"].nunique() > 1:
            plots.save(plots.dose_plot(res.table, title=f"{lm.info.ref}: dose-response"), out / "perturb_dose.png")
    return {"n_conditions": len(res.table), "files": ["perturbation.parquet", "perturbation_windows.parquet",
                                                      "stats.json"], "baseline_ppl": res.baseline.ppl,
            "significant": [c["significant"] for c in stats["comparisons"]]}
