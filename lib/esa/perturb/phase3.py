"""What the Phase 3 notebooks share: top-k sets from Phase 2's cache, evaluation windows, one model's sweep.

Top-k sets come from `esa.sensitivity.engine.score`, which returns Phase 2's cached run when the
settings (model, corpus, seqlen, samples, seed, metric settings, dtype, code version) match: Phase 3 never
computes its own selection. Whether each set came from the cache is reported (`from_cache`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from esa.params import Profile

log = logging.getLogger(__name__)

PRIMARY_METRIC = "grad_x_weight"


@dataclass
class ModelSweep:
    model: str
    family: str
    table: pd.DataFrame
    windows: pd.DataFrame
    stats: dict[str, Any]
    baseline: Any
    from_cache: dict[int, bool] = field(default_factory=dict)
    seconds: float = 0.0
    composition: pd.DataFrame = field(default_factory=pd.DataFrame)  # per group and seed: n, zero share, |w|


def load_model(name: str, P: Profile):
    from esa.models import load_configured

    return load_configured(name, P.dtype)


def topk_sets(lm: Any, model_name: str, P: Profile, metric: str = PRIMARY_METRIC, k: int | None = None,
              mode: str | None = None) -> tuple[pd.DataFrame, dict[int, Any], dict[int, bool]]:
    """(selection table over P.seeds, scores by seed, from_cache by seed) via Phase 2's engine cache."""
    from esa.sensitivity.engine import score
    from esa.sensitivity.metrics import MetricConfig

    sels, scores, cached = [], {}, {}
    for seed in P.seeds:
        cfg = MetricConfig(batch_size=P.batch_size, probes=P.hutchinson_probes, seed=seed, show_progress=False)
        run = score(lm, metric, seed, corpus=P.corpus, seqlen=P.seqlen, n_samples=P.max_samples, cfg=cfg,
                    model_ref=model_name)
        sels.append(run.topk(k or P.topk, mode or P.mode, lm.inventory))
        scores[seed], cached[seed] = run.scores, bool(run.from_cache)
        if not run.from_cache:
            log.warning("%s %s seed %d: no cached Phase 2 scores matched; they were computed now (and cached)",
                        model_name, metric, seed)
    return pd.concat(sels, ignore_index=True), scores, cached


def eval_windows(lm: Any, P: Profile):
    from esa.data import evaluation

    n = P.perturb_eval_windows or P.eval_windows
    return evaluation(lm.tokenizer, P.corpus, P.seqlen, n_windows=n, seed=0,
                      max_positions=lm.info.max_positions or None)


def specs_from_profile(P: Profile, perturbations: list[str] | None = None, scales: list[float] | None = None,
                       probs: list[float] | None = None) -> list:
    from esa.cli_perturb import specs_for

    return specs_for(perturbations or list(P.perturbations), scales or [P.perturb_scale], probs or [P.perturb_prob],
                     bits=list(P.bit_flip_bits))


def feasible_k(inventory: list, k: int) -> int:
    """k capped at a quarter of the smallest matrix, so random_k can still draw k weights outside the top-k
    (tiny models' MoE routers have 128 weights; a per-matrix top-100 would leave 28)."""
    smallest = min(s.rows * s.cols for s in inventory)
    return max(1, min(k, smallest // 4))


def sweep_model(model_name: str, P: Profile, specs: list, controls: list[str] | None = None,
                metric: str = PRIMARY_METRIC, lm: Any = None, k: int | None = None) -> ModelSweep:
    """Top-k (cached) + controls -> sweep -> statistics, for one model (k: default the profile's top-k)."""
    from esa.perturb import build_groups, run_sweep
    from esa.perturb.sweep import group_composition
    from esa.stats.inference import analyze

    t0 = time.perf_counter()
    lm = lm or load_model(model_name, P)
    sel, scores, cached = topk_sets(lm, model_name, P, metric, k=k)
    controls = list(P.controls if controls is None else controls)
    wins = eval_windows(lm, P)
    groups = build_groups(lm.model, lm.inventory, sel, P.seeds, controls, scores)
    res = run_sweep(lm.model, wins, groups, specs, batch_size=P.batch_size)
    stats = analyze(res.table, res.windows)
    table = res.table.assign(model=model_name)
    return ModelSweep(model_name, lm.info.family, table, res.windows.assign(model=model_name), stats,
                      res.baseline, cached, time.perf_counter() - t0,
                      group_composition(lm.model, groups).assign(model=model_name))
