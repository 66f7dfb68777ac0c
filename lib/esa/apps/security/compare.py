"""Critical weights against matched random sets on one loaded model: the comparisons of Phase 5, week 14.

Each function takes a loaded model, its critical set (`CriticalSet`: the top-k of a sensitivity metric),
held-out windows and plain numbers, and returns the tables the phase shows and judges; none reads a
profile or loads a model itself (esa.phases.phase5_security turns the profile's `security` section into
these arguments, and hands `in_formats` the loader for a format that needs the model in another dtype). The random control of a comparison has the critical set's count in every matrix, disjoint from it
(`matched_random`), drawn anew per attack seed:
- `attack_runs`: the bit search over all weights / the critical set / random-k per attack seed, the
  random-flip baseline, and optionally the search under a guard of the top scores vs an equal random guard;
- `set_fault_table`: bounded random faults inside the critical set vs inside the matched random sets, in pairs
  (`set_fault_pairs`); `sequential_set_faults` runs the pairs look by look until the comparison is decided;
- `pgd_table`: weight-space PGD on the critical set, random-k and magnitude-k;
- `protection_table`: catastrophic rate against the guarded fraction, top-scored vs an equal random set;
- `collapse_table`, `fault_curve_table`: per storage format (the model as `in_formats` gives it), the
  single-flip collapse share and the fault campaigns over per-bit rates;
- `attack_contrast`: the criterion's flips comparison (esa.stats.vulnerability) from the attack runs.
`analyse` runs them all on one model with the sizes a study's settings give (`Knobs`: the keys of the
profile's `security` section it reads) and returns the model's `ModelSecurity`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from esa.apps.security.adversarial import pgd_compare
from esa.apps.security.attacks import flips_needed, run_attack, summarise_attacks
from esa.apps.security.bfa import AttackConfig, AttackResult
from esa.apps.security.collapse import collapse_share
from esa.apps.security.common import contains, top_fraction
from esa.apps.security.defences import Guard, magnitude_like, matched_random
from esa.apps.security.faults import fault_campaign, protection_curve, set_faults
from esa.apps.security.formats import get_format, stored
from esa.data import Windows, calibration, evaluation
from esa.evaluate import evaluate
from esa.models import LoadedModel
from esa.perturb.apply import Targets, count_targets, weights_hash
from esa.stats.sequential import Design, SequentialResult
from esa.stats.sequential import run as run_sequential
from esa.stats.vulnerability import (
    Vulnerability,
    adversarial_contrasts,
    fault_contrast,
    vulnerability_contrast,
)

InFormat = Callable[[str], tuple[torch.nn.Module, Windows]]  # storage format -> (model in its dtype, windows)


class Knobs(Protocol):
    """The keys of a study's settings the comparisons read (esa.phases.phase5_security.Settings has them)."""

    formats: list[str]
    collapse_samples: int
    collapse_factor: float
    attack_format: str
    attack_bits: str | None
    max_flips: int
    goals: list[float]
    criterion_goal: float
    layer_candidates: int | None
    attack_sets: list[str]
    attack_seeds: list[int]
    attack_windows: int
    attack_seqlen: int
    heldout_windows: int
    heldout_seqlen: int
    random_flips: int
    fault_formats: list[str]
    fault_rates: list[float]
    fault_trials: int
    fault_factor: float
    set_fault_flips: int
    set_fault_trials: int
    protect_fractions: list[float]
    protect_mode: str
    protect_format: str
    protect_rate: float
    protect_trials: int
    guard_fraction: float
    guard_attack: bool
    pgd_budgets: list[float]
    pgd_radius: str
    pgd_steps: int
    criterion_factor: float
    alpha: float
    min_runs: int
    n_boot: int
    seed: int


@dataclass
class CriticalSet:
    targets: Targets  # the profile's top-k of the metric (per matrix, or global with mode: global)
    scores: Mapping[str, torch.Tensor] | None  # the metric's scores (for top fractions), None if not kept
    metric: str
    from_cache: bool
    k: int
    mode: str

    def sizes(self, lm: LoadedModel) -> dict[str, int]:
        return {s.name: s.numel for s in lm.inventory}

    def describe(self, lm: LoadedModel) -> dict[str, Any]:
        n = count_targets(self.targets)
        total = sum(s.numel for s in lm.inventory)
        return dict(metric=self.metric, k=self.k, mode=self.mode, n_weights=n, fraction=n / total,
                    from_cache=self.from_cache, scores_kept=self.scores is not None)


def in_critical(history: pd.DataFrame, targets: Targets) -> list[bool]:
    """Per flip of an attack's history (columns `param`, `index`): whether it hit a weight of `targets`."""
    return [bool(contains(targets, p, torch.tensor([int(i)]))[0])
            for p, i in zip(history["param"], history["index"], strict=True)]


@contextlib.contextmanager
def shared_int8(lm: LoadedModel, on: bool) -> Iterator[None]:
    """An int8 block over the model's studied weights that the analyses inside reuse (or nothing)."""
    if not on:
        yield
        return
    with stored(lm.model, "int8"):
        yield


# ------------------------------------------------------------------ per storage format
def in_formats(lm: LoadedModel, wins: Windows, load: Callable[[torch.dtype], LoadedModel],
               windows: Callable[[LoadedModel], Windows]) -> InFormat:
    """fmt -> (model, held-out windows) as `fmt` stores the weights: `lm` and `wins` when its dtype matches (or
    for simulated int8), else a copy `load(dtype)` loads once, with `windows(copy)`."""
    cache: dict[torch.dtype, LoadedModel] = {}

    def in_format(fmt: str) -> tuple[torch.nn.Module, Windows]:
        want = get_format(fmt).dtype
        if want is None or lm.model.get_parameter(lm.inventory[0].name).dtype == want:
            return lm.model, wins
        if want not in cache:
            cache[want] = load(want)
        return cache[want].model, windows(cache[want])
    return in_format


def collapse_table(in_format: InFormat, formats: Sequence[str], model: str, n_samples: int, seed: int,
                   factor: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per format: share of sampled weights whose worst single flip collapses the model, Wilson CI; the
    per-weight rows). Float formats flip the exponent MSB, int8 the code's MSB."""
    summ, rows = [], []
    for fmt in formats:
        m, w = in_format(fmt)
        r = collapse_share(m, w, fmt, n_samples=n_samples, seed=seed, factor=factor, show_progress=False)
        summ.append(dict(model=model, **r.summary()))
        rows.append(r.table.assign(model=model, format=fmt))
    return pd.DataFrame(summ), pd.concat(rows, ignore_index=True)


def fault_curve_table(in_format: InFormat, formats: Sequence[str], model: str, crit: CriticalSet,
                      rates: Sequence[float], trials: int, seed: int,
                      factor: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per format and rate: catastrophic rate, damage quantiles, attribution; per-trial rows)."""
    summ, rows = [], []
    for fmt in formats:
        m, w = in_format(fmt)
        r = fault_campaign(m, w, fmt, rates, trials, seed=seed, bits="any", critical=crit.targets, factor=factor,
                           show_progress=False)
        summ.append(r.summary.assign(format=fmt, model=model, n_stored_bits=r.settings["n_stored_bits"]))
        rows.append(r.trials.assign(format=fmt, model=model))
    return pd.concat(summ, ignore_index=True), pd.concat(rows, ignore_index=True)


# ------------------------------------------------------------------ critical vs matched random
@dataclass
class AttackRuns:
    results: dict[str, list[AttackResult]]  # set label -> one result per attack seed
    table: pd.DataFrame  # one row per (set, seed): flips to each goal, stop reason, timing
    history: pd.DataFrame  # every committed flip of every run
    summary: pd.DataFrame  # per (set, goal): flips needed, bootstrap CI over seeds, censoring


def attack_runs(lm: LoadedModel, crit: CriticalSet, wins: Windows, batch: Callable[[int], torch.Tensor],
                cfg: AttackConfig, seeds: Sequence[int], sets: Sequence[str], random_flips: int,
                guard_fraction: float | None, n_boot: int) -> AttackRuns:
    """Per attack seed (its batch `batch(seed)`): the bit search over each of `sets` (all / critical /
    random_k), the random-flip baseline with `random_flips` flips, and with `guard_fraction` the search over
    all weights with the top fraction of the scores guarded (ecc) vs an equal random set guarded."""
    results: dict[str, list[AttackResult]] = {}
    sizes = crit.sizes(lm)
    guard_sets: dict[str, Targets] = {}
    if guard_fraction is not None and crit.scores is not None:
        guard_sets = {"guard_critical": top_fraction(dict(crit.scores), guard_fraction, lm.inventory)}
    for seed in seeds:
        ids = batch(seed)
        space = {"all": None, "critical": crit.targets, "random_k": matched_random(crit.targets, sizes, seed)}
        for label in sets:
            r = run_attack("bfa", lm.model, ids, wins, targets=space[label], cfg=replace(cfg, seed=seed))
            results.setdefault(label, []).append(r)
        r = run_attack("random", lm.model, ids, wins, cfg=replace(cfg, max_flips=random_flips, seed=seed))
        results.setdefault("random_flips", []).append(r)
        for label, g in guard_sets.items():
            for glabel, gt in ((label, g), ("guard_random", matched_random(g, sizes, seed))):
                r = run_attack("bfa", lm.model, ids, wins, cfg=replace(cfg, seed=seed), guard=Guard("ecc", gt))
                results.setdefault(glabel, []).append(r)
    rows, hist = [], []
    for label, runs in results.items():
        for seed, r in zip(seeds, runs, strict=True):
            rows.append({**r.summary(), "set": label, "seed": seed})
            h = r.history.assign(set=label, seed=seed)
            if label != "random_flips" and crit.targets and len(h):
                h["in_critical"] = in_critical(h, crit.targets)
            hist.append(h)
    return AttackRuns(results, pd.DataFrame(rows), pd.concat(hist, ignore_index=True),
                      summarise_attacks(results, n_boot=n_boot))


def attack_contrast(runs: AttackRuns, goal: str, c: float = 1.0, alpha: float = 0.05,
                    min_runs: int = 3) -> Vulnerability:
    """Flips random-k − c · flips critical to `goal` (e.g. "ppl_x100"), paired by attack seed, runs that hit
    the flip budget flagged as censored (esa.stats.vulnerability)."""
    crit, rand = runs.results.get("critical", []), runs.results.get("random_k", [])
    if not crit or not rand:
        return vulnerability_contrast([], [], more_is_vulnerable=False, c=c, alpha=alpha, min_runs=min_runs)
    cf, okc = flips_needed(crit, goal)
    rf, okr = flips_needed(rand, goal)
    return vulnerability_contrast(cf, rf, more_is_vulnerable=False, c=c, alpha=alpha, min_runs=min_runs,
                                  censored_critical=~okc, censored_random=~okr)


def split_trials(trials: int, n_sets: int) -> list[int]:
    """`trials` over `n_sets` sets as evenly as possible, the first sets taking the remainder (some get 0
    when there are fewer trials than sets)."""
    q, r = divmod(trials, n_sets)
    return [q + (i < r) for i in range(n_sets)]


def set_fault_pairs(lm: LoadedModel, crit: CriticalSet, wins: Windows, fmt: str, n_flips: int, pairs: range,
                    seeds: Sequence[int], bits: str | None, seed: int, factor: float) -> pd.DataFrame:
    """The bounded-fault trial pairs `pairs` (e.g. range(30, 60)): pair i is critical trial i and random trial i,
    the latter trial i // S of the matched random set of seeds[i % S] (S seeds in turn). Each trial draws
    from its own seeded stream, so pair i is the same whichever calls run it, and any prefix of the pairs
    uses the random sets evenly. Rows as `set_faults`, with `pair`; random rows have set "random_k" and
    their draw in `random_set`."""
    n_sets = len(seeds)
    before, upto = split_trials(pairs.start, n_sets), split_trials(pairs.stop, n_sets)  # per set: trials below
    runs = {f"random_k@{s}": (a, b - a) for s, a, b in zip(seeds, before, upto, strict=True) if b > a}
    kw: dict[str, Any] = dict(bits=bits, seed=seed, factor=factor, show_progress=False)
    t = set_faults(lm.model, wins, fmt, {"critical": crit.targets}, n_flips, len(pairs), start=pairs.start, **kw)
    frames = [t.assign(pair=t["trial"])]
    if runs:
        rand = {f"random_k@{s}": matched_random(crit.targets, crit.sizes(lm), s) for s in seeds
                if f"random_k@{s}" in runs}
        r = set_faults(lm.model, wins, fmt, rand, n_flips, {k: n for k, (_, n) in runs.items()},
                       start={k: a for k, (a, _) in runs.items()}, **kw)
        j = r["set"].map({f"random_k@{s}": i for i, s in enumerate(seeds)})
        frames.append(r.assign(set="random_k", random_set=r["set"], pair=r["trial"] * n_sets + j))
    return pd.concat(frames, ignore_index=True)


def set_fault_table(lm: LoadedModel, crit: CriticalSet, wins: Windows, fmt: str, n_flips: int, trials: int,
                    seeds: Sequence[int], bits: str | None, seed: int, factor: float) -> pd.DataFrame:
    """Bounded faults inside the critical set (`trials` trials) vs matched random sets (one per attack seed,
    `trials` in all, split as evenly as the seeds allow): the pairs 0 .. trials − 1 (`set_fault_pairs`)."""
    return set_fault_pairs(lm, crit, wins, fmt, n_flips, range(trials), seeds, bits, seed, factor)


def paired_damage(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(critical, random) damage per pair, in pair order, of a `set_fault_pairs` table."""
    side = {k: table[table["set"] == k].sort_values("pair")["damage"].to_numpy(float) for k in ("critical", "random_k")}
    return side["critical"], side["random_k"]


PAIRS = "trial pairs"


def sequential_set_faults(lm: LoadedModel, crit: CriticalSet, wins: Windows, fmt: str, n_flips: int, design: Design,
                          seeds: Sequence[int], bits: str | None, seed: int, factor: float,
                          c: float = 1.0) -> tuple[pd.DataFrame, SequentialResult]:
    """The set-fault comparison decided sequentially (esa.stats.sequential): pairs run look by look, up to
    `design.looks`, until D = damage(critical) − c·damage(random) > 0 is decided (PASS or FAIL) or the cap
    n_max is reached. Returns every pair run (`set_fault_pairs` rows) and the decision."""
    frames: list[pd.DataFrame] = []

    def more(k: int) -> tuple[np.ndarray, np.ndarray]:
        done = sum(len(f) for f in frames) // 2  # every pair has a critical and a random row
        frames.append(set_fault_pairs(lm, crit, wins, fmt, n_flips, range(done, done + k), seeds, bits, seed, factor))
        return paired_damage(frames[-1])

    result = run_sequential(design, more, c=c, threshold=0.0, unit=PAIRS)
    return pd.concat(frames, ignore_index=True), result


def protection_table(lm: LoadedModel, in_format: InFormat, model: str, crit: CriticalSet,
                     fractions: Sequence[float], fmt: str, rate: float, trials: int, mode: str, seed: int,
                     factor: float) -> pd.DataFrame:
    """Catastrophic rate at `rate` in `fmt` against the guarded fraction: the top-scored weights vs an equal
    random set (matched per matrix), on the same faults. Empty when the scores were not kept."""
    if crit.scores is None:
        return pd.DataFrame()
    m, w = in_format(fmt)
    sets: dict[str, Targets] = {}
    sizes = crit.sizes(lm)
    for fr in fractions:
        top = top_fraction(dict(crit.scores), fr, lm.inventory)
        sets[f"critical@{fr:g}"] = top
        sets[f"random@{fr:g}"] = matched_random(top, sizes, seed)
    curve = protection_curve(m, w, fmt, rate, trials, sets, mode=mode, seed=seed, factor=factor,
                             show_progress=False)
    curve["kind"] = curve["protected"].str.split("@").str[0]
    curve["requested_fraction"] = [float(p.split("@")[1]) if "@" in p else 0.0 for p in curve["protected"]]
    return curve.assign(model=model, format=fmt)


def pgd_table(lm: LoadedModel, crit: CriticalSet, wins: Windows, batch: Callable[[int], torch.Tensor],
              seeds: Sequence[int], budgets: Sequence[float], radius: str, steps: int) -> pd.DataFrame:
    """PGD restricted to the critical set, random-k and magnitude-k (equal counts per matrix), per attack seed."""
    sizes = crit.sizes(lm)
    mag = magnitude_like(crit.targets, lm.model)
    frames = []
    for seed in seeds:
        sets = {"critical": crit.targets, "random_k": matched_random(crit.targets, sizes, seed), "magnitude_k": mag}
        t = pgd_compare(lm.model, batch(seed), sets, budgets, radius=radius, steps=steps, heldout=wins,
                        show_progress=False)
        frames.append(t.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------ one model, from a study's settings
def heldout(lm: LoadedModel, corpus: str, S: Knobs) -> Windows:
    """The windows every analysis is judged on: `heldout_windows` eval-split windows (seed 0)."""
    return evaluation(lm.tokenizer, corpus, S.heldout_seqlen, S.heldout_windows, seed=0,
                      max_positions=lm.info.max_positions or None)


def attack_batch(lm: LoadedModel, corpus: str, S: Knobs, seed: int) -> torch.Tensor:
    """(attack_windows, attack_seqlen) calib-split ids drawn with the attack seed."""
    return calibration(lm.tokenizer, corpus, S.attack_seqlen, S.attack_windows, seed,
                       max_positions=lm.info.max_positions or None).ids


def attack_config(S: Knobs, fmt: str | None = None, max_flips: int | None = None, seed: int = 0) -> AttackConfig:
    return AttackConfig(fmt=fmt or S.attack_format, max_flips=max_flips or S.max_flips, bits=S.attack_bits,
                        goals=tuple(S.goals), layer_candidates=S.layer_candidates, seed=seed, show_progress=False)


@dataclass
class ModelSecurity:
    model: str
    critical: dict[str, Any]
    base: dict[str, float]
    collapse: pd.DataFrame
    collapse_weights: pd.DataFrame
    attacks: AttackRuns
    faults: pd.DataFrame
    fault_trials: pd.DataFrame
    set_faults: pd.DataFrame
    protection: pd.DataFrame
    adversarial: pd.DataFrame
    vulnerability: dict[str, Any]  # attack / faults: Vulnerability; adversarial: eps -> Vulnerability
    seconds: dict[str, float]
    weights_restored: bool
    sequential: dict[str, SequentialResult] = field(default_factory=dict)  # comparisons decided in looks


def set_fault_study(lm: LoadedModel, crit: CriticalSet, wins: Windows, S: Knobs,
                    design: Design | None) -> tuple[pd.DataFrame, SequentialResult | None]:
    """The criterion's set faults in the attack format: every pair (`design` None: fixed n), or look by look
    until decided (`sequential_set_faults`)."""
    args = (lm, crit, wins, S.attack_format, S.set_fault_flips)
    rest = (S.attack_seeds, S.attack_bits, S.seed, S.fault_factor)
    if design is None:
        return set_fault_table(*args, S.set_fault_trials, *rest), None
    return sequential_set_faults(*args, design, *rest, c=S.criterion_factor)


def analyse(name: str, lm: LoadedModel, crit: CriticalSet, wins: Windows, in_format: InFormat, corpus: str,
            S: Knobs, before: str, started: float, fault_design: Design | None = None) -> ModelSecurity:
    """Every comparison of model `name` in the order the study runs them, its judged contrasts and timings; `before`
    is the weights' hash when loaded (`weights_restored`: unchanged after every analysis), `started` the
    perf_counter at the load (the first timing: load and critical set). `fault_design`: decide the set-fault
    comparison sequentially with it (None: all `set_fault_trials` pairs, fixed n)."""
    base = evaluate(lm.model, wins, show_progress=False)
    sec_t: dict[str, float] = {"load_and_critical_set": time.perf_counter() - started}

    def batch(seed: int) -> torch.Tensor:
        return attack_batch(lm, corpus, S, seed)

    def timed(key: str, fn: Any, *a: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a)
        sec_t[key] = time.perf_counter() - t0
        return out

    seeds, fmt = S.attack_seeds, S.attack_format
    collapse, cw = timed("collapse", collapse_table, in_format, S.formats, name, S.collapse_samples, S.seed,
                         S.collapse_factor)
    adv = timed("adversarial", pgd_table, lm, crit, wins, batch, seeds, S.pgd_budgets, S.pgd_radius, S.pgd_steps)
    faults, ft = timed("faults", fault_curve_table, in_format, S.fault_formats, name, crit, S.fault_rates,
                       S.fault_trials, S.seed, S.fault_factor)
    # the int8 analyses share one quantisation of the model (formats.stored reuses an open int8 block)
    with shared_int8(lm, fmt == "int8"):
        runs = timed("attack", attack_runs, lm, crit, wins, batch, attack_config(S), seeds, S.attack_sets,
                     S.random_flips, S.guard_fraction if S.guard_attack else None, S.n_boot)
        sf, seq = timed("set_faults", set_fault_study, lm, crit, wins, S, fault_design)
    with shared_int8(lm, S.protect_format == "int8"):
        prot = timed("protection", protection_table, lm, in_format, name, crit, S.protect_fractions,
                     S.protect_format, S.protect_rate, S.protect_trials, S.protect_mode, S.seed, S.fault_factor)
    stat = dict(c=S.criterion_factor, alpha=S.alpha, min_runs=S.min_runs)
    judged = {"attack": attack_contrast(runs, f"ppl_x{S.criterion_goal:g}", **stat),
              "faults": fault_contrast(sf, **{**stat, "alpha": fault_design.alpha if fault_design else S.alpha},
                                       result=seq),
              "adversarial": adversarial_contrasts(adv, **stat)}
    return ModelSecurity(name, crit.describe(lm), dict(ppl=base.ppl, log_ppl=base.log_ppl, accuracy=base.accuracy),
                         collapse.assign(model=name), cw, runs, faults, ft, sf.assign(model=name), prot,
                         adv.assign(model=name), judged, sec_t, weights_hash(lm.model) == before,
                         {"faults": seq} if seq is not None else {})
