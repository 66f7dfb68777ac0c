"""Phase 5 (week 14, security): bit flips in real storage formats, the bit-flip attack, fault campaigns,
protection of the critical set, weight-space PGD, backdoor detection, and the guide's criterion.

A `Study` (esa.phases.study) on the profile section `security`: `plan` lists each model's conditions and
the criterion row each serves, `run` computes them (esa.apps.security.compare), `criteria` judges
"quantified vulnerability differences for critical vs random weights", `findings` says what the numbers
show (esa.apps.security.sentences). The backdoor study (twins of one micro-suite model) is `backdoor`,
called on its own. esa-runner's `SecurityRequest` (--attack --flips --format --faults --trials): `job`.

**The criterion.** In float storage almost every weight is a one-flip single point of failure (the exponent
MSB sends |w| < 2 to ~1e38; the collapse share measures it), so critical and random weights are compared
where one flip's damage is bounded: simulated per-channel int8, or a float format's bounded bit class. The
critical set is the profile's top-k of `critical_metric` (Phase 2's cached scores); its control has the same
count in every matrix, disjoint from it, drawn anew per attack seed. "Quantified vulnerability differences"
is read as the claim that the critical set is at least c = `criterion_factor` (default 1: more) times as
vulnerable as the random set, judged three ways, each as a contrast by its one-sided (1 − `alpha`) bound,
never as a ratio over a control that may do nothing: flips random-k − c·flips critical to PPL x
`criterion_goal` (paired by attack seed; runs that hit the flip budget are censored), damage of
`set_fault_flips` bounded flips per trial in the critical set − c·in a matched random set (critical trial i
paired with random trial i, the random sets taken in turn), PGD loss increase on the critical set − c·on random-k at the largest budget (paired by attack
seed). Verdicts: esa.stats.vulnerability; below the guide's budget (`budget_reason`) a PASS/FAIL becomes
machinery-only. With the profile's `sequential`, the fault pairs run in looks until the comparison is decided
(`fault_design`, esa.stats.sequential), and the row reads that decision.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from esa.apps import security as sec
from esa.apps.security import common, compare
from esa.apps.security import sentences as say
from esa.apps.security.compare import CriticalSet, ModelSecurity, attack_batch, attack_config, heldout
from esa.apps.security.defences import check_mode
from esa.apps.security.faults import default_checkpoints
from esa.apps.security.formats import FORMATS
from esa.apps.security.poison import PROBE_WINDOWS, PROMPT_TOKENS, BackdoorResult, PoisonConfig, twin_study
from esa.errors import EsaError, unknown
from esa.models import LoadedModel, inventory_without_weights
from esa.params import Profile, model_params
from esa.perturb.apply import count_targets, targets_from_selection, weights_hash
from esa.phases import plans
from esa.phases.study import (
    Plan,
    Planned,
    RunContext,
    Study,
    as_windows,
    at_least,
    build_settings,
    each,
    fraction,
    one_of,
    option,
    optional,
    seed_value,
    setting,
)
from esa.recipes import Recipe
from esa.sensitivity.metrics import METRICS
from esa.stats import budget
from esa.stats.sequential import Design
from esa.stats.verdicts import Criterion, demote
from esa.stats.vulnerability import Vulnerability
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
CRITERION = "quantified vulnerability differences for critical vs random weights"

_FORMAT = one_of(lambda: FORMATS)
_METRIC = one_of(lambda: METRICS)
_COUNT = at_least(1)
_RATE = fraction("a per-bit fault rate")
_SHARE, _POSITIVE = common.check_protected_fraction, common.check_positive


@dataclass
class Settings:
    """The profile's `security` section. Sizes are per model."""

    # single-flip collapse share: formats, weights sampled per format, collapse = PPL >= factor x base
    formats: list[str] = setting(check=each(_FORMAT, nonempty=True), factory=lambda: ["bf16", "fp16", "fp32", "int8"])
    collapse_samples: int = setting(100, _COUNT)
    collapse_factor: float = setting(100.0, common.check_factor)
    # the bit-flip attack: storage format, bit class (null: the format's bounded class; checked in `validate`),
    # budget, goals, the goal whose flips-needed the criterion compares, matrices tried per cross-layer step
    attack_format: str = setting("int8", _FORMAT)
    attack_bits: str | None = None
    max_flips: int = setting(30, _COUNT)
    goals: list[float] = setting(check=each(common.check_factor, nonempty=True), factory=lambda: [100.0, 1000.0])
    criterion_goal: float = setting(100.0, common.check_factor)
    # the claim each comparison judges: the critical set at least this many times as vulnerable as random
    criterion_factor: float = setting(1.0, _POSITIVE)
    layer_candidates: int | None = setting(8, optional(_COUNT))  # null: all
    attack_sets: list[str] = setting(check=each(one_of(lambda: ATTACK_SETS)), factory=lambda: list(ATTACK_SETS))
    attack_seeds: list[int] = setting(check=each(seed_value, nonempty=True, unique=True), factory=lambda: [0, 1, 2])
    attack_windows: int = setting(2, _COUNT)  # attack batch: calib-split windows drawn with the attack seed
    attack_seqlen: int = setting(128, _COUNT)
    heldout_windows: int = setting(4, _COUNT)  # judged on: eval-split windows (seed 0), disjoint from any batch
    heldout_seqlen: int = setting(128, _COUNT)
    random_flips: int = setting(10000, _COUNT)  # the random-flip baseline's budget
    critical_metric: str = setting("grad_x_weight", _METRIC)
    # fault campaigns: formats, per-bit rates, Monte-Carlo trials, catastrophe = PPL >= factor x base; the
    # criterion's bounded faults per trial inside the critical / a random set, and their trials
    fault_formats: list[str] = setting(check=each(_FORMAT, nonempty=True), factory=lambda: ["int8", "bf16"])
    fault_rates: list[float] = setting(check=each(_RATE, nonempty=True), factory=lambda: [1e-9, 1e-8, 1e-7, 1e-6, 1e-5])
    fault_trials: int = setting(20, _COUNT)
    fault_factor: float = setting(10.0, common.check_factor)
    set_fault_flips: int = setting(10, _COUNT)
    set_fault_trials: int = setting(20, _COUNT)
    # with the profile's `sequential`: trial pairs at the first look (then doubling, up to set_fault_trials)
    set_fault_first: int = setting(30, at_least(2))
    # protection: guarded fractions of the top-scored weights (curve), mode (checked against the format in
    # `validate`), the campaign it is run on; the attack under a guard of the top `guard_fraction` (vs an
    # equal random guard: two more searches per attack seed when `guard_attack`)
    protect_fractions: list[float] = setting(check=each(_SHARE, nonempty=True),
                                             factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2])
    protect_mode: str = setting("ecc", one_of(lambda: sec.DEFENCES))
    protect_format: str = setting("bf16", _FORMAT)
    protect_rate: float = setting(1e-8, _RATE)
    protect_trials: int = setting(20, _COUNT)
    guard_fraction: float = setting(1e-4, _SHARE)
    guard_attack: bool = True
    # adversarial: L-infinity budgets (fractions of |w| or of the matrix std), PGD steps
    pgd_budgets: list[float] = setting(check=each(_POSITIVE, nonempty=True), factory=lambda: [0.01, 0.05, 0.2])
    pgd_radius: str = setting("abs", one_of(lambda: sec.RADII))
    pgd_steps: int = setting(5, _COUNT)
    # backdoor detection: twin pairs fine-tuned from a micro-suite base model (micro-llama-176k: 300 steps
    # give the backdoor an ASR of ~0.75 on held-out prompts; the 33k model does not learn it)
    backdoor_base: str = "micro-llama-176k@smoke"
    backdoor_pairs: int = setting(10, _COUNT)
    backdoor_steps: int = setting(300, _COUNT)
    backdoor_lr: float = setting(1e-2, _POSITIVE)
    backdoor_poison_frac: float = setting(0.5, fraction("a poisoned share of the training windows"))
    backdoor_train_windows: int = setting(64, _COUNT)
    backdoor_seqlen: int = setting(64, _COUNT)
    backdoor_prompts: int = setting(32, _COUNT)
    backdoor_metric: str = setting("grad_x_weight", _METRIC)
    # statistics
    alpha: float = setting(0.05, fraction("a one-sided level"))  # of the criterion's bounds (its CI was 95%)
    min_runs: int = setting(3, _COUNT)  # fewer paired runs: underpowered
    n_boot: int = setting(2000, _COUNT)
    seed: int = setting(0, seed_value)


def validate(S: Settings) -> Settings:
    """The checks that join several keys (each key's own check is declared on its field)."""
    fmt = FORMATS[S.attack_format]
    if S.attack_bits is not None and S.attack_bits not in fmt.bit_classes:
        raise unknown(f"bit class in security.attack_bits for attack_format {fmt.name}", S.attack_bits,
                      fmt.bit_classes)
    try:
        check_mode(S.protect_mode, FORMATS[S.protect_format])
    except EsaError as e:
        raise EsaError(f"security.protect_mode {S.protect_mode!r} with protect_format {S.protect_format}: {e}") \
            from None
    if not S.alpha < 0.5:
        raise EsaError(f"security.alpha {S.alpha:g} is a one-sided level: give one below 0.5")
    if S.criterion_goal not in S.goals:
        raise EsaError(f"security.criterion_goal {S.criterion_goal:g} is not among security.goals {S.goals}")
    return S


def settings(P: Profile, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The profile's `security` section (+ overrides), typed and validated: one EsaError on the first bad value."""
    return validate(build_settings(P, "security", Settings, overrides))


def budget_reason(S: Settings, planned: bool = False) -> str | None:
    """Why a verdict under these settings is a machinery check, or None (guide-sized, or `planned`: a
    power-planned profile, judged at its own sizes)."""
    if planned:
        return None
    n = len(S.attack_seeds)
    return budget.budget_reason("budget below the guide's: ", [
        (n < GUIDE_ATTACK_SEEDS, f"{n} attack seed(s) (guide-sized: {GUIDE_ATTACK_SEEDS})"),
        (S.set_fault_trials < GUIDE_TRIALS, f"{S.set_fault_trials} fault trials per set (guide-sized: {GUIDE_TRIALS})"),
        (S.heldout_windows * (S.heldout_seqlen - 1) < GUIDE_HELDOUT_TOKENS - S.heldout_windows,
         f"{S.heldout_windows} x {S.heldout_seqlen} held-out tokens (guide-sized: >= {GUIDE_HELDOUT_TOKENS})")])


# O'Brien-Fleming-type spending for the set-fault comparison, not the sweeps' Pocock: its effect is marginal
# (record: D = 0.0186, sd ~0.08, d_z ~0.24 over 120 pairs), so the cap decides it, and OBF keeps 0.97·alpha
# for the last look where Pocock keeps 0.38·alpha. Simulated at that effect (120 pairs, alpha 0.01): power
# 0.60 as for fixed n, 0.50 with Pocock; an effect with d_z > 1.2 still stops at a first look of 30 pairs.
# D's right tail is heavy (median 0.0009 against mean 0.015): the t errs safe for PASS, not for an early FAIL.
FAULT_SPENDING = "obf"
# The set-fault row is the one sequential comparison of a model's analysis (the attack and PGD rows are fixed n,
# each at alpha), so its design runs at alpha / 1 (Bonferroni over a family of one).
FAULT_FAMILY = 1


def fault_design(S: Settings, P: Profile) -> Design | None:
    """The sequential design of the set-fault comparison: looks at `set_fault_first` pairs (at least `min_runs`),
    doubling, up to the cap `set_fault_trials`; None when the profile is not sequential (fixed n)."""
    if not P.sequential:
        return None
    n_max = S.set_fault_trials
    if n_max < 2:
        raise EsaError(f"security.set_fault_trials {n_max} cannot be run sequentially; accepted: 2 or more "
                       "(or a profile without `sequential`)")
    n0 = min(max(S.set_fault_first, S.min_runs), n_max)
    return Design(alpha=S.alpha / FAULT_FAMILY, n0=n0, n_max=n_max, spending=FAULT_SPENDING)


# ------------------------------------------------------------------ one model
def critical_set(lm: LoadedModel, name: str, P: Profile, S: Settings) -> CriticalSet:
    """Top-k of `critical_metric` on the profile's first seed, through the score cache (Phase 2's run)."""
    R = Recipe.of(P)
    seed = P.seeds[0]
    sel, _, cached, runs = R.scored_topk(lm, name, S.critical_metric, seeds=[seed])
    return CriticalSet(targets_from_selection(sel, lm.inventory), runs[seed].full(), S.critical_metric,
                       bool(cached[seed]), R.topk, R.mode)


def analyse(name: str, P: Profile, S: Settings) -> ModelSecurity:
    """Every week-14 analysis of one model (esa.apps.security.compare.analyse; the backdoor study is
    separate: `backdoor`); `weights_restored` says whether every analysis restored the weights bit-exactly."""
    t = time.perf_counter()
    lm = Recipe.of(P).load(name)
    h0 = weights_hash(lm.model)
    crit = critical_set(lm, name, P, S)
    wins = heldout(lm, P.corpus, S)

    def load(dtype: torch.dtype) -> LoadedModel:  # the model again, stored in `dtype` (a float format's)
        # the dequantised GGUF folders keep a quantization_config, so transformers warns that GGUF kernels
        # prefer float32; the weights are plain nn.Linear tensors in `dtype`
        gguf_log = logging.getLogger("transformers.quantizers.quantizer_gguf")
        level = gguf_log.level
        gguf_log.setLevel(logging.ERROR)
        try:
            return Recipe.of(P).but(dtype=str(dtype).removeprefix("torch.")).load(name)
        finally:
            gguf_log.setLevel(level)

    in_format = compare.in_formats(lm, wins, load, lambda m: heldout(m, P.corpus, S))
    return compare.analyse(name, lm, crit, wins, in_format, P.corpus, S, h0, t, fault_design(S, P))


def backdoor(P: Profile, S: Settings) -> BackdoorResult:
    """Clean/backdoored twins of the micro base model; the sensitivity-map detector vs the spectral baseline."""
    base = Recipe.of(P).load(S.backdoor_base)
    cfg = PoisonConfig(steps=S.backdoor_steps, lr=S.backdoor_lr, poison_frac=S.backdoor_poison_frac)
    return twin_study(S.backdoor_base, base.model, base.tokenizer, P.corpus, S.backdoor_pairs, cfg, S.backdoor_seqlen,
                      S.backdoor_train_windows, S.backdoor_prompts, S.backdoor_metric, n_boot=S.n_boot, seed=S.seed,
                      max_positions=base.info.max_positions or None)


# ------------------------------------------------------------------ the criterion
def criterion_rows(model: str, S: Settings, attack: Vulnerability | None, faults: Vulnerability | None,
                   adversarial: dict[float, Vulnerability] | None, evidence: str,
                   planned: bool = False) -> list[Criterion]:
    """One row per comparison (attack, faults, adversarial at the largest budget): the contrast "critical at
    least `criterion_factor` times as vulnerable as random" by its one-sided bound; the measured value is the
    contrast's mean. Not run -> not estimable."""
    where = f"{S.attack_format}, bits {S.attack_bits or FORMATS[S.attack_format].bounded}"
    eps = max(adversarial) if adversarial else math.nan
    c = f"{S.criterion_factor:g}"
    specs = [
        ("attack", attack, f"flips(random-k) − {c}·flips(critical)",
         f"flips to PPL x{S.criterion_goal:g}, bit search in {where}"),
        ("faults", faults, f"damage(critical) − {c}·damage(random)",
         f"damage (log PPL ratio) per trial of {S.set_fault_flips} random flips in the critical / a matched random "
         f"set, {where}"),
        ("adversarial", adversarial[eps] if adversarial else None, f"loss(critical) − {c}·loss(random-k)",
         f"PGD loss increase at L-inf {eps:g} ({S.pgd_radius})"),
    ]
    rows = []
    why = budget_reason(S, planned)
    for key, v, contrast, what in specs:
        cid, text = f"P5.security.{key}.{model}", f"{CRITERION} ({key}, {model})"
        thr = f"{contrast} > 0: one-sided {1 - S.alpha:.0%} lower bound"
        thr += " (group-sequential: valid at the look that stopped it)" if v is not None and v.n_fixed else ""
        if v is None:
            rows.append(Criterion(cid, 5, text, None, thr, None, evidence, f"{key} comparison not run",
                                  verdict="not estimable"))
            continue
        measured = v.value if math.isfinite(v.value) else None
        row = Criterion(cid, 5, text, measured, thr, v.passed, evidence, f"{what}; {v.note}", verdict=v.verdict)
        rows.append(demote(row, "machinery-only", why) if why and row.verdict in ("PASS", "FAIL") else row)
    return rows


# ------------------------------------------------------------------ the study
def cross_layer_forwards(S: Settings, model: str) -> int | None:
    """Forwards per flip of the bit search's cross-layer step: `layer_candidates`, or (null) one per studied matrix
    of `model` (its shape alone; None when it cannot be read without loading)."""
    if S.layer_candidates is not None:
        return S.layer_candidates
    inventory = inventory_without_weights(model_params(model).ref)
    return None if inventory is None else len(inventory)


def _model_conditions(S: Settings, P: Profile, m: str, design: Design | None) -> list[Planned]:
    """Model `m`'s conditions, each priced by the passes its code runs (esa.apps.security): a held-out
    evaluation is `heldout_windows` x `heldout_seqlen` tokens, the attack batch `attack_windows` x
    `attack_seqlen`; searches and sequential comparisons at their caps (the worst case)."""
    a, f, v = (f"P5.security.{k}.{m}" for k in ("attack", "faults", "adversarial"))
    n, top, L, A = len(S.attack_seeds), max(S.pgd_budgets), S.attack_seqlen, S.attack_windows
    bits = S.attack_bits or FORMATS[S.attack_format].bounded
    held = as_windows(S.heldout_windows, S.heldout_seqlen, L)  # one held-out evaluation, in attack-batch windows
    H, T = S.heldout_windows, S.heldout_seqlen  # conditions made of held-out evaluations only: per_unit H at T
    how = (f"; sequential: looks at {', '.join(map(str, design.looks))} pairs (n: the cap), {design.spending} "
           f"spending, one-sided alpha {design.alpha:g}") if design else ""
    loaded: set[str] = set()

    def copy_load(fmt: str) -> tuple[tuple[str, float], ...]:
        """The model loaded again in a float format's dtype, by the first analysis that needs it (in_formats)."""
        dtype = FORMATS[fmt].dtype
        name = None if dtype is None else str(dtype).removeprefix("torch.")
        if name is None or name == P.dtype or name in loaded:
            return ()
        loaded.add(name)
        return (("load", 1.0),)

    kind, passes = plans.score_pass(P, S.critical_metric)
    recompute = not P.keep_scores  # full() recomputes the map a cache entry without keep_scores lacks
    conds = [Planned(m, f"load; critical set: {S.critical_metric} seed {P.seeds[0]} scored (the score cache's when an "
                     "earlier notebook of the run scored these windows)"
                     + (", then its full map recomputed (the cache keeps candidates only)" if recompute else "")
                     + "; the base held-out evaluation", P.max_samples, "calibration windows", kind=kind,
                     seqlen=P.seqlen, per_unit=passes * (1 + recompute),
                     once=(("load", 1.0), ("eval", as_windows(H, T, P.seqlen))))]
    # collapse: each sampled weight's worst-class bits flipped one at a time, a held-out evaluation each
    conds += [Planned(m, f"single-flip collapse share, {x}", S.collapse_samples, "weights", seqlen=T,
                      per_unit=H * len(FORMATS[x].positions(FORMATS[x].worst)), once=(("eval", H), *copy_load(x)))
              for x in S.formats]
    cands = cross_layer_forwards(S, m)
    cross = (f"{cands} cross-layer forwards" if cands is not None else
             "a cross-layer forward per matrix (not priced: the matrix count needs the model)")

    def search(label: str, serves: tuple[str, ...] = ()) -> Planned:
        # per flip: a gradient and `cands` cross-layer forwards on the attack batch, then a held-out evaluation;
        # per run: the held-out baseline and the attack batch's base loss
        return Planned(m, f"{label} at the cap of {S.max_flips} flips, each a gradient, {cross} and a held-out "
                       "evaluation", n, "seeds", serves, kind="grad",
                       seqlen=L, per_unit=S.max_flips * A,
                       also=(("eval", S.max_flips * ((cands or 0) * A + held) + held + A),))

    conds += [search(f"bit search over {s}, {S.attack_format} bits {bits},", (a,) if s != "all" else ())
              for s in S.attack_sets]
    checks = len(default_checkpoints(S.random_flips))
    conds.append(Planned(m, f"random flips, budget {S.random_flips}: a held-out evaluation at each of {checks} "
                         "checkpoints and the baseline", n, "seeds", seqlen=T, per_unit=H * (checks + 1)))
    conds += [search(f"bit search with the top {S.guard_fraction:g} {g} guarded (ecc),")
              for g in (("critical", "random") if S.guard_attack else ())]
    # set faults: a held-out evaluation per trial, and a baseline per set_faults call (one per look and side)
    looks = len(design.looks) if design else 1
    conds += [Planned(m, f"{S.set_fault_flips} bounded faults per trial in the critical set{how}",
                      S.set_fault_trials, "trials", (f,), seqlen=T, per_unit=H, once=(("eval", H * looks),)),
              Planned(m, f"{S.set_fault_flips} bounded faults per trial in matched random sets, one per seed{how}",
                      S.set_fault_trials, "trials", (f,), seqlen=T, per_unit=H, once=(("eval", H * looks),))]
    # fault campaigns: one per format over its rates, a baseline each; every trial priced as evaluated (the cap:
    # a trial that draws no flip takes the baseline's result)
    for x in S.fault_formats:
        conds += [Planned(m, f"fault campaign, {x} at per-bit rate {r:g}", S.fault_trials, "trials", seqlen=T,
                          per_unit=H, once=(("eval", H), *copy_load(x)) if i == 0 else ())
                  for i, r in enumerate(S.fault_rates)]
    # protection: a campaign (and its baseline) per guard; a guarded trial the guard leaves untouched reuses the
    # unguarded result, so these are at most
    guards = ["none", *(f"{k} {fr:g}" for fr in S.protect_fractions for k in ("critical", "random"))]
    conds += [Planned(m, f"protection ({S.protect_mode}, {S.protect_format} at rate {S.protect_rate:g}): {g}, at most "
                      "a held-out evaluation per trial", S.protect_trials, "trials", seqlen=T, per_unit=H,
                      once=(("eval", H), *(copy_load(S.protect_format) if i == 0 else ())))
              for i, g in enumerate(guards)]
    # PGD per seed and set: per budget `pgd_steps` gradients on the attack batch, a forward of the last iterate
    # and a held-out evaluation; once per seed and set (the first budget's) the base loss and held-out baseline
    for e in S.pgd_budgets:
        first = e == S.pgd_budgets[0]
        conds += [Planned(m, f"PGD on {s} at L-inf {e:g} ({S.pgd_radius}, {S.pgd_steps} steps)"
                          + (", with the set's baselines" if first else ""), n, "seeds",
                          (v,) if s != "magnitude_k" and e == top else (), kind="grad", seqlen=L,
                          per_unit=S.pgd_steps * A, also=(("eval", (A + held) * (1 + first)),))
                  for s in ("critical", "random_k", "magnitude_k")]
    return conds


def backdoor_conditions(S: Settings, model: str) -> list[Planned]:
    """The backdoor study, run once by the notebook beside `model` (its first), priced at the micro base model's
    costs: its training when the cache lacks it, then per twin `backdoor_steps` Adam steps of `batch` windows,
    the held-out loss and the greedy ASR decoding on the prompts, and the detector's gradient map."""
    cfg = PoisonConfig(steps=S.backdoor_steps, lr=S.backdoor_lr, poison_frac=S.backdoor_poison_frac)
    T = S.backdoor_seqlen
    trig, tgt = len(cfg.trigger.encode()), len(cfg.target.encode())  # the micro suite's tokenizer is byte-level
    # the held-out loss over the prompts, then per target token a greedy step with and without the trigger (at
    # most prompt + trigger + target tokens long)
    evals = as_windows(S.backdoor_prompts, PROMPT_TOKENS, T) + \
        2 * tgt * as_windows(S.backdoor_prompts, PROMPT_TOKENS + trig + tgt, T)
    twins = Planned(model, f"backdoor study on twins of {S.backdoor_base}: {S.backdoor_pairs} clean/backdoored "
                    f"pairs, {S.backdoor_steps} steps of {cfg.batch} x {T} tokens each, their ASR and the detectors",
                    2 * S.backdoor_pairs, "models", kind="eval", seqlen=T, per_unit=evals,
                    # kind stays eval: a `train` condition is read by the dry run as the suite's training of a
                    # member, which an earlier notebook may have done; this fine-tuning happens here every time
                    also=(("train", S.backdoor_steps * cfg.batch), ("grad", PROBE_WINDOWS)), once=(("load", 1.0),),
                    priced_as=S.backdoor_base)
    base = [replace(c, model=model, label=f"backdoor base {c.model}: {c.label}", priced_as=c.model)
            for c in plans.training([S.backdoor_base])]  # when the cache lacks it
    return [*base, twins]


def plan(S: Settings, P: Profile, models: Sequence[str] | None = None) -> Plan:
    """Every condition of each model, the criterion row it serves, and what they share; nothing loaded."""
    chosen = list(models or P.models)
    bits = S.attack_bits or FORMATS[S.attack_format].bounded
    design = fault_design(S, P)
    conds = [c for m in chosen for c in _model_conditions(S, P, m, design)] + backdoor_conditions(S, chosen[0])
    setup = {"critical_set": {"metric": S.critical_metric, "topk": P.topk, "mode": P.mode, "score_seed": P.seeds[0]},
             "heldout": {"corpus": P.corpus, "windows": S.heldout_windows, "seqlen": S.heldout_seqlen},
             "attack_batch": {"windows": S.attack_windows, "seqlen": S.attack_seqlen, "seeds": list(S.attack_seeds)},
             "criterion": {"goal": f"PPL x{S.criterion_goal:g}", "format": S.attack_format, "bits": bits,
                           "factor": S.criterion_factor, "alpha": S.alpha, "min_runs": S.min_runs},
             "set_faults": design.describe() if design else "no (fixed n)",
             "backdoor": {"base": S.backdoor_base, "pairs": S.backdoor_pairs, "steps": S.backdoor_steps,
                          "metric": S.backdoor_metric}}
    why = budget_reason(S, P.planned)
    notes = [f"the backdoor study fine-tunes twins of its own base model, apart from the models (`backdoor`); "
             f"planned with {chosen[0]}, priced at {S.backdoor_base}'s costs"]
    notes += ["set faults stop adding pairs once decided; O'Brien-Fleming-type spending keeps nearly all of alpha "
              "for the cap, where a marginal effect is decided"] * bool(design)
    return Plan("security", P, chosen, S, conds, setup, notes + [f"verdicts are machinery checks: {why}"] * bool(why))


def run(p: Plan) -> dict[str, ModelSecurity]:
    """Every model of the plan, one after the other (each loaded, analysed, its weights checked restored)."""
    return {m: analyse(m, p.profile, p.settings) for m in p.models}


def criteria(results: Mapping[str, ModelSecurity], p: Plan, evidence: str) -> list[Criterion]:
    return [row for m, r in results.items() for row in criterion_rows(
        m, p.settings, r.vulnerability["attack"], r.vulnerability["faults"], r.vulnerability["adversarial"], evidence,
        p.profile.planned)]


def findings(results: Mapping[str, ModelSecurity], p: Plan) -> list[str]:
    """Markdown sentences computed from the numbers, one paragraph per model (esa.apps.security.sentences)."""
    return [say.paragraph(r, p.settings) for r in results.values()]


backdoor_findings = say.backdoor_paragraph  # the backdoor study's paragraph (Markdown), for the notebook


# ------------------------------------------------------------------ esa-runner
@dataclass
class Spec:
    """esa-runner's security request: an attack and/or a fault campaign on the run's model."""

    attack: str | None = None
    flips: int = 30
    format: str = "int8"
    faults: list[float] = field(default_factory=list)
    trials: int = 20
    settings: Settings = field(default_factory=Settings)  # the profile's security section

    def describe(self) -> str:
        what = [f"attack {self.attack} ({self.flips} flips)"] * bool(self.attack)
        what += [f"faults {self.faults} x {self.trials} trials"] * bool(self.faults)
        return ", ".join(what) + f" on {self.format}"


@dataclass(frozen=True)
class SecurityRequest:
    """esa-runner's security flags (the command layer builds them from these fields)."""

    attack: str | None = option("bit-flip attack over all studied weights", choices=lambda: sec.ATTACKS)
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
    if attack is not None and attack not in sec.ATTACKS:
        raise unknown("attack", attack, sec.ATTACKS)
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
    n = common.check_positive_int(flips if flips is not None else S.max_flips, "--flips (flip budget)")
    if attack is not None:
        inventory = inventory_without_weights(model_params(ctx.model).ref)  # None: load() says what is wrong
        if inventory is not None:
            bits = sum(s.numel for s in inventory) * FORMATS[fmt].n_bits
            if n > bits:
                raise EsaError(f"--flips {n} is more than the {bits:,} {fmt} bits of {ctx.model}'s studied weights; "
                               f"give at most {bits:,}")
    t = common.check_positive_int(trials if trials is not None else S.fault_trials, "--trials")
    rates = [common.check_rate(r, "--faults rate") for r in faults or []]
    return Spec(attack=attack, flips=n, format=fmt, faults=rates, trials=t, settings=S)


def run_job(spec: Spec, cmd: Command, lm: LoadedModel, runs: Any, stage: Path) -> dict[str, Any]:
    """The attack (attack.parquet) and/or fault campaign (faults.parquet) on `lm`, with the critical set the
    run selected (first metric and seed); the weights are restored bit-exactly."""
    S, R = spec.settings, cmd.recipe
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
            h["in_critical"] = compare.in_critical(h, crit)
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


STUDY = Study(name="security", title="security (Phase 5, week 14)", Request=SecurityRequest,
              trigger=("attack", "faults"), settings=settings, plan=plan, run=run, criteria=criteria,
              findings=findings, job=job, run_job=run_job)
