"""The attack registry: every bit-flip attack has one signature, so a runner flag picks it by name.

    ATTACKS[name](model, attack_ids, heldout, targets=None, cfg=AttackConfig(...), weights=None, guard=None)
        -> AttackResult

- `bfa`: progressive bit search (bfa.py).
- `random`: distinct uniformly random flips of the same bit class and target set, judged at checkpoints
  (faults.py): the baseline the search is compared to.
`summarise_attacks` and `flips_ratio` turn runs over attack seeds into flips-needed CIs and the
critical/random vulnerability ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from esa.apps.security.bfa import AttackConfig, AttackResult, progressive_bit_search
from esa.apps.security.faults import random_flip_search
from esa.errors import EsaError, unknown
from esa.registry import Registry
from esa.stats.inference import bootstrap_ci, ratio_ci

AttackFn = Callable[..., AttackResult]

ATTACKS: Registry[AttackFn] = Registry("attack")
ATTACKS.register(progressive_bit_search, "bfa", "progressive bit search: gradient-ranked bits, in-layer then "
                 "cross-layer, one flip per iteration")
ATTACKS.register(random_flip_search, "random",
                 "distinct uniformly random flips of the same bit class and target set, judged at checkpoints")


def run_attack(name: str, *args: Any, cfg: AttackConfig | None = None, **kw: Any) -> AttackResult:
    """ATTACKS[name](...), with the name and the config checked before any work."""
    attack = ATTACKS.lookup(name)
    cfg = cfg or AttackConfig()
    cfg.validate()
    return attack(*args, cfg=cfg, **kw)


def flips_needed(results: Sequence[AttackResult], goal: str) -> tuple[np.ndarray, np.ndarray]:
    """(flips per run, reached per run) for one goal label; a run that never reached it counts its budget + 1
    (right-censored: statistics over such values are lower bounds, and say so)."""
    if not results:
        raise EsaError("no attack results to summarise")
    flips, reached = [], []
    for r in results:
        if goal not in r.flips_to:
            raise unknown("attack goal", goal, r.flips_to)
        v = r.flips_to[goal]
        reached.append(v is not None)
        flips.append(float(v) if v is not None else float(r.settings["max_flips"]) + 1)
    return np.asarray(flips), np.asarray(reached)


def summarise_attacks(results: Mapping[str, Sequence[AttackResult]], n_boot: int = 5000) -> pd.DataFrame:
    """Per (target set label, goal): runs (attack seeds), how many reached the goal, mean flips needed with
    a bootstrap CI over the runs, and whether the mean is censored (some run hit its budget first)."""
    rows = []
    for label, runs in results.items():
        for goal in runs[0].flips_to if runs else []:
            x, ok = flips_needed(runs, goal)
            est, lo, hi = bootstrap_ci(x, n_boot=n_boot)
            rows.append(dict(set=label, goal=goal, n_runs=len(x), n_reached=int(ok.sum()), flips_mean=est,
                             flips_lo=lo, flips_hi=hi, flips_median=float(np.median(x)),
                             censored=bool((~ok).any()), attack=runs[0].attack))
    return pd.DataFrame(rows)


def flips_ratio(num: Sequence[AttackResult], den: Sequence[AttackResult], goal: str, paired: bool = True,
                n_boot: int = 5000) -> dict[str, Any]:
    """mean flips(num) / mean flips(den) for one goal, with a bootstrap CI (paired: run i of each shares an
    attack seed). E.g. num = random-k, den = critical: > 1 means the critical set is the more vulnerable."""
    a, ok_a = flips_needed(num, goal)
    b, ok_b = flips_needed(den, goal)
    if paired and a.size != b.size:
        raise EsaError(f"paired ratio needs as many runs on each side, got {a.size} and {b.size}")
    est, lo, hi = ratio_ci(a, b, paired=paired, n_boot=n_boot)
    note = "" if ok_a.all() and ok_b.all() else (
        "censored: some runs hit their flip budget (bounds, not estimates)")
    if min(a.size, b.size) < 2:
        note = (note + "; " if note else "") + "not estimable: fewer than 2 runs per side"
    return dict(goal=goal, ratio=est, lo=lo, hi=hi, n_num=int(a.size), n_den=int(b.size), note=note)
