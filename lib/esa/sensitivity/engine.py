"""Run one metric on one model + calibration sample + seed, and cache what later work needs.

`score(...)` returns a `ScoreRun`: the scores (fp32, one tensor per studied parameter; lazily read back
from the cache), each matrix's top and bottom candidates (any per_layer or global top-k with k <= the
cached depth is derived from these exactly), heavy-tail statistics, per-matrix statistics, timings.
Everything is stored under a content key (model, corpus, seqlen, samples, seed, metric and its
settings, dtype, code version) in `esa.store.cache_dir("scores")`, written to a temporary folder and
renamed, so a crashed run never leaves a half-written entry.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esa import memory
from esa.data import Calibration, Windows
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.models.loader import LoadedModel
from esa.sensitivity.metrics import METRICS, MetricConfig, fused_gradients, get_metric
from esa.sensitivity.select import check_k, from_candidates, matrix_candidates
from esa.stats.tails import tail_summary
from esa.store import cache_dir, content_key, read_json, seal, source_hash, usable, write_json, write_parquet

log = logging.getLogger(__name__)

SCORE_CODE = ("esa.sensitivity.metrics", "esa.sensitivity.select", "esa.sensitivity.engine", "esa.data",
              "esa.models.inventory", "esa.stats.tails")
CANDIDATES_K = 1000  # per-matrix depth of cached top/bottom candidates
KEEP_SCORES_MAX = 2_000_000_000  # cache full scores only below this many weights (fp32 on disk)


class LazyScores(Mapping[str, torch.Tensor]):
    """Scores in a safetensors file, read one parameter at a time (memory-mapped)."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path, self.names = path, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class ScoreRun:
    metric: str
    seed: int
    key: str
    settings: dict[str, Any]
    scores: Mapping[str, torch.Tensor] | None  # None if not kept (too large)
    top: pd.DataFrame  # matrix_candidates, largest first
    bottom: pd.DataFrame  # matrix_candidates, smallest first
    matrices: pd.DataFrame  # per matrix: param, layer, component, kind, expert, numel, sum, mean, max, share
    tails: dict[str, Any]
    survival: pd.DataFrame
    extras: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    from_cache: bool = False

    def topk(self, k: int, mode: str = "per_layer", inventory: list[WeightSpec] | None = None) -> pd.DataFrame:
        return self._select(self.top, k, mode, True, inventory)

    def bottomk(self, k: int, mode: str = "per_layer", inventory: list[WeightSpec] | None = None) -> pd.DataFrame:
        return self._select(self.bottom, k, mode, False, inventory)

    def _select(self, cands: pd.DataFrame, k: int, mode: str, largest: bool,
                inventory: list[WeightSpec] | None) -> pd.DataFrame:
        depth = int(cands["rank"].max())
        if inventory is not None:
            names = set(cands["param"])
            check_k([s for s in inventory if s.name in names], k, mode)
        if k > depth and self.scores is None:
            raise EsaError(f"k={k} is deeper than the {depth} cached candidates per matrix and scores were not kept")
        if k > depth:
            specs = [s for s in (inventory or []) if s.name in self.scores]  # type: ignore[operator]
            cands = matrix_candidates(dict(self.scores), specs, k, largest)  # type: ignore[arg-type]
        df = from_candidates(cands, k, mode, largest)
        df["metric"], df["seed"] = self.metric, self.seed
        return df


def score_key(settings: dict[str, Any]) -> str:
    return content_key(settings)


def settings_for(model_ref: str, windows: Windows, metric: str, seed: int, dtype: str, cfg: MetricConfig,
                 inventory: list[WeightSpec]) -> dict[str, Any]:
    """The cache key's content: everything that determines a metric's scores (and nothing else)."""
    return {
        "model": model_ref, "corpus": windows.corpus, "seqlen": windows.seqlen, "n_samples": windows.n_windows,
        "seed": seed, "metric": metric, "metric_settings": METRICS[metric].key(cfg), "dtype": dtype,
        "tokenizer": windows.tokenizer, "weights": content_key([s.name for s in inventory]),
        # the code that determines the scores, not the commit: unrelated commits keep the cache
        "code_version": source_hash(*SCORE_CODE),
    }


def score(lm: LoadedModel, metric: str, calib: Calibration, cfg: MetricConfig | None = None, *,
          model_ref: str | None = None, inventory: list[WeightSpec] | None = None, use_cache: bool = True,
          refresh: bool = False, keep_scores: bool = True, windows: Windows | None = None) -> ScoreRun:
    """Score every weight of `inventory` (default: the model's) with `metric` on the calibration sample `calib`."""
    return score_many(lm, [metric], calib, {metric: cfg or MetricConfig()}, model_ref=model_ref,
                      inventory=inventory, use_cache=use_cache, refresh=refresh, keep_scores=keep_scores,
                      windows=windows, fuse=False)[metric]


def score_many(lm: LoadedModel, metrics: list[str], calib: Calibration,
               cfgs: Mapping[str, MetricConfig] | None = None, *, model_ref: str | None = None,
               inventory: list[WeightSpec] | None = None, use_cache: bool = True, refresh: bool = False,
               keep_scores: bool = True, windows: Windows | None = None,
               fuse: bool | str = "auto") -> dict[str, ScoreRun]:
    """`score` for several metrics on one calibration sample; gradient metrics share a backward pass.

    Cached metrics are read back; the uncached gradient metrics (those with a `fold`) with one batch size are
    computed from one forward+backward per micro-batch when `fuse` is True, or "auto" and the extra fp32
    accumulators fit in memory (`esa.memory`, pass "grad_fused"). Results and cache entries are the same
    as separate `score` calls, bit for bit. `windows`: the sample itself, when the caller already has it.
    `use_cache=False` neither reads nor writes the cache; `refresh` recomputes and rewrites the entries. A
    corrupt entry (sizes or headers not matching its manifest) is moved aside and recomputed.
    """
    for m in metrics:
        get_metric(m)  # unknown names fail before any work
    cfgs = {m: (cfgs or {}).get(m) or MetricConfig() for m in metrics}
    inventory = inventory if inventory is not None else lm.inventory
    if not inventory:
        raise EsaError(f"{lm.info.ref}: no weights under study (no attention/MLP linear layers found)")
    seed = calib.seed
    t0 = time.perf_counter()
    if windows is None:
        windows = calib.windows(lm.tokenizer, max_positions=lm.info.max_positions or None)
    t_data = time.perf_counter() - t0
    ref = model_ref or lm.info.ref
    runs: dict[str, ScoreRun] = {}
    todo: dict[str, tuple[dict[str, Any], Path]] = {}
    for m in metrics:
        settings = settings_for(ref, windows, m, seed, lm.info.dtype, cfgs[m], inventory)
        folder = cache_dir("scores") / score_key(settings)
        if use_cache and not refresh and usable(folder, adopt="complete"):
            t1 = time.perf_counter()
            runs[m] = load_cached(folder)
            runs[m].timings["load_cache_s"] = time.perf_counter() - t1
        else:
            todo[m] = (settings, folder)

    group = _fused_group(lm, todo, cfgs, inventory, windows, fuse)
    if group:
        t1 = time.perf_counter()
        results = fused_gradients(lm.model, inventory, windows.ids, {m: cfgs[m] for m in group})
        t_metric = _synced(t1)
        for m in group:
            extras = {**results[m].extras, "fused_with": [g for g in group if g != m], "fused_metric_s": t_metric}
            runs[m] = _finish(m, seed, *todo[m], results[m].scores, extras, windows, inventory,
                              {"data_s": t_data, "metric_s": t_metric / len(group)}, use_cache, keep_scores)
            del results[m]  # drop this metric's buffers before the next one is written
    for m in todo:
        if m in group:
            continue
        t1 = time.perf_counter()
        result = get_metric(m)(lm.model, inventory, windows.ids, cfgs[m])
        t_metric = _synced(t1)
        runs[m] = _finish(m, seed, *todo[m], result.scores, result.extras, windows, inventory,
                          {"data_s": t_data, "metric_s": t_metric}, use_cache, keep_scores)
    return {m: runs[m] for m in metrics}


def _synced(t0: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _fused_group(lm: LoadedModel, todo: Mapping[str, Any], cfgs: Mapping[str, MetricConfig],
                 inventory: list[WeightSpec], windows: Windows, fuse: bool | str) -> list[str]:
    """The uncached gradient metrics to compute in one pass (empty: compute each on its own)."""
    if fuse not in (True, False, "auto"):
        raise EsaError(f"fuse must be True, False or 'auto', got {fuse!r}")
    group = [m for m in todo if METRICS[m].fold is not None]
    if not fuse or len(group) < 2 or len({cfgs[m].batch_size for m in group}) != 1:
        return []
    if fuse == "auto":
        try:
            memory.check(lm.model, "grad_fused", cfgs[group[0]].batch_size, windows.seqlen, inventory)
        except EsaError as err:
            log.info("computing %s one at a time: %s", group, str(err).splitlines()[0])
            return []
    return group


def _finish(metric: str, seed: int, settings: dict[str, Any], folder: Path,
            scores: dict[str, torch.Tensor], extras: dict[str, Any], windows: Windows,
            inventory: list[WeightSpec], timings: dict[str, float], use_cache: bool, keep_scores: bool) -> ScoreRun:
    """Candidates, statistics and the cache entry of one metric's scores."""
    t2 = time.perf_counter()
    depth = CANDIDATES_K
    top = matrix_candidates(scores, inventory, depth, largest=True)
    bottom = matrix_candidates(scores, inventory, depth, largest=False)
    matrices = matrix_stats(scores, inventory)
    tails, surv = tail_summary(scores)
    timings = {**timings, "select_and_stats_s": time.perf_counter() - t2, "tokens": int(windows.ids.numel())}
    extras = {**extras, "windows": windows.describe(), "window_indices": list(windows.indices)}
    n_weights = sum(s.numel for s in inventory)
    keep = keep_scores and n_weights <= KEEP_SCORES_MAX
    run = ScoreRun(metric, seed, score_key(settings), settings, scores if keep else None, top, bottom, matrices,
                   tails, surv, extras, timings)
    if use_cache:
        _write_cache(folder, run, scores if keep else None)
        if keep:  # hand back the lazy view so the caller can drop the in-memory buffers
            run.scores = LazyScores(folder / "scores.safetensors", [s.name for s in inventory if s.name in scores])
    return run


def matrix_stats(scores: Mapping[str, torch.Tensor], inventory: list[WeightSpec]) -> pd.DataFrame:
    """Per matrix (expert slices separately): numel, sum, mean, max of |score|, share of the model's total."""
    rows = []
    for spec in inventory:
        if spec.name not in scores:
            continue
        t = scores[spec.name].detach().float()
        mats = t.reshape(spec.n_experts, -1) if spec.n_experts else t.reshape(1, -1)
        for e, m in enumerate(mats):
            m = m.abs()  # |score|, as the tail statistics (Hutchinson saliencies can be negative)
            total = float(m.sum())
            rows.append({"param": spec.name, "layer": spec.layer, "component": spec.component, "kind": spec.kind,
                         "expert": e if spec.n_experts else -1, "numel": m.numel(), "sum": total,
                         "mean": total / m.numel(), "max": float(m.max())})
    df = pd.DataFrame(rows)
    df["share"] = df["sum"] / df["sum"].sum() if df["sum"].sum() > 0 else 0.0
    return df


def _write_cache(folder: Path, run: ScoreRun, scores: Mapping[str, torch.Tensor] | None) -> None:
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if scores is not None:
        save_file({n: t.detach().float().contiguous().cpu() for n, t in scores.items()}, str(tmp / "scores.safetensors"))
    write_parquet(tmp / "top.parquet", run.top)
    write_parquet(tmp / "bottom.parquet", run.bottom)
    write_parquet(tmp / "matrices.parquet", run.matrices)
    write_parquet(tmp / "survival.parquet", run.survival)
    write_json(tmp / "meta.json", {"metric": run.metric, "seed": run.seed, "key": run.key, "settings": run.settings,
                                   "tails": run.tails, "extras": run.extras, "timings": run.timings,
                                   "has_scores": scores is not None,
                                   "names": list(scores) if scores is not None else []})
    (tmp / "complete").write_text(run.key + "\n")
    seal(tmp)  # sizes and hashes of every file: checked on every read (esa.store.check)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same entry first; its content is identical
        shutil.rmtree(tmp, ignore_errors=True)


def load_cached(folder: Path) -> ScoreRun:
    meta = read_json(folder / "meta.json")
    scores = LazyScores(folder / "scores.safetensors", meta["names"]) if meta["has_scores"] else None
    return ScoreRun(
        meta["metric"], int(meta["seed"]), meta["key"], meta["settings"], scores,
        pd.read_parquet(folder / "top.parquet"), pd.read_parquet(folder / "bottom.parquet"),
        pd.read_parquet(folder / "matrices.parquet"), meta["tails"], pd.read_parquet(folder / "survival.parquet"),
        meta["extras"], dict(meta["timings"]), from_cache=True,
    )
