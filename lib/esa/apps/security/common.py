"""What every security analysis shares: input checks, the damage thresholds, target-set helpers, a Wilson CI.

Damage is judged on log-perplexity (mean NLL in nats), never on perplexity itself, so a destroyed model
(PPL beyond float range) still compares: `collapsed(log_ppl, base, factor)` is true when
log_ppl - base >= log(factor) or log_ppl is not finite (inf/NaN windows are counted, never dropped).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats as sps

from esa.data import Windows
from esa.errors import EsaError
from esa.evaluate import EvalResult, evaluate
from esa.models.inventory import WeightSpec, classify, layer_index, weight_inventory
from esa.perturb.apply import Targets


def check_rate(rate: float, what: str = "per-bit fault rate") -> float:
    r = float(rate)
    if not (0.0 < r < 1.0):
        raise EsaError(f"{what} must lie in (0, 1), got {rate!r}")
    return r


def check_positive_int(value: int, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) <= 0:
        raise EsaError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_factor(factor: float, what: str = "damage factor") -> float:
    f = float(factor)
    if not (f > 1.0) or math.isinf(f):
        raise EsaError(f"{what} must be a finite number > 1 (a multiple of the baseline PPL), got {factor!r}")
    return f


def check_positive(value: float, what: str) -> float:
    """A finite number > 0 (an L-infinity budget, a learning rate)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 < value < math.inf):
        raise EsaError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def check_protected_fraction(fraction: float, what: str = "protected fraction") -> float:
    """A share of the weights to guard or compare, in (0, 0.5): an equal random set disjoint from it must fit."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not (0.0 < fraction < 0.5):
        raise EsaError(f"{what} must be a share of the weights in (0, 0.5), got {fraction!r}")
    return float(fraction)


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """One numpy stream per (seed, parts): a draw never depends on which other draws were made before."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(zlib.crc32(str(p).encode()) for p in parts)])


def resolve_weights(model: torch.nn.Module, weights: Sequence[str | WeightSpec] | None) -> list[WeightSpec]:
    """None -> the model's weight inventory (the default set of README, "Methods"); names -> specs of those parameters.

    Names outside the inventory (a norm, a bias, an embedding) are accepted here with their real shape, so
    that a format can refuse them by name (int8 needs a 2-D or expert-stacked 3-D floating weight)."""
    if weights is None:
        specs = weight_inventory(model)
        if not specs:
            raise EsaError("the model has no weights under study (no transformer-block linear layers)")
        return specs
    params = dict(model.named_parameters())
    out: list[WeightSpec] = []
    for w in weights:
        if isinstance(w, WeightSpec):
            out.append(w)
            continue
        if w not in params:
            raise EsaError(f"parameter {w!r} is not in the model")
        p = params[w]
        comp = classify(w)
        out.append(WeightSpec(w, layer_index(w), comp[0] if comp else "other", comp[1] if comp else "other",
                              tuple(p.shape), p.shape[0] if p.dim() == 3 else 0))
    if not out:
        raise EsaError("no weights given to study")
    return out


def baseline(model: torch.nn.Module, windows: Windows | torch.Tensor, batch_size: int | None) -> EvalResult:
    return evaluate(model, windows, batch_size=batch_size, show_progress=False)


def damage(log_ppl: float, base_log_ppl: float) -> float:
    """log(PPL / base PPL) in nats; +inf for a non-finite result (NaN included: a NaN model is destroyed)."""
    return math.inf if not math.isfinite(log_ppl) else log_ppl - base_log_ppl


def collapsed(log_ppl: float, base_log_ppl: float, factor: float) -> bool:
    return damage(log_ppl, base_log_ppl) >= math.log(factor)


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(share, lo, hi) of k successes in n trials: the Wilson score interval (sound at k = 0 and k = n)."""
    if n <= 0:
        return math.nan, math.nan, math.nan
    z = float(sps.norm.ppf(1 - (1 - level) / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # clamped so that lo <= p <= hi also under rounding (at k = n, centre + half is 1 only up to an ulp)
    return p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


# ---------------------------------------------------------------- target sets
def n_targets(targets: Targets) -> int:
    return int(sum(int(v.numel()) for v in targets.values()))


def contains(targets: Targets | None, name: str, idx: torch.Tensor) -> torch.Tensor:
    """Bool mask (n,): which flat indices `idx` of parameter `name` lie in `targets` (sorted unique sets)."""
    idx = idx.long().cpu()
    if targets is None or name not in targets or targets[name].numel() == 0:
        return torch.zeros(idx.shape, dtype=torch.bool)
    t = targets[name].long().cpu()
    pos = torch.searchsorted(t, idx).clamp(max=t.numel() - 1)
    return t[pos] == idx


def check_targets(targets: Targets, specs: list[WeightSpec], what: str = "target set") -> Targets:
    """Sorted, deduplicated, in-range target set over the studied weights; an empty set is an error."""
    by_name = {s.name: s for s in specs}
    out: Targets = {}
    for name, idx in targets.items():
        if name not in by_name:
            raise EsaError(f"{what} names {name!r}, which is not among the weights under study")
        idx = torch.unique(torch.as_tensor(idx).long().cpu().reshape(-1))
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= by_name[name].numel):
            raise EsaError(f"{what}: indices of {name} out of range for shape {by_name[name].shape}")
        if idx.numel():
            out[name] = idx
    if not out:
        raise EsaError(f"{what} is empty")
    return out


def uniform_targets(specs: list[WeightSpec], k: int, seed: int, exclude: Targets | None = None) -> Targets:
    """k weights drawn uniformly (seeded) from all studied weights minus `exclude` (unmatched random-k)."""
    k = check_positive_int(k, "random-k size")
    sizes = np.array([s.numel for s in specs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    excluded = np.sort(np.concatenate(
        [exclude[s.name].numpy() + offsets[i] for i, s in enumerate(specs) if exclude and s.name in exclude]
        or [np.zeros(0, dtype=np.int64)]))
    total = int(offsets[-1])
    if k > total - excluded.size:
        raise EsaError(f"cannot draw {k} weights: only {total - excluded.size} are available")
    rng = rng_for(seed, "uniform_targets")
    picked: np.ndarray = np.zeros(0, dtype=np.int64)
    while picked.size < k:  # rejection of duplicates and excluded draws; k << total in every real use
        draw = rng.integers(0, total, size=2 * (k - picked.size) + 8)
        if excluded.size:
            pos = np.searchsorted(excluded, draw).clip(max=excluded.size - 1)
            draw = draw[excluded[pos] != draw]
        picked = np.unique(np.concatenate([picked, draw]))
    picked = np.sort(rng.permutation(picked)[:k])
    which = np.searchsorted(offsets, picked, side="right") - 1
    out: Targets = {}
    for i in np.unique(which):
        out[specs[int(i)].name] = torch.from_numpy(picked[which == i] - offsets[i]).long()
    return out


def top_fraction(scores: dict[str, torch.Tensor], fraction: float,
                 specs: list[WeightSpec] | None = None) -> Targets:
    """The globally top-scoring `fraction` of the weights in `scores` (ties: earlier param, lower index)."""
    if not (0.0 < fraction <= 1.0):
        raise EsaError(f"protected fraction must lie in (0, 1], got {fraction!r}")
    names = [s.name for s in specs] if specs else list(scores)
    flat = torch.cat([scores[n].detach().float().reshape(-1).cpu() for n in names])  # (N,)
    k = max(1, int(round(fraction * flat.numel())))
    # the k largest (NaN ranks last); ties at the k-th value go to the earlier parameter and lower index,
    # as a stable sort would pick them, without sorting all N scores (topk is O(N))
    flat = torch.nan_to_num(flat, nan=-math.inf)
    thr = torch.topk(flat, k, sorted=False).values.min()
    above = (flat > thr).nonzero().reshape(-1)
    order = torch.cat([above, (flat == thr).nonzero().reshape(-1)[: k - above.numel()]])
    sizes = torch.tensor([scores[n].numel() for n in names])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])
    which = torch.searchsorted(offsets, order, right=True) - 1
    return {names[int(i)]: torch.sort(order[which == i] - offsets[i]).values for i in torch.unique(which)}
