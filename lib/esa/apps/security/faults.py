"""Monte-Carlo fault campaigns: uniform random bit flips at per-bit rates, one evaluation per trial.

A trial at per-bit rate r over N stored bits (every bit of every studied weight in the format, or one bit
class) draws the number of flips k ~ Binomial(N, r), then k distinct bit positions uniformly, applies
them in place, evaluates once on the held-out windows, and restores. A trial with no flip (common at
1e-9) is not evaluated: the model is then bit-identical to the baseline, whose result it takes
(`evaluated` says which). Draws use one seeded stream per (seed, rate, trial), so campaigns that differ
only in protection see the same faults (common random numbers), and the guard's effect is paired.

Per trial: flips drawn, flips stopped by the guard, inf/NaN values produced, PPL, log-PPL, accuracy, the
damage log(PPL/base) and whether it is catastrophic (PPL >= factor x base, default 10, or not finite),
and the attribution the issue asks for: flips in the critical set, exponent flips, exponent-MSB (int8:
MSB) flips. Per rate: the catastrophic rate with a Wilson CI, damage quantiles (a non-finite damage is
counted apart and ranks above every finite one), and the share of catastrophes that hit the critical
set / an exponent bit.

`random_flip_search` is the random baseline of the attack comparison (the "10,000 random flips"): one
seeded sequence of distinct uniformly random flips over a target set, judged at checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from esa.apps.security.bfa import AttackConfig, AttackResult, goal_labels, judge
from esa.apps.security.common import (
    baseline,
    check_factor,
    check_positive_int,
    check_rate,
    check_targets,
    collapsed,
    contains,
    damage,
    resolve_weights,
    rng_for,
    wilson_ci,
)
from esa.apps.security.defences import Guard, apply_guard, check_mode, make_guard
from esa.apps.security.formats import (
    BitDomain,
    FlipSet,
    Store,
    draw_distinct,
    flipped,
    get_format,
    mask_bits,
    stored,
)
from esa.data import Windows
from esa.errors import EsaError
from esa.evaluate import EvalResult, evaluate
from esa.models.inventory import WeightSpec
from esa.perturb.apply import Targets
from esa.progress import progress


@dataclass
class FaultResult:
    trials: pd.DataFrame  # one row per (rate, trial)
    summary: pd.DataFrame  # one row per rate
    base: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)


def _attribution(store: Store, flips: FlipSet, critical: Targets | None) -> dict[str, int]:
    fmt = store.fmt
    n_crit = n_exp = n_top = n_w_crit = 0
    top = fmt.positions(fmt.worst)[0]
    exp = set(fmt.exponent)
    for name, (idx, mask) in flips.items():
        i, b = mask_bits(mask, idx, fmt.n_bits)
        inside = contains(critical, name, i)
        n_crit += int(inside.sum())
        n_w_crit += int(contains(critical, name, idx).sum())
        n_exp += int(sum(int((b == e).sum()) for e in exp))
        n_top += int((b == top).sum())
    return dict(critical_set=critical is not None, n_critical_flips=n_crit, n_critical_weights_hit=n_w_crit,
                n_exponent_flips=n_exp, n_top_bit_flips=n_top)


_EVAL_COLUMNS = ("evaluated", "n_weights", "n_inf", "n_nan", "ppl", "log_ppl", "accuracy",
                 "n_nonfinite_windows", "damage", "catastrophic")


def _trial_row(r: EvalResult, base: EvalResult, factor: float) -> dict[str, Any]:
    return dict(ppl=r.ppl, log_ppl=r.log_ppl, accuracy=r.accuracy, n_nonfinite_windows=r.n_nonfinite_windows,
                damage=damage(r.log_ppl, base.log_ppl),
                catastrophic=collapsed(r.log_ppl, base.log_ppl, factor))


def _share(flags: pd.Series) -> float:
    """Share of True among the catastrophes; NaN (not estimable) when there were none."""
    return float(flags.mean()) if len(flags) else math.nan


def summarise(trials: pd.DataFrame, by: Sequence[str] = ("rate",)) -> pd.DataFrame:
    """Per group: catastrophic rate (Wilson 95%), damage quantiles, attribution of the catastrophes."""
    out = []
    for key, g in trials.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        k, n = int(g["catastrophic"].sum()), len(g)
        rate, lo, hi = wilson_ci(k, n)
        d = g["damage"].to_numpy(dtype=float)
        fin = d[np.isfinite(d)]
        cat = g[g["catastrophic"]]
        q = np.quantile(fin, [0.5, 0.9, 0.99]) if fin.size else [math.nan] * 3
        out.append(dict(zip(by, key, strict=True), n_trials=n, n_evaluated=int(g["evaluated"].sum()),
                        n_reused=int(g["reused"].sum()) if "reused" in g else 0,
                        mean_flips=float(g["n_flips"].mean()),
                        mean_flips_stopped=float(g["n_stopped"].mean()),
                        n_catastrophic=k, catastrophic_rate=rate, catastrophic_lo=lo, catastrophic_hi=hi,
                        n_nonfinite=int((~np.isfinite(d)).sum()), trials_with_inf_or_nan_weights=int(
                            ((g["n_inf"] + g["n_nan"]) > 0).sum()),
                        damage_median=float(q[0]), damage_p90=float(q[1]), damage_p99=float(q[2]),
                        damage_max_finite=float(fin.max()) if fin.size else math.nan,
                        catastrophes_hit_critical=_share(cat["n_critical_flips"] > 0)
                        if g["critical_set"].all() else math.nan,  # no critical set given: not estimable
                        catastrophes_hit_exponent=_share(cat["n_exponent_flips"] > 0),
                        catastrophes_hit_top_bit=_share(cat["n_top_bit_flips"] > 0)))
    return pd.DataFrame(out)


def fault_campaign(
    model: torch.nn.Module,
    windows: Windows | torch.Tensor,
    fmt: str,
    rates: Sequence[float],
    trials: int,
    seed: int = 0,
    bits: str = "any",
    weights: Sequence[str | WeightSpec] | None = None,
    critical: Targets | None = None,
    guard: Guard | None = None,
    factor: float = 10.0,
    batch_size: int | None = None,
    show_progress: bool = True,
    reuse: FaultResult | None = None,
) -> FaultResult:
    """Monte-Carlo trials of uniform random bit flips at each per-bit rate (see the module docstring).

    `reuse`: an unguarded campaign with the same format, bits, seed and factor on the same model; a trial
    whose faults the guard leaves untouched then takes that campaign's result instead of evaluating the
    same weights again (evaluation is deterministic given identical weights; `reused` marks such rows)."""
    f = get_format(fmt)
    f.positions(bits)
    rates = [check_rate(r) for r in rates]
    if not rates:
        raise EsaError("no fault rate given")
    trials = check_positive_int(trials, "number of trials")
    factor = check_factor(factor, "catastrophe factor")
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    specs = resolve_weights(model, weights)
    crit = check_targets(critical, specs, "critical set") if critical is not None else None
    if guard is not None:
        guard = make_guard(guard.mode, guard.targets, f, specs)
    earlier: dict[tuple[float, int], dict[str, Any]] = {}
    if reuse is not None:
        rs = reuse.settings
        if rs.get("guard") is not None or any(rs.get(k) != v for k, v in
                                              dict(format=fmt, bits=bits, seed=seed, factor=factor).items()):
            raise EsaError("reuse needs an unguarded campaign with the same format, bits, seed and factor; "
                           "got "
                           f"{ {k: rs.get(k) for k in ('format', 'bits', 'seed', 'factor', 'guard')} }")
        earlier = {(float(r["rate"]), int(r["trial"])): r for r in reuse.trials.to_dict("records")}
    with stored(model, fmt, specs) as store:
        domain = BitDomain(store, bits)
        if reuse is not None and reuse.settings.get("n_stored_bits") != domain.total:
            raise EsaError("reuse: the earlier campaign studied a different set of stored bits")
        tb = time.perf_counter()
        base = baseline(model, windows, batch_size)
        t_base = time.perf_counter() - tb
        t_eval = 0.0
        jobs = [(r, t) for r in rates for t in range(trials)]
        for r, t in progress(jobs, desc=f"faults {fmt}", disable=not show_progress, unit="trial"):
            rng = rng_for(seed, "faults", f"{r:.6e}", t)
            k = int(rng.binomial(domain.total, r))
            drawn = domain.locate(draw_distinct(rng, domain.total, k)) if k else {}
            through, stopped = apply_guard(guard, store, drawn)
            row: dict[str, Any] = dict(rate=r, trial=t, n_drawn=k, n_stopped=stopped,
                                       n_flips=k - stopped, **_attribution(store, through, crit))
            prev = earlier.get((r, t))
            if row["n_flips"] == 0:
                row.update(evaluated=False, reused=False, n_weights=0, n_inf=0, n_nan=0,
                           **_trial_row(base, base, factor))
            elif stopped == 0 and prev is not None and prev["n_drawn"] == k:
                row.update({c: prev[c] for c in _EVAL_COLUMNS}, reused=True)
            else:
                te = time.perf_counter()
                with flipped(store, through) as st:
                    res = evaluate(model, windows, batch_size=batch_size, show_progress=False)
                t_eval += time.perf_counter() - te
                row.update(evaluated=True, reused=False, n_weights=st.n_weights, n_inf=st.n_inf,
                           n_nan=st.n_nan, **_trial_row(res, base, factor))
            rows.append(row)
        n_bits = domain.total
    table = pd.DataFrame(rows)
    settings = dict(format=fmt, bits=bits, trials=trials, seed=seed, factor=factor, n_stored_bits=n_bits,
                    guard=None if guard is None else guard.mode,
                    protected_fraction=None if guard is None else guard.fraction(store),
                    seconds=time.perf_counter() - t0, seconds_baseline=t_base, seconds_in_trial_evals=t_eval)
    return FaultResult(table, summarise(table),
                       dict(ppl=base.ppl, log_ppl=base.log_ppl, accuracy=base.accuracy), settings)


def protection_curve(
    model: torch.nn.Module,
    windows: Windows | torch.Tensor,
    fmt: str,
    rate: float,
    trials: int,
    protected: dict[str, Targets],
    mode: str = "ecc",
    seed: int = 0,
    **kw: Any,
) -> pd.DataFrame:
    """Catastrophic rate at one per-bit rate for each protected set (label -> target set), plus no protection.

    Every campaign sees the same faults (same seed), so the curve isolates what the guard stops; trials the
    guard leaves untouched reuse the unprotected campaign's evaluation."""
    check_rate(rate)
    if not protected:
        raise EsaError("protection_curve needs at least one protected set")
    check_mode(mode, get_format(fmt))
    free = fault_campaign(model, windows, fmt, [rate], trials, seed=seed, **kw)
    frames = [free.summary.assign(protected="none", protected_fraction=0.0, mode=None)]
    for label, targets in protected.items():
        res = fault_campaign(model, windows, fmt, [rate], trials, seed=seed, guard=Guard(mode, targets),
                             reuse=free, **kw)
        frames.append(res.summary.assign(protected=label, mode=mode,
                                         protected_fraction=res.settings["protected_fraction"]))
    return pd.concat(frames, ignore_index=True)


def default_checkpoints(max_flips: int) -> list[int]:
    """Where `random_flip_search` judges its flips by default: 1, 2, 5, 10, 20, 50, ... below the budget, and
    the budget (a plan prices one held-out evaluation at each)."""
    return sorted({m * 10**e for e in range(9) for m in (1, 2, 5) if m * 10**e < max_flips} | {max_flips})


def random_flip_search(
    model: torch.nn.Module,
    attack_ids: torch.Tensor | None,
    heldout: Windows | torch.Tensor,
    targets: Targets | None = None,
    cfg: AttackConfig | None = None,
    weights: Sequence[str | WeightSpec] | None = None,
    guard: Guard | None = None,
    checkpoints: Sequence[int] | None = None,
) -> AttackResult:
    """Up to `cfg.max_flips` distinct uniformly random flips of the allowed bits of `targets` (None: all
    studied weights), judged on `heldout` at checkpoints (default 1, 2, 5, 10, 20, 50, ... and the budget).
    `flips_to` is then the first checkpoint that reaches a goal: an upper bound at that resolution.
    `attack_ids` is unused (the signature is the attack registry's)."""
    cfg = cfg or AttackConfig()
    cfg.validate()
    f = get_format(cfg.fmt)
    bits = cfg.bits or f.bounded
    if checkpoints is None:
        checkpoints = default_checkpoints(cfg.max_flips)
    checkpoints = sorted({check_positive_int(c, "checkpoint") for c in checkpoints if c <= cfg.max_flips})
    t0 = time.perf_counter()
    specs = resolve_weights(model, weights)
    space = None if targets is None else check_targets(targets, specs, "attack target set")
    if guard is not None:
        guard = make_guard(guard.mode, guard.targets, f, specs)
    with stored(model, cfg.fmt, specs) as store:
        domain = BitDomain(store, bits, space)
        base = baseline(model, heldout, cfg.batch_size)
        n_max = min(cfg.max_flips, domain.total)
        order = draw_distinct(rng_for(cfg.seed, "random_flips"), domain.total, n_max)
        flips_to: dict[str, int | None] = {k: None for k in goal_labels(cfg)}
        judge(flips_to, cfg, 0, base.log_ppl, base.accuracy, base.log_ppl)  # met by the baseline: 0 flips
        rows = []
        stop, through = "flip budget spent", {}
        for n in checkpoints:
            through, stopped = apply_guard(guard, store, domain.locate(order[:n]))
            with flipped(store, through) as st:
                r = evaluate(model, heldout, batch_size=cfg.batch_size, show_progress=False)
            rows.append(dict(step=n, n_stopped=stopped, heldout_ppl=r.ppl, heldout_log_ppl=r.log_ppl,
                             heldout_accuracy=r.accuracy, n_inf=st.n_inf, n_nan=st.n_nan,
                             seconds=time.perf_counter() - t0))
            if judge(flips_to, cfg, n, r.log_ppl, r.accuracy, base.log_ppl):
                stop = "every goal reached"
                break
    settings = dict(format=cfg.fmt, bits=bits, max_flips=cfg.max_flips, seed=cfg.seed,
                    target_size=domain.n_weights if targets is not None else None,
                    guard=None if guard is None else guard.mode,
                    resolution="checkpoints " + ",".join(map(str, checkpoints)))
    return AttackResult("random", pd.DataFrame(rows), flips_to, stop,
                        dict(ppl=base.ppl, log_ppl=base.log_ppl, accuracy=base.accuracy), through,
                        dict(seconds=time.perf_counter() - t0), settings, dict(flips_to))



def set_faults(
    model: torch.nn.Module,
    windows: Windows | torch.Tensor,
    fmt: str,
    sets: dict[str, Targets],
    n_flips: int,
    trials: int | Mapping[str, int],
    bits: str | None = None,
    seed: int = 0,
    weights: Sequence[str | WeightSpec] | None = None,
    factor: float = 10.0,
    batch_size: int | None = None,
    show_progress: bool = True,
    start: int | Mapping[str, int] = 0,
) -> pd.DataFrame:
    """Damage per fault inside a weight set: each trial flips `n_flips` distinct stored bits drawn uniformly
    from the bit class `bits` (default: the format's bounded class) of one set's weights, evaluates once and
    restores. One row per (set, trial): damage log(PPL/base), catastrophic (PPL >= factor x base), inf/NaN
    counts. Sets of equal size (a critical set and random sets matched per matrix) make the damage per flip
    comparable; the draws of set s, trial t use their own seeded stream. `trials`: one count for every set,
    or a count per set label. `start`: the first trial index (one for every set, or per set label), so trials
    run in several calls (the looks of a sequential comparison) are the trials one call would run."""
    f = get_format(fmt)
    bits = bits or f.bounded
    f.positions(bits)
    n_flips = check_positive_int(n_flips, "faults per trial")
    factor = check_factor(factor, "catastrophe factor")
    if not sets:
        raise EsaError("set_faults needs at least one weight set")
    per = dict(trials) if isinstance(trials, Mapping) else dict.fromkeys(sets, trials)
    if set(per) != set(sets):
        raise EsaError(f"trials per set are given for {sorted(per)}, the sets are {sorted(sets)}")
    per = {label: check_positive_int(n, f"number of trials of set {label!r}") for label, n in per.items()}
    first = _first_trials(start, per)
    specs = resolve_weights(model, weights)
    checked = {label: check_targets(t, specs, f"weight set {label!r}") for label, t in sets.items()}
    rows = []
    with stored(model, fmt, specs) as store:
        base = baseline(model, windows, batch_size)
        domains = {label: BitDomain(store, bits, t) for label, t in checked.items()}
        jobs = [(label, t) for label in checked for t in range(first[label], first[label] + per[label])]
        for label, t in progress(jobs, desc=f"set faults {fmt}", disable=not show_progress, unit="trial"):
            dom = domains[label]
            fl = dom.locate(draw_distinct(rng_for(seed, "set_faults", label, t), dom.total, n_flips))
            with flipped(store, fl) as st:
                r = evaluate(model, windows, batch_size=batch_size, show_progress=False)
            rows.append(dict(set=label, trial=t, set_size=dom.n_weights, n_flips=st.n_flips, n_inf=st.n_inf,
                             n_nan=st.n_nan, format=fmt, bits=bits, base_log_ppl=base.log_ppl,
                             **_trial_row(r, base, factor)))
    return pd.DataFrame(rows)


def _first_trials(start: int | Mapping[str, int], per: Mapping[str, int]) -> dict[str, int]:
    """`set_faults`' first trial index per set label, checked (integers >= 0, for exactly the sets)."""
    first = dict(start) if isinstance(start, Mapping) else dict.fromkeys(per, start)
    if set(first) != set(per):
        raise EsaError(f"first trials are given for {sorted(first)}, the sets are {sorted(per)}")
    for label, t in first.items():
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0:
            raise EsaError(f"first trial of set {label!r} is {t!r}; accepted: an integer >= 0")
    return {label: int(t) for label, t in first.items()}
