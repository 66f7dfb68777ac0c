"""Where two results of one computation disagree: exactly, or with floats to a tolerance of their size.

The same code on the same CPU gives the same bits. Another CPU sums in another order (its own matmul and
reduction kernels), so a result re-computed there agrees with the first only to rounding. Comparisons across
machines therefore take `rtol`: a float `a` equals `b` when |a - b| <= rtol * max(|a|, |b|, 1), relative above 1
and absolute below it (a damage of 1e-4 nats carries the rounding of the two log-PPLs it is a difference of,
about 1e-6 absolute). Everything that is not a float (verdicts, counts, labels, which weights, the number of
windows a sequential test took) must be equal whatever `rtol` is; `rtol=math.inf` compares those alone (and
which floats are NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

SHAPE = "columns or rows differ"  # said where two results differ in shape (columns, rows, keys, items), not values


def _close(a: Any, b: Any, rtol: float) -> Any:
    """Whether floats (or arrays of them) `a` and `b` agree to `rtol` as the module says; NaN equals NaN."""
    with np.errstate(invalid="ignore"):  # inf - inf: settled by a == b
        size = np.maximum(np.maximum(np.abs(a), np.abs(b)), 1.0)
        return (a == b) | (np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= rtol * size)


def difference(a: Any, b: Any, rtol: float = 0.0, path: str = "") -> str | None:
    """The first place `b` differs from `a` ("path: a != b"), or None: mappings key by key, lists item by item,
    floats to `rtol` (NaN equals NaN), everything else exactly."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}/{k}: {SHAPE}, in one only"
            if hit := difference(a[k], b[k], rtol, f"{path}/{k}"):
                return hit
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{path}: {SHAPE}, {len(a)} != {len(b)} items"
        return next((hit for i, (x, y) in enumerate(zip(a, b, strict=True))
                     if (hit := difference(x, y, rtol, f"{path}[{i}]"))), None)
    if isinstance(a, float) and isinstance(b, float):
        return None if _close(np.float64(a), np.float64(b), rtol) else f"{path}: {a!r} != {b!r}"
    return None if a == b else f"{path}: {a!r} != {b!r}"


def frame_difference(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 0.0) -> str | None:
    """The first column where table `b` differs from `a`, or None: the same columns, dtypes and rows; float
    columns to `rtol` (as `difference`), every other column exactly."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return f"{SHAPE}: {list(a.columns)} x {len(a)} vs {list(b.columns)} x {len(b)}"
    if rtol == 0.0:
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        except AssertionError as e:
            return " ".join(str(e).split())[:300]
        return None
    for col in a.columns:
        x, y = a[col], b[col]
        if x.dtype != y.dtype:
            return f"column {col!r}: dtype {x.dtype} != {y.dtype}"
        if pd.api.types.is_float_dtype(x):
            u, v = x.to_numpy(float), y.to_numpy(float)
            bad = ~_close(u, v, rtol)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                return f"column {col!r}, row {i}: {float(u[i])!r} != {float(v[i])!r} ({int(bad.sum())} rows beyond rtol {rtol:g})"
        elif hit := difference(x.tolist(), y.tolist(), rtol, f"column {col!r}"):
            return hit
    return None


def largest(a: Any, b: Any) -> float:
    """The largest |a - b| / max(|a|, |b|, 1) over the floats two equal-shaped results hold (0 when bit-equal):
    how far apart two machines' roundings put them."""
    if isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame):
        cols = [c for c in a.columns if c in b.columns and pd.api.types.is_float_dtype(a[c])
                and pd.api.types.is_float_dtype(b[c]) and len(a) == len(b)]
        return max((largest(a[c].tolist(), b[c].tolist()) for c in cols), default=0.0)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return max((largest(a[k], b[k]) for k in a if k in b), default=0.0)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return max((largest(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b):
        return abs(a - b) / max(abs(a), abs(b), 1.0)
    return 0.0
