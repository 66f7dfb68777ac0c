"""Per-model Phase 2/3 measures for the scaling and architecture analyzers, from the project's own engines.

`model_measures(ref, profile)` scores one model with Phase 2's engine (cached), selects the top-k,
zeroes it and a size-matched random control (Phase 3's in-place perturbation with exact restore),
and returns one row of the tidy scaling table plus the top-k table for the architecture analyzer.

Measures (averaged over the profile's seeds):
- `dlogppl_topk_zero`: increase in eval log-perplexity (nats/token) when the top-k is zeroed;
- `dlogppl_random_zero`: the same for `random_k` (same count per matrix, random positions);
- `topk_over_random`: their ratio (how much more the selected weights matter than random ones);
- `tail_top1pct_over_median`, `tail_max_over_median`, `hill_alpha`: heavy-tail statistics of scores;
- `frac_selected`: selected weights / weights studied (per_layer k is fixed, so this falls with size:
  a confound of every damage-vs-size fit, reported so it can be read alongside).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from esa.errors import EsaError
from esa.params import Profile

log = logging.getLogger(__name__)


def phase4_models(P: Profile) -> list[str]:
    """The profile's Phase 4 model set (`phase4_models`: micro-suite `name@budget` entries and real models)."""
    if not P.phase4_models:
        raise EsaError(f"profile {P.name!r} lists no phase4_models; add the micro-suite and/or real models to it")
    return list(P.phase4_models)


def model_measures(ref: str, P: Profile, metric: str = "grad_x_weight", k: int | None = None,
                   mode: str | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """(one row of the scaling table, the top-k table over seeds) for model `ref` under profile `P`."""
    from esa.data import evaluation
    from esa.evaluate import evaluate
    from esa.models import load_configured
    from esa.perturb.apply import perturbed, targets_from_selection
    from esa.perturb.controls import ControlInput, make_control
    from esa.perturb.ops import PerturbSpec
    from esa.sensitivity.engine import score
    from esa.sensitivity.metrics import MetricConfig

    t0 = time.perf_counter()
    k, mode = k or P.topk, mode or P.mode
    lm = load_configured(ref, P.dtype)  # a params/models name (hub id, device_map) or a raw reference
    wins = evaluation(lm.tokenizer, P.corpus, P.seqlen, n_windows=P.eval_windows, seed=0,
                      max_positions=lm.info.max_positions or None)
    base = evaluate(lm.model, wins, batch_size=P.batch_size, show_progress=False)
    zero = PerturbSpec("zero")
    rows, sels = [], []
    for seed in P.seeds:
        cfg = MetricConfig(batch_size=P.batch_size, probes=P.hutchinson_probes, seed=seed, show_progress=False)
        run = score(lm, metric, seed, corpus=P.corpus, seqlen=P.seqlen, n_samples=P.max_samples, cfg=cfg,
                    model_ref=ref)
        sel = run.topk(k, mode, lm.inventory)
        sels.append(sel)
        top = targets_from_selection(sel, lm.inventory)
        rand = make_control("random_k", ControlInput(lm.model, lm.inventory, top, seed=seed))
        out = {}
        for label, targets in (("topk", top), ("random", rand)):
            with perturbed(lm.model, targets, zero, seed=seed):
                res = evaluate(lm.model, wins, batch_size=P.batch_size, show_progress=False)
            out[label] = res.log_ppl - base.log_ppl
        t = run.tails
        rows.append(dict(seed=seed, dlogppl_topk_zero=out["topk"], dlogppl_random_zero=out["random"],
                         tail_top1pct_over_median=t["top_mean_over_median"], tail_max_over_median=t["max_over_median"],
                         hill_alpha=t["hill_alpha"], n_selected=len(sel)))
    per_seed = pd.DataFrame(rows)
    info = lm.info
    row = dict(model=ref, family=info.family, moe=info.moe, instruct=info.instruct, n_layers=info.n_layers,
               n_params=info.n_params, n_params_active=info.n_params_active, metric=metric, k=k, mode=mode,
               base_log_ppl=base.log_ppl, base_ppl=base.ppl, n_seeds=len(per_seed),
               **per_seed.drop(columns="seed").mean().to_dict())
    row["topk_over_random"] = (row["dlogppl_topk_zero"] / row["dlogppl_random_zero"]
                               if row["dlogppl_random_zero"] > 0 else np.nan)
    row["frac_selected"] = row.pop("n_selected") / info.n_weights_studied
    row["seconds"] = time.perf_counter() - t0
    log.info("%s: measures in %.0f s", ref, row["seconds"])
    return row, pd.concat(sels, ignore_index=True)


def collect(refs: list[str], P: Profile, metric: str = "grad_x_weight") -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The tidy scaling table (one row per model) and {model: top-k table} for a list of models."""
    rows, tables = [], {}
    for ref in refs:
        row, sel = model_measures(ref, P, metric)
        rows.append(row)
        tables[ref] = sel
    return pd.DataFrame(rows), tables


WEEK9 = "phase4_week9_parameter_scaling"


def week9_results(run_dir: Any, models: list[str] | None, P: Profile,
                  metric: str = "grad_x_weight") -> tuple[pd.DataFrame, dict[str, pd.DataFrame], str]:
    """(measures, {model: top-k table}, where they came from) for the Phase 4 notebooks after week 9.

    Week 9's saved tables in `run_dir` are reused when present; otherwise the measures are collected now
    (scores come from the engine's cache where they exist), for `models` or the profile's Phase 4 set.
    """
    from pathlib import Path

    folder = Path(run_dir) / "data" / WEEK9
    if (folder / "measures.parquet").exists():
        measures = pd.read_parquet(folder / "measures.parquet")
        tables = {m: pd.read_parquet(folder / f"topk_{m.replace('@', '_')}.parquet") for m in measures.model}
        return measures, tables, f"week 9 results of this run ({folder})"
    measures, tables = collect(list(models) if models else phase4_models(P), P, metric)
    return measures, tables, "collected in this notebook (week 9 output not found)"
