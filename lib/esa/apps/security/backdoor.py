"""Backdoor detection from weights: sensitivity-map statistics against a clean reference; a spectral baseline.

Features of one model (one row of a models x features table):
- `map_features(scores)`: from a sensitivity map (param -> score tensor, e.g. grad_x_weight on a fixed
  probe text), per matrix: log mean score, log(max / mean), log(top-1% mean / median) (tail weight), the
  largest row and column shares of the total (channel concentration); with `channels=True` also every
  row's and column's share (the per-channel profile), so a backdoor that works through a few channels
  can stand out in them.
- `spectral_features(deltas)`: the weight-delta spectral baseline. Per matrix of delta = W - W_base (the
  fine-tuning update): log Frobenius norm, log top singular value, sigma_1 / ||delta||_F (how rank-one the
  update is), effective rank exp(entropy of sigma^2 / sum sigma^2).
Scoring (`anomaly_scores`): each feature is standardised against the clean reference models (z = (x -
mean_ref) / std_ref), and a model's score is the mean of its largest `top_frac` share of |z|. A clean
reference model is scored against the other clean models (leave-one-out), and every other model against
each of the same leave-one-out subsets in turn, averaged, so both see references of the same size.
`auroc` is P(score of a backdoored model > score of a clean one) (ties count half); `auroc_ci` a
stratified percentile bootstrap. Unsupervised: nothing is fitted on the backdoored models' labels.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from esa.apps.security.common import resolve_weights
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.sensitivity.metrics import MetricConfig, get_metric

_EPS = 1e-30


def _matrices(t: torch.Tensor) -> list[torch.Tensor]:
    """A 2-D tensor, or the expert slices of a 3-D one."""
    return [t] if t.dim() == 2 else list(t.unbind(0))


def map_features(scores: Mapping[str, torch.Tensor], channels: bool = True) -> pd.Series:
    """Per-matrix (and per-channel) statistics of one sensitivity map; see the module docstring."""
    out: dict[str, float] = {}
    for name, s in scores.items():
        for e, m in enumerate(_matrices(s.detach().float().abs().cpu())):
            key = name if s.dim() == 2 else f"{name}[{e}]"
            flat = m.reshape(-1)
            total = float(flat.sum())
            mean = total / flat.numel()
            k = max(1, flat.numel() // 100)
            top = float(torch.topk(flat, k).values.mean())
            med = float(flat.median())
            rows, cols = m.sum(dim=1), m.sum(dim=0)  # (rows,), (cols,)
            out[f"{key}|log_mean"] = math.log(mean + _EPS)
            out[f"{key}|log_max_over_mean"] = math.log((float(flat.max()) + _EPS) / (mean + _EPS))
            out[f"{key}|log_top1_over_median"] = math.log((top + _EPS) / (med + _EPS))
            out[f"{key}|row_max_share"] = float(rows.max()) / (total + _EPS)
            out[f"{key}|col_max_share"] = float(cols.max()) / (total + _EPS)
            if channels:
                for i, v in enumerate((rows / (total + _EPS)).tolist()):
                    out[f"{key}|row{i}"] = v
                for j, v in enumerate((cols / (total + _EPS)).tolist()):
                    out[f"{key}|col{j}"] = v
    return pd.Series(out, dtype=float)


def spectral_features(deltas: Mapping[str, torch.Tensor]) -> pd.Series:
    """Spectral statistics of weight deltas (param -> W - W_base); see the module docstring."""
    out: dict[str, float] = {}
    for name, d in deltas.items():
        for e, m in enumerate(_matrices(d.detach().float().cpu())):
            key = name if d.dim() == 2 else f"{name}[{e}]"
            sv = torch.linalg.svdvals(m)  # (min(rows, cols),) descending
            fro = float(sv.square().sum().sqrt())
            p = sv.square() / (sv.square().sum() + _EPS)
            ent = float(-(p * torch.log(p + _EPS)).sum())
            out[f"{key}|log_fro"] = math.log(fro + _EPS)
            out[f"{key}|log_sigma1"] = math.log(float(sv[0]) + _EPS)
            out[f"{key}|sigma1_share"] = float(sv[0]) / (fro + _EPS)
            out[f"{key}|effective_rank"] = math.exp(ent)
    return pd.Series(out, dtype=float)


def weight_deltas(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                  names: Sequence[str]) -> dict[str, torch.Tensor]:
    """param -> state[param] - base[param] (fp32), for the named 2-D/3-D weights."""
    missing = [n for n in names if n not in state or n not in base]
    if missing:
        raise EsaError(f"state dicts lack weights {missing[:3]}")
    return {n: state[n].detach().float() - base[n].detach().float() for n in names}


# ---------------------------------------------------------------- sensitivity maps of many models
def sensitivity_map(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, metric: str,
                    cfg: MetricConfig | None = None) -> dict[str, torch.Tensor]:
    """The one call into esa.sensitivity: `metric`'s scores of `specs` on probe windows `ids`."""
    cfg = cfg or MetricConfig(show_progress=False)
    return get_metric(metric)(model, specs, ids, cfg).scores


@contextlib.contextmanager
def loaded_state(model: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Let the block load other weights into `names` in place; the model's own come back bit-exactly after."""
    params = dict(model.named_parameters())
    backup = {n: params[n].detach().to("cpu", copy=True) for n in names}  # one backup for every model loaded
    try:
        yield {n: params[n] for n in names}
    finally:
        with torch.no_grad():
            for n, raw in backup.items():
                params[n].data.copy_(raw.to(params[n].device))  # same dtype: a byte copy


def sensitivity_features(
    model: torch.nn.Module,
    states: Mapping[str, Mapping[str, torch.Tensor]],
    ids: torch.Tensor,
    metric: str = "grad_x_weight",
    weights: Sequence[str | WeightSpec] | None = None,
    cfg: MetricConfig | None = None,
    channels: bool = True,
) -> pd.DataFrame:
    """models x features: each state dict (model id -> {param: tensor}) is loaded into `model`'s studied
    weights in turn (same architecture), its sensitivity map computed on `ids`, and summarised."""
    get_metric(metric)
    specs = resolve_weights(model, weights)
    names = [s.name for s in specs]
    shapes = {s.name: tuple(s.shape) for s in specs}
    for mid, sd in states.items():
        bad = [n for n in names if n not in sd or tuple(sd[n].shape) != shapes[n]]
        if bad:
            raise EsaError(f"state dict {mid!r} lacks or misshapes weights {bad[:3]}")
    rows = {}
    with loaded_state(model, names) as params:
        for mid, sd in states.items():
            with torch.no_grad():
                for n in names:
                    params[n].data.copy_(sd[n].to(params[n].device, params[n].dtype))
            rows[mid] = map_features(sensitivity_map(model, specs, ids, metric, cfg), channels=channels)
    return pd.DataFrame(rows).T


# ---------------------------------------------------------------- scoring and AUROC
def _score_against(x: np.ndarray, ref: np.ndarray, top_frac: float) -> float:
    mu, sd = ref.mean(axis=0), ref.std(axis=0, ddof=1)
    floor = 1e-9 + 1e-6 * np.abs(mu)  # a feature constant across the reference must not divide by ~0
    z = np.abs((x - mu) / np.maximum(sd, floor))
    z = z[np.isfinite(z)]
    if not z.size:
        return math.nan
    k = max(1, int(round(top_frac * z.size)))
    return float(np.sort(z)[-k:].mean())


def anomaly_scores(features: pd.DataFrame, reference: Sequence[Any], top_frac: float = 0.01) -> pd.Series:
    """Score of every model (row) against the clean reference rows (leave-one-out: see the module doc)."""
    ref_ids = list(reference)
    if len(ref_ids) < 3:
        raise EsaError(f"a clean reference needs at least 3 models (leave-one-out keeps 2 for a spread), "
                       f"got {len(ref_ids)}")
    missing = [r for r in ref_ids if r not in features.index]
    if missing:
        raise EsaError(f"reference models not in the feature table: {missing[:3]}")
    if not (0.0 < top_frac <= 1.0):
        raise EsaError(f"top_frac must lie in (0, 1], got {top_frac!r}")
    X = features.to_numpy(dtype=float)
    pos = {mid: i for i, mid in enumerate(features.index)}
    ref_rows = [pos[r] for r in ref_ids]
    out = {}
    for mid, i in pos.items():
        if mid in ref_ids:
            others = [j for j in ref_rows if j != i]
            out[mid] = _score_against(X[i], X[others], top_frac)
        else:
            out[mid] = float(np.mean([_score_against(X[i], X[[j for j in ref_rows if j != k]], top_frac)
                                      for k in ref_rows]))
    return pd.Series(out)


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (the Mann-Whitney U / (n1 n0))."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    r = sps.rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc_ci(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, n_boot: int = 2000,
             level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(AUROC, lo, hi): percentile bootstrap resampling positives and negatives separately."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels).astype(bool)
    est = auroc(s, y)
    pos, neg = s[y], s[~y]
    if pos.size < 2 or neg.size < 2:
        return est, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    lab = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    for b in range(n_boot):
        boots[b] = auroc(np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)], lab)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return est, float(lo), float(hi)


@dataclass
class DetectionResult:
    auroc: float
    lo: float
    hi: float
    scores: pd.DataFrame  # model id, label, score
    n_clean: int
    n_backdoored: int
    note: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


MIN_PER_CLASS = 10  # the minimum; below it the AUROC is reported as underpowered


def detect(features: pd.DataFrame, labels: Mapping[Any, int], top_frac: float = 0.01, n_boot: int = 2000,
           seed: int = 0) -> DetectionResult:
    """Score every model against the clean ones (label 0) and report the AUROC for label 1 with a CI."""
    lab = pd.Series(labels)
    unknown_ids = [m for m in lab.index if m not in features.index]
    if unknown_ids:
        raise EsaError(f"labelled models not in the feature table: {unknown_ids[:3]}")
    if set(lab.unique()) - {0, 1}:
        raise EsaError(f"labels must be 0 (clean) or 1 (backdoored), got {sorted(set(lab.unique()))}")
    feats = features.loc[lab.index]
    scores = anomaly_scores(feats, [m for m in lab.index if lab[m] == 0], top_frac)
    est, lo, hi = auroc_ci(scores.to_numpy(), lab.to_numpy(), n_boot=n_boot, seed=seed)
    n1, n0 = int((lab == 1).sum()), int((lab == 0).sum())
    note = "" if min(n1, n0) >= MIN_PER_CLASS else (
        f"underpowered: {n0} clean and {n1} backdoored models (fewer than {MIN_PER_CLASS} per class)")
    table = pd.DataFrame({"model": scores.index, "label": lab.loc[scores.index].to_numpy(),
                          "score": scores.to_numpy()})
    return DetectionResult(est, lo, hi, table, n0, n1, note,
                           dict(top_frac=top_frac, n_features=int(feats.shape[1]),
                                ci="stratified percentile bootstrap"))
