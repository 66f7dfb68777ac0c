"""Phase 5 (week 14, security): bit flips in real storage formats, the bit-flip attack, fault campaigns,
protection of the critical set, weight-space PGD, backdoor detection, and the guide's criterion.

The methods live in esa.apps.security; this module turns the profile's `security` section (`Settings`) into
their inputs for one model, and judges the criterion "quantified vulnerability differences for critical vs
random weights" from the results.

**The criterion, defined.** In float storage almost every weight is a one-flip single point of failure
(the exponent MSB sends |w| < 2 to ~1e38; `collapse_shares` measures the share), so "flips to collapse"
cannot tell critical from random weights there. The comparison is therefore made where the damage of one
flip is bounded: simulated per-channel int8 (every flip moves a weight by at most its row's range), or a
float format restricted to its bounded bit class (sign, mantissa, exponent LSB). The critical set is the
profile's top-k of `critical_metric` (per matrix, Phase 2's cached scores); its control is a random set
with the same count in every matrix, disjoint from it (`matched_random`), drawn anew per attack seed.
Three vulnerability ratios V = vulnerability(critical) / vulnerability(random), each with a 95% bootstrap CI:
- attack: V = mean flips(random-k) / mean flips(critical) that the bit search restricted to the set needs
  to reach PPL x `criterion_goal` on held-out windows, paired over attack seeds (attack batch and random
  set drawn per seed);
- faults: V = mean damage log(PPL/base) of `set_fault_flips` uniformly random bounded flips inside the
  critical set / inside the matched random set, over `set_fault_trials` trials each (unpaired);
- adversarial: V = mean attack-loss increase of PGD restricted to the critical set / to random-k, paired
  over attack seeds, at each L-infinity budget (the criterion row takes the largest budget; the table has all).
Verdict (`vulnerability_verdict`): PASS when the CI's lower bound exceeds 1 (critical weights measurably
more vulnerable); FAIL when it does not; underpowered with fewer than `min_runs` runs per side, or when
censoring (an attack that hit its flip budget) leaves the direction open; not estimable when the ratio or
its CI is not finite or the random side's mean is within noise of zero (its CI reaches 0). Below the
guide's budget (`budget_reason`) a PASS/FAIL becomes machinery-only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from esa.apps import security as sec
from esa.apps.security.attacks import ATTACKS
from esa.apps.security.backdoor import spectral_features, weight_deltas
from esa.apps.security.common import check_factor, check_positive_int, check_rate, contains
from esa.apps.security.defences import DEFENCES, check_mode, magnitude_like
from esa.apps.security.formats import FORMATS
from esa.data import Windows, calibration, evaluation
from esa.errors import EsaError, unknown
from esa.evaluate import evaluate
from esa.models import LoadedModel
from esa.params import Profile
from esa.perturb.apply import Targets, count_targets, targets_from_selection, weights_hash
from esa.phases.study import Plan, Planned, RunContext, Study, build_settings, option
from esa.recipes import Recipe
from esa.sensitivity.metrics import METRICS
from esa.stats.inference import bootstrap_ci, ratio_ci
from esa.stats.verdicts import Criterion, demote
from esa.store import write_json, write_parquet

if TYPE_CHECKING:
    from esa.phases.command import Command

DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ATTACK_SETS = ("all", "critical", "random_k")
# The guide-sized budget below which a verdict is a machinery check (smoke): attack seeds, fault trials per
# set, held-out tokens per evaluation.
GUIDE_ATTACK_SEEDS = 3
GUIDE_TRIALS = 20
GUIDE_HELDOUT_TOKENS = 512


@dataclass
class Settings:
    """The profile's `security` section. Sizes are per model."""

    # single-flip collapse share: formats, weights sampled per format, collapse = PPL >= factor x base
    formats: list[str] = field(default_factory=lambda: ["bf16", "fp16", "fp32", "int8"])
    collapse_samples: int = 100
    collapse_factor: float = 100.0
    # the bit-flip attack: storage format, bit class (null: the format's bounded class), budget, goals
    attack_format: str = "int8"
    attack_bits: str | None = None
    max_flips: int = 30
    goals: list[float] = field(default_factory=lambda: [100.0, 1000.0])
    criterion_goal: float = 100.0  # the PPL factor whose flips-needed the criterion compares
    layer_candidates: int | None = 8  # cross-layer search: matrices tried per iteration (null: all)
    attack_sets: list[str] = field(default_factory=lambda: list(ATTACK_SETS))
    attack_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    attack_windows: int = 2  # attack batch: calib-split windows drawn with the attack seed
    attack_seqlen: int = 128
    heldout_windows: int = 4  # judged on: eval-split windows (seed 0), disjoint from every attack batch
    heldout_seqlen: int = 128
    random_flips: int = 10000  # the random-flip baseline's budget
    critical_metric: str = "grad_x_weight"
    # fault campaigns: formats, per-bit rates, Monte-Carlo trials, catastrophe = PPL >= factor x base
    fault_formats: list[str] = field(default_factory=lambda: ["int8", "bf16"])
    fault_rates: list[float] = field(default_factory=lambda: [1e-9, 1e-8, 1e-7, 1e-6, 1e-5])
    fault_trials: int = 20
    fault_factor: float = 10.0
    set_fault_flips: int = 10  # criterion: bounded faults per trial inside the critical / random set
    set_fault_trials: int = 20
    # protection: guarded fractions of the top-scored weights (curve), mode, the campaign it is run on
    protect_fractions: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2])
    protect_mode: str = "ecc"
    protect_format: str = "bf16"
    protect_rate: float = 1e-8
    protect_trials: int = 20
    guard_fraction: float = 1e-4  # the attack under a guard of the top 0.01% (vs an equal random guard)
    guard_attack: bool = True  # run that guarded attack (two more searches per attack seed)
    # adversarial: L-infinity budgets (fractions of |w| or of the matrix std), PGD steps
    pgd_budgets: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.2])
    pgd_radius: str = "abs"
    pgd_steps: int = 5
    # backdoor detection: twin pairs fine-tuned from a micro-suite base model
    # (micro-llama-176k: 300 steps give the backdoor an ASR of ~0.75 on held-out prompts; the 33k model
    # does not learn it)
    backdoor_base: str = "micro-llama-176k@smoke"
    backdoor_pairs: int = 10
    backdoor_steps: int = 300
    backdoor_lr: float = 1e-2
    backdoor_poison_frac: float = 0.5
    backdoor_train_windows: int = 64
    backdoor_seqlen: int = 64
    backdoor_prompts: int = 32
    backdoor_metric: str = "grad_x_weight"
    # statistics
    min_runs: int = 3  # fewer runs per side of a ratio: underpowered
    n_boot: int = 2000
    seed: int = 0

    def validate(self) -> Settings:
        """Every value checked; one EsaError naming the key, the value and what is accepted."""
        for key in ("formats", "fault_formats"):
            vals = getattr(self, key)
            if not vals:
                raise EsaError(f"security.{key} is empty; accepted: {', '.join(FORMATS)}")
            for f in vals:
                if f not in FORMATS:
                    raise unknown(f"storage format in security.{key}", f, FORMATS)
        for key in ("attack_format", "protect_format"):
            if getattr(self, key) not in FORMATS:
                raise unknown(f"storage format in security.{key}", getattr(self, key), FORMATS)
        if self.attack_bits is not None:
            FORMATS[self.attack_format].positions(self.attack_bits)
        for s in self.attack_sets:
            if s not in ATTACK_SETS:
                raise unknown("attack target set in security.attack_sets", s, ATTACK_SETS)
        if self.critical_metric not in METRICS:
            raise unknown("metric in security.critical_metric", self.critical_metric, METRICS)
        if self.backdoor_metric not in METRICS:
            raise unknown("metric in security.backdoor_metric", self.backdoor_metric, METRICS)
        if self.protect_mode not in DEFENCES:
            raise unknown("protection in security.protect_mode", self.protect_mode, DEFENCES)
        check_mode(self.protect_mode, FORMATS[self.protect_format])
        if self.pgd_radius not in sec.RADII:
            raise unknown("L-infinity radius in security.pgd_radius", self.pgd_radius, sec.RADII)
        for key in ("collapse_samples", "max_flips", "attack_windows", "attack_seqlen", "heldout_windows",
                    "heldout_seqlen", "random_flips", "fault_trials", "set_fault_flips", "set_fault_trials",
                    "protect_trials", "pgd_steps", "backdoor_pairs", "backdoor_steps", "backdoor_train_windows",
                    "backdoor_seqlen", "backdoor_prompts", "min_runs", "n_boot"):
            check_positive_int(getattr(self, key), f"security.{key}")
        if self.layer_candidates is not None:
            check_positive_int(self.layer_candidates, "security.layer_candidates")
        if not self.attack_seeds:
            raise EsaError("security.attack_seeds is empty; give at least one seed")
        if len(set(self.attack_seeds)) != len(self.attack_seeds):
            raise EsaError(f"security.attack_seeds has duplicates: {self.attack_seeds}")
        if not (0.0 < self.backdoor_poison_frac < 1.0) or not (self.backdoor_lr > 0):
            raise EsaError(f"security.backdoor_poison_frac must lie in (0, 1) and backdoor_lr be > 0, got "
                           f"{self.backdoor_poison_frac!r} and {self.backdoor_lr!r}")
        for key in ("collapse_factor", "fault_factor", "criterion_goal"):
            check_factor(getattr(self, key), f"security.{key}")
        if not self.goals:
            raise EsaError("security.goals is empty; give PPL factors such as [100, 1000]")
        for g in self.goals:
            check_factor(g, "security.goals")
        if self.criterion_goal not in self.goals:
            raise EsaError(f"security.criterion_goal {self.criterion_goal:g} is not among security.goals "
                           f"{self.goals}")
        if not self.fault_rates:
            raise EsaError("security.fault_rates is empty; give per-bit rates in (0, 1)")
        for r in (*self.fault_rates, self.protect_rate):
            check_rate(r, "security fault rate")
        for key in ("protect_fractions", "pgd_budgets"):
            if not getattr(self, key):
                raise EsaError(f"security.{key} is empty")
        for fr in (*self.protect_fractions, self.guard_fraction):
            if not (0.0 < fr < 0.5):
                raise EsaError(f"security protected fraction must lie in (0, 0.5), got {fr!r}")
        for b in self.pgd_budgets:
            if not (b > 0) or math.isinf(b):
                raise EsaError(f"security.pgd_budgets: a budget must be a finite number > 0, got {b!r}")
        return self


def settings(P: Profile, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The profile's `security` section (+ overrides), typed and validated."""
    return build_settings(P, "security", Settings, overrides).validate()


def budget_reason(S: Settings) -> str | None:
    """Why a verdict under these settings is a machinery check, or None (guide-sized)."""
    short = []
    if len(S.attack_seeds) < GUIDE_ATTACK_SEEDS:
        short.append(f"{len(S.attack_seeds)} attack seed(s) (guide-sized: {GUIDE_ATTACK_SEEDS})")
    if S.set_fault_trials < GUIDE_TRIALS:
        short.append(f"{S.set_fault_trials} fault trials per set (guide-sized: {GUIDE_TRIALS})")
    if S.heldout_windows * (S.heldout_seqlen - 1) < GUIDE_HELDOUT_TOKENS - S.heldout_windows:
        short.append(f"{S.heldout_windows} x {S.heldout_seqlen} held-out tokens (guide-sized: "
                     f">= {GUIDE_HELDOUT_TOKENS})")
    return "budget below the guide's: " + ", ".join(short) if short else None


# ------------------------------------------------------------------ inputs
def heldout(lm: LoadedModel, corpus: str, S: Settings) -> Windows:
    return evaluation(lm.tokenizer, corpus, S.heldout_seqlen, S.heldout_windows, seed=0,
                      max_positions=lm.info.max_positions or None)


def attack_batch(lm: LoadedModel, corpus: str, S: Settings, seed: int) -> torch.Tensor:
    """(attack_windows, attack_seqlen) calib-split ids drawn with the attack seed."""
    return calibration(lm.tokenizer, corpus, S.attack_seqlen, S.attack_windows, seed,
                       max_positions=lm.info.max_positions or None).ids


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


def critical_set(lm: LoadedModel, name: str, P: Profile, S: Settings) -> CriticalSet:
    """Top-k of `critical_metric` on the profile's first seed, through the score cache (Phase 2's run)."""
    R = Recipe.of(P)
    seed = P.seeds[0]
    sel, _, cached, runs = R.scored_topk(lm, name, S.critical_metric, seeds=[seed])
    return CriticalSet(targets_from_selection(sel, lm.inventory), runs[seed].full(), S.critical_metric,
                       bool(cached[seed]), R.topk, R.mode)


def attack_config(S: Settings, fmt: str | None = None, max_flips: int | None = None, seed: int = 0) -> sec.AttackConfig:
    return sec.AttackConfig(fmt=fmt or S.attack_format, max_flips=max_flips or S.max_flips, bits=S.attack_bits,
                            goals=tuple(S.goals), layer_candidates=S.layer_candidates, seed=seed,
                            show_progress=False)


def load_in(name: str, P: Profile, fmt: str, lm: LoadedModel,
            cache: dict[str, LoadedModel] | None = None) -> LoadedModel:
    """The model as format `fmt` stores it: `lm` itself when its dtype matches (or for int8), else a copy
    loaded in that dtype (kept in `cache`, keyed by dtype, when one is given)."""
    want = DTYPE_OF.get(fmt)
    if want is None or lm.model.get_parameter(lm.inventory[0].name).dtype == getattr(torch, want):
        return lm
    if cache is not None and want in cache:
        return cache[want]
    # the embedded models' dequantised folders keep their GGUF quantization_config, so transformers warns that
    # packed GGUF kernels prefer float32; the weights are plain nn.Linear tensors in `want` (tests flip them)
    gguf_log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        m = Recipe.of(P).but(dtype=want).load(name)
    finally:
        gguf_log.setLevel(level)
    if cache is not None:
        cache[want] = m
    return m


# ------------------------------------------------------------------ analyses
def collapse_shares(lm: LoadedModel, name: str, P: Profile, S: Settings, wins: Windows,
                    cache: dict[str, LoadedModel] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per format: share of sampled weights whose worst single flip collapses the model, Wilson CI; the
    per-weight rows). Float formats flip the exponent MSB, int8 the code's MSB."""
    summ, rows = [], []
    for fmt in S.formats:
        m = load_in(name, P, fmt, lm, cache)
        w = heldout(m, P.corpus, S) if m is not lm else wins
        r = sec.collapse_share(m.model, w, fmt, n_samples=S.collapse_samples, seed=S.seed,
                               factor=S.collapse_factor, show_progress=False)
        summ.append(dict(model=name, **r.summary()))
        rows.append(r.table.assign(model=name, format=fmt))
    return pd.DataFrame(summ), pd.concat(rows, ignore_index=True)


@dataclass
class AttackRuns:
    results: dict[str, list[sec.AttackResult]]  # set label -> one result per attack seed
    table: pd.DataFrame  # one row per (set, seed): flips to each goal, stop reason, timing
    history: pd.DataFrame  # every committed flip of every run
    summary: pd.DataFrame  # per (set, goal): flips needed, bootstrap CI over seeds, censoring


def attacks(lm: LoadedModel, P: Profile, S: Settings, crit: CriticalSet, wins: Windows) -> AttackRuns:
    """BFA over all weights / the critical set / random-k per attack seed, the random-flip baseline, and
    (guard_attack) BFA over all weights with the top `guard_fraction` critical vs an equal random set guarded."""
    results: dict[str, list[sec.AttackResult]] = {}
    sizes = crit.sizes(lm)
    guard_sets: dict[str, Targets] = {}
    if S.guard_attack and crit.scores is not None:
        top = sec.top_fraction(dict(crit.scores), S.guard_fraction, lm.inventory)
        guard_sets = {"guard_critical": top}
    for seed in S.attack_seeds:
        ids = attack_batch(lm, P.corpus, S, seed)
        rand = sec.matched_random(crit.targets, sizes, seed)
        space = {"all": None, "critical": crit.targets, "random_k": rand}
        for label in S.attack_sets:
            r = sec.run_attack("bfa", lm.model, ids, wins, targets=space[label], cfg=attack_config(S, seed=seed))
            results.setdefault(label, []).append(r)
        r = sec.run_attack("random", lm.model, ids, wins, cfg=attack_config(S, max_flips=S.random_flips, seed=seed))
        results.setdefault("random_flips", []).append(r)
        for label, g in guard_sets.items():
            for glabel, gt in ((label, g), ("guard_random", sec.matched_random(g, sizes, seed))):
                r = sec.run_attack("bfa", lm.model, ids, wins, cfg=attack_config(S, seed=seed),
                                   guard=sec.Guard("ecc", gt))
                results.setdefault(glabel, []).append(r)
    rows, hist = [], []
    for label, runs in results.items():
        for seed, r in zip(S.attack_seeds, runs, strict=True):
            rows.append({**r.summary(), "set": label, "seed": seed})
            h = r.history.assign(set=label, seed=seed)
            if label != "random_flips" and crit.targets and len(h):
                h["in_critical"] = [bool(sec_contains(crit.targets, p, i)) for p, i in zip(h["param"], h["index"],
                                                                                          strict=True)]
            hist.append(h)
    return AttackRuns(results, pd.DataFrame(rows), pd.concat(hist, ignore_index=True),
                      sec.summarise_attacks(results, n_boot=S.n_boot))


def sec_contains(targets: Targets, name: str, index: int) -> bool:
    return bool(contains(targets, name, torch.tensor([int(index)]))[0])


def fault_curves(lm: LoadedModel, name: str, P: Profile, S: Settings, crit: CriticalSet, wins: Windows,
                 cache: dict[str, LoadedModel] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per format and rate: catastrophic rate, damage quantiles, attribution; per-trial rows)."""
    summ, trials = [], []
    for fmt in S.fault_formats:
        m = load_in(name, P, fmt, lm, cache)
        w = heldout(m, P.corpus, S) if m is not lm else wins
        r = sec.fault_campaign(m.model, w, fmt, S.fault_rates, S.fault_trials, seed=S.seed, bits="any",
                               critical=crit.targets, factor=S.fault_factor, show_progress=False)
        summ.append(r.summary.assign(format=fmt, model=name, n_stored_bits=r.settings["n_stored_bits"]))
        trials.append(r.trials.assign(format=fmt, model=name))
    return pd.concat(summ, ignore_index=True), pd.concat(trials, ignore_index=True)


def set_faults(lm: LoadedModel, S: Settings, crit: CriticalSet, wins: Windows) -> pd.DataFrame:
    """The criterion's fault comparison: bounded faults inside the critical set vs matched random sets (one
    random set per attack seed, trials split evenly between them)."""
    sizes = crit.sizes(lm)
    sets = {"critical": crit.targets}
    per = max(1, S.set_fault_trials // len(S.attack_seeds))
    rand = {f"random_k@{s}": sec.matched_random(crit.targets, sizes, s) for s in S.attack_seeds}
    t = sec.set_faults(lm.model, wins, S.attack_format, sets, S.set_fault_flips, S.set_fault_trials,
                       bits=S.attack_bits, seed=S.seed, factor=S.fault_factor, show_progress=False)
    r = sec.set_faults(lm.model, wins, S.attack_format, rand, S.set_fault_flips, per, bits=S.attack_bits,
                       seed=S.seed, factor=S.fault_factor, show_progress=False)
    return pd.concat([t, r.assign(set="random_k", random_set=r["set"])], ignore_index=True)


def protection(lm: LoadedModel, name: str, P: Profile, S: Settings, crit: CriticalSet,
               cache: dict[str, LoadedModel] | None = None) -> pd.DataFrame:
    """Catastrophic rate at `protect_rate` against the guarded fraction: the top-scored weights vs an equal
    random set (matched per matrix), on the same faults. Empty when the scores were not kept."""
    if crit.scores is None:
        return pd.DataFrame()
    m = load_in(name, P, S.protect_format, lm, cache)
    w = heldout(m, P.corpus, S)
    sets: dict[str, Targets] = {}
    sizes = crit.sizes(lm)
    for fr in S.protect_fractions:
        top = sec.top_fraction(dict(crit.scores), fr, lm.inventory)
        sets[f"critical@{fr:g}"] = top
        sets[f"random@{fr:g}"] = sec.matched_random(top, sizes, S.seed)
    curve = sec.protection_curve(m.model, w, S.protect_format, S.protect_rate, S.protect_trials, sets,
                                 mode=S.protect_mode, seed=S.seed, factor=S.fault_factor, show_progress=False)
    curve["kind"] = curve["protected"].str.split("@").str[0]
    curve["requested_fraction"] = [float(p.split("@")[1]) if "@" in p else 0.0 for p in curve["protected"]]
    return curve.assign(model=name, format=S.protect_format)


def adversarial(lm: LoadedModel, P: Profile, S: Settings, crit: CriticalSet, wins: Windows) -> pd.DataFrame:
    """PGD restricted to the critical set, random-k and magnitude-k (equal counts per matrix), per attack seed."""
    sizes = crit.sizes(lm)
    mag = magnitude_like(crit.targets, lm.model)
    frames = []
    for seed in S.attack_seeds:
        ids = attack_batch(lm, P.corpus, S, seed)
        sets = {"critical": crit.targets, "random_k": sec.matched_random(crit.targets, sizes, seed),
                "magnitude_k": mag}
        t = sec.pgd_compare(lm.model, ids, sets, S.pgd_budgets, radius=S.pgd_radius, steps=S.pgd_steps,
                            heldout=wins, show_progress=False)
        frames.append(t.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


@dataclass
class BackdoorResult:
    twins: pd.DataFrame  # per model: ASR, false-trigger rate, losses
    detection: pd.DataFrame  # per detector: AUROC with CI, counts, note
    scores: pd.DataFrame  # per (detector, model): anomaly score and label
    settings: dict[str, Any]


def backdoor(P: Profile, S: Settings) -> BackdoorResult:
    """Clean/backdoored twins of the micro base model; the sensitivity-map detector vs the spectral baseline."""
    t0 = time.perf_counter()
    R = Recipe.of(P)
    base = R.load(S.backdoor_base)
    train = calibration(base.tokenizer, P.corpus, S.backdoor_seqlen, S.backdoor_train_windows, S.seed,
                        max_positions=base.info.max_positions or None).ids
    prompts = evaluation(base.tokenizer, P.corpus, 24, S.backdoor_prompts, seed=0,
                         max_positions=base.info.max_positions or None).ids
    probe = calibration(base.tokenizer, P.corpus, S.backdoor_seqlen, 4, S.seed + 1,
                        max_positions=base.info.max_positions or None).ids
    cfg = sec.PoisonConfig(steps=S.backdoor_steps, lr=S.backdoor_lr, poison_frac=S.backdoor_poison_frac)
    cfg.validate()
    suite = sec.make_twins(base.model, base.tokenizer, train, prompts, S.backdoor_pairs, cfg, seed=S.seed)
    names = list(suite.base)
    feats = {
        "sensitivity_map": sec.sensitivity_features(base.model, suite.states, probe, metric=S.backdoor_metric),
        "weight_delta_spectral": pd.DataFrame({mid: spectral_features(weight_deltas(sd, suite.base, names))
                                               for mid, sd in suite.states.items()}).T,
    }
    det, scores = [], []
    for label, f in feats.items():
        r = sec.detect(f, suite.labels, n_boot=S.n_boot, seed=S.seed)
        det.append(dict(detector=label, auroc=r.auroc, lo=r.lo, hi=r.hi, n_clean=r.n_clean,
                        n_backdoored=r.n_backdoored, n_features=int(f.shape[1]), note=r.note))
        scores.append(r.scores.assign(detector=label))
    return BackdoorResult(suite.table, pd.DataFrame(det), pd.concat(scores, ignore_index=True),
                          dict(base=S.backdoor_base, seconds=time.perf_counter() - t0, **suite.settings))


# ------------------------------------------------------------------ the criterion
@dataclass
class Ratio:
    value: float
    lo: float
    hi: float
    n_critical: int
    n_random: int
    passed: bool | None
    verdict: str
    note: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def vulnerability_verdict(
    critical: Sequence[float], random: Sequence[float], more_is_vulnerable: bool, paired: bool,
    min_runs: int = 3, censored_critical: Sequence[bool] | None = None,
    censored_random: Sequence[bool] | None = None, n_boot: int = 2000, seed: int = 0,
) -> Ratio:
    """V = vulnerability(critical) / vulnerability(random) with a bootstrap CI, and its verdict.

    more_is_vulnerable: True for damage or loss (V = mean critical / mean random), False for flips needed
    (V = mean random / mean critical). Censored runs (an attack that hit its budget: its count is a lower
    bound) are flagged per run; see the module docstring for the rules."""
    c, r = np.asarray(critical, dtype=float), np.asarray(random, dtype=float)
    cc = np.zeros(c.size, bool) if censored_critical is None else np.asarray(censored_critical, bool)
    cr = np.zeros(r.size, bool) if censored_random is None else np.asarray(censored_random, bool)
    num, den = (c, r) if more_is_vulnerable else (r, c)
    if min(c.size, r.size) < min_runs:
        est = ratio_ci(num, den, paired=False, n_boot=n_boot, seed=seed)[0] if c.size and r.size else math.nan
        return Ratio(est, math.nan, math.nan, int(c.size), int(r.size), None, "underpowered",
                     f"{c.size} critical and {r.size} random runs; the ratio needs {min_runs} per side")
    if paired and c.size != r.size:
        raise EsaError(f"a paired ratio needs as many runs per side, got {c.size} and {r.size}")
    est, lo, hi = ratio_ci(num, den, paired=paired, n_boot=n_boot, seed=seed)
    base = dict(n_critical=int(c.size), n_random=int(r.size))
    if more_is_vulnerable and np.isfinite(r).all():
        _, dlo, dhi = bootstrap_ci(r, n_boot=n_boot, seed=seed)
        if not (dlo > 0):
            diff = c.mean() - r.mean()
            return Ratio(est, lo, hi, **base, passed=None, verdict="not estimable",
                         note=f"the random side's mean {r.mean():.3g} is within noise of 0 (95% CI [{dlo:.3g}, "
                              f"{dhi:.3g}]): the ratio's denominator is noise; difference critical - random "
                              f"= {diff:.3g}")
    if not all(math.isfinite(x) for x in (est, lo, hi)):
        return Ratio(est, lo, hi, **base, passed=None, verdict="not estimable",
                     note="the ratio or its CI is not finite (an infinite damage, or a side with no measurable harm)")
    # flips: a censored critical run undercounts the critical side (V overstated), a censored random run the
    # random side (V understated); bootstrapped values keep the budget + 1 as the run's count
    v_inflated, v_deflated = (False, False) if more_is_vulnerable else (bool(cc.any()), bool(cr.any()))
    if v_inflated and v_deflated:
        return Ratio(est, lo, hi, **base, passed=None, verdict="underpowered",
                     note=f"both sides hit the flip budget ({int(cc.sum())} critical, {int(cr.sum())} random "
                          "runs): counts are bounds; raise max_flips")
    if lo > 1:
        if v_inflated:
            return Ratio(est, lo, hi, **base, passed=None, verdict="underpowered",
                         note=f"{int(cc.sum())} critical-set run(s) hit the flip budget, so the ratio may be "
                              "overstated; raise max_flips")
        note = "CI above 1: critical weights are the more vulnerable"
        if v_deflated:
            note += f" (a lower bound: {int(cr.sum())} random-k run(s) hit the flip budget)"
        return Ratio(est, lo, hi, **base, passed=True, verdict="PASS", note=note)
    if v_deflated:
        return Ratio(est, lo, hi, **base, passed=None, verdict="underpowered",
                     note=f"{int(cr.sum())} random-k run(s) hit the flip budget: the ratio is only a lower "
                          "bound and its CI reaches 1; raise max_flips")
    note = ("CI below 1: random weights are the more vulnerable" if hi < 1 else
            "CI includes 1: no difference measured")
    return Ratio(est, lo, hi, **base, passed=False, verdict="FAIL", note=note)


def attack_ratio(runs: AttackRuns, S: Settings) -> Ratio:
    goal = f"ppl_x{S.criterion_goal:g}"
    crit, rand = runs.results.get("critical", []), runs.results.get("random_k", [])
    if not crit or not rand:
        return Ratio(math.nan, math.nan, math.nan, len(crit), len(rand), None, "not estimable",
                     "the critical and random_k attack sets were not both run")
    c, okc = sec.flips_needed(crit, goal)
    r, okr = sec.flips_needed(rand, goal)
    return vulnerability_verdict(c, r, more_is_vulnerable=False, paired=True, min_runs=S.min_runs,
                                 censored_critical=~okc, censored_random=~okr, n_boot=S.n_boot, seed=S.seed)


def fault_ratio(table: pd.DataFrame, S: Settings) -> Ratio:
    c = table.loc[table["set"] == "critical", "damage"].to_numpy(float)
    r = table.loc[table["set"] == "random_k", "damage"].to_numpy(float)
    if not (np.isfinite(c).all() and np.isfinite(r).all()):
        return Ratio(math.nan, math.nan, math.nan, c.size, r.size, None, "not estimable",
                     "a trial's damage is not finite (a bounded flip produced inf/NaN)")
    return vulnerability_verdict(c, r, more_is_vulnerable=True, paired=False, min_runs=S.min_runs,
                                 n_boot=S.n_boot, seed=S.seed)


def adversarial_ratios(table: pd.DataFrame, S: Settings) -> dict[float, Ratio]:
    out = {}
    for eps, g in table.groupby("eps"):
        c = g[g["set"] == "critical"].sort_values("seed")["loss_increase"].to_numpy(float)
        r = g[g["set"] == "random_k"].sort_values("seed")["loss_increase"].to_numpy(float)
        out[float(eps)] = vulnerability_verdict(c, r, more_is_vulnerable=True, paired=True, min_runs=S.min_runs,
                                                n_boot=S.n_boot, seed=S.seed)
    return out


TEXT = "quantified vulnerability differences for critical vs random weights"


def criterion_rows(model: str, S: Settings, attack: Ratio | None, faults: Ratio | None,
                   adversarial: dict[float, Ratio] | None, evidence: str) -> list[Criterion]:
    """One row per comparison (attack, faults, adversarial at the largest budget); not run -> not estimable."""
    where = f"{S.attack_format}, bits {S.attack_bits or FORMATS[S.attack_format].bounded}"
    specs = [
        ("attack", attack, f"flips(random-k) / flips(critical) to PPL x{S.criterion_goal:g}, bit search in {where}"),
        ("faults", faults, f"damage per trial of {S.set_fault_flips} random flips in the critical / a matched "
                           f"random set, {where}"),
    ]
    if adversarial:
        eps = max(adversarial)
        specs.append(("adversarial", adversarial[eps], f"PGD loss increase critical / random-k at L-inf "
                                                        f"{eps:g} ({S.pgd_radius})"))
    else:
        specs.append(("adversarial", None, "PGD loss increase critical / random-k"))
    rows = []
    why = budget_reason(S)
    for key, r, what in specs:
        cid = f"P5.security.{key}.{model}"
        if r is None:
            rows.append(Criterion(cid, 5, f"{TEXT} ({key}, {model})", None, "> 1 (95% CI lower bound)", None,
                                  evidence, f"{key} comparison not run", verdict="not estimable"))
            continue
        note = f"V = {what}; 95% CI [{r.lo:.3g}, {r.hi:.3g}]; n = {r.n_critical} vs {r.n_random}; {r.note}"
        c = Criterion(cid, 5, f"{TEXT} ({key}, {model})", r.value, "> 1 (95% CI lower bound)", r.passed,
                      evidence, note, verdict=r.verdict)
        rows.append(demote(c, "machinery-only", why) if why and c.verdict in ("PASS", "FAIL") else c)
    return rows


# ------------------------------------------------------------------ esa-runner
@dataclass
class Spec:
    """esa-runner's security request: an attack and/or a fault campaign on the run's model."""

    attack: str | None = None
    flips: int = 30
    format: str = "int8"
    faults: list[float] = field(default_factory=list)
    trials: int = 20
    settings: dict[str, Any] = field(default_factory=dict)  # the profile's security section

    def describe(self) -> str:
        what = [f"attack {self.attack} ({self.flips} flips)"] if self.attack else []
        return ", ".join(what + ([f"faults {self.faults} x {self.trials} trials"] if self.faults else [])) + f" on {self.format}"


@dataclass(frozen=True)
class SecurityRequest:
    """esa-runner's security flags (the command layer builds them from these fields)."""

    attack: str | None = option("bit-flip attack over all studied weights", choices=lambda: ATTACKS)
    flips: int | None = option("flip budget of --attack (default: the profile's security.max_flips)")
    format: str | None = option("storage format the flips hit; float formats need the matching --dtype",
                                choices=lambda: FORMATS)
    faults: list[float] | None = option("per-bit fault rate(s) in (0, 1), comma list: a Monte-Carlo fault campaign",
                                        accepts="per-bit rates in (0, 1), comma-separated")
    trials: int | None = option("fault trials per rate (default: the profile's security.fault_trials)")


def job(req: SecurityRequest, ctx: RunContext) -> Spec:
    """The validated request; every bad value is one EsaError before loading."""
    attack, faults, flips, fmt, trials = req.attack, req.faults, req.flips, req.format, req.trials
    S = settings(ctx.profile)
    if attack is not None and attack not in ATTACKS:
        raise unknown("attack", attack, ATTACKS)
    if flips is not None and attack is None:
        raise EsaError("--flips needs --attack")
    if trials is not None and faults is None:
        raise EsaError("--trials needs --faults")
    fmt = fmt or S.attack_format
    if fmt not in FORMATS:
        raise unknown("storage format", fmt, FORMATS)
    dtype = ctx.recipe.dtype
    want = DTYPE_OF.get(fmt)
    if want is not None and DTYPE_OF.get(dtype, dtype) != want:
        raise EsaError(f"--format {fmt} flips the weights as stored, so the model must be loaded as {want}; "
                       f"the run's dtype is {dtype}: add --dtype {want}, or use --format int8")
    n = check_positive_int(flips if flips is not None else S.max_flips, "--flips (flip budget)")
    t = check_positive_int(trials if trials is not None else S.fault_trials, "--trials")
    return Spec(attack=attack, flips=n, format=fmt, faults=[check_rate(r, "--faults rate") for r in faults or []],
                trials=t, settings=asdict(S))


def run_job(spec: Spec, cmd: Command, lm: LoadedModel, runs: Any, stage: Path) -> dict[str, Any]:
    """The attack (attack.parquet) and/or fault campaign (faults.parquet) on `lm`, with the critical set the
    run selected (first metric and seed); the weights are restored bit-exactly."""
    S = Settings(**spec.settings)
    R = cmd.recipe
    key = (R.metrics[0], R.seeds[0])
    crit = targets_from_selection(runs[key].topk(R.topk, R.mode, lm.inventory), lm.inventory)
    wins = heldout(lm, R.corpus, S)
    out: dict[str, Any] = {"format": spec.format, "critical": dict(metric=key[0], seed=key[1], k=R.topk,
                                                                   mode=R.mode, n_weights=count_targets(crit))}
    tag = {"model": cmd.model, "run_id": cmd.run_id}
    if spec.attack is not None:
        ids = attack_batch(lm, R.corpus, S, S.attack_seeds[0])
        cfg = attack_config(S, fmt=spec.format, max_flips=spec.flips, seed=S.attack_seeds[0])
        res = sec.run_attack(spec.attack, lm.model, ids, wins, cfg=cfg)
        h = res.history.assign(**tag, attack=spec.attack, format=spec.format)
        if "param" in h:
            h["in_critical"] = [sec_contains(crit, p, i) for p, i in zip(h["param"], h["index"], strict=True)]
        write_parquet(stage / "attack.parquet", h)
        out["attack"] = {**res.summary(), "base": res.base, "files": ["attack.parquet"]}
    if spec.faults:
        res = sec.fault_campaign(lm.model, wins, spec.format, spec.faults, spec.trials, seed=S.seed, critical=crit,
                                 factor=S.fault_factor, show_progress=R.show_progress)
        write_parquet(stage / "faults.parquet", res.trials.assign(**tag, format=spec.format))
        out["faults"] = {"summary": res.summary.to_dict("records"), "settings": res.settings, "base": res.base,
                         "files": ["faults.parquet"]}
    write_json(stage / "security.json", out)
    return out




# ------------------------------------------------------------------ one model, end to end
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
    ratios: dict[str, Any]  # attack / faults: Ratio; adversarial: eps -> Ratio
    seconds: dict[str, float]
    weights_restored: bool


def analyse(name: str, P: Profile, S: Settings) -> ModelSecurity:
    """Every week-14 analysis of one model (the backdoor study is separate: `backdoor`); the weights are
    hashed before and after, and `weights_restored` says whether every analysis restored them bit-exactly."""
    sec_t: dict[str, float] = {}
    t = time.perf_counter()
    lm = Recipe.of(P).load(name)
    h0 = weights_hash(lm.model)
    crit = critical_set(lm, name, P, S)
    wins = heldout(lm, P.corpus, S)
    base = evaluate(lm.model, wins, show_progress=False)
    cache: dict[str, LoadedModel] = {}
    sec_t["load_and_critical_set"] = time.perf_counter() - t

    def timed(key: str, fn: Any, *a: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a)
        sec_t[key] = time.perf_counter() - t0
        return out

    collapse, cw = timed("collapse", collapse_shares, lm, name, P, S, wins, cache)
    adv = timed("adversarial", adversarial, lm, P, S, crit, wins)
    faults, ft = timed("faults", fault_curves, lm, name, P, S, crit, wins, cache)
    # the int8 analyses share one quantisation of the model (formats.stored reuses an open int8 block)
    with shared_int8(lm, S.attack_format == "int8"):
        runs = timed("attack", attacks, lm, P, S, crit, wins)
        sf = timed("set_faults", set_faults, lm, S, crit, wins)
    with shared_int8(lm, S.protect_format == "int8"):
        prot = timed("protection", protection, lm, name, P, S, crit, cache)
    ratios = {"attack": attack_ratio(runs, S), "faults": fault_ratio(sf, S), "adversarial": adversarial_ratios(adv, S)}
    restored = weights_hash(lm.model) == h0
    return ModelSecurity(name, crit.describe(lm), dict(ppl=base.ppl, log_ppl=base.log_ppl, accuracy=base.accuracy),
                         collapse.assign(model=name), cw, runs, faults, ft, sf.assign(model=name), prot,
                         adv.assign(model=name), ratios, sec_t, restored)


@contextlib.contextmanager
def shared_int8(lm: LoadedModel, on: bool) -> Iterator[None]:
    """An int8 block over the model's studied weights that the analyses inside reuse (or nothing)."""
    if not on:
        yield
        return
    with sec.stored(lm.model, "int8"):
        yield


WORKING_ASR = 0.5  # below this mean ASR the backdoors did not take, and detecting them means nothing


def backdoor_prose(bd: BackdoorResult) -> list[str]:
    """Sentences computed from the backdoor study, saying when the backdoors did not take."""
    asr = bd.twins.groupby("label")["asr"].mean()
    took, clean = float(asr.get(1, math.nan)), float(asr.get(0, math.nan))
    out = [f"Backdoor attack success rate: {took:.0%} on backdoored twins, {clean:.0%} on clean twins "
           f"({bd.settings['n_prompts']} held-out prompts + trigger, {bd.settings['steps']} fine-tuning steps of "
           f"{bd.settings['base']})."]
    if not (took >= WORKING_ASR):
        out.append(f"The backdoors did not take (mean ASR {took:.0%} < {WORKING_ASR:.0%}): the AUROCs below test "
                   "the detector's machinery, not its power.")
    for d in bd.detection.itertuples():
        out.append(f"Detector {d.detector}: AUROC {d.auroc:.2f} [{d.lo:.2f}, {d.hi:.2f}] on {d.n_clean} clean and "
                   f"{d.n_backdoored} backdoored twins" + (f"; {d.note}" if d.note else "") + ".")
    return out


def ratio_table(res: ModelSecurity) -> pd.DataFrame:
    rows = [dict(model=res.model, comparison=k, eps=None, **res.ratios[k].as_dict()) for k in ("attack", "faults")]
    rows += [dict(model=res.model, comparison="adversarial", eps=e, **r.as_dict())
             for e, r in res.ratios["adversarial"].items()]
    return pd.DataFrame(rows)


def _fmt_flips(v: float, censored: bool) -> str:
    return f"> {v - 1:.0f}" if censored else f"{v:.3g}"


def prose(res: ModelSecurity, S: Settings) -> list[str]:
    """Sentences computed from the results (no claim typed in)."""
    out = []
    c = res.collapse
    parts = [f"{r.format} {r.share:.0%} [{r.lo:.0%}, {r.hi:.0%}] of {r.n}" for r in c.itertuples()]
    out.append(f"{res.model}: share of sampled weights whose single worst flip (float: exponent MSB; int8: code "
               f"MSB) takes PPL to >= x{S.collapse_factor:g}: " + "; ".join(parts) + ".")
    summ = res.attacks.summary
    goal = f"ppl_x{S.criterion_goal:g}"
    g = summ[summ["goal"] == goal].set_index("set")
    if len(g):
        parts = [f"{k} {_fmt_flips(v.flips_mean, bool(v.censored))} (reached in {v.n_reached}/{v.n_runs} seeds)"
                 for k, v in g.iterrows()]
        out.append(f"Mean flips to PPL x{S.criterion_goal:g} in {S.attack_format} ('>' = budget hit first, a "
                   "lower bound): " + "; ".join(parts) + ".")
    h = res.attacks.history
    if "in_critical" in h and "all" in set(h["set"]):
        a = h[h["set"] == "all"]
        out.append(f"Of the {len(a)} flips the unrestricted search chose, {int(a['in_critical'].sum())} hit the "
                   f"critical set ({res.critical['fraction']:.3%} of the weights).")
    for key in ("attack", "faults"):
        r = res.ratios[key]
        out.append(f"Vulnerability ratio ({key}): {r.value:.3g} [{r.lo:.3g}, {r.hi:.3g}], {r.verdict}: {r.note}.")
    for eps, r in res.ratios["adversarial"].items():
        out.append(f"Vulnerability ratio (PGD, eps {eps:g}): {r.value:.3g} [{r.lo:.3g}, {r.hi:.3g}], {r.verdict}.")
    f = res.faults
    for fmt, g in f.groupby("format"):
        worst = g.sort_values("rate").iloc[-1]
        share = worst["catastrophes_hit_top_bit" if FORMATS[str(fmt)].simulated else "catastrophes_hit_exponent"]
        out.append(f"Faults in {fmt}: catastrophic-trial rate {g['catastrophic_rate'].min():.0%} to "
                   f"{g['catastrophic_rate'].max():.0%} over rates {g['rate'].min():.0e}-{g['rate'].max():.0e}; "
                   f"at {worst['rate']:.0e}, {worst['mean_flips']:.3g} flips per trial"
                   + ("" if math.isnan(share) else f", {share:.0%} of catastrophes with "
                                                   f"{'a code-MSB' if FORMATS[str(fmt)].simulated else 'an exponent'} flip")
                   + ".")
    p = res.protection
    if len(p):
        none = p[p["protected"] == "none"].iloc[0]
        top = p[p["kind"] == "critical"].sort_values("requested_fraction").iloc[-1]
        rnd = p[(p["kind"] == "random") & (p["requested_fraction"] == top["requested_fraction"])].iloc[0]
        out.append(f"Protection ({S.protect_mode}, {S.protect_format}, rate {S.protect_rate:g}): unprotected "
                   f"catastrophic rate {none['catastrophic_rate']:.0%}; guarding the top "
                   f"{top['requested_fraction']:.2%} critical {top['catastrophic_rate']:.0%}, an equal random set "
                   f"{rnd['catastrophic_rate']:.0%}.")
    return out


# ------------------------------------------------------------------ the study
def plan(S: Settings, P: Profile, models: Sequence[str] | None = None) -> Plan:
    """The analyses of each model, without loading anything."""
    chosen = list(models or P.models)
    conds = [Planned(m, f"attack {a} seed={s}", S.heldout_windows, "windows") for m in chosen
             for a in S.attack_sets for s in S.attack_seeds]
    conds += [Planned(m, f"faults {f} rate={r:g}", S.fault_trials, "trials") for m in chosen for f in S.fault_formats
              for r in S.fault_rates]
    return Plan("security", P, chosen, S, conds, {"formats": list(S.formats), "max_flips": S.max_flips})


def run(p: Plan) -> dict[str, ModelSecurity]:
    return {m: analyse(m, p.profile, p.settings) for m in p.models}


def criteria(results: Mapping[str, ModelSecurity], p: Plan, evidence: str) -> list[Criterion]:
    return [row for m, r in results.items() for row in criterion_rows(
        m, p.settings, r.ratios["attack"], r.ratios["faults"], r.ratios["adversarial"], evidence)]


def findings(results: Mapping[str, ModelSecurity], p: Plan) -> list[str]:
    return [" ".join(prose(r, p.settings)) for r in results.values()]


STUDY = Study(name="security", title="security (Phase 5, week 14)", Request=SecurityRequest,
              trigger=("attack", "faults"), settings=settings, plan=plan, run=run, criteria=criteria,
              findings=findings, job=job, run_job=run_job)
