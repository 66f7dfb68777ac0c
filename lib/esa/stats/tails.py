"""Heavy-tail statistics of sensitivity scores, computed without concatenating the model's scores.

Scores arrive as one tensor per parameter. Order statistics (median, top-1% mean) come from a histogram
over the top 16 bits of each float32 (sign, exponent and 7 mantissa bits: monotonic in the value, bins
< 0.8% wide, one integer shift per weight), interpolated within a bin (relative error < 0.8%);
`exact=True` adds a second pass that gathers only the few bins holding a wanted rank. Statistics are of
|score| (Hutchinson saliencies can be negative; the negatives are counted).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

N_BINS = 1 << 15  # non-negative float32 >> 16
F32_MAX = float(torch.finfo(torch.float32).max)


def _tensors(scores: Mapping[str, torch.Tensor] | torch.Tensor | np.ndarray) -> Iterable[torch.Tensor]:
    if isinstance(scores, np.ndarray):
        scores = torch.from_numpy(scores)
    if isinstance(scores, torch.Tensor):
        return [scores]
    return scores.values()


def _clean(t: torch.Tensor) -> torch.Tensor:
    """|score| as a flat fp32 tensor with NaN -> 0 and inf -> the largest float."""
    v = t.detach().reshape(-1).float()
    return torch.nan_to_num(v, nan=0.0, posinf=F32_MAX, neginf=F32_MAX).abs_()


def _bins(v: torch.Tensor) -> torch.Tensor:
    return v.view(torch.int32) >> 16  # (n,) in [0, N_BINS): order-preserving for v >= 0


def _bin_lower_edge(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.int64) << 16).astype(np.int32).view(np.float32).astype(np.float64)


class _Pass:
    """First pass: count and sum of |score| per bin, plus the non-finite / negative counts.

    The histogram is built with torch on each score's own device and summed there; the host sees one
    (N_BINS,) count and sum array per device at the end, not every score matrix, and no per-matrix sync."""

    def __init__(self, scores: Any) -> None:
        self.scores = scores
        acc: dict[torch.device, list[torch.Tensor]] = {}  # device -> [counts, sums, n_negative, n_nonfinite]
        self.n = 0
        for t in _tensors(scores):
            raw = t.detach().reshape(-1).float()
            self.n += raw.numel()
            dev = raw.device
            if dev not in acc:
                acc[dev] = [torch.zeros(N_BINS, dtype=torch.int64, device=dev),
                            torch.zeros(N_BINS, dtype=torch.float64, device=dev),
                            torch.zeros((), dtype=torch.int64, device=dev),
                            torch.zeros((), dtype=torch.int64, device=dev)]
            counts, sums, n_neg, n_nonfin = acc[dev]
            n_nonfin += (~torch.isfinite(raw)).sum()
            n_neg += (raw < 0).sum()  # NaN is not negative, -inf is
            v = torch.nan_to_num(raw, nan=0.0, posinf=F32_MAX, neginf=F32_MAX).abs_()
            b = _bins(v)  # int32: bincount takes it as is
            counts += torch.bincount(b, minlength=N_BINS)
            # float64 weights: the per-bin sums are those the float64 numpy path gave
            sums += torch.bincount(b, weights=v.double(), minlength=N_BINS)
        self.counts = np.zeros(N_BINS, dtype=np.int64)
        self.sums = np.zeros(N_BINS, dtype=np.float64)
        self.n_negative = self.n_nonfinite = 0
        for counts, sums, n_neg, n_nonfin in acc.values():  # the one copy to the host per device
            self.counts += counts.cpu().numpy()
            self.sums += sums.cpu().numpy()
            self.n_negative += int(n_neg)
            self.n_nonfinite += int(n_nonfin)
        self.cum = np.cumsum(self.counts)
        self.total = float(self.sums.sum())

    def bin_of(self, r: int) -> int:
        """Bin holding the r-th smallest value (0-based)."""
        return int(np.searchsorted(self.cum, r, side="right"))

    def resolve(self, ranks: list[int], top_m: int, exact: bool = False) -> tuple[list[float], float]:
        """Values at `ranks` and the sum of the `top_m` largest values.

        exact=False (default) stays inside the bins: a rank's value is interpolated within its bin
        (bins are < 0.8% wide, so the relative error is below that) and the part of the top m that falls
        in the threshold bin is counted at the bin's mean. exact=True gathers those bins in a second pass.
        """
        top_bin = self.bin_of(self.n - top_m)  # bin of the smallest of the top m
        k_from_bin = top_m - (self.n - int(self.cum[top_bin]))  # how many of the top m lie in that bin
        above = float(self.sums[top_bin + 1 :].sum())  # every value in a higher bin is in the top m
        if not exact:
            def approx(r: int) -> float:
                b = self.bin_of(r)
                below = int(self.cum[b - 1]) if b > 0 else 0
                lo, hi = _bin_lower_edge(np.array([b, b + 1]))
                return float(lo + (hi - lo) * (r - below + 0.5) / self.counts[b])

            bin_mean = self.sums[top_bin] / max(1, self.counts[top_bin])
            return [approx(r) for r in ranks], above + k_from_bin * bin_mean
        want = sorted({self.bin_of(r) for r in ranks} | {top_bin})
        gathered: dict[int, list[torch.Tensor]] = {b: [] for b in want}
        for t in _tensors(self.scores):
            v = _clean(t)
            b = _bins(v)
            for w in want:  # only the few bins holding a wanted rank are gathered
                gathered[w].append(v[b == w].cpu())
        sorted_bins = {w: torch.cat(g).sort().values.double().numpy() for w, g in gathered.items()}

        def value(r: int) -> float:
            b = self.bin_of(r)
            below = int(self.cum[b - 1]) if b > 0 else 0
            return float(sorted_bins[b][r - below])

        in_bin = sorted_bins[top_bin]
        top_sum = above + (float(in_bin[len(in_bin) - k_from_bin :].sum()) if k_from_bin > 0 else 0.0)
        return [value(r) for r in ranks], top_sum

    def survival(self, points_per_decade: int = 10) -> pd.DataFrame:
        nz = np.nonzero(self.counts[1:])[0] + 1  # skip bin 0 (zeros)
        if len(nz) == 0:
            return pd.DataFrame({"threshold": [], "survival": []})
        step = max(1, int(round(128 * math.log2(10) / points_per_decade)))  # 128 bins per octave
        bins = np.arange(nz[0], nz[-1] + 1, step)
        at_least = self.n - np.concatenate([[0], self.cum])[bins]  # count with bin >= b
        return pd.DataFrame({"threshold": _bin_lower_edge(bins), "survival": at_least / self.n})


def top_values(scores: Any, m: int) -> np.ndarray:
    """The m largest |values| overall, descending (merging each tensor's own top m)."""
    cands = [torch.topk(_clean(t), min(m, t.numel())).values.cpu() for t in _tensors(scores)]
    allc = torch.cat(cands)
    return torch.topk(allc, min(m, allc.numel())).values.double().numpy()


def hill_alpha(top_desc: np.ndarray) -> float:
    """Hill estimator of the tail index from the k+1 largest values (descending); small alpha = heavy tail."""
    x = top_desc[top_desc > 0]
    if len(x) < 3:
        return float("nan")
    k = len(x) - 1
    mean_log = float(np.mean(np.log(x[:k]) - np.log(x[k])))
    return 1.0 / mean_log if mean_log > 0 else float("inf")


def tail_summary(scores: Any, top_frac: float = 0.01, hill_frac: float = 0.001, hill_max: int = 2000,
                 points_per_decade: int = 10, exact: bool = False) -> tuple[dict[str, Any], pd.DataFrame]:
    """(tail statistics, survival curve) from one histogram pass (+ one gathering pass if `exact`)."""
    p = _Pass(scores)
    n = p.n
    m = max(1, int(math.ceil(top_frac * n)))
    (lo, hi), top_sum = p.resolve([(n - 1) // 2, n // 2], m, exact)
    median, top_mean = 0.5 * (lo + hi), top_sum / m
    k_hill = int(min(hill_max, max(10, hill_frac * n)))
    top = top_values(scores, k_hill + 1)
    stats = {
        "n": n, "n_zero": int(p.counts[0]), "n_negative": p.n_negative, "n_nonfinite": p.n_nonfinite,
        "mean": p.total / n, "median": median, "max": float(top[0]), "top_frac": top_frac, "top_mean": top_mean,
        "top_mean_over_median": top_mean / median if median > 0 else float("inf"),
        "max_over_median": float(top[0]) / median if median > 0 else float("inf"),
        "hill_alpha": hill_alpha(top), "hill_k": k_hill,
        "exact": exact,
        "note": "statistics of |score|; n_zero counts exact zeros and values below ~1e-38"
        + ("" if exact else "; median and top mean within 0.8% (binned)"),
    }
    return stats, p.survival(points_per_decade)


def tail_stats(scores: Any, top_frac: float = 0.01, hill_frac: float = 0.001, hill_max: int = 2000,
               exact: bool = False) -> dict[str, Any]:
    """Top-1% mean / median, max / median and a Hill tail index over every weight's |score|."""
    return tail_summary(scores, top_frac, hill_frac, hill_max, exact=exact)[0]


def survival_curve(scores: Any, points_per_decade: int = 10) -> pd.DataFrame:
    """Fraction of weights with |score| >= threshold, at about `points_per_decade` thresholds per decade."""
    return _Pass(scores).survival(points_per_decade)
