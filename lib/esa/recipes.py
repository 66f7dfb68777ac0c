"""The one place where run settings become method inputs: the recipe layer under the phases, the CLI and Phase 5.

A `Recipe` holds the settings a run shares (from a profile, or from esa-runner's flags over a profile) and
turns them into what the method packages take: the loaded model, the calibration sample and metric
configuration of a seed, the scored top-k sets (through the score cache), the evaluation windows and the
perturbation specs. Because every caller goes through here, a notebook and esa-runner with the same
settings build the same cache keys and hit the same cache entries (tested).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import pandas as pd
import torch

from esa.data import Calibration, Windows, evaluation
from esa.models import LoadedModel, load
from esa.models.loader import placement
from esa.params import Profile, model_params
from esa.perturb.ops import PerturbSpec, sweep_specs
from esa.sensitivity.engine import ScoreRun, score, score_many
from esa.sensitivity.metrics import MetricConfig, get_metric

log = logging.getLogger(__name__)
# model -> its recomputed full maps by (run key, name): weakly keyed, so a model's maps go when it does and no
# later model (which may reuse a freed model's id) can ever read them
_FULL_MAPS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], Mapping[str, torch.Tensor]]] = (
    weakref.WeakKeyDictionary())


def load_configured(name: str, dtype: str | torch.dtype = "float32", device: str | None = None,
                    device_map: str | None = None, **kwargs: Any) -> LoadedModel:
    """`load` by a params/models name (or any raw reference: hub id, folder), with the ref its params file
    sets; placement follows `esa.models.loader.placement` (an explicit device or device map wins over the
    params file's device_map, and both together are refused)."""
    mp = model_params(name)
    device, device_map = placement(device, device_map, mp.device_map, f"params/models/{name}.yaml")
    return load(mp.ref, dtype=dtype, device=device, device_map=device_map, **kwargs)


@dataclass(frozen=True)
class Recipe:
    """Every setting that decides what a run computes (a profile's, or esa-runner's flags over a profile)."""

    corpus: str = "shakespeare"
    dtype: str = "float32"
    seqlen: int = 256
    max_samples: int = 4
    eval_windows: int | None = 8
    perturb_eval_windows: int | None = None
    seeds: tuple[int, ...] = (1337,)
    topk: int = 100
    mode: str = "per_layer"
    metrics: tuple[str, ...] = ("grad_x_weight",)
    hutchinson_probes: int = 2
    batch_size: int = 4
    per_batch: bool = False
    perturbations: tuple[str, ...] = ("sign_flip",)
    perturb_scale: float = 1.0
    perturb_prob: float = 0.5
    bit_flip_bits: tuple[str, ...] = ("exponent",)
    controls: tuple[str, ...] = ("random_k", "bottom_k")
    candidate_depth: int = 1000  # per-matrix candidates a score cache entry stores
    keep_scores: bool = False  # entries also store every weight's score (bf16)
    use_cache: bool = True
    refresh_cache: bool = False  # recompute scores and rewrite their cache entries (esa-runner --no-cache)
    show_progress: bool = False

    @classmethod
    def of(cls, P: Profile, **overrides: Any) -> Recipe:
        """The recipe of profile `P`, with `overrides` (None values ignored) on top."""
        names = {f.name for f in fields(cls)}
        base = {k: v for k, v in P.as_dict().items() if k in names}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in base.items()})

    def but(self, **changes: Any) -> Recipe:
        return replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})

    # ------------------------------------------------------------ model
    def load(self, name: str, eager: bool = False, attn: str | None = None, **kwargs: Any) -> LoadedModel:
        """Model `name` (a params/models name or any reference) in the recipe's dtype, with SDPA attention.

        Every pass runs SDPA's fused kernels except the double backward (hutchinson_diag and the curvature
        reliability), which switches to SDPA's math kernel around itself (`esa.sensitivity.passes.
        math_attention`): no pass pays for eager attention's (heads x T x T) buffers unless it needs them.
        `eager=True` is for readers of attention probabilities (interpretability). The kernel a pass ran is
        part of its scores' cache key (`esa.sensitivity.engine.pass_attention`). `attn` (esa-runner --attn)
        replaces that choice."""
        return load_configured(name, self.dtype, attn_implementation=attn or ("eager" if eager else "sdpa"), **kwargs)

    # ------------------------------------------------------------ sensitivity
    def calibration(self, seed: int, n_samples: int | None = None) -> Calibration:
        return Calibration(self.corpus, self.seqlen, n_samples or self.max_samples, seed)

    def metric_config(self, seed: int) -> MetricConfig:
        """The settings every caller uses, so the cache key matches across the CLI, notebooks and phases."""
        return MetricConfig(batch_size=self.batch_size, per_batch=self.per_batch, probes=self.hutchinson_probes,
                            seed=seed, show_progress=self.show_progress)

    def score_model(self, lm: LoadedModel, name: str, metrics: list[str] | None = None,
                    seeds: list[int] | None = None, n_samples: int | None = None) -> dict[tuple[str, int], ScoreRun]:
        """Every metric x seed (cached where computed before); per seed, the gradient metrics share a pass."""
        metrics, seeds = list(metrics or self.metrics), list(seeds or self.seeds)
        by_seed = {}
        for seed in seeds:
            by_seed[seed] = score_many(lm, metrics, self.calibration(seed, n_samples),
                                       {m: self.metric_config(seed) for m in metrics}, model_ref=name,
                                       use_cache=self.use_cache, refresh=self.refresh_cache,
                                       keep_scores=self.keep_scores, depth=self.candidate_depth)
            cached = [m for m, r in by_seed[seed].items() if r.from_cache]
            log.info("%s seed %d: scored (from cache: %s)", name, seed, cached or "none")
        runs = {(m, s): by_seed[s][m] for m in metrics for s in seeds}
        for run in runs.values():
            self._attach(lm, name, run)
        return runs

    def _attach(self, lm: LoadedModel, name: str, run: ScoreRun) -> ScoreRun:
        if run.scores is None:
            run.provider = lambda: self._recompute(lm, name, run)
        return run

    def scored_topk(self, lm: LoadedModel, name: str, metric: str, k: int | None = None, mode: str | None = None,
                    seeds: list[int] | None = None) -> tuple[pd.DataFrame, dict[int, Mapping[str, Any] | None],
                                                            dict[int, bool], dict[int, ScoreRun]]:
        """(top-k table over seeds, control source by seed, from_cache by seed, runs by seed) of one metric.

        The control source is what bottom_k draws from: the kept full map, else the cached bottom candidates."""
        sels, scores, cached, runs = [], {}, {}, {}
        for seed in seeds or self.seeds:
            run = score(lm, metric, self.calibration(seed), self.metric_config(seed), model_ref=name,
                        use_cache=self.use_cache, refresh=self.refresh_cache, keep_scores=self.keep_scores,
                        depth=self.candidate_depth)
            self._attach(lm, name, run)
            sels.append(run.topk(k or self.topk, mode or self.mode, lm.inventory))
            scores[seed] = run.scores if run.scores is not None else run.bottom_source()
            cached[seed], runs[seed] = bool(run.from_cache), run
        return pd.concat(sels, ignore_index=True), scores, cached, runs

    def _recompute(self, lm: LoadedModel, name: str, run: ScoreRun) -> Mapping[str, torch.Tensor]:
        """The full map of a run whose entry keeps none, for readers deeper than its candidates (pruning at
        50%, sparse fine-tuning at 5%, per-head sums): the fp32 scores recomputed by the same pass (so the same
        values the candidates hold; not written to disk), held for this model object's later readers."""
        memo = _FULL_MAPS.setdefault(lm.model, {})
        key = (run.key, name)
        if key not in memo:
            while len(memo) >= 2:  # at most two maps held: a 7B model's fp32 map is 28 GB
                memo.pop(next(iter(memo)))
            # the run's own sample: week 1 scores some metrics on more windows than max_samples
            n = len(run.extras.get("window_indices") or []) or None
            windows = self.calibration(run.seed, n).windows(lm.tokenizer, max_positions=lm.info.max_positions or None)
            cfg = self.metric_config(run.seed)
            memo[key] = get_metric(run.metric)(lm.model, lm.inventory, windows.ids, cfg).scores
        return memo[key]

    # ------------------------------------------------------------ evaluation and perturbation
    def evaluation_windows(self, lm: LoadedModel, n: int | None = None, perturbation: bool = False) -> Windows:
        """The fixed evaluation windows (eval split, seed 0): `n`, else the perturbation or the plain count."""
        if n is None:
            n = (self.perturb_eval_windows or self.eval_windows) if perturbation else self.eval_windows
        return evaluation(lm.tokenizer, self.corpus, self.seqlen, n_windows=n, seed=0,
                          max_positions=lm.info.max_positions or None)

    def perturb_specs(self, perturbations: list[str] | None = None, scales: list[float] | None = None,
                      probs: list[float] | None = None) -> list[PerturbSpec]:
        return sweep_specs(list(perturbations or self.perturbations), list(scales or [self.perturb_scale]),
                           list(probs or [self.perturb_prob]), bits=list(self.bit_flip_bits))
