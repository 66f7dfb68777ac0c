"""Phase 5 (week 13b, training): sparse fine-tuning of the critical weights against equal-count controls,
LoRA and full fine-tuning, and protection of the critical weights while fine-tuning, on a shift of domain.

A `Study` (esa.phases.study) on the profile section `finetune`: `plan` lists the grid's arms per model, each
run once per seed; `run` trains them from the same base weights, restored bit-exactly after every run
(esa.apps.training.grid: the domains, gain and forgetting in nats per token, the seed as the unit of
replication); `criteria` judges the criteria below by paired-by-seed comparisons (esa.stats.paired);
`findings` says the numbers in sentences. esa-runner's request is `FinetuneRequest`.

**Seed parts.** The notebook's unit of work is one seed of one model (`<model>@seed<N>`: every arm for that
seed), a record part of its own (esa.phases.parts; `make record CHUNK=phase5_week13_finetune
PART=smollm2-135m@seed1337`). `run_parts` reads each committed seed part or computes the seed, and `combine`
stacks a model's seeds into the Result one grid over every seed gives; the criteria are judged over all seeds.

**Criteria, defined** (one-sided paired t over seeds on per-seed differences, Holm within each family,
alpha `ALPHA`; fewer than `MIN_SEEDS` seeds -> underpowered, with the seeds a test would need at the
observed effect; a NaN or a constant difference -> not estimable; below the guide's budget
(`budget_reason`) a PASS/FAIL becomes machinery-only):
1. `sparse_vs_random`: for each selection metric and density, gain(sparse on the metric's top-k) >
   gain(sparse on random-k at equal count, per matrix, disjoint from the top-k). Family: metrics x densities.
2. `gap_lora` / `gap_full`: gain(sparse on critical) > gain(LoRA at equal trainable count) and > gain(full
   fine-tuning). The gap (nats and as a share of the baseline's gain) is the measured value; PASS needs the
   one-sided test; a significant loss is said in the note. Family: every gap row.
3. `protection`: for each protection of the `protect_method` run, forgetting(none) - forgetting(p) > 0
   (significant) while keeping at least `MIN_GAIN_KEPT` of the unprotected gain, judged as the contrast
   gain(p) - MIN_GAIN_KEPT·gain(none) > 0 by its one-sided bound (so an unprotected gain within noise of zero
   decides the cost instead of leaving a share over noise; the share kept is said beside); and `freeze_vs_random`: freezing the critical set reduces forgetting more than
   freezing a random set of the same size (forgetting(random_freeze) - forgetting(freeze) > 0).
   Family: every protection row.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from esa import agree
from esa.apps import training as tr
from esa.apps.training import grid, prose
from esa.apps.training.grid import Arm, Result, arms, pairs, reference
from esa.apps.training.tables import summary_table
from esa.errors import EsaError, unknown
from esa.models import LoadedModel, inventory_without_weights
from esa.params import Profile, model_params
from esa.perturb.controls import CONTROLS
from esa.phases import parts as record_parts
from esa.phases.study import (
    Check,
    Plan,
    Planned,
    RunContext,
    Study,
    at_least,
    build_settings,
    each,
    one_of,
    option,
    optional,
    seed_value,
    setting,
)
from esa.recipes import Recipe
from esa.sensitivity.metrics import METRICS
from esa.stats import budget, paired, power
from esa.stats.verdicts import Criterion
from esa.store import write_json, write_parquet

if TYPE_CHECKING:
    from esa.phases.command import Command

SELECTION_METRICS = tuple(sorted({*METRICS, "obd"}))  # what a sparse selection's top-k may be ranked by
BASELINES = ("lora", "full")
PROTECT_METHODS = ("full", "lora")
MIN_GAIN_KEPT = 0.5  # a protection "at a stated cost" must keep at least half of the unprotected gain
# The guide-sized budget below which a verdict is a machinery check (smoke): trained tokens per run,
# held-out target tokens per evaluation.
GUIDE_TRAIN_TOKENS = 16_384
GUIDE_HELDOUT_TOKENS = 2_048


def _finite(bound: str) -> Check:
    """A finite number '> 0' or '>= 0'."""
    def run(v: Any, where: str) -> None:
        if not (isinstance(v, int | float) and math.isfinite(v) and (v > 0 if bound == "> 0" else v >= 0)):
            raise EsaError(f"{where} must be a finite number {bound}, got {v!r}")
    return run


@dataclass
class Settings:
    """The profile's `finetune` section (one model's grid; every run starts from the same base weights)."""

    domain: str = setting("gsm8k", tr.check_domain)  # target domain (esa.apps.training.DOMAINS)
    # sparse FT on each metric's top-k, against equal-count controls, LoRA at equal count and full FT
    selections: list[str] = setting(check=each(one_of(lambda: SELECTION_METRICS)), factory=lambda: ["grad_x_weight"])
    controls: list[str] = setting(check=each(one_of(lambda: CONTROLS)), factory=lambda: ["random_k", "magnitude_k"])
    baselines: list[str] = setting(check=each(one_of(lambda: BASELINES)), factory=lambda: ["lora", "full"])
    densities: list[float] = setting(check=each(tr.check_density), factory=lambda: [0.01])  # share trained
    protections: list[str] = setting(check=each(one_of(lambda: tr.RETENTIONS)),
                                     factory=lambda: ["none", "freeze", "ewc", "anchor", "random_freeze"])
    protect_method: str = setting("full", one_of(lambda: PROTECT_METHODS))  # the method the protections act on
    # the critical set: the super-weight candidates + critical_metric's top-k at critical_density
    critical_metric: str = setting("grad_x_weight", one_of(lambda: SELECTION_METRICS))
    critical_density: float = setting(0.001, tr.check_density)
    ewc_strength: float = setting(1000.0, _finite(">= 0"))  # EWC's lambda (Fisher diagonal normalised to mean 1)
    anchor_strength: float = setting(1000.0, _finite(">= 0"))  # lambda of the L2 anchor on the critical set
    steps: int | None = 20  # training budget per run: steps, or tokens (steps = tokens // (batch x seqlen))
    tokens: int | None = None
    batch_size: int = setting(2, at_least(1))  # windows per step
    seqlen: int = setting(128, at_least(2))  # tokens per window (training and evaluation)
    lr_sparse: float = setting(1e-3, _finite("> 0"))  # peak rates (warmup 10%, cosine to 10%); sparse: larger
    lr_lora: float = setting(1e-3, _finite("> 0"))
    lr_full: float = setting(2e-5, _finite("> 0"))
    full_scope: str = setting("all", one_of(lambda: tr.full.SCOPES))  # full FT trains 'all' or the 'studied'
    seeds: list[int] | None = setting(None, optional(each(seed_value, unique=True)))  # None: the profile's
    train_windows: int | None = setting(None, optional(at_least(1)))  # of the domain's train split (None: all)
    target_windows: int = setting(8, at_least(1))  # held-out target windows per evaluation
    source_windows: int = setting(8, at_least(1))  # source (forgetting) windows per evaluation
    eval_every: int = setting(0, at_least(0))  # evaluate every n steps for the learning curve (0: before/after)

    def lr_of(self, method: str) -> float:
        return {"sparse": self.lr_sparse, "lora": self.lr_lora, "full": self.lr_full}[method]

    def strength_of(self, protection: str) -> float:
        return {"ewc": self.ewc_strength, "anchor": self.anchor_strength}.get(protection, 1.0)

    def train_config(self, seed: int, lr: float, show_progress: bool = False) -> tr.TrainConfig:
        return tr.TrainConfig(steps=self.steps, tokens=self.tokens, batch_size=self.batch_size, lr=lr, seed=seed,
                              eval_every=self.eval_every, eval_start=False, show_progress=show_progress)

    def n_steps(self) -> int:
        return self.train_config(0, self.lr_sparse).n_steps(self.seqlen)


def validate(S: Settings) -> Settings:
    """The checks that join several settings (each setting's own check ran in `build_settings`)."""
    if not S.densities and (S.selections or S.controls or "lora" in S.baselines):
        raise EsaError("finetune.densities is empty; sparse FT, its controls and LoRA need at least one density")
    if S.protect_method == "lora":
        tr.check_lora_protections(S.protections, "finetune.protections with protect_method 'lora'")
        if not S.densities:
            raise EsaError("protect_method 'lora' needs a density (its trainable count); finetune.densities is empty")
    S.n_steps()  # a budget of zero steps, or both/neither of steps and tokens
    if not arms(S):
        raise EsaError("the finetune section asks for no run: give selections, controls, baselines or protections")
    return S


def settings(P: Profile, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The profile's `finetune` section (+ overrides: field -> value on top), typed and validated."""
    return validate(build_settings(P, "finetune", Settings, overrides))


def seeds_of(S: Settings, P: Profile) -> list[int]:
    return list(S.seeds) if S.seeds else list(P.seeds)


# ------------------------------------------------------------------ plan
def plan(S: Settings, P: Profile, models: Sequence[str] | None = None) -> Plan:
    """Every arm on each model, run once per seed (the comparisons' n), without loading anything."""
    chosen, seeds = list(models or P.models), seeds_of(S, P)
    compared = pairs(S)
    # a seed of an arm: its training steps (a forward and backward pass per window) and its evaluations
    train, evals = S.n_steps() * S.batch_size, S.target_windows + S.source_windows
    conds = [Planned(m, a.label, len(seeds), "seeds",
                     tuple(f"P5.ft.{p.name}" for p in compared if a.label in (p.a, p.b)), kind="grad",
                     seqlen=S.seqlen, per_unit=train, also=(("eval", evals),)) for m in chosen for a in arms(S)]
    setup = {"training": {"domain": S.domain, "steps": S.n_steps(), "batch_size": S.batch_size, "seqlen": S.seqlen,
                          "lr": {"sparse": S.lr_sparse, "lora": S.lr_lora, "full": S.lr_full}},
             "evaluation": {"target_windows": S.target_windows, "source_windows": S.source_windows,
                            "source_corpus": P.corpus},
             "critical_set": {"metric": S.critical_metric, "density": S.critical_density}, "seeds": seeds}
    why = budget_reason(P, S)
    return Plan("finetune", P, chosen, S, conds, setup, [f"a PASS or FAIL is machinery-only: {why}"] if why else [])


# ------------------------------------------------------------------ running
def run_grid(name: str, P: Profile, S: Settings, lm: LoadedModel | None = None,
             runs: Mapping[tuple[str, int], Any] | None = None, arm_list: list[Arm] | None = None,
             seeds: list[int] | None = None, recipe: Recipe | None = None, export_dir: Path | None = None,
             check_restored: bool = True) -> Result:
    """Every arm for every seed on model `name` (loaded, and its missing scores computed through the score
    cache, by the recipe) from the same base weights, restored bit-exactly after each run."""
    t0 = time.perf_counter()
    arm_list = arms(S) if arm_list is None else arm_list
    seeds = seeds_of(S, P) if seeds is None else seeds
    recipe = recipe or Recipe.of(P)
    lm = lm or recipe.load(name)
    have = dict(runs or {})
    missing = [m for m in grid.needed_metrics(S, arm_list) if any((m, s) not in have for s in seeds)]
    if missing:
        have.update(recipe.score_model(lm, name, metrics=missing, seeds=seeds))
    data = grid.prepare_data(lm, S, P.corpus)
    done, restored = grid.run_arms(lm, S, arm_list, seeds, have, data, export_dir, recipe.show_progress,
                                   check_restored)
    return Result.of(name, asdict(S), done, data.describe(seeds), time.perf_counter() - t0, restored)


def run(p: Plan) -> dict[str, Result]:
    return {m: run_grid(m, p.profile, p.settings) for m in p.models}


# ------------------------------------------------------------------ one seed of one model, as a record part
NOTEBOOK = "phase5_week13_finetune"
SEED_MARK = "@seed"  # a unit: <model>@seed<N>
# the profile keys a seed's grid reads besides its section: the scores' calibration and metric configuration
# (esa.recipes.Recipe), the model's dtype and the source corpus
_PART_KEYS = ("corpus", "dtype", "seqlen", "max_samples", "batch_size")
_TABLES = ("final", "steps", "evals", "drift")


def unit(model: str, seed: int) -> str:
    return f"{model}{SEED_MARK}{seed}"


def split_unit(name: str) -> tuple[str, int]:
    """(model, seed) of a unit `unit` named."""
    model, _, seed = name.rpartition(SEED_MARK)
    return model, int(seed)


def part_units(P: Profile, models: Sequence[str] | None) -> list[str]:
    """The notebook's units: every seed of every model, model by model."""
    S = settings(P, None)
    return [unit(m, s) for m in plan(S, P, models).models for s in seeds_of(S, P)]


def part_settings(P: Profile, name: str) -> dict[str, Any]:
    """What determines a seed's grid: the section's fields (less the seed list: a seed added to the profile
    leaves this seed's part valid; one key each, so a refusal names the field), the seed, the metrics it
    scores and the profile keys it reads."""
    model, seed = split_unit(name)
    S = settings(P, None)
    metrics = grid.needed_metrics(S, arms(S))
    section = {f"finetune.{k}": v for k, v in asdict(S).items() if k != "seeds"}
    return record_parts.model_settings(P, model, _PART_KEYS, seed=seed, metrics=metrics, **section,
                                       hutchinson_probes=P.hutchinson_probes if "hutchinson_diag" in metrics else None)


def as_result(res: Result) -> dict[str, Any]:
    """A grid Result as a part stores it: its tables and plain values."""
    return {f.name: getattr(res, f.name) for f in fields(Result) if f.name != "model"}


def part_compute(P: Profile, name: str) -> dict[str, Any]:
    """Every arm for one seed of one model (the model loaded, its scores for that seed computed)."""
    model, seed = split_unit(name)
    return as_result(run_grid(model, P, settings(P, None), seeds=[seed]))


def part_seconds(p: Plan, name: str) -> float | None:
    """A seed's predicted seconds: its model's conditions (one per arm, n = the seeds), each divided by its n."""
    conds = p.for_model(split_unit(name)[0])
    if not conds or any(c.seconds is None for c in conds):
        return None
    return float(sum(c.seconds / c.n for c in conds))  # type: ignore[operator]


# A float measured on the model (the tracked super weight's activation, `out_max`) differs in its last digits
# between CPUs (esa.agree), so seeds recorded on two machines agree to this tolerance; every other value (settings,
# which weights are tracked, the data's sizes and digests) exactly.
MEASURED_RTOL = 1e-4


def shared_difference(first: Mapping[str, Any], other: Mapping[str, Any]) -> str | None:
    """Where two seeds of a model did not share their inputs (None: they did): their settings exactly, their
    data less the seed list with measured floats to MEASURED_RTOL."""
    data = [{k: v for k, v in r["data"].items() if k != "seeds"} for r in (first, other)]
    return (agree.difference(first["settings"], other["settings"], path="settings")
            or agree.difference(*data, MEASURED_RTOL, "data"))


def combine(model: str, seeds: Sequence[int], per_seed: Sequence[Mapping[str, Any]]) -> Result:
    """One model's Result from its seeds' results (`as_result`, in `seeds` order), as one grid over every seed
    gives it: the tables stacked seed by seed, the shared data the first seed's; one EsaError when two seeds did
    not share their inputs (`shared_difference`)."""
    first = per_seed[0]
    for s, r in zip(seeds, per_seed, strict=True):
        hit = shared_difference(first, r)
        if hit:
            raise EsaError(f"{NOTEBOOK}: seed {s} of {model} was run on other settings or data than seed {seeds[0]} "
                           f"({hit}; its part was recorded at other code?); re-record it (make record "
                           f"CHUNK={NOTEBOOK} PART={unit(model, s)})")

    def stacked(name: str) -> pd.DataFrame:
        frames = [r[name] for r in per_seed if len(r[name])]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    return Result(model=model, settings=first["settings"], **{t: stacked(t) for t in _TABLES},
                  data={**first["data"], "seeds": list(seeds)}, seconds=float(sum(r["seconds"] for r in per_seed)),
                  weights_restored=all(r["weights_restored"] for r in per_seed))


def run_parts(run_dir: str | Path, p: Plan) -> tuple[dict[str, Result], dict[str, dict[str, Any]]]:
    """({model: Result}, {unit: origin}): each seed of each model read from its committed part under `run_dir`
    or computed (esa.phases.parts.per_unit, through the storage form either way), then combined."""
    got, origins = record_parts.per_unit(run_dir, NOTEBOOK, p.profile, part_units(p.profile, p.models),
                                         on_unit=lambda u, r: gc.collect())
    seeds = seeds_of(p.settings, p.profile)
    return {m: combine(m, seeds, [got[unit(m, s)] for s in seeds]) for m in p.models}, origins


record_parts.SPECS.register(record_parts.PartSpec(NOTEBOOK, part_units, part_settings, part_compute, unit="seed",
                                                  syntax=f"<model>{SEED_MARK}<N>", seconds=part_seconds))


# ------------------------------------------------------------------ criteria
def budget_reason(P: Profile, S: Settings) -> str | None:
    """Why this run's numbers are a machinery check rather than evidence (the smoke budget), or None (also for
    a power-planned profile, judged at its own sizes)."""
    if P.planned:
        return None
    tokens, held = S.n_steps() * S.batch_size * S.seqlen, S.target_windows * (S.seqlen - 1)
    return budget.budget_reason(f"{P.name} budget: ", [(
        tokens < GUIDE_TRAIN_TOKENS or held < GUIDE_HELDOUT_TOKENS,
        f"{tokens} training tokens per run, {held} held-out target tokens "
        f"(evidence needs >= {GUIDE_TRAIN_TOKENS} and >= {GUIDE_HELDOUT_TOKENS})")])


def criteria_rows(res: Result, P: Profile, S: Settings, evidence: str) -> list[Criterion]:
    """The three criteria of the module docstring, as scorecard rows for one model."""
    final, m, why, ref = res.final, res.model, budget_reason(P, S), reference(S).label
    alpha, rows = paired.ALPHA, []
    for family in ("sparse_vs_random", "gap", "protection"):
        fam = [p for p in pairs(S) if p.family == family]
        comps = paired.with_holm([paired.compare(final, p.key, p.a, p.b, p.value) for p in fam])
        for p, c in zip(fam, comps, strict=True):
            cid, n, extra, judged = f"P5.ft.{p.name}.{m}", len(fam), "", None
            if p.family == "sparse_vs_random":
                text = f"sparse FT on critical weights beats random-k at equal count ({c.key}, {m})"
                threshold = f"gain diff > 0 nats, one-sided paired t over >= {paired.MIN_SEEDS} seeds, Holm p < {alpha}"
            elif p.family == "gap":
                base = p.kind.removeprefix("gap_")
                text = (f"sparse FT on critical weights vs LoRA at equal trainable count ({c.key}, {m})" if base == "lora"
                        else f"sparse FT on critical weights vs full fine-tuning ({c.key}, {m})")
                threshold = f"gain(sparse) - gain({base}) > 0, one-sided paired t, Holm p < {alpha}"
                extra = _gap_note(final, c, base)
            elif p.kind == "freeze_vs_random":
                text = (f"freezing the critical set avoids more forgetting than freezing a random set of its size "
                        f"({ref}, {m})")
                threshold = f"forgetting(random_freeze) - forgetting(freeze) > 0, Holm p < {alpha}"
            else:
                text = f"protection '{p.key}' reduces forgetting at a stated cost in gain ({ref}, {m})"
                threshold = (f"forgetting(none) - forgetting({p.key}) > 0 (one-sided paired t, Holm p < {alpha}) and "
                             f"gain({p.key}) - {MIN_GAIN_KEPT:g}·gain(none) > 0 (one-sided {1 - alpha:.0%} lower "
                             "bound)")
                judged = _protection_verdict(final, ref, p.key, c, n)
            rows.append(paired.comparison_row(cid, 5, text, c, n, threshold, evidence, extra, why, judged))
    return rows


def _gap_note(final: pd.DataFrame, c: paired.Comparison, base: str) -> str:
    """The share of the baseline's gain sparse FT reaches, and how their forgetting differs."""
    share = paired.mean_ratio(final, c.a, c.b, "gain")
    fg = paired.compare(final, c.key, c.a, c.b, "forgetting", sign=-1.0)
    return (f"sparse reaches {share:.0%} of {base}'s gain" if math.isfinite(share) else
            f"{base}'s gain is not above zero: no share") + (
        f"; forgetting {'lower' if fg.mean_diff > 0 else 'higher'} than {base}'s by {abs(fg.mean_diff):.4f} nats"
        if math.isfinite(fg.mean_diff) else "")


def _protection_verdict(final: pd.DataFrame, ref: str, p: str, c: paired.Comparison,
                        n_family: int) -> tuple[bool | None, str, str]:
    """The paired verdict of protection `p` on forgetting (not estimable when the reference did not forget:
    nothing to reduce), joined to its cost: gain(p) − MIN_GAIN_KEPT·gain(reference) > 0, paired by seed and
    judged by its one-sided bounds (esa.stats.paired.share_kept). A PASS needs both claims (each one-sided at
    alpha: their conjunction needs no correction); a refuted cost makes it a FAIL, an undecided one
    underpowered."""
    ok = paired.ran(final)
    base = ok[ok["arm"] == ref]
    if not c.missing and len(base) and not float(base["forgetting"].mean()) > 0:
        c.missing = (f"the unprotected run did not forget (forgetting {float(base['forgetting'].mean()):+.4f} "
                     "nats): nothing to reduce")
    passed, verdict, note = paired.judge_comparison(c, n_family)
    cost = paired.share_kept(final, f"{ref}+{p}", ref, "gain", MIN_GAIN_KEPT)
    if cost is None:
        return passed, verdict, note
    kept = paired.mean_ratio(final, f"{ref}+{p}", ref, "gain")
    note += (f"; cost: gain({p}) − {MIN_GAIN_KEPT:g}·gain(none) = {cost.describe()}"
             + (f"; gain kept {kept:.0%} (described, not judged)" if math.isfinite(kept) else ""))
    if verdict == "PASS" and cost.decision == "FAIL":
        passed, verdict = False, "FAIL"
    elif verdict == "PASS" and cost.decision != "PASS":
        passed, verdict = None, "underpowered"
        note += f"; the cost is undecided: {power.units_note(cost.estimate, cost.sd, 'seeds', cost.alpha)}"
    return passed, verdict, note


def criteria(results: Mapping[str, Result], p: Plan, evidence: str) -> list[Criterion]:
    """Every model's rows; `{model}` in `evidence` stands for the model's name (else it is appended)."""
    return [r for m, res in results.items() for r in criteria_rows(
        res, p.profile, p.settings, evidence.replace("{model}", m) if "{model}" in evidence else f"{evidence} ({m})")]


# ------------------------------------------------------------------ findings
def findings(results: Mapping[str, Result], p: Plan) -> list[str]:
    """One Markdown paragraph per model: its numbers in sentences, then its criteria's verdicts."""
    rows = criteria(results, p, "")
    out = []
    for m, res in results.items():
        verdicts = pd.Series([r.verdict for r in rows if r.id.endswith(f".{m}")]).value_counts().to_dict()
        out.append(" ".join(prose.sentences(res, p.settings)
                            + ["The criteria read " + ", ".join(f"{n} {v}" for v, n in verdicts.items()) + "."]))
    return out


# ------------------------------------------------------------------ esa-runner
@dataclass
class Spec:
    """esa-runner's fine-tuning request, validated: one arm, run once per seed of the run."""

    method: str
    selection: str = ""
    density: float | None = None
    protection: str = "none"
    settings: Settings = field(default_factory=Settings)  # the profile's finetune section (steps overridden)

    def arm(self) -> Arm:
        return Arm(self.method, self.selection, self.density, self.protection)

    def describe(self) -> str:
        return self.arm().label


@dataclass(frozen=True)
class FinetuneRequest:
    """esa-runner's fine-tuning flags (the command layer builds them from these fields)."""

    finetune: str | None = option("fine-tune the model on GSM8K", choices=lambda: tr.METHODS)
    density: float | None = option("share of the studied weights trained, in (0, 1] (sparse; LoRA matches the "
                                   "count); default: the profile's finetune.densities[0]")
    select: str | None = option("what sparse FT trains: a metric's top-k or a control", choices=lambda: tr.SELECTIONS)
    protect: str | None = option("protection while training", choices=lambda: tr.RETENTIONS)
    steps: int | None = option("training steps per seed (default: the profile's finetune.steps)")


def job(req: FinetuneRequest, ctx: RunContext) -> Spec:
    """The validated request; every bad value is one EsaError before loading."""
    method, profile = req.finetune, ctx.profile
    if method not in tr.METHODS:
        raise unknown("fine-tuning method (--finetune)", method, tr.METHODS)
    if req.steps is not None and req.steps < 1:
        raise EsaError(f"--steps {req.steps}: a training budget of {req.steps} steps; it must be at least 1")
    S = settings(profile, {"steps": req.steps, "tokens": None} if req.steps is not None else None)
    density = None
    if req.density is not None:
        if method == "full":
            raise EsaError("--density applies to --finetune sparse and lora; full fine-tuning trains every weight")
        density = tr.check_density(req.density, "--density")
    elif method != "full":
        density = S.densities[0] if S.densities else 0.01
    selection = ""
    if req.select is not None and method != "sparse":
        raise EsaError(f"--select applies to --finetune sparse (what it trains); {method} trains a fixed set")
    if method == "sparse":
        selection = tr.check_selection(req.select or (S.selections[0] if S.selections else "grad_x_weight"))
    protection = req.protect or "none"
    if protection not in tr.RETENTIONS:
        raise unknown("protection (--protect)", protection, tr.RETENTIONS)
    if method == "lora":
        tr.check_lora_protections([protection], "--protect with --finetune lora")
    if (method == "sparse" and protection == "freeze" and selection == S.critical_metric
            and density <= S.critical_density):  # type: ignore[operator]
        raise EsaError(f"--protect freeze freezes the critical set ({S.critical_metric} top-k at "
                       f"{S.critical_density:g} + super weights), which covers the whole --select {selection} set at "
                       f"--density {density:g}: nothing would train; raise --density or select another metric")
    # LoRA at this count must be plannable: checked here from the config when it is at hand without loading,
    # else at the start of the run (still before any training)
    inv = inventory_without_weights(model_params(ctx.model).ref) if method == "lora" else None
    if inv is not None:
        tr.plan_lora(inv, n_trainable=tr.count_at_density(density, inv))  # type: ignore[arg-type]
    return Spec(method, selection, density, protection, S)


def run_job(spec: Spec, cmd: Command, lm: LoadedModel, runs: Any, stage: Path) -> dict[str, Any]:
    """The requested arm once per seed of the run, on the run's model; finetune.parquet (learning curve and
    final metrics), finetune_drift.parquet, finetune.json and, for sparse FT, one sparse delta per seed."""
    arm = spec.arm()
    if arm.method == "lora":
        tr.plan_lora(lm.inventory, n_trainable=tr.count_at_density(arm.density, lm.inventory))  # type: ignore[arg-type]
    R = cmd.recipe
    P = Profile(name=cmd.profile, corpus=R.corpus, seeds=list(R.seeds))
    S = settings(P, {**asdict(spec.settings),
                     "selections": [arm.selection] if arm.family == "sparse" else spec.settings.selections[:1],
                     "densities": [arm.density] if arm.density is not None else spec.settings.densities[:1]})
    res = run_grid(cmd.model, P, S, lm=lm, runs=dict(runs), arm_list=[arm], seeds=list(R.seeds), recipe=R,
                   export_dir=stage if arm.method == "sparse" else None)
    tag = {"model": cmd.model, "run_id": cmd.run_id}
    write_parquet(stage / "finetune.parquet", res.records().assign(**tag))
    if len(res.drift):
        write_parquet(stage / "finetune_drift.parquet", res.drift.assign(**tag))
    errors = [e for e in res.final.get("error", []) if e]
    if errors:
        raise EsaError(f"fine-tuning {arm.label} could not run: {errors[0]}")
    summ = summary_table(res.final)
    out = {"arm": arm.as_dict(), "settings": res.settings, "data": res.data, "seconds": res.seconds,
           "weights_restored": res.weights_restored, "summary": summ.to_dict("records"),
           "files": ["finetune.parquet", "finetune_drift.parquet", "finetune.json"]
           + ([f"sparse_delta_seed{s}.safetensors" for s in R.seeds] if arm.method == "sparse" else [])}
    write_json(stage / "finetune.json", out)
    return out


STUDY = Study(name="finetune", title="fine-tuning (Phase 5, week 13b): target GSM8K, source = the corpus (forgetting)",
              Request=FinetuneRequest, trigger=("finetune",), settings=settings, plan=plan, run=run,
              criteria=criteria, findings=findings, job=job, run_job=run_job)
