"""The share of weights whose single worst bit flip collapses the model, sampled, with a Wilson CI.

Protocol: draw `n_samples` weights uniformly (seeded) from all studied weights; for each, flip each bit of
the chosen bit class in turn (default: the format's worst class, one bit: the exponent MSB of a float,
the MSB of an int8 code), evaluate on the held-out windows, and keep the weight's worst result. A weight
*collapses* the model when that PPL is at least `factor` x the baseline PPL (default 100) or not finite.
In float storage the exponent MSB of almost any weight with |w| < 2 sends it to ~1e38, so this share
says how much of the model is a one-flip single point of failure; it is the number to read before any
"flips to collapse" count in a float format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from esa.apps.security.common import (
    baseline,
    check_factor,
    check_positive_int,
    collapsed,
    damage,
    uniform_targets,
    wilson_ci,
)
from esa.apps.security.formats import flipped, get_format, make_flips, stored
from esa.data import Windows
from esa.evaluate import evaluate
from esa.models.inventory import WeightSpec
from esa.progress import progress


@dataclass
class CollapseResult:
    table: pd.DataFrame  # one row per sampled weight (its worst flip)
    share: float  # collapsed / sampled
    lo: float  # Wilson 95% CI
    hi: float
    n: int
    n_collapsed: int
    n_nonfinite: int  # of the sampled weights, how many gave a non-finite PPL
    base: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return dict(share=self.share, lo=self.lo, hi=self.hi, n=self.n, n_collapsed=self.n_collapsed,
                    n_nonfinite=self.n_nonfinite, **{f"base_{k}": v for k, v in self.base.items()},
                    **self.settings)


def collapse_share(
    model: torch.nn.Module,
    windows: Windows | torch.Tensor,
    fmt: str = "bf16",
    n_samples: int = 100,
    seed: int = 0,
    bits: str | None = None,
    factor: float = 100.0,
    weights: Sequence[str | WeightSpec] | None = None,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> CollapseResult:
    """Sample weights, flip each one's worst bit (within `bits`), and count how many collapse the model."""
    f = get_format(fmt)
    bit_list = f.positions(bits or f.worst)
    n_samples = check_positive_int(n_samples, "number of sampled weights")
    factor = check_factor(factor, "collapse factor")
    rows = []
    with stored(model, fmt, weights) as store:
        specs = list(store.specs.values())
        base = baseline(model, windows, batch_size)
        sample = uniform_targets(specs, n_samples, seed)
        todo = [(name, int(i)) for name, idx in sample.items() for i in idx]
        for name, i in progress(todo, desc=f"collapse {fmt}", disable=not show_progress, unit="weight"):
            spec = store.specs[name]
            idx = torch.tensor([i])
            value = float(store.values(name, idx).float()[0])
            worst: dict[str, Any] = {}
            for b in bit_list:
                fl = make_flips({name: (idx, torch.tensor([b]))})
                with flipped(store, fl) as st:
                    new = float(store.values(name, idx).float()[0])
                    r = evaluate(model, windows, batch_size=batch_size, show_progress=False)
                d = damage(r.log_ppl, base.log_ppl)
                if not worst or d > worst["damage"]:
                    worst = dict(bit=b, after=new, ppl=r.ppl, log_ppl=r.log_ppl, damage=d,
                                 accuracy=r.accuracy,
                                 n_inf=st.n_inf, n_nan=st.n_nan, n_nonfinite_windows=r.n_nonfinite_windows)
            e, rr, c = (int(t[0]) for t in spec.unravel(idx))
            rows.append(dict(param=name, index=i, expert=e, row=rr, col=c, before=value, **worst,
                             collapsed=collapsed(worst["log_ppl"], base.log_ppl, factor)))
    table = pd.DataFrame(rows)
    k = int(table["collapsed"].sum())
    share, lo, hi = wilson_ci(k, len(table))
    nonfinite = int((~table["log_ppl"].apply(math.isfinite)).sum())
    return CollapseResult(table, share, lo, hi, len(table), k, nonfinite,
                          dict(ppl=base.ppl, log_ppl=base.log_ppl, accuracy=base.accuracy),
                          dict(format=fmt, bits=bits or f.worst, factor=factor, seed=seed, ci="wilson 95%",
                               sampling="uniform over studied weights"))
