"""Phase 5 (week 15, interpretability): what the critical weights compute, and the guide's criterion.

A `Study` (esa.phases.study) over the methods of esa.apps.interpret: `settings` reads the profile section
`interpret`; `plan` lists per model the role catalogue of the top critical weights (Phase 2's cached scores),
the super-weight chain on one sentence, the per-head sink correlation and the knowledge-localisation tests on
the offline Shakespeare probe set; `run` computes them (`analyse_loaded`); `criteria` judges the guide's
criterion; `findings` says it in sentences. esa-runner's request is `InterpretRequest` (`--roles [LIST]
--roles-topk K`).

**The criterion, defined.** The guide asks for "identified computational roles for >= 50% of top critical
weights". Here:
- the top critical weights are the union over `metrics` of each metric's global top-`topk` (calibration seed
  `score_seed`); the detector's candidates are tested and shown, but count only if a metric ranks them;
- a role is identified for a weight only when its *ablation* test beats the matched control: roles (a)-(c)
  (`ABLATION_ROLES`: zeroing the weight shrinks a massive channel / lowers the sink mass / raises stopword
  mass more than zeroing a random weight of the same matrix, one-sided Wilcoxon over inputs) at Holm-adjusted
  p < `alpha`, Holm across every test of the catalogue call. The baseline-only roles (d)-(f) describe the
  weight's input and are reported beside it, not counted;
- the measured value is the share of those weights with >= 1 identified role, with a Wilson 95% CI
  (esa.apps.interpret.tables.role_share).
Verdict (esa.stats.shares.share_verdict): FAIL when the share is below 50%; PASS when it is at least 50% and
the CI's lower bound is too; underpowered when the share is >= 50% but its CI reaches below, when fewer than
`min_weights` weights were tested, or when the inputs are too few for any test to pass (with n inputs the
smallest exact one-sided Wilcoxon p is 2^-n, which must be below Holm's first threshold alpha / m); below the
guide's budget (top-100 per metric on >= 16 inputs) a PASS or FAIL becomes machinery-only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from esa.apps import interpret as interp
from esa.apps.interpret import sentences
from esa.apps.interpret.localise import CONDITIONS as ABLATIONS
from esa.apps.interpret.probes import BUILDERS as PROBE_KINDS
from esa.apps.interpret.roles import UNEXPLAINED
from esa.apps.interpret.sinks import AGGREGATES
from esa.apps.interpret.tokens import SINKS
from esa.data import evaluation
from esa.errors import EsaError
from esa.models import LoadedModel
from esa.params import Profile
from esa.perturb.apply import targets_from_selection
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
    setting,
)
from esa.recipes import Recipe
from esa.sensitivity.engine import ScoreRun
from esa.sensitivity.metrics import METRICS
from esa.sensitivity.superweights import DEFAULT_PROMPT
from esa.stats.budget import budget_reason as stats_budget
from esa.stats.shares import share_verdict
from esa.stats.verdicts import Criterion
from esa.store import write_parquet

if TYPE_CHECKING:
    from esa.phases.command import Command

Runs = dict[tuple[str, int], ScoreRun]
GUIDE_TOPK = 100  # the top-100 global weights of each metric
GUIDE_INPUTS = 16  # inputs per role test below which a run is a machinery check
CRITERION = "P5.interpret_roles"  # + ".<model>"
CRITERION_TEXT = "identified computational roles for ≥ 50% of top critical weights"
QWEN = "qwen2.5-coder-0.5b"


# ------------------------------------------------------------------ settings
def _model_topk(v: dict[str, Any], where: str) -> None:
    for model, k in v.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise EsaError(f"{where}[{model!r}] = {k!r} must be a positive integer")


def _sentence(v: str, where: str) -> None:
    if not v.strip():
        raise EsaError(f"{where} = {v!r} is empty; give the sentence the super-weight chain is traced on")


_METRIC = one_of(lambda: METRICS)
_ROLES = each(one_of(lambda: interp.ROLES), nonempty=True)
_COUNTED = each(one_of(lambda: [r for r in interp.ROLES if r != UNEXPLAINED]), nonempty=True)  # (g) is no role


@dataclass(frozen=True)
class Settings:
    """The profile section `interpret` (every key optional; None means "the profile's value")."""

    models: list[str] | None = None  # None: the profile's models
    metrics: list[str] | None = setting(None, optional(each(_METRIC, nonempty=True)))  # None: the profile's
    score_seed: int | None = None  # calibration seed of those scores (None: the profile's first seed)
    topk: int = 100  # global top-k of each metric whose roles are tested
    model_topk: dict[str, int] = setting(check=_model_topk, factory=dict)  # per-model topk (CPU budgets)
    detector: bool = True  # also test the super-weight detector's candidates
    roles: list[str] | None = setting(None, optional(_ROLES))  # roles tested (None: the whole catalogue)
    criterion_roles: list[str] = setting(check=_COUNTED, factory=lambda: list(interp.ABLATION_ROLES))  # (a)-(c)
    n_inputs: int = setting(16, at_least(interp.RoleConfig.min_inputs))  # held-out windows per role test
    input_seqlen: int = setting(32, at_least(2))  # tokens per role-test window
    alpha: float = setting(0.05, fraction("a family-wise error rate"))  # Holm across the catalogue
    control_seed: int = 0  # matched-control draws (weight i: control_seed + i) and localisation's random sets
    n_boot: int = setting(2000, at_least(100))  # bootstrap resamples of every CI
    sink: str = setting("first", one_of(lambda: SINKS))  # sink keys: position 0, or position 0 and delimiters
    min_weights: int = setting(20, at_least(1))  # fewer tested top weights: the criterion is underpowered
    chain_text: str = setting(DEFAULT_PROMPT, _sentence)  # the sentence the super-weight chain is traced on
    sink_metric: str = setting("grad_x_weight", _METRIC)  # head sensitivity: this metric over q/k/v/o slices
    sink_aggregate: str = setting("sum", one_of(lambda: AGGREGATES))  # over a head's slices
    localise: bool = True  # run the knowledge-localisation tests
    localise_metric: str = setting("grad_x_weight", _METRIC)  # calibrated on the probe set and on generic text
    probes_per_kind: int | None = setting(None, optional(at_least(1)))  # None: every item the plays yield
    probe_seqlen: int = setting(64, at_least(2))  # tokens per probe calibration window
    localise_k: int = setting(100, at_least(1))  # weights zeroed per localisation condition
    generic_windows: int = setting(8, at_least(1))  # evaluation windows of the generic PPL
    generic_seqlen: int | None = setting(None, optional(at_least(2)))  # their length (None: the profile's seqlen)
    direct_top: int = setting(30, at_least(1))  # direct test: the probe score's top weights ...
    direct_random: int = setting(30, at_least(0))  # ... and this many uniform random weights
    batch_size: int | None = setting(None, optional(at_least(1)))  # inputs per role-test batch (None: all)

    def validate(self, P: Profile) -> Settings:
        """The checks that join several fields, or a field and the profile (each field checks itself)."""
        where = f"profile {P.name!r}, section interpret"
        if self.score_seed is not None and self.score_seed not in P.seeds:
            raise EsaError(f"{where}: score_seed {self.score_seed} is not one of the profile's seeds {P.seeds} "
                           "(Phase 2 cached scores for those only)")
        tested = interp.parse_roles(self.roles)
        for r in self.criterion_roles:
            if r not in tested:
                raise EsaError(f"{where}: criterion role {r!r} is not among the tested roles {tested}")
        return self

    def topk_for(self, model: str) -> int:
        return self.model_topk.get(model, self.topk)


def settings(P: Profile, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The profile's `interpret` section (+ overrides): types and each field checked, then the joint checks."""
    return build_settings(P, "interpret", Settings, overrides).validate(P)


def model_names(P: Profile, S: Settings) -> list[str]:
    return list(S.models or P.models)


def metric_names(P: Profile, S: Settings) -> list[str]:
    return list(S.metrics or P.metrics)


def score_seed(P: Profile, S: Settings) -> int:
    return P.seeds[0] if S.score_seed is None else S.score_seed


def budget_reason(S: Settings, k: int, planned: bool = False) -> str | None:
    """Why a run is a machinery check rather than the guide's experiment, or None (or `planned`: judged as is)."""
    if planned:
        return None
    return stats_budget(f"top-{k} per metric on {S.n_inputs} inputs of {S.input_seqlen} tokens ", [(
        k < GUIDE_TOPK or S.n_inputs < GUIDE_INPUTS,
        f"(the guide's: top-{GUIDE_TOPK} per metric, >= {GUIDE_INPUTS} inputs)")])


def reductions(P: Profile, S: Settings, models: list[str]) -> list[str]:
    """What this run leaves out of the issue's full grid (top-100 per metric on every model, every probe item)."""
    return [f"{m}: top-{S.topk_for(m)} per metric instead of top-{GUIDE_TOPK}" for m in models
            if S.topk_for(m) < GUIDE_TOPK] + [text for short, text in [
        (S.n_inputs < GUIDE_INPUTS, f"{S.n_inputs} role-test inputs instead of >= {GUIDE_INPUTS}"),
        (S.probes_per_kind is not None, f"at most {S.probes_per_kind} probe items per kind"),
        (not S.localise, "no localisation tests"),
        (QWEN not in models, f"{QWEN} (the Qwen2 model) not run: one 8 x 256-token evaluation takes ~100 s on 2 "
                             "cores; add it with models"),
        (len(P.seeds) > 1 or S.score_seed is not None, f"one calibration seed ({score_seed(P, S)}) of the "
                                                       f"profile's {P.seeds}")] if short]


# ------------------------------------------------------------------ one model
def load_model(name: str, P: Profile) -> LoadedModel:
    # eager attention: the sink role and the chain read attention probabilities
    return Recipe.of(P).load(name, eager=True)


def scored_metrics(P: Profile, S: Settings) -> list[str]:
    """Every metric this phase reads scores of: the catalogue's, the sinks' and localisation's."""
    return list(dict.fromkeys([*metric_names(P, S), S.sink_metric, S.localise_metric]))


def score_runs(lm: LoadedModel, name: str, P: Profile, S: Settings) -> Runs:
    """Phase 2's cached scores of every metric this phase reads, at the score seed."""
    return Recipe.of(P).score_model(lm, name, scored_metrics(P, S), [score_seed(P, S)])


def catalogue(lm: LoadedModel, sel: pd.DataFrame, inputs: torch.Tensor, S: Settings,
              roles: list[str] | None = None) -> interp.RoleReport:
    """The role catalogue over `sel` (every weight zeroed in place and restored bit-exactly; eager meanwhile)."""
    with interp.Eager(lm.model):
        return interp.roles_for(lm, sel, inputs, roles if roles is not None else S.roles, interp.RoleConfig(
            alpha=S.alpha, sink=S.sink, seed=S.control_seed, n_boot=S.n_boot, batch_size=S.batch_size,
            show_progress=False))


@dataclass
class ModelInterpret:
    model: str
    family: str
    k: int
    selection: pd.DataFrame
    detector: pd.DataFrame
    report: interp.RoleReport
    share: dict[str, Any]
    chain: interp.ChainTrace
    sinks: interp.SinkCorrelation | None
    sinks_note: str
    localisation: interp.Localisation | None
    localisation_note: str
    seconds: dict[str, float]


def analyse_loaded(lm: LoadedModel, name: str, P: Profile, S: Settings) -> ModelInterpret:
    """Everything for one loaded model; every ablation is undone bit-exactly (tests check the weights' hash)."""
    sec: dict[str, float] = {}
    t = [time.perf_counter()]

    def lap(key: str) -> None:
        t.append(time.perf_counter())
        sec[key] = round(t[-1] - t[-2], 2)

    seed, k = score_seed(P, S), S.topk_for(name)
    runs = score_runs(lm, name, P, S)
    lap("scores")
    det = interp.detector_table(lm, S.chain_text)  # the chain needs it even when its candidates are not tested
    sel = interp.critical_selection(lm, runs, metric_names(P, S), seed, k, det if S.detector else None)
    inputs = interp.default_inputs(lm.tokenizer, S.n_inputs, S.input_seqlen, corpus=P.corpus)
    lap("selection")
    report = catalogue(lm, sel, inputs, S)
    lap("roles")
    trace = interp.trace_chosen(lm, det, sel, S.chain_text, S.sink, S.control_seed)
    lap("chain")
    sc, sc_note = None, ""
    try:
        sc = interp.head_sink_correlation(lm, runs[(S.sink_metric, seed)].full(), inputs, S.sink,
                                          S.sink_aggregate, S.n_boot, S.control_seed, S.batch_size)
    except EsaError as e:
        sc_note = f"not run: {e}"
    lap("sinks")
    loc, loc_note = None, "" if S.localise else "switched off (localise: false)"
    if S.localise:
        exclude = targets_from_selection(sel[sel["metric"] == interp.DETECTOR], lm.inventory) if S.detector else None
        eval_ids = evaluation(lm.tokenizer, P.corpus, S.generic_seqlen or P.seqlen, n_windows=S.generic_windows,
                              seed=0, max_positions=lm.info.max_positions or None).ids
        loc = interp.localisation(lm, runs[(S.localise_metric, seed)].full(), eval_ids, metric=S.localise_metric,
                              k=S.localise_k, probes_per_kind=S.probes_per_kind, probe_seqlen=S.probe_seqlen,
                              direct_top=S.direct_top, direct_random=S.direct_random, n_boot=S.n_boot,
                              seed=S.control_seed, exclude=exclude)
    lap("localisation")
    share = interp.role_share(report, S.criterion_roles, S.alpha)
    return ModelInterpret(name, lm.info.family, k, sel, det, report, share, trace, sc, sc_note, loc, loc_note, sec)


# ------------------------------------------------------------------ the criterion
def judge(share: dict[str, Any], S: Settings, k: int, planned: bool = False) -> tuple[bool | None, str, str]:
    """(passed, verdict, reason) of a measured share (esa.stats.shares.share_verdict) at top-k per metric."""
    return share_verdict(share["share"], share["ci_lo"], share["n"], share["reachable"], S.min_weights,
                         budget_reason(S, k, planned))


def criterion_rows(model: str, share: dict[str, Any], S: Settings, k: int, evidence: str,
                   planned: bool = False) -> list[Criterion]:
    passed, verdict, why = judge(share, S, k, planned)
    note = (f"{why}; {share['explained']}/{share['n']} weights (union of the global top-{k} of each metric), "
            f"95% Wilson CI [{share['ci_lo']:.2f}, {share['ci_hi']:.2f}]; identified = an ablation role "
            f"({', '.join(share['roles'])}) beats its matched control at Holm-adjusted p < {S.alpha:g} over "
            f"{share['m_tests']} tests, {share['n_inputs']} inputs each; counting the baseline-only roles too: "
            f"{share['share_any_role']:.0%}")
    value = None if not math.isfinite(share["share"]) else round(float(share["share"]), 4)
    return [Criterion(f"{CRITERION}.{model}", 5, f"{CRITERION_TEXT} ({model})", value, ">= 0.5", passed,
                      evidence, note, verdict=verdict)]


# ------------------------------------------------------------------ the study
# Tokens of one probe sequence (a prompt with one answer): 17 on average over the powered probe set with SmolLM2's
# tokenizer. A plan tokenizes nothing, so a probe pass is priced at this many tokens per item: the one number here
# that is measured, not counted.
PROBE_TOKENS = 17
# Passes over the chain sentence: the detector's, then baseline, weight zeroed and control zeroed, and one more
# to find the channel when the weight does not write the residual stream (at most)
CHAIN_PASSES = 5


def _scores(P: Profile, S: Settings, m: str) -> list[Planned]:
    """The scores of every metric read (the score cache's when an earlier notebook of the run computed them), then
    each full map the sinks and localisation read, recomputed once when the cache keeps candidates only."""
    seed = score_seed(P, S)
    conds = plans.scoring(P, m, [seed], scored_metrics(P, S), (), "scores (the score cache's, else computed): ")
    if P.keep_scores:
        return conds
    readers = {S.sink_metric: ["sinks"]}
    if S.localise:
        readers.setdefault(S.localise_metric, []).append("localisation")
    for metric, who in readers.items():
        kind, passes = plans.score_pass(P, metric)
        conds.append(Planned(m, f"full {metric} map recomputed for the {' and '.join(who)} (the score cache keeps "
                             "candidates only)", P.max_samples, "calibration windows", kind=kind, seqlen=P.seqlen,
                             per_unit=passes))
    return conds


def _localisation(P: Profile, S: Settings, m: str) -> list[Planned]:
    """Probe accuracy, probe calibration, the three ablations and the direct test, priced per probe item at
    PROBE_TOKENS: a score of every candidate is two passes per item (the prompt with a KV cache, then the
    candidates against it), an answer's NLL one."""
    items = S.probes_per_kind * len(PROBE_KINDS) if S.probes_per_kind else 0  # 0: every item the plays yield
    n_gen = S.generic_seqlen or P.seqlen
    scored = as_windows(2 * items, PROBE_TOKENS, n_gen)  # every item's candidates scored, in generic windows
    kind, passes = plans.score_pass(P, S.localise_metric)
    conds = [Planned(m, "probe accuracy (" + (f"up to {items} items)" if items else "every item the plays yield)"),
                     items, "inputs", seqlen=PROBE_TOKENS, per_unit=2),
             Planned(m, f"{S.localise_metric} calibrated on the probe statements", items, "inputs", kind=kind,
                     seqlen=PROBE_TOKENS, per_unit=passes)]
    # each ablation (the first also the unablated model): the items scored and the generic evaluation
    conds += [Planned(m, f"selectivity: {c} ({S.localise_k} weights) zeroed, probe items and generic log-PPL"
                      + (", and unablated" if i == 0 else ""), S.generic_windows, "windows", seqlen=n_gen,
                      per_unit=1 + (i == 0), once=(("eval", scored * (1 + (i == 0))),))
              for i, c in enumerate(ABLATIONS)]
    conds.append(Planned(m, "direct test: each candidate zeroed alone, the answers' NLL over every item (and once "
                         "unablated)", S.direct_top + S.direct_random, "trials", seqlen=PROBE_TOKENS, per_unit=items,
                         once=(("eval", items),)))
    return conds


def plan(S: Settings, P: Profile, models: Sequence[str] | None = None) -> Plan:
    """Every condition of each model with its n, without loading anything: the scores, the role catalogue (which
    the criterion reads), the chain, the sinks and the localisation tests, each priced by the passes it runs."""
    chosen = list(models or model_names(P, S))
    tested = [r for r in interp.parse_roles(S.roles) if r != UNEXPLAINED]
    ablating = any(interp.ROLES[r].ablation for r in tested)
    conds = []
    for m in chosen:
        # at most every metric's top-k distinct (the detector's few candidates not counted: most are in one)
        weights = len(metric_names(P, S)) * S.topk_for(m)
        conds += _scores(P, S, m)
        conds += [Planned(m, f"{len(tested)} role tests of the global top-{S.topk_for(m)} of each metric"
                          + (" and the detector's candidates" if S.detector else "")
                          + (f": per input a baseline pass, then the weight and its control zeroed for each of at "
                             f"most {weights} weights" if ablating else ": one baseline pass"), S.n_inputs, "inputs",
                          (f"{CRITERION}.{m}",), seqlen=S.input_seqlen, per_unit=1 + 2 * weights * ablating),
                  # at most one token per character of the sentence, and a BOS
                  Planned(m, "super-weight detector and chain, the weight and its matched control zeroed", 1, "inputs",
                          seqlen=len(S.chain_text) + 1, per_unit=CHAIN_PASSES),
                  Planned(m, f"per-head sink mass vs {S.sink_metric} head sensitivity", S.n_inputs, "inputs",
                          seqlen=S.input_seqlen)]
        conds += _localisation(P, S, m) if S.localise else []
    setup = {"scores": {"metrics": metric_names(P, S), "seed": score_seed(P, S)},
             "roles": {"tested": tested, "counted": list(S.criterion_roles), "alpha": S.alpha, "n_boot": S.n_boot,
                       "inputs": f"{S.n_inputs} x {S.input_seqlen} tokens of {P.corpus}"},
             "sinks": {"keys": S.sink, "metric": S.sink_metric, "aggregate": S.sink_aggregate},
             "localisation": {"metric": S.localise_metric, "generic": f"{S.generic_windows} windows of "
                              f"{S.generic_seqlen or P.seqlen} tokens"} if S.localise else "off"}
    # the costs are measured with SDPA attention (esa.phases.costs); this study's passes run eager attention
    eager = ("seconds are priced at SDPA costs; every pass here runs eager attention (it reads attention "
             "probabilities), which the measured costs do not cover")
    return Plan("interpret", P, chosen, S, conds, setup, [*reductions(P, S, chosen), eager])


def run(p: Plan) -> dict[str, ModelInterpret]:
    """Every model of the plan, one after the other (each loaded with eager attention, analysed, restored)."""
    return {m: analyse_loaded(load_model(m, p.profile), m, p.profile, p.settings) for m in p.models}


def criteria(results: Mapping[str, ModelInterpret], p: Plan, evidence: str) -> list[Criterion]:
    """One row per model; a "{model}" in `evidence` (where the numbers are) becomes the model's name."""
    return [row for m, r in results.items()
            for row in criterion_rows(m, r.share, p.settings, r.k, evidence.replace("{model}", m), p.profile.planned)]


def findings(results: Mapping[str, ModelInterpret], p: Plan) -> list[str]:
    """Markdown paragraphs computed from the numbers: per model the roles, the chain, the sinks, localisation."""
    out = []
    for m, r in results.items():
        out += [sentences.roles_paragraph(m, r.share, r.report.tests),
                sentences.chain_paragraph(m, r.chain, interp.has_candidate(r.detector)),
                sentences.sinks_paragraph(m, r.sinks, p.settings.sink_metric) if r.sinks is not None
                else f"The sink analysis of {m} was {r.sinks_note}.",
                sentences.localisation_paragraph(m, r.localisation) if r.localisation is not None
                else f"Localisation on {m}: {r.localisation_note}."]
    return out


# ------------------------------------------------------------------ esa-runner --roles
@dataclass(frozen=True)
class InterpretJob:
    roles: list[str]
    topk: int
    settings: Settings  # the validated profile section

    def describe(self) -> str:
        return f"roles {', '.join(self.roles)} of the top-{self.topk} per metric"


@dataclass(frozen=True)
class InterpretRequest:
    """esa-runner's interpretability flags (the command layer builds them from these fields)."""

    roles: str | None = option("role catalogue of the global top-k of each metric plus the super-weight "
                               "candidates: all, or a comma list; writes roles.parquet", choices=lambda: interp.ROLES,
                               const="all")
    roles_topk: int | None = option("global top-k of each metric whose roles are tested (default: the profile's "
                                    "interpret.topk)")


def job(req: InterpretRequest, ctx: RunContext) -> InterpretJob:
    S = settings(ctx.profile)
    names = interp.parse_roles(None if req.roles.strip() == "all" else req.roles)  # type: ignore[union-attr]
    k = S.topk if req.roles_topk is None else req.roles_topk
    if k < 1:
        raise EsaError(f"--roles-topk must be at least 1, got {k}")
    return InterpretJob(names, k, S)


def run_job(spec: InterpretJob, cmd: Command, lm: LoadedModel, runs: Runs, stage: Path) -> dict[str, Any]:
    """The catalogue over the run's metrics (first seed) into stage/roles.parquet (one row per weight)."""
    counted = [r for r in spec.settings.criterion_roles if r in spec.roles]
    S = replace(spec.settings, roles=list(spec.roles),
                criterion_roles=counted or [r for r in spec.roles if r in interp.ABLATION_ROLES])
    seed = cmd.recipe.seeds[0]
    det = interp.detector_table(lm, S.chain_text) if S.detector else None
    sel = interp.critical_selection(lm, runs, list(cmd.recipe.metrics), seed, spec.topk, det)
    inputs = interp.default_inputs(lm.tokenizer, S.n_inputs, S.input_seqlen, corpus=cmd.recipe.corpus)
    report = catalogue(lm, sel, inputs, S, spec.roles)
    wide = interp.wide_table(report).assign(model=cmd.model, run_id=cmd.run_id)
    write_parquet(stage / "roles.parquet", wide)
    write_parquet(stage / "roles_tests.parquet", report.tests.assign(model=cmd.model, run_id=cmd.run_id))
    out: dict[str, Any] = {"files": ["roles.parquet", "roles_tests.parquet"], "n_weights": len(wide),
                           "roles": spec.roles, "topk": spec.topk, "seed": seed, "timing": report.timing}
    if S.criterion_roles:
        share = interp.role_share(report, S.criterion_roles, S.alpha)
        passed, verdict, why = judge(share, S, spec.topk)
        out["criterion"] = {**share, "passed": passed, "verdict": verdict, "reason": why}
    else:
        out["criterion"] = {"verdict": "not estimable", "reason": "no ablation role (a-c) was asked for"}
    return out


STUDY = Study(name="interpret", title="interpretability (Phase 5, week 15)", Request=InterpretRequest,
              trigger=("roles",), settings=settings, plan=plan, run=run, criteria=criteria, findings=findings,
              job=job, run_job=run_job)
