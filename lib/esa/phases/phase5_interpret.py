"""Phase 5 (week 15, interpretability): what the critical weights compute, and the guide's criterion.

The methods live in esa.apps.interpret; this module turns the profile's `interpret` section (`Settings`)
into their inputs for one model: the weights to explain (the global top-`topk` of each metric from Phase 2's
cached scores, plus the super-weight detector's candidates), the role catalogue over them, the super-weight
chain on one sentence, the per-head sink correlation, and the knowledge-localisation tests on the offline
Shakespeare probe set. `analyse` runs all of it for one model; `APP` is esa-runner's `--roles`.

**The criterion, defined.** The guide asks for "identified computational roles for >= 50% of top critical
weights". Here:
- the top critical weights are the union over `metrics` of each metric's global top-`topk` (calibration seed
  `score_seed`); the detector's candidates are tested and shown, but count only if a metric ranks them;
- a role is identified for a weight only when its *ablation* test beats the matched control: roles (a)-(c)
  (`ABLATION_ROLES`: zeroing the weight shrinks a massive channel / lowers the sink mass / raises stopword
  mass more than zeroing a random weight of the same matrix, one-sided Wilcoxon over inputs) at Holm-adjusted
  p < `alpha`, Holm across every test of the catalogue call. The baseline-only roles (d)-(f) describe the
  weight's input and are reported beside it, not counted;
- the measured value is the share of those weights with >= 1 identified role, with a Wilson 95% CI.
Verdict (`share_verdict`): FAIL when the share is below 50%; PASS when it is at least 50% and the CI's lower
bound is too; underpowered when the share is >= 50% but its CI reaches below, when fewer than `min_weights`
weights were tested, or when the inputs are too few for any test to pass (with n inputs the smallest exact
one-sided Wilcoxon p is 2^-n, which must be below Holm's first threshold alpha / m); below the guide's budget
(top-100 per metric on >= 16 inputs) a PASS or FAIL becomes machinery-only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from esa.apps import interpret as interp
from esa.apps.interpret.anatomy import anatomy
from esa.apps.interpret.roles import KEY, ROLES, UNEXPLAINED, RoleConfig, RoleReport, parse_roles
from esa.apps.interpret.sinks import AGGREGATES
from esa.data import evaluation
from esa.errors import EsaError, unknown
from esa.models import LoadedModel
from esa.params import Profile
from esa.perturb.apply import Targets, targets_from_selection
from esa.phases.study import Plan, Planned, RunContext, Study, build_settings, option
from esa.recipes import Recipe
from esa.sensitivity.engine import ScoreRun
from esa.sensitivity.metrics import METRICS
from esa.sensitivity.select import check_k
from esa.sensitivity.superweights import DEFAULT_PROMPT, detect_superweights
from esa.stats.verdicts import Criterion
from esa.store import write_parquet

if TYPE_CHECKING:
    from esa.phases.command import Command

Runs = dict[tuple[str, int], ScoreRun]
ABLATION_ROLES = [r.name for r in ROLES.values() if r.ablation]  # (a)-(c): the roles the criterion counts
THRESHOLD = 0.5
GUIDE_TOPK = 100  # the top-100 global weights of each metric
GUIDE_INPUTS = 16  # inputs per role test below which a run is a machinery check
DETECTOR = "detector"  # the metric name of the super-weight detector's candidates in the selection
CRITERION_TEXT = "identified computational roles for ≥ 50% of top critical weights"
SINKS = ("first", "delimiters")
QWEN = "qwen2.5-coder-0.5b"


# ------------------------------------------------------------------ settings
@dataclass
class Settings:
    models: list[str] | None = None  # None: the profile's models
    metrics: list[str] | None = None  # None: the profile's metrics (Phase 2's cached scores)
    score_seed: int | None = None  # calibration seed of those scores (None: the profile's first seed)
    topk: int = 100  # global top-k of each metric whose roles are tested
    model_topk: dict[str, int] = field(default_factory=dict)  # per-model override of topk (CPU budgets)
    detector: bool = True  # also test the super-weight detector's candidates
    roles: list[str] | None = None  # roles tested (None: the whole catalogue)
    criterion_roles: list[str] = field(default_factory=lambda: list(ABLATION_ROLES))  # roles the criterion counts
    n_inputs: int = 16  # held-out windows per role test (the unit of replication)
    input_seqlen: int = 32  # tokens per role-test window
    alpha: float = 0.05  # family-wise, Holm across the catalogue
    control_seed: int = 0  # matched-control draws (weight i: control_seed + i) and localisation's random sets
    n_boot: int = 2000  # bootstrap resamples of every CI
    sink: str = "first"  # sink keys: position 0, or position 0 and delimiters
    min_weights: int = 20  # fewer tested top weights: the criterion is underpowered
    chain_text: str = DEFAULT_PROMPT  # the sentence the super-weight chain is traced on
    sink_metric: str = "grad_x_weight"  # head sensitivity = this metric's scores over the head's q/k/v/o slices
    sink_aggregate: str = "sum"  # sum, mean or max over a head's slices
    localise: bool = True  # run the knowledge-localisation tests
    localise_metric: str = "grad_x_weight"  # calibrated on the probe set and on generic text
    probes_per_kind: int | None = None  # probe items per kind (None: every item the plays yield)
    probe_seqlen: int = 64  # tokens per probe calibration window
    localise_k: int = 100  # weights zeroed per localisation condition
    generic_windows: int = 8  # evaluation windows of the generic PPL
    generic_seqlen: int | None = None  # their length (None: the profile's seqlen)
    direct_top: int = 30  # direct test: the probe score's top weights ...
    direct_random: int = 30  # ... and this many uniform random weights
    batch_size: int | None = None  # inputs per role-test forward batch (None: all at once)

    def validate(self, P: Profile) -> Settings:
        """Values `section` cannot check by type: names, ranges, and what the profile provides."""
        where = f"profile {P.name!r}, section interpret"
        for name in (self.metrics or []) + [self.sink_metric, self.localise_metric]:
            if name not in METRICS:
                raise unknown("metric", name, METRICS)
        if self.metrics is not None and not self.metrics:
            raise EsaError(f"{where}: metrics is empty; give at least one of {', '.join(METRICS)} (or null)")
        if self.score_seed is not None and self.score_seed not in P.seeds:
            raise EsaError(f"{where}: score_seed {self.score_seed} is not one of the profile's seeds {P.seeds} "
                           "(Phase 2 cached scores for those only)")
        tested = parse_roles(self.roles)
        for r in self.criterion_roles:
            if r not in ROLES or r == UNEXPLAINED:
                raise unknown("criterion role", r, [n for n in ROLES if n != UNEXPLAINED])
            if r not in tested:
                raise EsaError(f"{where}: criterion role {r!r} is not among the tested roles {tested}")
        if not self.criterion_roles:
            raise EsaError(f"{where}: criterion_roles is empty; accepted: {', '.join(ABLATION_ROLES)}")
        if not 0.0 < self.alpha < 1.0:
            raise EsaError(f"{where}: alpha = {self.alpha} must lie in (0, 1)")
        if self.sink not in SINKS:
            raise unknown("sink", self.sink, SINKS)
        if self.sink_aggregate not in AGGREGATES:
            raise unknown("sink aggregate", self.sink_aggregate, AGGREGATES)
        mins = {"n_inputs": RoleConfig.min_inputs, "input_seqlen": 2, "n_boot": 100, "min_weights": 1,
                "probe_seqlen": 2, "localise_k": 1, "generic_windows": 1, "generic_seqlen": 2, "direct_top": 1, "direct_random": 0,
                "probes_per_kind": 1, "batch_size": 1}
        for key, low in mins.items():
            v = getattr(self, key)
            if v is not None and v < low:
                raise EsaError(f"{where}: {key} = {v} must be >= {low}")
        for model, k in self.model_topk.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise EsaError(f"{where}: model_topk[{model!r}] = {k!r} must be a positive integer")
        if not self.chain_text.strip():
            raise EsaError(f"{where}: chain_text is empty")
        return self

    def topk_for(self, model: str) -> int:
        return self.model_topk.get(model, self.topk)


def settings(P: Profile, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The profile's `interpret` section (+ overrides), type-checked by esa.params.section, value-checked here."""
    return build_settings(P, "interpret", Settings, overrides).validate(P)


def model_names(P: Profile, S: Settings) -> list[str]:
    return list(S.models or P.models)


def metric_names(P: Profile, S: Settings) -> list[str]:
    return list(S.metrics or P.metrics)


def score_seed(P: Profile, S: Settings) -> int:
    return P.seeds[0] if S.score_seed is None else S.score_seed


def role_config(S: Settings) -> RoleConfig:
    return RoleConfig(alpha=S.alpha, sink=S.sink, seed=S.control_seed, n_boot=S.n_boot, batch_size=S.batch_size,
                      show_progress=False)


def budget_reason(S: Settings, k: int) -> str | None:
    """Why a run is a machinery check rather than the guide's experiment, or None."""
    if k < GUIDE_TOPK or S.n_inputs < GUIDE_INPUTS:
        return (f"top-{k} per metric on {S.n_inputs} inputs of {S.input_seqlen} tokens (the guide's: top-{GUIDE_TOPK} "
                f"per metric, >= {GUIDE_INPUTS} inputs)")
    return None


# ------------------------------------------------------------------ inputs of the catalogue
def load_model(name: str, P: Profile) -> LoadedModel:
    # eager attention: the sink role and the chain read attention probabilities
    return Recipe.of(P).load(name, eager=True)


def score_runs(lm: LoadedModel, name: str, P: Profile, S: Settings) -> Runs:
    """Phase 2's cached scores of every metric this phase reads, at the score seed."""
    needed = list(dict.fromkeys([*metric_names(P, S), S.sink_metric, S.localise_metric]))
    return Recipe.of(P).score_model(lm, name, needed, [score_seed(P, S)])


def detector_table(lm: LoadedModel, text: str = DEFAULT_PROMPT) -> pd.DataFrame:
    """The super-weight detector's per-layer table (empty, with the reason in attrs, for a model it cannot read)."""
    try:
        return detect_superweights(lm.model, lm.tokenizer, lm.inventory, prompt=text)
    except EsaError as e:
        out = pd.DataFrame(columns=["layer", "param", "row", "col", "in_max", "out_max", "candidate"])
        out.attrs["skipped"] = str(e)
        return out


def selection(lm: LoadedModel, runs: Runs, metrics: list[str], seed: int, k: int,
              detector: pd.DataFrame | None = None) -> pd.DataFrame:
    """Global top-k of each metric (columns param, expert, row, col, score, rank, metric) plus, as metric
    "detector", the detector's candidates ranked by their output spike. k larger than the weights: EsaError."""
    check_k(lm.inventory, k, "global")
    parts = []
    for m in metrics:
        if (m, seed) not in runs:
            raise EsaError(f"no scores of metric {m!r} at seed {seed}; scored: {sorted(runs)}")
        parts.append(runs[(m, seed)].topk(k, "global", lm.inventory)[["param", "expert", "row", "col", "score",
                                                                        "rank"]].assign(metric=m))
    if detector is not None and len(detector) and detector["candidate"].any():
        cand = detector[detector["candidate"]].sort_values("out_max", ascending=False)
        parts.append(pd.DataFrame({"param": cand["param"], "expert": -1, "row": cand["row"], "col": cand["col"],
                                   "score": cand["out_max"], "rank": np.arange(1, len(cand) + 1),
                                   "metric": DETECTOR}))
    return pd.concat(parts, ignore_index=True)


def role_inputs(lm: LoadedModel, corpus: str, S: Settings) -> torch.Tensor:
    return interp.default_inputs(lm.tokenizer, S.n_inputs, S.input_seqlen, corpus=corpus)


class _Eager:
    """Eager attention for the duration of a block (the sink role reads attention probabilities), then back."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.before = model, anatomy(model).attn_implementation

    def __enter__(self) -> None:
        if self.before != "eager":
            self.model.set_attn_implementation("eager")

    def __exit__(self, *exc: object) -> None:
        if self.before != "eager" and self.before is not None:
            self.model.set_attn_implementation(self.before)


def catalogue(lm: LoadedModel, sel: pd.DataFrame, inputs: torch.Tensor, S: Settings,
              roles: list[str] | None = None) -> RoleReport:
    """The role catalogue over `sel` (every weight zeroed in place and restored bit-exactly)."""
    with _Eager(lm.model):
        return interp.roles_for(lm, sel, inputs, roles if roles is not None else S.roles, role_config(S))


# ------------------------------------------------------------------ the criterion
def role_share(report: RoleReport, S: Settings) -> dict[str, Any]:
    """Share of the top critical weights (metric selections, not the detector's own) with >= 1 identified
    role among `S.criterion_roles`, its Wilson CI, and whether the inputs let any test pass at all."""
    member = report.membership
    keys = member.loc[member["metric"] != DETECTOR, KEY].drop_duplicates()
    w = report.weights.merge(keys, on=KEY)
    counted = set(S.criterion_roles)
    hit = w["roles"].str.split(";").apply(lambda rs: bool(counted & set(rs))) if len(w) else pd.Series(dtype=bool)
    n, k = len(w), int(hit.sum()) if len(w) else 0
    tests = report.tests
    m = int(tests["p"].notna().sum())
    decided = tests[tests["p"].notna()]
    n_inputs = int(decided["n_inputs"].max()) if len(decided) else 0
    out = {"n": n, "explained": k, "share": k / n if n else math.nan, "ci_lo": math.nan, "ci_hi": math.nan,
           "roles": sorted(counted), "m_tests": m, "n_inputs": n_inputs,
           "min_p": 2.0 ** -n_inputs if n_inputs else math.nan,
           "holm_first_threshold": S.alpha / m if m else math.nan}
    out["reachable"] = bool(m and n_inputs and out["min_p"] < out["holm_first_threshold"])
    if n:
        ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        out.update(ci_lo=float(ci.low), ci_hi=float(ci.high))
    # beside it, for reading only: the same share counting every tested role (baseline-only d-f too)
    tested = [r for r in report.config["roles"] if r != UNEXPLAINED]
    out["share_any_role"] = float(w["roles"].str.split(";").apply(lambda rs: bool(set(tested) & set(rs))).mean()) \
        if n else math.nan
    return out


def share_verdict(share: float, ci_lo: float, n: int, reachable: bool, min_weights: int,
                  budget: str | None = None) -> tuple[bool | None, str, str]:
    """(passed, verdict, reason) of the criterion from the measured share (see the module docstring)."""
    if n == 0 or not math.isfinite(share):
        return None, "not estimable", "no top critical weights were tested"
    if not reachable:
        return None, "underpowered", ("too few inputs: the smallest attainable Wilcoxon p is not below Holm's "
                                      "first threshold, so no role could be identified")
    if n < min_weights:
        return None, "underpowered", f"only {n} weights tested (< {min_weights}): the share's CI is too wide"
    if share < THRESHOLD:
        passed, verdict, why = False, "FAIL", f"{share:.0%} of the top critical weights have an identified role"
    elif ci_lo < THRESHOLD:
        return None, "underpowered", (f"share {share:.0%} but its 95% CI reaches {ci_lo:.0%}, below 50%: more "
                                      "weights are needed to call it")
    else:
        passed, verdict, why = True, "PASS", f"{share:.0%} (CI lower bound {ci_lo:.0%}) have an identified role"
    if budget:
        return None, "machinery-only", f"{budget} (the number alone reads {verdict})"
    return passed, verdict, why


def criterion_rows(model: str, share: dict[str, Any], S: Settings, k: int, evidence: str) -> list[Criterion]:
    passed, verdict, why = share_verdict(share["share"], share["ci_lo"], share["n"], share["reachable"],
                                         S.min_weights, budget_reason(S, k))
    note = (f"{why}; {share['explained']}/{share['n']} weights (union of the global top-{k} of each metric), "
            f"95% Wilson CI [{share['ci_lo']:.2f}, {share['ci_hi']:.2f}]; identified = an ablation role "
            f"({', '.join(share['roles'])}) beats its matched control at Holm-adjusted p < {S.alpha:g} over "
            f"{share['m_tests']} tests, {share['n_inputs']} inputs each; counting the baseline-only roles too: "
            f"{share['share_any_role']:.0%}")
    value = None if not math.isfinite(share["share"]) else round(float(share["share"]), 4)
    return [Criterion(f"P5.interpret_roles.{model}", 5, f"{CRITERION_TEXT} ({model})", value, ">= 0.5", passed,
                      evidence, note, verdict=verdict)]


# ------------------------------------------------------------------ chain, sinks, localisation
def chain_weight(detector: pd.DataFrame, sel: pd.DataFrame) -> tuple[str, int, int, str]:
    """(param, row, col, why) of the weight whose chain is traced: the detector's candidate with the largest
    output spike; without a candidate, the layer with the largest down-projection output spike; without a
    detector table, the first metric's top weight."""
    if len(detector) and detector["candidate"].any():
        r = detector[detector["candidate"]].sort_values("out_max", ascending=False).iloc[0]
        return str(r["param"]), int(r["row"]), int(r["col"]), "the super-weight detector's strongest candidate"
    if len(detector):
        r = detector.sort_values("out_max", ascending=False).iloc[0]
        return (str(r["param"]), int(r["row"]), int(r["col"]),
                "no detector candidate: the largest down-projection output spike, traced as the nearest thing")
    r = sel.iloc[0]
    return (str(r["param"]), int(r["row"]), int(r["col"]),
            f"no detector table ({detector.attrs.get('skipped', '')}): the top weight of {r['metric']}")


def chain(lm: LoadedModel, detector: pd.DataFrame, sel: pd.DataFrame, S: Settings) -> interp.ChainTrace:
    param, row, col, why = chain_weight(detector, sel)
    with _Eager(lm.model):
        trace = interp.trace_chain(lm.model, lm.tokenizer, lm.inventory, param, row, col, S.chain_text, sink=S.sink,
                                   seed=S.control_seed)
    trace.summary["chosen_because"] = why
    return trace


def sinks(lm: LoadedModel, runs: Runs, inputs: torch.Tensor, S: Settings, seed: int) -> interp.SinkCorrelation:
    """Per-head sink strength on the role inputs against the head's `sink_metric` sensitivity."""
    run = runs[(S.sink_metric, seed)]
    with _Eager(lm.model):
        strength = interp.head_sink_strength(lm.model, inputs, lm.tokenizer, S.sink, S.batch_size)
    sens = interp.head_sensitivity(run.full(), lm.inventory, lm.model, S.sink_aggregate)
    return interp.sink_correlation(strength, sens, n_boot=S.n_boot, seed=S.control_seed)


@dataclass
class Localisation:
    probes: pd.DataFrame  # probe_summary: accuracy, CI, chance, p vs chance per kind and overall
    selectivity: interp.SelectivityResult
    direct: interp.DirectTest
    n_items: int


def localisation(lm: LoadedModel, P: Profile, S: Settings, runs: Runs, seed: int,
                 exclude: Targets | None = None) -> Localisation:
    """Probe accuracy; probe- vs generic-calibrated top-k and random-k ablations; the direct test."""
    probes = interp.build_probes(max_per_kind=S.probes_per_kind)
    summary = interp.probe_summary(interp.score_probes(lm.model, lm.tokenizer, probes))
    pids = interp.probe_windows(lm.tokenizer, probes, S.probe_seqlen)
    p_scores = interp.metric_scores(lm.model, lm.inventory, pids, S.localise_metric)
    g_scores = runs[(S.localise_metric, seed)].full()
    sets = interp.ablation_sets(lm.model, lm.inventory, p_scores, g_scores, S.localise_k, "global", S.control_seed,
                                exclude)
    eval_ids = evaluation(lm.tokenizer, P.corpus, S.generic_seqlen or P.seqlen, n_windows=S.generic_windows, seed=0,
                          max_positions=lm.info.max_positions or None).ids
    sel = interp.selectivity(lm.model, lm.tokenizer, probes, eval_ids, sets, S.n_boot, seed=S.control_seed,
                             show_progress=False)
    cand = interp.direct_candidates(lm.model, lm.inventory, p_scores, g_scores, S.direct_top, S.direct_random,
                                    S.control_seed)
    direct = interp.direct_test(lm.model, lm.tokenizer, probes, cand, lm.inventory, S.n_boot, seed=S.control_seed,
                                show_progress=False)
    return Localisation(summary, sel, direct, len(probes))


# ------------------------------------------------------------------ one model
@dataclass
class ModelInterpret:
    model: str
    family: str
    k: int
    selection: pd.DataFrame
    detector: pd.DataFrame
    report: RoleReport
    share: dict[str, Any]
    chain: interp.ChainTrace
    sinks: interp.SinkCorrelation | None
    sinks_note: str
    localisation: Localisation | None
    localisation_note: str
    seconds: dict[str, float]


def analyse_loaded(lm: LoadedModel, name: str, P: Profile, S: Settings) -> ModelInterpret:
    """Everything for one loaded model; every ablation is undone bit-exactly (tests check the weights' hash)."""
    sec: dict[str, float] = {}
    t = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal t
        now = time.perf_counter()
        sec[key] = round(now - t, 2)
        t = now

    seed, k = score_seed(P, S), S.topk_for(name)
    runs = score_runs(lm, name, P, S)
    lap("scores")
    det = detector_table(lm, S.chain_text)  # the chain needs it even when its candidates are not tested
    sel = selection(lm, runs, metric_names(P, S), seed, k, det if S.detector else None)
    inputs = role_inputs(lm, P.corpus, S)
    lap("selection")
    report = catalogue(lm, sel, inputs, S)
    lap("roles")
    trace = chain(lm, det, sel, S)
    lap("chain")
    sc, sc_note = None, ""
    try:
        sc = sinks(lm, runs, inputs, S, seed)
    except EsaError as e:
        sc_note = f"not run: {e}"
    lap("sinks")
    loc, loc_note = None, "" if S.localise else "switched off (localise: false)"
    if S.localise:
        exclude = targets_from_selection(sel[sel["metric"] == DETECTOR], lm.inventory) if S.detector else None
        loc = localisation(lm, P, S, runs, seed, exclude)
    lap("localisation")
    return ModelInterpret(name, lm.info.family, k, sel, det, report, role_share(report, S), trace, sc, sc_note, loc,
                          loc_note, sec)


def analyse(name: str, P: Profile, S: Settings) -> ModelInterpret:
    return analyse_loaded(load_model(name, P), name, P, S)


# ------------------------------------------------------------------ tables, figures, prose
def headline(res: ModelInterpret, rows: int = 12) -> pd.DataFrame:
    """The catalogue's headline rows: weights with an identified role first (most roles, then the largest
    shrink factor), capped at `rows`; the full table is `interp.wide_table(res.report)`."""
    wide = interp.wide_table(res.report)
    cols = ["label", "metrics", "roles"] + [c for c in (f"{r}_effect" for r in ABLATION_ROLES) if c in wide]
    shrink = wide.get("creates_massive_effect", pd.Series(np.nan, index=wide.index)).fillna(0)
    order = wide.assign(_s=shrink).sort_values(["n_roles", "_s"], ascending=False, kind="mergesort")
    return order[cols].head(rows).reset_index(drop=True)


def share_table(res: ModelInterpret, S: Settings) -> pd.DataFrame:
    """Per metric (and all): share of its top weights with an identified (ablation) role, Wilson CI."""
    rows = []
    counted = set(S.criterion_roles)
    w = res.report.weights.merge(res.report.membership, on=KEY)
    for metric, g in [*w.groupby("metric"), ("all (criterion)", w[w["metric"] != DETECTOR].drop_duplicates(KEY))]:
        hit = g["roles"].str.split(";").apply(lambda rs: bool(counted & set(rs)))
        n, k = len(g), int(hit.sum())
        ci = sps.binomtest(k, n).proportion_ci(method="wilson") if n else None
        rows.append({"model": res.model, "metric": metric, "n": n, "explained": k, "share": k / n if n else math.nan,
                     "ci_lo": float(ci.low) if ci else math.nan, "ci_hi": float(ci.high) if ci else math.nan})
    return pd.DataFrame(rows)


def plot_sinks(sc: interp.SinkCorrelation, title: str, ax: Any = None) -> Any:
    """Sink mass of each head against its sensitivity (log scale), coloured by layer."""
    import matplotlib.pyplot as plt  # plotting only

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    t = sc.table
    pts = ax.scatter(np.maximum(t["total"], 1e-30), t["sink_mass"], c=t["layer"], s=12, cmap="viridis")
    ax.set_xscale("log")
    ax.set_xlabel("head sensitivity (sum over q/k/v/o slices)")
    ax.set_ylabel("attention mass on sink")
    o = sc.overall
    ax.set_title(f"{title}: Spearman {o['rho']:.2f} [{o['ci_lo']:.2f}, {o['ci_hi']:.2f}]", fontsize=9)
    plt.colorbar(pts, ax=ax, label="layer")
    return ax


def reductions(P: Profile, S: Settings, models: list[str]) -> list[str]:
    """What this run leaves out of the issue's full grid (top-100 per metric on every model, every probe item)."""
    out = []
    for m in models:
        if S.topk_for(m) < GUIDE_TOPK:
            out.append(f"{m}: top-{S.topk_for(m)} per metric instead of top-{GUIDE_TOPK}")
    if S.n_inputs < GUIDE_INPUTS:
        out.append(f"{S.n_inputs} role-test inputs instead of >= {GUIDE_INPUTS}")
    if S.probes_per_kind is not None:
        out.append(f"at most {S.probes_per_kind} probe items per kind")
    if not S.localise:
        out.append("no localisation tests")
    if QWEN not in models:
        out.append(f"{QWEN} (the Qwen2 model) not run: one 8 x 256-token evaluation takes ~100 s on 2 cores; "
                   "add it with models")
    if len(P.seeds) > 1 or S.score_seed is not None:
        out.append(f"one calibration seed ({score_seed(P, S)}) of the profile's {P.seeds}")
    return out


def _fmt(x: float, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def prose(res: ModelInterpret, S: Settings) -> list[str]:
    """Sentences computed from the numbers of one model."""
    sh, m = res.share, res.model
    out = [f"{m}: {sh['explained']} of {sh['n']} top critical weights ({_fmt(sh['share'], '.0%')}, 95% CI "
           f"{_fmt(sh['ci_lo'], '.0%')}-{_fmt(sh['ci_hi'], '.0%')}) have at least one ablation-verified role "
           f"({', '.join(sh['roles'])}; Holm over {sh['m_tests']} tests on {sh['n_inputs']} inputs); counting the "
           f"baseline-only roles too, {_fmt(sh['share_any_role'], '.0%')}."]
    t = res.report.tests
    counts = t[t["verdict"] == "pass"].groupby("role").size()
    if len(counts):
        out.append("  verified roles: " + ", ".join(f"{r} {n}" for r, n in counts.sort_values(ascending=False).items()))
    cand = res.detector[res.detector["candidate"]] if len(res.detector) else res.detector
    c = res.chain.summary
    if len(cand):
        out.append(f"  super-weight chain: zeroing {c['weight']} shrinks channel {c['channel']}'s peak after block "
                   f"{c['layer']} from {c['max_after_block_base']:.4g} to {c['max_after_block_ablated']:.4g} "
                   f"(x{c['factor_at_block']:.2f}; the matched control x{c['control_factor_at_block']:.2f}); the "
                   f"later blocks' mean sink mass goes {_fmt(c['sink_mass_later_base'])} -> "
                   f"{_fmt(c['sink_mass_later_ablated'])}, stopword mass x{c['stopword_ratio']:.2f}.")
    else:
        out.append(f"  {m} has no super-weight candidate of the SmolLM2 kind ({c['chosen_because']}): zeroing "
                   f"{c['weight']} changes channel {c['channel']}'s peak x{c['factor_at_block']:.2f} "
                   f"(control x{c['control_factor_at_block']:.2f}), stopword mass x{c['stopword_ratio']:.2f}.")
    d = res.chain.depth
    late = d[d["block"] > c["layer"]]
    if len(late):
        last = late.iloc[-1]
        out.append(f"  through depth the factor goes from x{c['factor_at_block']:.2f} at block {c['layer']} to "
                   f"x{last['factor']:.2f} at the last block (min x{late['factor'].min():.2f}, max "
                   f"x{late['factor'].max():.2f}).")
    if res.sinks is not None:
        o, wl = res.sinks.overall, res.sinks.within_layer
        out.append(f"  sinks: Spearman rho of per-head sink mass with {S.sink_metric} head sensitivity "
                   f"{_fmt(o['rho'])} [{_fmt(o['ci_lo'])}, {_fmt(o['ci_hi'])}] over {o['n']} heads; within layers "
                   f"{_fmt(wl['rho'])} [{_fmt(wl['ci_lo'])}, {_fmt(wl['ci_hi'])}] over {wl['n_layers']} layers.")
    else:
        out.append(f"  sinks: {res.sinks_note}")
    if res.localisation is not None:
        loc = res.localisation
        a = loc.probes.set_index("kind").loc["all"]
        out.append(f"  probes: accuracy {a['accuracy']:.0%} on {int(a['n'])} items (chance {a['chance']:.0%}, exact "
                   f"p vs chance {a['p_vs_chance']:.2g}).")
        st = loc.selectivity.table.set_index("condition")
        parts = [f"{cnd} {_fmt(r['selectivity_nll'])} [{_fmt(r['selectivity_nll_lo'])}, {_fmt(r['selectivity_nll_hi'])}]"
                 for cnd, r in st.iterrows()]
        out.append("  selectivity (rise of answer NLL / rise of generic log-PPL): " + "; ".join(parts) + ".")
        r1, r0 = loc.direct.rho("probe_score", "abs_effect"), loc.direct.rho("generic_score", "abs_effect")
        out.append(f"  direct test: probe score vs |effect| rho {_fmt(r1['rho'])} [{_fmt(r1['ci_lo'])}, "
                   f"{_fmt(r1['ci_hi'])}], generic score {_fmt(r0['rho'])} [{_fmt(r0['ci_lo'])}, {_fmt(r0['ci_hi'])}]"
                   f" (n = {r1['n']}); " + ("the probe score ranks the effect better." if _better(r1, r0) else
                                            "the probe score does not rank the effect better than the generic one."))
    else:
        out.append(f"  localisation: {res.localisation_note}")
    return out


def _better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(math.isfinite(a["rho"]) and math.isfinite(b["rho"]) and a["ci_lo"] > b["rho"])


# ------------------------------------------------------------------ esa-runner --roles
@dataclass(frozen=True)
class Spec:
    roles: list[str]
    topk: int
    settings: dict[str, Any]  # the validated profile section

    def describe(self) -> str:
        return f"roles {', '.join(self.roles)} of the top-{self.topk} per metric"


@dataclass(frozen=True)
class RolesRequest:
    """esa-runner's interpretability flags (the command layer builds them from these fields)."""

    roles: str | None = option("role catalogue of the global top-k of each metric plus the super-weight "
                               "candidates: all, or a comma list; writes roles.parquet", choices=lambda: ROLES,
                               const="all")
    roles_topk: int | None = option("global top-k of each metric whose roles are tested (default: the profile's "
                                    "interpret.topk)")


def job(req: RolesRequest, ctx: RunContext) -> Spec:
    S = settings(ctx.profile)
    names = parse_roles(None if req.roles.strip() == "all" else req.roles)  # type: ignore[union-attr]
    k = S.topk if req.roles_topk is None else req.roles_topk
    if k < 1:
        raise EsaError(f"--roles-topk must be at least 1, got {k}")
    return Spec(names, k, asdict(S))


def run_job(spec: Spec, cmd: Command, lm: LoadedModel, runs: Runs, stage: Path) -> dict[str, Any]:
    """The catalogue over the run's metrics (first seed) into stage/roles.parquet (one row per weight)."""
    S = Settings(**{f.name: spec.settings[f.name] for f in fields(Settings) if f.name in spec.settings})
    S.roles = list(spec.roles)
    S.criterion_roles = [r for r in S.criterion_roles if r in spec.roles] or [
        r for r in spec.roles if r in ABLATION_ROLES]
    seed = cmd.recipe.seeds[0]
    det = detector_table(lm, S.chain_text) if S.detector else None
    sel = selection(lm, runs, list(cmd.recipe.metrics), seed, spec.topk, det)
    report = catalogue(lm, sel, role_inputs(lm, cmd.recipe.corpus, S), S, spec.roles)
    wide = interp.wide_table(report).assign(model=cmd.model, run_id=cmd.run_id)
    write_parquet(stage / "roles.parquet", wide)
    write_parquet(stage / "roles_tests.parquet", report.tests.assign(model=cmd.model, run_id=cmd.run_id))
    out: dict[str, Any] = {"files": ["roles.parquet", "roles_tests.parquet"], "n_weights": len(wide),
                           "roles": spec.roles, "topk": spec.topk, "seed": seed, "timing": report.timing}
    if S.criterion_roles:
        share = role_share(report, S)
        passed, verdict, why = share_verdict(share["share"], share["ci_lo"], share["n"], share["reachable"],
                                             S.min_weights, budget_reason(S, spec.topk))
        out["criterion"] = {**share, "passed": passed, "verdict": verdict, "reason": why}
    else:
        out["criterion"] = {"verdict": "not estimable", "reason": "no ablation role (a-c) was asked for"}
    return out


# ------------------------------------------------------------------ the study
def plan(S: Settings, P: Profile, models: Sequence[str] | None = None) -> Plan:
    """The role catalogue of each model, without loading anything."""
    chosen = list(models or model_names(P, S))
    conds = [Planned(m, f"roles of the top-{S.topk_for(m)} per metric", S.n_inputs, "inputs") for m in chosen]
    return Plan("interpret", P, chosen, S, conds, {"metrics": metric_names(P, S), "seed": score_seed(P, S)},
                reductions(P, S, chosen))


def run(p: Plan) -> dict[str, ModelInterpret]:
    return {m: analyse(m, p.profile, p.settings) for m in p.models}


def criteria(results: Mapping[str, ModelInterpret], p: Plan, evidence: str) -> list[Criterion]:
    return [row for m, r in results.items() for row in criterion_rows(m, r.share, p.settings, r.k, evidence)]


def findings(results: Mapping[str, ModelInterpret], p: Plan) -> list[str]:
    return [" ".join(prose(r, p.settings)) for r in results.values()]


STUDY = Study(name="interpret", title="interpretability (Phase 5, week 15)", Request=RolesRequest, trigger=("roles",),
              settings=settings, plan=plan, run=run, criteria=criteria, findings=findings, job=job, run_job=run_job)
