"""Run one metric on one model + calibration sample + seed, and cache what later work needs.

`score(...)` returns a `ScoreRun`: each matrix's top and bottom candidates (any per_layer or global top-k
with k <= the stored depth is derived from these exactly), the candidates of scores derived at scoring time
(grad_squared's OBD saliency), heavy-tail statistics, the survival curve, per-matrix statistics, timings,
and, only on request (`keep_scores`), the full map in bf16. An entry is stored under a content key (model,
corpus, seqlen, samples, seed, metric and its settings, dtype, depth, full map or not, code version) in
`esa.store.cache_dir("scores")`, written to a temporary folder and renamed, so a crashed run never leaves a
half-written entry. About 21 bytes per matrix and depth unit: SmolLM2-135M at depth 1000 is ~4.5 MB an
entry (0.04 bytes a weight) instead of 420 MB of fp32 scores.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import transformers
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from esa import memory
from esa.data import Calibration, Windows
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.models.loader import LoadedModel, weights_digest
from esa.sensitivity.metrics import METRICS, MetricConfig, fused_gradients, get_metric
from esa.sensitivity.select import (
    BottomSource,
    BottomTies,
    bottom_ties,
    check_k,
    compact_candidates,
    expand_candidates,
    from_candidates,
    matrix_candidates,
)
from esa.stats.tails import tail_summary
from esa.store import cache_dir, content_key, read_json, seal, source_hash, usable, write_json, write_parquet

log = logging.getLogger(__name__)

SCORE_CODE = ("esa.sensitivity.metrics", "esa.sensitivity.passes", "esa.sensitivity.select", "esa.sensitivity.engine",
              "esa.data", "esa.models.inventory", "esa.stats.tails")
FORMAT = 2  # cache entry layout: compact candidates, optional bf16 full map (1: fp32 full map, always)
DEPTH_DEFAULT = 1000  # per-matrix depth of stored top/bottom candidates, unless the caller sets one
MAP_DTYPE = torch.bfloat16  # full maps on request: fp32's exponent range, 2 bytes a weight
CANDIDATE_BYTES = 10.5  # measured parquet bytes per stored candidate (int32 order and flat, int16 expert, fp32)
ENTRY_OVERHEAD = 64 << 10  # matrix summaries, survival curve, meta, manifest


class LazyScores(Mapping[str, torch.Tensor]):
    """Scores in a safetensors file, read one parameter at a time (memory-mapped), as fp32."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path, self.names = path, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def entry_bytes(inventory: list[WeightSpec], depth: int = DEPTH_DEFAULT, keep_scores: bool = False,
                n_derived: int = 0) -> int:
    """Disk bytes of one score cache entry for `inventory` (the disk guard and the benchmark's projection)."""
    per_matrix = [min(depth, s.rows * s.cols) for s in inventory for _ in range(max(1, s.n_experts))]
    cands = (2 + n_derived) * sum(per_matrix) * CANDIDATE_BYTES
    full = sum(s.numel for s in inventory) * MAP_DTYPE.itemsize if keep_scores else 0
    return int(cands + full + ENTRY_OVERHEAD)


@dataclass
class ScoreRun:
    metric: str
    seed: int
    key: str
    settings: dict[str, Any]
    scores: Mapping[str, torch.Tensor] | None  # the stored full map (bf16, read as fp32) if kept, else None
    top: pd.DataFrame  # matrix_candidates, largest first
    bottom: pd.DataFrame  # matrix_candidates, smallest first
    matrices: pd.DataFrame  # per matrix: param, layer, component, kind, expert, numel, sum, mean, max, share
    tails: dict[str, Any]
    survival: pd.DataFrame
    extras: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    from_cache: bool = False
    derived: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> top candidates of a derived score
    ties: BottomTies | None = None  # bottom ties that run past the stored depth (bottom_k's uniform tie draw)
    provider: Callable[[], Mapping[str, torch.Tensor]] | None = field(default=None, repr=False, compare=False)

    def full(self) -> Mapping[str, torch.Tensor]:
        """Every weight's score: the kept map, else what `provider` recomputes (set by `esa.recipes.Recipe`)."""
        if self.scores is not None:
            return self.scores
        if self.provider is None:
            raise EsaError(f"{self.metric} seed {self.seed}: the full score map was not kept (keep_scores) and "
                           "this run has no recipe to recompute it")
        return self.provider()

    def bottom_source(self) -> BottomSource:
        """What bottom_k draws from: the bottom candidates with their complete tie sets."""
        return BottomSource(self.bottom, self.ties or BottomTies.empty(), self.depth)

    @property
    def depth(self) -> int:
        """Per-matrix depth of the stored candidates (a smaller matrix holds all its weights)."""
        return int(self.settings.get("depth", DEPTH_DEFAULT))

    def topk(self, k: int, mode: str = "per_layer", inventory: list[WeightSpec] | None = None) -> pd.DataFrame:
        return self._select(self.top, k, mode, True, inventory)

    def bottomk(self, k: int, mode: str = "per_layer", inventory: list[WeightSpec] | None = None) -> pd.DataFrame:
        return self._select(self.bottom, k, mode, False, inventory)

    def derived_topk(self, name: str, k: int, mode: str = "per_layer") -> pd.DataFrame:
        """Top-k of a score derived at scoring time (e.g. grad_squared's `obd`), from its stored candidates."""
        if name not in self.derived:
            raise EsaError(f"{self.metric} has no derived score {name!r}; stored: {sorted(self.derived) or 'none'}")
        self._check_depth(k)
        df = from_candidates(self.derived[name], k, mode, True)
        df["metric"], df["seed"] = self.metric, self.seed
        return df

    def _check_depth(self, k: int) -> None:
        if k > self.depth and self.scores is None:
            raise EsaError(f"k={k} needs candidates {k} deep per matrix; this entry stores {self.depth} and no full "
                           f"map: rescore with depth >= {k} (profile key candidate_depth) or keep full maps "
                           "(--keep-scores / profile key keep_scores)")

    def _select(self, cands: pd.DataFrame, k: int, mode: str, largest: bool,
                inventory: list[WeightSpec] | None) -> pd.DataFrame:
        if inventory is not None:
            names = set(cands["param"])
            check_k([s for s in inventory if s.name in names], k, mode)
        self._check_depth(k)
        if k > self.depth:  # deeper than the candidates: from the stored full map
            specs = [s for s in (inventory or []) if s.name in self.scores]  # type: ignore[operator]
            cands = matrix_candidates(dict(self.scores), specs, k, largest)  # type: ignore[arg-type]
        df = from_candidates(cands, k, mode, largest)
        df["metric"], df["seed"] = self.metric, self.seed
        return df


# labels an entry records but its key leaves out once the content is known: the same weights and tokens
# reached by another name, id or path find the same entry
_LABELS = ("model", "tokenizer")


def score_key(settings: dict[str, Any]) -> str:
    keyed = settings if settings.get("weights_digest") is None else {
        k: v for k, v in settings.items() if k not in _LABELS}
    return content_key(keyed)


def settings_for(model_ref: str, windows: Windows, metric: str, seed: int, dtype: str, cfg: MetricConfig,
                 inventory: list[WeightSpec], depth: int = DEPTH_DEFAULT, keep_scores: bool = False,
                 attention: str | None = None, weights_digest: str | None = None,
                 device_type: str | None = None) -> dict[str, Any]:
    """The cache key's content: everything that determines a metric's scores and what the entry stores
    (`attention`: the model's attention kernel, e.g. "eager" or "sdpa": it changes the scores).

    `weights_digest` (esa.models.loader.weights_digest) keys the entry by the weights' content and the
    calibration tokens' digest instead of the model's name and tokenizer label. The device type and the
    torch/transformers versions are in the key: Hutchinson and GGN probes come from a generator on the
    model's device (a CUDA generator draws other numbers than the CPU one), and kernels change between
    versions."""
    return {
        "model": model_ref, "corpus": windows.corpus, "seqlen": windows.seqlen, "n_samples": windows.n_windows,
        "seed": seed, "metric": metric, "metric_settings": METRICS[metric].key(cfg), "dtype": dtype,
        "tokenizer": windows.tokenizer, "weights": content_key([s.name for s in inventory]),
        "weights_digest": weights_digest,
        "inputs": xxhash.xxh3_128(windows.ids.cpu().contiguous().numpy()).hexdigest() if weights_digest else None,
        "device_type": device_type, "torch": torch.__version__, "transformers": transformers.__version__,
        "attention": attention, "format": FORMAT, "depth": int(depth), "full_map": str(MAP_DTYPE).removeprefix("torch.") if keep_scores else None,
        # the code that determines the scores, not the commit: unrelated commits keep the cache
        "code_version": source_hash(*SCORE_CODE),
    }


def attention_of(model: torch.nn.Module) -> str | None:
    """The attention kernel the model runs (transformers' config._attn_implementation), None if it has none."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return str(impl) if impl is not None else None


def pass_attention(model: torch.nn.Module, metric: str) -> str | None:
    """The attention kernel `metric`'s pass runs on `model`: the model's, except that a double-backward metric
    on an SDPA model runs SDPA's math kernel (`math_attention`), recorded as "sdpa-math"."""
    impl = attention_of(model)
    return "sdpa-math" if impl == "sdpa" and METRICS[metric].double_backward else impl


def check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise EsaError(f"candidate_depth must be a positive integer (candidates per matrix), got {depth!r}")
    return depth


def score(lm: LoadedModel, metric: str, calib: Calibration, cfg: MetricConfig | None = None, *,
          model_ref: str | None = None, inventory: list[WeightSpec] | None = None, use_cache: bool = True,
          refresh: bool = False, keep_scores: bool = False, windows: Windows | None = None,
          depth: int = DEPTH_DEFAULT) -> ScoreRun:
    """Score every weight of `inventory` (default: the model's) with `metric` on the calibration sample `calib`."""
    return score_many(lm, [metric], calib, {metric: cfg or MetricConfig()}, model_ref=model_ref,
                      inventory=inventory, use_cache=use_cache, refresh=refresh, keep_scores=keep_scores,
                      windows=windows, fuse=False, depth=depth)[metric]


def score_many(lm: LoadedModel, metrics: list[str], calib: Calibration,
               cfgs: Mapping[str, MetricConfig] | None = None, *, model_ref: str | None = None,
               inventory: list[WeightSpec] | None = None, use_cache: bool = True, refresh: bool = False,
               keep_scores: bool = False, windows: Windows | None = None,
               fuse: bool | str = "auto", depth: int = DEPTH_DEFAULT) -> dict[str, ScoreRun]:
    """`score` for several metrics on one calibration sample; gradient metrics share a backward pass.

    Cached metrics are read back; the uncached gradient metrics (those with a `fold`) with one batch size are
    computed from one forward+backward per micro-batch when `fuse` is True, or "auto" and the extra fp32
    accumulators fit in memory (`esa.memory`, pass "grad_fused"). Results and cache entries are the same
    as separate `score` calls, bit for bit. `windows`: the sample itself, when the caller already has it.
    `use_cache=False` neither reads nor writes the cache; `refresh` recomputes and rewrites the entries. A
    corrupt entry (sizes, headers or digests not matching its manifest) is named, moved aside and recomputed.

    An entry stores each matrix's top and bottom `depth` candidates, the tail statistics, the survival curve,
    the matrix summaries and the candidates of derived scores (`Metric.derived`); `keep_scores` adds the full
    map in bf16 (`ScoreRun.scores`). Without it, `ScoreRun.scores` is None: a consumer that needs every
    weight's score gets it from `ScoreRun.full()`, which `esa.recipes.Recipe` sets up to recompute it.
    """
    for m in metrics:
        get_metric(m)  # unknown names fail before any work
    check_depth(depth)
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
    digest = weights_digest(lm.model) if use_cache else None  # once per loaded model (cached with it)
    runs: dict[str, ScoreRun] = {}
    todo: dict[str, tuple[dict[str, Any], Path]] = {}
    for m in metrics:
        settings = settings_for(ref, windows, m, seed, lm.info.dtype, cfgs[m], inventory, depth, keep_scores,
                                pass_attention(lm.model, m), digest, lm.device.type)
        folder = cache_dir("scores") / score_key(settings)
        if use_cache and not refresh and usable(folder):
            t1 = time.perf_counter()
            runs[m] = load_cached(folder, inventory)
            runs[m].timings["load_cache_s"] = time.perf_counter() - t1
        else:
            todo[m] = (settings, folder)
    if use_cache and todo:
        check_disk(cache_dir("scores"), len(todo) * entry_bytes(inventory, depth, keep_scores, n_derived=1),
                   f"{len(todo)} score cache entries of {ref}")

    group = _fused_group(lm, todo, cfgs, inventory, windows, fuse)
    common = dict(windows=windows, inventory=inventory, model=lm.model, use_cache=use_cache,
                  keep_scores=keep_scores, depth=depth)
    if group:
        t1 = time.perf_counter()
        results = fused_gradients(lm.model, inventory, windows.ids, {m: cfgs[m] for m in group})
        t_metric = _synced(t1)
        for m in group:
            extras = {**results[m].extras, "fused_with": [g for g in group if g != m], "fused_metric_s": t_metric}
            runs[m] = _finish(m, seed, *todo[m], results[m].scores, extras, cfgs[m],
                              {"data_s": t_data, "metric_s": t_metric / len(group)}, **common)
            del results[m]  # drop this metric's buffers before the next one is written
    for m in todo:
        if m in group:
            continue
        # the memory plan of this pass, asked before it runs: a pass that cannot fit stops here with its need,
        # what is free and what to change, not with an out-of-memory error half-way
        memory.check(lm.model, METRICS[m].memory_pass, cfgs[m].batch_size, windows.seqlen, inventory,
                     probes=cfgs[m].probes)
        t1 = time.perf_counter()
        result = get_metric(m)(lm.model, inventory, windows.ids, cfgs[m])
        t_metric = _synced(t1)
        runs[m] = _finish(m, seed, *todo[m], result.scores, result.extras, cfgs[m],
                          {"data_s": t_data, "metric_s": t_metric}, **common)
    return {m: runs[m] for m in metrics}


def check_disk(folder: Path, need: int, what: str, headroom: float = 0.9) -> None:
    """Raise EsaError before any work if `folder`'s file system lacks `need` bytes (with the remedy)."""
    free = shutil.disk_usage(folder).free
    if need > headroom * free:
        raise EsaError(f"{what} need {need / 2**30:.2f} GiB, {folder} has {free / 2**30:.2f} GiB free: free space "
                       "(python -m esa.runner.cache du / prune), point ESA_CACHE_DIR elsewhere, or drop --keep-scores")


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


class _Derived(Mapping[str, torch.Tensor]):
    """A derived score, one matrix at a time (never a second full-size copy)."""

    def __init__(self, scores: Mapping[str, torch.Tensor], model: torch.nn.Module, fn: Any) -> None:
        self.scores, self.model, self.fn = scores, model, fn

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fn(self.scores[name], self.model.get_parameter(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)


def _finish(metric: str, seed: int, settings: dict[str, Any], folder: Path, scores: dict[str, torch.Tensor],
            extras: dict[str, Any], cfg: MetricConfig, timings: dict[str, float], *, windows: Windows,
            inventory: list[WeightSpec], model: torch.nn.Module, use_cache: bool, keep_scores: bool,
            depth: int) -> ScoreRun:
    """Candidates (of the score and of its derived scores), statistics and the cache entry of one metric."""
    t2 = time.perf_counter()
    top = matrix_candidates(scores, inventory, depth, largest=True)
    bottom = matrix_candidates(scores, inventory, depth, largest=False)
    derived = {d.name: matrix_candidates(_Derived(scores, model, d.fn), inventory, depth, largest=True)  # type: ignore[arg-type]
               for d in METRICS[metric].derived_for(cfg)}
    matrices = matrix_stats(scores, inventory)
    tails, surv = tail_summary(scores)
    timings = {**timings, "select_and_stats_s": time.perf_counter() - t2, "tokens": int(windows.ids.numel())}
    extras = {**extras, "windows": windows.describe(), "window_indices": list(windows.indices)}
    ties = bottom_ties(scores, inventory, bottom, model)
    run = ScoreRun(metric, seed, score_key(settings), settings, None, top, bottom, matrices, tails, surv, extras,
                   timings, derived=derived, ties=ties)
    if use_cache:
        t3 = time.perf_counter()
        _write_cache(folder, run, scores if keep_scores else None)
        run.timings["write_cache_s"] = time.perf_counter() - t3
        if keep_scores:  # the stored map, so a fresh run reads what a cached one does
            run.scores = LazyScores(folder / "scores.bf16.safetensors", [s.name for s in inventory if s.name in scores])
    elif keep_scores:
        run.scores = {n: t.detach().to(MAP_DTYPE).float() for n, t in scores.items()}
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
        save_file({n: t.detach().to(MAP_DTYPE).contiguous().cpu() for n, t in scores.items()},
                  str(tmp / "scores.bf16.safetensors"))
    write_parquet(tmp / "top.parquet", compact_candidates(run.top))
    write_parquet(tmp / "bottom.parquet", compact_candidates(run.bottom))
    for name, cands in run.derived.items():
        write_parquet(tmp / f"derived.{name}.top.parquet", compact_candidates(cands))
    ties = run.ties or BottomTies.empty()
    write_parquet(tmp / "bottom_ties.parquet", ties.groups)
    write_parquet(tmp / "bottom_ties_diff.parquet", ties.diff)
    write_parquet(tmp / "matrices.parquet", run.matrices)
    write_parquet(tmp / "survival.parquet", run.survival)
    write_json(tmp / "meta.json", {"format": FORMAT, "metric": run.metric, "seed": run.seed, "key": run.key,
                                   "settings": run.settings, "tails": run.tails, "extras": run.extras,
                                   "timings": run.timings, "has_scores": scores is not None,
                                   "derived": sorted(run.derived),
                                   "names": [n for n in run.top["param"].unique()]})
    seal(tmp)  # sizes and digests of every file: checked on every read (esa.store.check)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same entry first; its content is identical
        shutil.rmtree(tmp, ignore_errors=True)


def load_cached(folder: Path, inventory: list[WeightSpec]) -> ScoreRun:
    """A stored entry, its candidates rebuilt against `inventory` (the weights it was scored on)."""
    meta = read_json(folder / "meta.json")
    if meta.get("format") != FORMAT:
        raise EsaError(f"score cache entry {folder} has format {meta.get('format', 1)}, this code reads {FORMAT}: "
                       "rescore it (delete the folder, or python -m esa.runner.cache prune --stale)")
    specs = [s for s in inventory if s.name in set(meta["names"])]
    read = lambda name: expand_candidates(pd.read_parquet(folder / name), specs)  # noqa: E731
    scores = LazyScores(folder / "scores.bf16.safetensors", meta["names"]) if meta["has_scores"] else None
    return ScoreRun(
        meta["metric"], int(meta["seed"]), meta["key"], meta["settings"], scores, read("top.parquet"),
        read("bottom.parquet"), pd.read_parquet(folder / "matrices.parquet"), meta["tails"],
        pd.read_parquet(folder / "survival.parquet"), meta["extras"], dict(meta["timings"]), from_cache=True,
        derived={d: read(f"derived.{d}.top.parquet") for d in meta.get("derived", [])},
        ties=BottomTies(pd.read_parquet(folder / "bottom_ties.parquet"), pd.read_parquet(folder / "bottom_ties_diff.parquet")),
    )
