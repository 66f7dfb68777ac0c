"""Phase 5 (week 13b, training): sparse fine-tuning of the critical weights against equal-count controls,
LoRA and full fine-tuning, and protection of the critical weights while fine-tuning, on a shift of domain.

The methods live in esa.apps.training; this module turns the profile's `finetune` section (`Settings`) into
a grid of runs (`Arm`s) for one model, runs it once per seed from the same base weights (restored
bit-exactly after every run), and judges the criteria from the results.

**Domains.** Target: GSM8K with worked solutions (`esa.apps.training.domains`; train / held-out problems split
by SHA-256 of the question). Source: the profile corpus's eval split (Shakespeare offline), for forgetting.
Every run of a model is evaluated on the same held-out target windows and the same source windows.

**Quantities** (nats per token, from the mean next-token NLL of the windows):
- gain = target loss before - after training (higher: more learnt);
- forgetting = source loss after - before (higher: more forgotten).

**Seeds.** The unit of replication is the seed: it picks the calibration sample of the sensitivity scores
(the profile's Phase 2 cache), the draw of the random controls, the order of training batches and the LoRA
initialisation. Comparisons are paired by seed.

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
   (significant) while keeping at least `MIN_GAIN_KEPT` of the unprotected gain (the cost in gain is the
   stated share kept); and `freeze_vs_random`: freezing the critical set reduces forgetting more than
   freezing a random set of the same size (forgetting(random_freeze) - forgetting(freeze) > 0).
   Family: every protection row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from esa.apps import training as tr
from esa.apps.training.domains import describe_domain
from esa.data import Windows, evaluation
from esa.errors import EsaError, unknown
from esa.models import LoadedModel, inventory_without_weights
from esa.params import Profile
from esa.perturb.apply import Targets, weights_hash
from esa.perturb.controls import CONTROLS, ControlInput, make_control
from esa.phases.study import Plan, Planned, RunContext, Study, build_settings, option
from esa.recipes import Recipe
from esa.sensitivity.metrics import METRICS
from esa.sensitivity.superweights import DEFAULT_PROMPT, detect_superweights
from esa.stats import power
from esa.stats.inference import bootstrap_ci, holm, paired_test
from esa.stats.verdicts import Criterion, demote
from esa.store import write_json, write_parquet

if TYPE_CHECKING:
    from esa.phases.command import Command

SELECTION_METRICS = tuple(sorted({*METRICS, "obd"}))  # what a sparse selection's top-k may be ranked by
BASELINES = ("lora", "full")
PROTECT_METHODS = ("full", "lora")
ALPHA = 0.05
MIN_SEEDS = 3  # the guide's seeds; a one-sided paired t at alpha 0.05 can pass with 3 consistent seeds
MIN_GAIN_KEPT = 0.5  # a protection "at a stated cost" must keep at least half of the unprotected gain
# The guide-sized budget below which a verdict is a machinery check (smoke): seeds, trained tokens per run,
# held-out target tokens per evaluation.
GUIDE_SEEDS = 3
GUIDE_TRAIN_TOKENS = 16_384
GUIDE_HELDOUT_TOKENS = 2_048


@dataclass
class Settings:
    """The profile's `finetune` section (one model's grid; every run starts from the same base weights)."""

    domain: str = "gsm8k"  # target domain (esa.apps.training.DOMAINS)
    selections: list[str] = field(default_factory=lambda: ["grad_x_weight"])  # sparse FT on each metric's top-k
    controls: list[str] = field(default_factory=lambda: ["random_k", "magnitude_k"])  # equal-count controls
    baselines: list[str] = field(default_factory=lambda: ["lora", "full"])  # LoRA at equal count, full FT
    densities: list[float] = field(default_factory=lambda: [0.01])  # share of the studied weights trained
    protections: list[str] = field(default_factory=lambda: ["none", "freeze", "ewc", "anchor", "random_freeze"])
    protect_method: str = "full"  # the method the protections act on (full or lora)
    critical_metric: str = "grad_x_weight"  # critical set = super-weight candidates + this metric's top-k
    critical_density: float = 0.001  # ... at this density
    ewc_strength: float = 1000.0  # lambda of EWC, with the Fisher diagonal normalised to mean 1 per weight
    anchor_strength: float = 1000.0  # lambda of the L2 anchor on the critical set
    steps: int | None = 20  # training budget per run: steps, or tokens (steps = tokens // (batch x seqlen))
    tokens: int | None = None
    batch_size: int = 2  # windows per step
    seqlen: int = 128  # tokens per window (training and evaluation)
    lr_sparse: float = 1e-3  # peak learning rates (warmup 10%, cosine to 10%); sparse deltas need larger ones
    lr_lora: float = 1e-3
    lr_full: float = 2e-5
    full_scope: str = "all"  # full FT trains every parameter ('all') or only the studied weights ('studied')
    seeds: list[int] | None = None  # None: the profile's seeds (their Phase 2 scores are cached)
    train_windows: int | None = None  # training windows of the domain's train split (None: all)
    target_windows: int = 8  # held-out target windows per evaluation
    source_windows: int = 8  # source (forgetting) windows per evaluation
    eval_every: int = 0  # evaluate every n steps for the learning curve (0: only before and after)

    def lr_of(self, method: str) -> float:
        return {"sparse": self.lr_sparse, "lora": self.lr_lora, "full": self.lr_full}[method]

    def strength_of(self, protection: str) -> float:
        return {"ewc": self.ewc_strength, "anchor": self.anchor_strength}.get(protection, 1.0)

    def train_config(self, seed: int, lr: float, show_progress: bool = False) -> tr.TrainConfig:
        return tr.TrainConfig(steps=self.steps, tokens=self.tokens, batch_size=self.batch_size, lr=lr, seed=seed,
                              eval_every=self.eval_every, eval_start=False, show_progress=show_progress)

    def n_steps(self) -> int:
        return self.train_config(0, self.lr_sparse).n_steps(self.seqlen)


def _check_names(what: str, names: list[str], accepted: tuple[str, ...] | list[str]) -> None:
    for n in names:
        if n not in accepted:
            raise unknown(what, n, accepted)


def validate(S: Settings) -> Settings:
    """Every setting checked before any model is loaded; one EsaError naming the bad value."""
    tr.check_domain(S.domain)
    _check_names("finetune selection metric", S.selections, SELECTION_METRICS)
    _check_names("finetune control", S.controls, tuple(CONTROLS))
    _check_names("finetune baseline", S.baselines, BASELINES)
    _check_names("protection", S.protections, tuple(tr.RETENTIONS))
    if S.protect_method not in PROTECT_METHODS:
        raise unknown("finetune protect_method", S.protect_method, PROTECT_METHODS)
    if S.critical_metric not in SELECTION_METRICS:
        raise unknown("finetune critical_metric", S.critical_metric, SELECTION_METRICS)
    if S.full_scope not in tr.full.SCOPES:
        raise unknown("full fine-tuning scope", S.full_scope, tr.full.SCOPES)
    for d in S.densities:
        tr.check_density(d)
    tr.check_density(S.critical_density)
    if not S.densities and (S.selections or S.controls or "lora" in S.baselines):
        raise EsaError("finetune.densities is empty; sparse FT, its controls and LoRA need at least one density")
    if S.protect_method == "lora":
        bad = [p for p in S.protections if tr.RETENTIONS[p].freezes]
        if bad:
            ok = [p for p, v in tr.RETENTIONS.items() if not v.freezes]
            raise EsaError(f"protection(s) {bad} cannot act on protect_method 'lora' (a low-rank update cannot hold "
                           f"single weights fixed); accepted with lora: {', '.join(ok)}")
        if not S.densities:
            raise EsaError("protect_method 'lora' needs a density (its trainable count); finetune.densities is empty")
    for name in ("ewc_strength", "anchor_strength", "lr_sparse", "lr_lora", "lr_full"):
        v = getattr(S, name)
        if not (math.isfinite(v) and v >= 0) or (name.startswith("lr") and v <= 0):
            raise EsaError(f"finetune.{name} must be a finite number {'> 0' if name.startswith('lr') else '>= 0'}, "
                           f"got {v!r}")
    for name in ("target_windows", "source_windows", "train_windows"):
        v = getattr(S, name)
        if v is not None and v < 1:
            raise EsaError(f"finetune.{name} must be at least 1, got {v}")
    if S.eval_every < 0:
        raise EsaError(f"finetune.eval_every must be >= 0, got {S.eval_every}")
    S.n_steps()  # a budget of zero steps, or both/neither of steps and tokens
    tr.TrainConfig(steps=1, batch_size=S.batch_size, lr=S.lr_sparse).validate()
    if not arms(S):
        raise EsaError("the finetune section asks for no run: give selections, controls, baselines or protections")
    return S


def settings(P: Profile, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The profile's `finetune` section (+ overrides: field -> value on top), typed and validated."""
    return validate(build_settings(P, "finetune", Settings, overrides))


def seeds_of(S: Settings, P: Profile) -> list[int]:
    return list(S.seeds) if S.seeds else list(P.seeds)


# ------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class Arm:
    """One run of the grid: a method, its selection (sparse) and density (sparse, LoRA), and a protection."""

    method: str  # sparse | lora | full
    selection: str = ""  # sparse: a metric (its top-k) or a control
    density: float | None = None  # sparse and LoRA: the trained share of the studied weights
    protection: str = "none"

    @property
    def family(self) -> str:
        """sparse (a metric's top-k), control (an equal-count control set), lora, full."""
        if self.method == "sparse":
            return "control" if self.selection in CONTROLS else "sparse"
        return self.method

    @property
    def label(self) -> str:
        base = {"sparse": f"sparse[{self.selection}]", "lora": "lora", "full": "full"}[self.method]
        if self.density is not None:
            base += f"@{self.density:g}"
        return base if self.protection == "none" else f"{base}+{self.protection}"

    def as_dict(self) -> dict[str, Any]:
        return dict(arm=self.label, method=self.method, family=self.family, selection=self.selection,
                    density=self.density if self.density is not None else math.nan, protection=self.protection)


def arms(S: Settings) -> list[Arm]:
    """The grid in run order: per density the sparse selections, their controls and LoRA; full FT; protections."""
    out: list[Arm] = []
    for d in S.densities:
        out += [Arm("sparse", s, d) for s in S.selections]
        out += [Arm("sparse", c, d) for c in S.controls]
        if "lora" in S.baselines:
            out.append(Arm("lora", density=d))
    protected = [p for p in S.protections if p != "none"]
    ref_density = S.densities[0] if S.protect_method == "lora" and S.densities else None
    reference = Arm(S.protect_method, density=ref_density)
    if "full" in S.baselines or (S.protections and S.protect_method == "full"):
        out.append(Arm("full"))
    if S.protections and reference not in out:
        out.append(reference)
    out += [Arm(S.protect_method, density=ref_density, protection=p) for p in protected]
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------ inputs of one model
@dataclass
class Data:
    """Windows and probes shared by every run of one model."""

    train: Windows
    target: Windows
    source: Windows
    tracked: list[tuple[str, int]]  # super-weight candidates (param, flat index)
    probes: dict[str, Callable[[torch.nn.Module], float]]
    super_weights: pd.DataFrame  # the candidates tracked (layer, param, row, col, weight, flagged)

    def describe(self) -> dict[str, Any]:
        return dict(train=self.train.describe(), target=self.target.describe(), source=self.source.describe(),
                    tracked=self.super_weights.to_dict("records"))


def super_weight_rows(lm: LoadedModel) -> pd.DataFrame:
    """The flagged super-weight candidates; when none is flagged, the layer with the largest output spike
    (`flagged` False), so drift is still tracked on the strongest candidate and the table says it."""
    try:
        sw = detect_superweights(lm.model, lm.tokenizer, lm.inventory)
    except EsaError:
        return pd.DataFrame(columns=["layer", "param", "row", "col", "out_max", "weight", "flagged"])
    flagged = sw[sw["candidate"]]
    rows = flagged if len(flagged) else sw.loc[[sw["out_max"].idxmax()]]
    return rows.assign(flagged=bool(len(flagged)))[["layer", "param", "row", "col", "out_max", "weight", "flagged"]]


def prepare_data(lm: LoadedModel, P: Profile, S: Settings) -> Data:
    tok, maxpos = lm.tokenizer, lm.info.max_positions or None
    train = tr.domain_windows(tok, S.domain, "train", S.seqlen, n_windows=S.train_windows,
                              seed=0 if S.train_windows else None, max_positions=maxpos)
    target = tr.domain_windows(tok, S.domain, "heldout", S.seqlen, n_windows=S.target_windows, seed=0,
                               max_positions=maxpos)
    source = evaluation(tok, P.corpus, S.seqlen, n_windows=S.source_windows, seed=0, max_positions=maxpos)
    sw = super_weight_rows(lm)
    shapes = {s.name: s.shape for s in lm.inventory}
    tracked = [(r.param, int(r.row) * int(shapes[r.param][-1]) + int(r.col)) for r in sw.itertuples()]
    probes: dict[str, Callable[[torch.nn.Module], float]] = {}
    if len(sw):
        top = sw.sort_values("out_max", ascending=False).iloc[0]
        ids = tok(DEFAULT_PROMPT, return_tensors="pt")["input_ids"]
        # the massive-activation channel: the row the strongest candidate writes, on the detector's prompt
        probes["massive_act"] = tr.channel_probe(str(top.param).removesuffix(".weight"), int(top.row), ids)
    return Data(train, target, source, tracked, probes, sw.reset_index(drop=True))


def _metric_scores(runs: dict[tuple[str, int], Any], metric: str, seed: int, lm: LoadedModel) -> dict[str, torch.Tensor]:
    """A selection metric's scores for one seed; obd = grad_squared x w^2 (the OBD saliency)."""
    base = "grad_squared" if metric == "obd" else metric
    scores = runs[(base, seed)].full()
    if metric != "obd":
        return dict(scores)
    return {n: s.float() * lm.model.get_parameter(n).detach().float() ** 2 for n, s in scores.items()}


def needed_metrics(S: Settings, arm_list: list[Arm] | None = None) -> list[str]:
    """The Phase 2 metrics the grid reads (through the score cache)."""
    arm_list = arms(S) if arm_list is None else arm_list
    want = {a.selection for a in arm_list if a.family == "sparse"}
    if any(a.family == "control" for a in arm_list):
        want.add(S.selections[0] if S.selections else S.critical_metric)
    if any(a.protection in ("freeze", "anchor", "random_freeze") for a in arm_list):
        want.add(S.critical_metric)
    if any(a.protection == "ewc" for a in arm_list):
        want.add("grad_squared")
    return sorted({"grad_squared" if m == "obd" else m for m in want})


def score_runs(lm: LoadedModel, name: str, P: Profile, S: Settings, seeds: list[int],
               have: dict[tuple[str, int], Any] | None = None, recipe: Recipe | None = None,
               arm_list: list[Arm] | None = None) -> dict[tuple[str, int], Any]:
    """(metric, seed) -> ScoreRun for every metric the arms need: `have` first, then the score cache."""
    runs = dict(have or {})
    missing = [m for m in needed_metrics(S, arm_list) if any((m, s) not in runs for s in seeds)]
    if missing:
        runs.update((recipe or Recipe.of(P)).score_model(lm, name, metrics=missing, seeds=seeds))
    return runs


@dataclass
class SeedInputs:
    """The selections and protection inputs of one seed (all drawn from that seed's scores)."""

    seed: int
    top: dict[tuple[str, float], Targets]  # (metric, density) -> per-matrix top-k
    critical: Targets
    fisher: dict[str, torch.Tensor] | None

    def targets(self, arm: Arm, lm: LoadedModel, S: Settings, scores: dict[str, torch.Tensor] | None) -> Targets | None:
        if arm.method != "sparse":
            return None
        if arm.family == "sparse":
            return self.top[(arm.selection, arm.density)]  # type: ignore[index]
        ref = S.selections[0] if S.selections else S.critical_metric
        inp = ControlInput(lm.model, lm.inventory, top=self.top[(ref, arm.density)], seed=self.seed,  # type: ignore[index]
                           scores=scores)
        return make_control(arm.selection, inp)


def seed_inputs(lm: LoadedModel, S: Settings, seed: int, runs: dict[tuple[str, int], Any], data: Data,
                arm_list: list[Arm]) -> tuple[SeedInputs, dict[str, torch.Tensor] | None]:
    top: dict[tuple[str, float], Targets] = {}
    metrics = {a.selection for a in arm_list if a.family == "sparse"}
    if any(a.family == "control" for a in arm_list):
        metrics.add(S.selections[0] if S.selections else S.critical_metric)
    ref_scores = None
    for m in sorted(metrics):
        sc = _metric_scores(runs, m, seed, lm)
        if m == (S.selections[0] if S.selections else S.critical_metric):
            ref_scores = sc
        for d in S.densities:
            top[(m, d)] = tr.targets_at_density(sc, lm.inventory, d)
    critical: Targets = {}
    if any(a.protection in ("freeze", "anchor", "random_freeze") for a in arm_list):
        sc = _metric_scores(runs, S.critical_metric, seed, lm)
        sw = {}
        for param, idx in data.tracked:
            sw.setdefault(param, []).append(idx)
        critical = tr.union(tr.targets_at_density(sc, lm.inventory, S.critical_density),
                            {p: torch.tensor(v, dtype=torch.long) for p, v in sw.items()})
    fisher = None
    if any(a.protection == "ewc" for a in arm_list):
        raw = _metric_scores(runs, "grad_squared", seed, lm)
        mean = float(sum(float(v.double().sum()) for v in raw.values()) / sum(v.numel() for v in raw.values()))
        if not mean > 0:
            raise EsaError(f"the grad_squared Fisher diagonal of seed {seed} is all zero; EWC has nothing to weigh")
        # normalised to mean 1 per studied weight, so ewc_strength is on the scale of anchor_strength
        fisher = {n: (v.float() / mean) for n, v in raw.items()}
    return SeedInputs(seed, top, critical, fisher), ref_scores


def build_method(arm: Arm, lm: LoadedModel, targets: Targets | None, S: Settings, seed: int) -> tr.Method:
    if arm.method == "sparse":
        return tr.make_method("sparse", lm.inventory, targets=targets, density=arm.density)
    if arm.method == "lora":
        n = tr.count_at_density(arm.density, lm.inventory)  # type: ignore[arg-type]
        return tr.make_method("lora", lm.inventory, n_trainable=n, density=arm.density, seed=seed)
    return tr.make_method("full", lm.inventory, scope=S.full_scope)


# ------------------------------------------------------------------ running the grid
@dataclass
class ArmRun:
    arm: Arm
    seed: int
    steps: pd.DataFrame
    evals: pd.DataFrame
    drift: pd.DataFrame
    summary: dict[str, Any]
    error: str = ""  # an arm that cannot run (e.g. LoRA cannot match a tiny count) says why here


def _restore(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base[n])


def run_arm(lm: LoadedModel, arm: Arm, inputs: SeedInputs, S: Settings, data: Data,
            ref_scores: dict[str, torch.Tensor] | None, base_eval: tuple[dict[str, Any], list[dict[str, Any]]],
            export_dir: Path | None = None, show_progress: bool = False) -> ArmRun:
    """One training run from the current (base) weights; the caller restores the base afterwards."""
    seed = inputs.seed
    try:
        targets = inputs.targets(arm, lm, S, ref_scores)
        method = build_method(arm, lm, targets, S, seed)
    except EsaError as e:  # e.g. LoRA cannot match the count at this density: a result, said in the table
        return ArmRun(arm, seed, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {}, error=str(e))
    spec = tr.RetentionSpec(arm.protection, critical=inputs.critical or None,
                          fisher=inputs.fisher if arm.protection == "ewc" else None,
                          strength=S.strength_of(arm.protection), seed=seed)
    ev = tr.Evaluator(target=data.target, source=data.source, tracked=data.tracked, probes=data.probes)
    res = tr.train(lm.model, method, data.train, S.train_config(seed, S.lr_of(arm.method), show_progress),
                   inventory=lm.inventory, protect=spec, evaluator=ev)
    lm.model = res.model  # LoRA: the merged plain model
    if export_dir is not None and isinstance(method, tr.SparseFT):
        tr.SparseDelta.from_sparse(method, res.model, notes={"arm": arm.label, "seed": seed}).save(
            export_dir / f"sparse_delta_seed{seed}.safetensors")
    row0, drift0 = base_eval
    evals = pd.concat([pd.DataFrame([row0]), res.evals], ignore_index=True)
    drift = pd.concat([pd.DataFrame(drift0), res.drift], ignore_index=True)
    summary = dict(res.summary)
    if isinstance(method, tr.LoraFT):
        summary["lora_plan"] = method.plan.describe()
    return ArmRun(arm, seed, res.steps, evals, drift, summary)


def final_row(run: ArmRun) -> dict[str, Any]:
    """Gain, forgetting and costs of one run (nats per token; NaN with the reason when the arm could not run)."""
    row: dict[str, Any] = {**run.arm.as_dict(), "seed": run.seed, "error": run.error}
    if run.error:
        return row
    e0, e1 = run.evals.iloc[0], run.evals.iloc[-1]
    s = run.summary
    row.update(n_trainable=s["n_trainable"], n_frozen=s["n_frozen"], optimizer_state_bytes=s["optimizer_state_bytes"],
               steps=s["steps"], tokens=s["tokens"], seconds=s["seconds"],
               seconds_per_step=s["seconds_per_step_median"], lr=s["config"]["lr"],
               target_loss_0=e0["target_loss"], target_loss=e1["target_loss"], target_ppl_0=e0["target_ppl"],
               target_ppl=e1["target_ppl"], source_loss_0=e0["source_loss"], source_loss=e1["source_loss"],
               source_ppl_0=e0["source_ppl"], source_ppl=e1["source_ppl"],
               gain=e0["target_loss"] - e1["target_loss"], forgetting=e1["source_loss"] - e0["source_loss"],
               final_train_loss=float(run.steps["loss"].iloc[-1]) if len(run.steps) else math.nan)
    if "massive_act" in run.evals:
        row.update(massive_act_0=e0["massive_act"], massive_act=e1["massive_act"],
                   massive_act_ratio=e1["massive_act"] / e0["massive_act"] if e0["massive_act"] else math.nan)
    if len(run.drift):
        last = run.drift[run.drift["step"] == run.drift["step"].max()]
        rel = (last["drift"].abs() / last["initial"].abs().where(last["initial"] != 0)).max()
        row.update(super_weight_drift=float(last["drift"].abs().max()), super_weight_rel_drift=float(rel))
    if "lora_plan" in s:
        row.update(lora_rank_min=s["lora_plan"]["rank_min"], lora_rank_max=s["lora_plan"]["rank_max"])
    return row


@dataclass
class Result:
    """Every run of one model's grid: the final table (one row per arm x seed) and the learning curves."""

    model: str
    settings: dict[str, Any]
    final: pd.DataFrame
    steps: pd.DataFrame  # arm, seed, step, loss, lr, ...
    evals: pd.DataFrame  # arm, seed, step, tokens, target/source loss and ppl, massive_act
    drift: pd.DataFrame  # arm, seed, step, param, index, value, initial, drift
    data: dict[str, Any]
    seconds: float
    weights_restored: bool


def run_grid(name: str, P: Profile, S: Settings, lm: LoadedModel | None = None,
             runs: dict[tuple[str, int], Any] | None = None, arm_list: list[Arm] | None = None,
             seeds: list[int] | None = None, recipe: Recipe | None = None, export_dir: Path | None = None,
             check_restored: bool = True) -> Result:
    """Run every arm for every seed on model `name` from the same base weights (restored bit-exactly after each)."""
    t0 = time.perf_counter()
    validate(S)
    arm_list = arms(S) if arm_list is None else arm_list
    seeds = seeds_of(S, P) if seeds is None else seeds
    recipe = recipe or Recipe.of(P)
    lm = lm or recipe.load(name)
    runs = score_runs(lm, name, P, S, seeds, runs, recipe, arm_list)
    data = prepare_data(lm, P, S)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    h0 = weights_hash(lm.model) if check_restored else ""
    base_eval = tr.Evaluator(target=data.target, source=data.source, tracked=data.tracked,
                             probes=data.probes).measure_base(lm.model)
    done: list[ArmRun] = []
    try:
        for seed in seeds:
            inputs, ref_scores = seed_inputs(lm, S, seed, runs, data, arm_list)
            for arm in arm_list:
                try:
                    done.append(run_arm(lm, arm, inputs, S, data, ref_scores, base_eval, export_dir,
                                        show_progress=recipe.show_progress))
                finally:
                    _restore(lm.model, base)
    finally:
        _restore(lm.model, base)
    restored = (weights_hash(lm.model) == h0) if check_restored else True

    def tagged(attr: str) -> pd.DataFrame:
        parts = [getattr(r, attr).assign(arm=r.arm.label, seed=r.seed) for r in done if len(getattr(r, attr))]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    final = pd.DataFrame([final_row(r) for r in done]).assign(model=name)
    return Result(name, asdict(S), final, tagged("steps"), tagged("evals"), tagged("drift"),
                  {**data.describe(), "domain": describe_domain(S.domain), "seeds": seeds,
                   "n_studied": sum(s.numel for s in lm.inventory)},
                  time.perf_counter() - t0, restored)



# ------------------------------------------------------------------ tables
FAMILY_ORDER = {"sparse": 0, "control": 1, "lora": 2, "full": 3}


def summary_table(final: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: gain and forgetting (mean over seeds, 95% bootstrap CI over seeds where >= 2), costs.
    An arm that could not run keeps its row with the reason in `error`."""
    rows = []
    for _, g in final.groupby("arm", sort=False):
        first = g.iloc[0]
        row: dict[str, Any] = {k: first[k] for k in ("arm", "method", "family", "selection", "density", "protection")}
        ok = g[g["error"] == ""] if "error" in g else g
        row.update(n_seeds=len(ok), error=next((e for e in g.get("error", []) if e), ""))
        if len(ok):
            for v in ("gain", "forgetting"):
                est, lo, hi = bootstrap_ci(ok[v].to_numpy(float))
                row.update({v: est, f"{v}_lo": lo, f"{v}_hi": hi})
            row.update(n_trainable=int(ok["n_trainable"].median()), lr=float(ok["lr"].median()), target_ppl_0=float(ok["target_ppl_0"].mean()),
                       target_ppl=float(ok["target_ppl"].mean()), source_ppl_0=float(ok["source_ppl_0"].mean()),
                       source_ppl=float(ok["source_ppl"].mean()),
                       optimizer_mib=float(ok["optimizer_state_bytes"].median()) / 2**20,
                       seconds_per_step=float(ok["seconds_per_step"].median()))
            for v in ("massive_act_ratio", "super_weight_rel_drift"):
                if v in ok:
                    row[v] = float(ok[v].mean())
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["pareto"] = pareto_front(out)
    return out


def pareto_front(summary: pd.DataFrame) -> list[bool]:
    """Arms no other arm beats on both axes (higher gain and lower forgetting, at least one strictly)."""
    g, f = summary.get("gain"), summary.get("forgetting")
    if g is None or f is None:
        return [False] * len(summary)
    gs, fs = g.to_numpy(float), f.to_numpy(float)
    out = []
    for i in range(len(gs)):
        if not (np.isfinite(gs[i]) and np.isfinite(fs[i])):
            out.append(False)
            continue
        dominated = any(np.isfinite(gs[j]) and np.isfinite(fs[j]) and gs[j] >= gs[i] and fs[j] <= fs[i]
                        and (gs[j] > gs[i] or fs[j] < fs[i]) for j in range(len(gs)) if j != i)
        out.append(not dominated)
    return out


def equal_count_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Unprotected arms by density (sparse selections, controls, LoRA at the same trainable count), full FT last."""
    s = summary[summary["protection"] == "none"].copy()
    s["_f"] = s["family"].map(FAMILY_ORDER)
    s["_d"] = s["density"].fillna(math.inf)
    cols = [c for c in ("arm", "family", "selection", "density", "n_seeds", "n_trainable", "lr", "target_ppl_0",
                        "target_ppl", "gain", "gain_lo", "gain_hi", "source_ppl", "forgetting", "forgetting_lo",
                        "forgetting_hi", "optimizer_mib", "seconds_per_step", "pareto", "error") if c in s]
    return s.sort_values(["_d", "_f", "arm"])[cols].reset_index(drop=True)


def protection_table(summary: pd.DataFrame, S: Settings) -> pd.DataFrame:
    """The protect_method's arms: none and every protection, with gain kept and forgetting avoided."""
    ref = Arm(S.protect_method, density=S.densities[0] if S.protect_method == "lora" and S.densities else None)
    s = summary[(summary["method"] == S.protect_method) & (summary["arm"].str.startswith(ref.label))].copy()
    if s.empty or ref.label not in set(s["arm"]):
        return s
    base = s.set_index("arm").loc[ref.label]
    s["gain_kept"] = s["gain"] / base["gain"] if base.get("gain", 0) else math.nan
    s["forgetting_avoided"] = base.get("forgetting", math.nan) - s["forgetting"]
    return s.reset_index(drop=True)


# ------------------------------------------------------------------ criteria
def budget_reason(P: Profile, S: Settings, seeds: list[int]) -> str | None:
    """Why this run's numbers are a machinery check rather than evidence (the smoke budget), or None."""
    tokens = S.n_steps() * S.batch_size * S.seqlen
    held = S.target_windows * (S.seqlen - 1)
    if tokens < GUIDE_TRAIN_TOKENS or held < GUIDE_HELDOUT_TOKENS:
        return (f"{P.name} budget: {tokens} training tokens per run, {held} held-out target tokens "
                f"(evidence needs >= {GUIDE_TRAIN_TOKENS} and >= {GUIDE_HELDOUT_TOKENS})")
    return None


@dataclass
class Comparison:
    """A paired-by-seed comparison: diff = value(a) - value(b) per seed (sign flips it), H1: mean diff > 0."""

    key: str
    a: str
    b: str
    value: str
    n: int = 0
    mean_diff: float = math.nan
    d_z: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    test: str = ""
    reverse_p: float = math.nan  # H1: mean diff < 0 (a significant loss)
    diffs: list[float] = field(default_factory=list)
    missing: str = ""  # why the comparison could not be made


def compare(final: pd.DataFrame, key: str, a: str, b: str, value: str, sign: float = 1.0) -> Comparison:
    c = Comparison(key, a, b, value)
    ok = final[final["error"] == ""] if "error" in final else final
    runs = set(final["arm"])
    for arm in (a, b):
        if arm not in runs:
            c.missing = f"{arm} was not run"
            return c
        errs = final[(final["arm"] == arm) & (final["error"] != "")]["error"] if "error" in final else []
        if len(errs) and arm not in set(ok["arm"]):
            c.missing = f"{arm} could not run: {errs.iloc[0]}"
            return c
    pa = ok[ok["arm"] == a].set_index("seed")[value]
    pb = ok[ok["arm"] == b].set_index("seed")[value]
    both = pa.index.intersection(pb.index)
    d = (sign * (pa.loc[both] - pb.loc[both])).to_numpy(float)
    d = d[np.isfinite(d)]
    c.n, c.diffs = int(d.size), [float(x) for x in d]
    if d.size == 0:
        c.missing = "no seed has finite values for both arms"
        return c
    c.mean_diff = float(d.mean())
    # differences equal up to float rounding are constant (scipy's t would divide by a rounding-noise sd)
    d = np.where(np.isclose(d, c.mean_diff, rtol=1e-9, atol=1e-12), c.mean_diff, d)
    t = paired_test(d, np.zeros_like(d), alternative="greater")
    c.d_z, c.p, c.test = float(t["effect_size"]), float(t["p"]), str(t["test"])
    if d.size >= 2:
        c.reverse_p = float(paired_test(d, np.zeros_like(d), alternative="less")["p"])
    return c


def with_holm(comps: list[Comparison]) -> list[Comparison]:
    ps = holm([c.p for c in comps])
    for c, p in zip(comps, ps, strict=True):
        c.p_holm = p
    return comps


def judge_comparison(c: Comparison, n_family: int) -> tuple[bool | None, str, str]:
    """(passed, verdict, note) of "a beats b" from a Holm-adjusted comparison."""
    if c.missing:
        return None, "not estimable", c.missing
    base = (f"mean diff {c.mean_diff:+.4f} nats over {c.n} seed(s) (per seed {', '.join(f'{x:+.4f}' for x in c.diffs)}); "
            f"{c.test} one-sided p = {c.p:.3g}, Holm over {n_family}: {c.p_holm:.3g}")
    if c.n >= 2 and not math.isnan(c.reverse_p):
        base += f"; reverse test (b better) p = {c.reverse_p:.3g}"
    if all(x == 0 for x in c.diffs):
        return None, "not estimable", f"every seed gives exactly the same value for both arms. {base}"
    if c.n < MIN_SEEDS:
        need = power.paired_t_seeds_needed(c.d_z, ALPHA) if c.n >= 2 else None
        need = max(need, MIN_SEEDS) if need else None
        want = (f"the observed effect (d_z {c.d_z:.2f}) would need {need} seeds" if need else
                "the observed effect points the other way or is not estimable" if c.n >= 2 else
                f"a paired test needs >= {MIN_SEEDS} seeds")
        return None, "underpowered", f"only {c.n} seed(s) (verdicts need >= {MIN_SEEDS}); {want}. {base}"
    if math.isnan(c.p_holm):
        return None, "not estimable", f"the test is not defined. {base}"
    passed = bool(c.p_holm < ALPHA and c.mean_diff > 0)
    return passed, ("PASS" if passed else "FAIL"), base


def _row(cid: str, text: str, c: Comparison, n_family: int, threshold: str, evidence: str,
         extra: str = "", why: str | None = None) -> Criterion:
    passed, verdict, note = judge_comparison(c, n_family)
    crit = Criterion(cid, 5, text, None if math.isnan(c.mean_diff) else c.mean_diff, threshold, passed, evidence,
                     f"{note}{'; ' + extra if extra else ''}", verdict=verdict)
    return demote(crit, "machinery-only", why) if why and crit.verdict in ("PASS", "FAIL") else crit


def criteria_rows(res: Result, P: Profile, S: Settings, evidence: str) -> list[Criterion]:
    """The three criteria of the module docstring, as scorecard rows for one model."""
    final, m = res.final, res.model
    why = budget_reason(P, S, res.data.get("seeds", []))
    labels = set(final["arm"]) if len(final) else set()
    rows: list[Criterion] = []
    # 1. sparse on critical weights vs random-k at equal count
    c1 = with_holm([compare(final, f"{s}@{d:g}", Arm("sparse", s, d).label, Arm("sparse", "random_k", d).label,
                            "gain") for d in S.densities for s in S.selections])
    for c in c1:
        rows.append(_row(f"P5.ft.sparse_vs_random.{c.key}.{m}", f"sparse FT on critical weights beats random-k at "
                         f"equal count ({c.key}, {m})", c, len(c1),
                         f"gain diff > 0 nats, one-sided paired t over >= {MIN_SEEDS} seeds, Holm p < {ALPHA}",
                         evidence, why=why))
    # 2. gaps to LoRA (equal count) and to full FT
    gaps = []
    for d in S.densities:
        for s in S.selections:
            a = Arm("sparse", s, d).label
            if "lora" in S.baselines:
                gaps.append(("lora", compare(final, f"{s}@{d:g}", a, Arm("lora", density=d).label, "gain")))
            if "full" in S.baselines:
                gaps.append(("full", compare(final, f"{s}@{d:g}", a, Arm("full").label, "gain")))
    with_holm([c for _, c in gaps])
    for base, c in gaps:
        share = _share(final, c.a, c.b, "gain")
        fg = compare(final, c.key, c.a, c.b, "forgetting", sign=-1.0)
        extra = (f"sparse reaches {share:.0%} of {base}'s gain" if math.isfinite(share) else
                 f"{base}'s gain is not above zero: no share") + (
            f"; forgetting {'lower' if fg.mean_diff > 0 else 'higher'} than {base}'s by {abs(fg.mean_diff):.4f} nats"
            if math.isfinite(fg.mean_diff) else "")
        text = (f"sparse FT on critical weights vs LoRA at equal trainable count ({c.key}, {m})" if base == "lora"
                else f"sparse FT on critical weights vs full fine-tuning ({c.key}, {m})")
        rows.append(_row(f"P5.ft.gap_{base}.{c.key}.{m}", text, c, len(gaps),
                         f"gain(sparse) - gain({base}) > 0, one-sided paired t, Holm p < {ALPHA}", evidence, extra, why))
    # 3. protection: forgetting avoided at a stated cost in gain
    ref = Arm(S.protect_method, density=S.densities[0] if S.protect_method == "lora" and S.densities else None).label
    prot = [(p, compare(final, p, ref, f"{ref}+{p}", "forgetting")) for p in S.protections if p != "none"]
    if "freeze" in S.protections and "random_freeze" in S.protections:
        prot.append(("freeze_vs_random", compare(final, "freeze_vs_random", f"{ref}+random_freeze", f"{ref}+freeze",
                                                 "forgetting")))
    with_holm([c for _, c in prot])
    for p, c in prot:
        if p == "freeze_vs_random":
            rows.append(_row(f"P5.ft.freeze_vs_random.{m}", f"freezing the critical set avoids more forgetting than "
                             f"freezing a random set of its size ({ref}, {m})", c, len(prot),
                             f"forgetting(random_freeze) - forgetting(freeze) > 0, Holm p < {ALPHA}", evidence, why=why))
            continue
        rows.append(_protection_row(final, m, ref, p, c, len(prot), evidence, why, labels))
    return rows


def _share(final: pd.DataFrame, a: str, b: str, value: str) -> float:
    """mean(a) / mean(b) over seeds where both ran; NaN when b's mean is not above zero."""
    ok = final[final["error"] == ""] if "error" in final else final
    va, vb = ok[ok["arm"] == a][value], ok[ok["arm"] == b][value]
    if not len(va) or not len(vb) or not float(vb.mean()) > 0:
        return math.nan
    return float(va.mean() / vb.mean())


def _protection_row(final: pd.DataFrame, m: str, ref: str, p: str, c: Comparison, n_family: int, evidence: str,
                    why: str | None, labels: set[str]) -> Criterion:
    cid, text = f"P5.ft.protect_{p}.{m}", f"protection '{p}' reduces forgetting at a stated cost in gain ({ref}, {m})"
    threshold = (f"forgetting(none) - forgetting({p}) > 0 (one-sided paired t, Holm p < {ALPHA}) and gain kept "
                 f">= {MIN_GAIN_KEPT:.0%}")
    ok = final[final["error"] == ""] if "error" in final else final
    base = ok[ok["arm"] == ref]
    if not c.missing and len(base):
        g = bootstrap_ci(base["gain"].to_numpy(float))
        kept = _share(final, f"{ref}+{p}", ref, "gain")
        if not float(base["forgetting"].mean()) > 0:
            c.missing = (f"the unprotected run did not forget (forgetting {float(base['forgetting'].mean()):+.4f} "
                         "nats): nothing to reduce")
        elif not math.isfinite(kept) or (len(base) >= 2 and not g[1] > 0):
            c.missing = (f"the unprotected gain ({g[0]:+.4f} nats, 95% CI [{g[1]:.4f}, {g[2]:.4f}]) is within "
                         "noise of zero: the share of gain kept has no denominator")
    passed, verdict, note = judge_comparison(c, n_family)
    kept = _share(final, f"{ref}+{p}", ref, "gain")
    if passed is not None and math.isfinite(kept):
        note += f"; gain kept {kept:.0%} (cost {1 - kept:.0%} of the unprotected gain)"
        if kept < MIN_GAIN_KEPT:
            passed, verdict = False, "FAIL"
    elif math.isfinite(kept):
        note += f"; gain kept {kept:.0%}"
    crit = Criterion(cid, 5, text, None if math.isnan(c.mean_diff) else c.mean_diff, threshold, passed, evidence,
                     note, verdict=verdict)
    return demote(crit, "machinery-only", why) if why and crit.verdict in ("PASS", "FAIL") else crit


def prose(res: Result, S: Settings, rows: list[Criterion]) -> list[str]:
    """Sentences computed from the numbers (a loss is said as a loss)."""
    summ = summary_table(res.final)
    out = []
    ok = summ[summ["n_seeds"] > 0].set_index("arm") if len(summ) else summ
    for d in S.densities:
        for s in S.selections:
            a, r = Arm("sparse", s, d).label, Arm("sparse", "random_k", d).label
            if a not in ok.index:
                continue
            line = (f"{res.model}, density {d:g}: sparse FT on the {s} top-k moves held-out GSM8K PPL "
                    f"{ok.loc[a, 'target_ppl_0']:.2f} -> {ok.loc[a, 'target_ppl']:.2f} (gain {ok.loc[a, 'gain']:+.4f} "
                    f"nats) and Shakespeare PPL {ok.loc[a, 'source_ppl_0']:.2f} -> {ok.loc[a, 'source_ppl']:.2f}")
            for other in (r, Arm("sparse", "magnitude_k", d).label, Arm("lora", density=d).label, "full"):
                if other in ok.index and other != a and math.isfinite(ok.loc[other].get("gain", math.nan)):
                    word = "beats" if ok.loc[a, "gain"] > ok.loc[other, "gain"] else "loses to"
                    line += f"; it {word} {other} (gain {ok.loc[other, 'gain']:+.4f}, PPL {ok.loc[other, 'target_ppl']:.2f})"
            out.append(line + ".")
    prot = protection_table(summ, S) if len(summ) else summ
    if len(prot) > 1:
        ref = prot.iloc[0]
        for _, r in prot.iloc[1:].iterrows():
            if not math.isfinite(r.get("forgetting", math.nan)):
                continue
            more = "less" if r["forgetting"] < ref["forgetting"] else "more"
            out.append(f"{r['arm']}: forgetting {r['forgetting']:+.4f} nats ({more} than unprotected "
                       f"{ref['forgetting']:+.4f}), gain {r['gain']:+.4f} vs {ref['gain']:+.4f}"
                       + (f" ({r['gain_kept']:.0%} kept)." if math.isfinite(r.get("gain_kept", math.nan)) else "."))
    if "super_weight_rel_drift" in summ and summ["super_weight_rel_drift"].notna().any():
        top = summ.loc[summ["super_weight_rel_drift"].idxmax()]
        act = summ["massive_act_ratio"] if "massive_act_ratio" in summ else pd.Series(dtype=float)
        out.append(f"The tracked super weight moved by at most {top['super_weight_rel_drift']:.2%} of its value "
                   f"({top['arm']})" + (f"; the massive-activation channel's max |activation| ends at "
                                        f"{act.min():.3f}-{act.max():.3f} x its base value." if act.notna().any() else "."))
    for arm, row in summ.set_index("arm").iterrows() if len(summ) else []:
        if row.get("error"):
            out.append(f"{arm} could not run: {row['error']}")
    verdicts = pd.Series([r.verdict for r in rows]).value_counts().to_dict() if rows else {}
    out.append("Criteria: " + ", ".join(f"{n} {v}" for v, n in verdicts.items()) + ".")
    return out


# ------------------------------------------------------------------ the study
def plan(S: Settings, P: Profile, models: Sequence[str] | None = None) -> Plan:
    """Every arm x seed on each model, without loading anything."""
    chosen, seeds = list(models or P.models), seeds_of(S, P)
    conds = [Planned(m, f"{a.label} seed={s}", S.target_windows, "windows") for m in chosen for a in arms(S)
             for s in seeds]
    setup = {"training": {"steps": S.n_steps(), "batch_size": S.batch_size, "seqlen": S.seqlen, "domain": S.domain},
             "evaluation": {"target_windows": S.target_windows, "source_windows": S.source_windows},
             "seeds": seeds}
    return Plan("finetune", P, chosen, S, conds, setup)


def run(p: Plan) -> dict[str, Result]:
    return {m: run_grid(m, p.profile, p.settings) for m in p.models}


def criteria(results: Mapping[str, Result], p: Plan, evidence: str) -> list[Criterion]:
    return [r for m, res in results.items() for r in criteria_rows(res, p.profile, p.settings, f"{evidence} ({m})")]


def findings(results: Mapping[str, Result], p: Plan) -> list[str]:
    rows = criteria(results, p, "")
    return [" ".join(prose(res, p.settings, [r for r in rows if r.id.endswith(f".{m}")])) for m, res in results.items()]


# ------------------------------------------------------------------ esa-runner
@dataclass
class Spec:
    """esa-runner's fine-tuning request: one arm, run once per seed of the run."""

    method: str
    selection: str = ""
    density: float | None = None
    protection: str = "none"
    settings: dict[str, Any] = field(default_factory=dict)  # the profile's finetune section (steps overridden)

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
    over: dict[str, Any] = {}
    if req.steps is not None:
        if req.steps < 1:
            raise EsaError(f"--steps {req.steps}: a training budget of {req.steps} steps; it must be at least 1")
        over["steps"], over["tokens"] = req.steps, None
    S = settings(profile, over)
    density = None
    if req.density is not None:
        if method == "full":
            raise EsaError("--density applies to --finetune sparse and lora; full fine-tuning trains every weight")
        density = tr.check_density(req.density)
    elif method != "full":
        density = S.densities[0] if S.densities else 0.01
    selection = ""
    if req.select is not None and method != "sparse":
        raise EsaError(f"--select applies to --finetune sparse (what it trains); {method} trains a fixed set")
    if method == "sparse":
        selection = tr.check_selection(req.select or (S.selections[0] if S.selections else "grad_x_weight"))
    base = "grad_squared" if selection == "obd" else selection
    if base in METRICS and METRICS[base].double_backward and base not in ctx.recipe.metrics:
        raise EsaError(f"--select {selection} needs its scores computed with eager attention: add --metric {base}")
    protection = req.protect or "none"
    if protection not in tr.RETENTIONS:
        raise unknown("protection (--protect)", protection, tr.RETENTIONS)
    if tr.RETENTIONS[protection].freezes and method == "lora":
        ok = [p for p, v in tr.RETENTIONS.items() if not v.freezes]
        raise EsaError(f"--protect {protection} is not available with --finetune lora (a low-rank update cannot hold "
                       f"single weights fixed); accepted with lora: {', '.join(ok)}")
    if (method == "sparse" and tr.RETENTIONS[protection].freezes and protection == "freeze"
            and selection == S.critical_metric and density <= S.critical_density):  # type: ignore[operator]
        raise EsaError(f"--protect freeze freezes the critical set ({S.critical_metric} top-k at "
                       f"{S.critical_density:g} + super weights), which covers the whole --select {selection} set at "
                       f"--density {density:g}: nothing would train; raise --density or select another metric")
    if method == "lora":
        check_lora_count(ctx.model, density)  # type: ignore[arg-type]
    return Spec(method, selection, density, protection, asdict(S))


def check_lora_count(model: str, density: float) -> None:
    """LoRA at the trainable count of `density` must be plannable on `model` (one EsaError if not); checked from
    the config when it is at hand, else at the start of the run (still before any training)."""
    inv = inventory_without_weights(model)
    if inv is not None:
        tr.plan_lora(inv, n_trainable=tr.count_at_density(density, inv))


def run_job(spec: Spec, cmd: Command, lm: LoadedModel, runs: Any, stage: Path) -> dict[str, Any]:
    """The requested arm once per seed of the run, on the run's model; finetune.parquet (learning curve and
    final metrics), finetune_drift.parquet, finetune.json and, for sparse FT, one sparse delta per seed."""
    S = validate(Settings(**spec.settings))
    arm = spec.arm()
    if arm.method == "lora":
        tr.plan_lora(lm.inventory, n_trainable=tr.count_at_density(arm.density, lm.inventory))  # type: ignore[arg-type]
    R = cmd.recipe
    P = Profile(name=cmd.profile, corpus=R.corpus, seeds=list(R.seeds))
    S = replace(S, selections=[arm.selection] if arm.family == "sparse" else S.selections[:1],
                densities=[arm.density] if arm.density is not None else S.densities[:1])
    res = run_grid(cmd.model, P, S, lm=lm, runs=dict(runs), arm_list=[arm], seeds=list(R.seeds), recipe=R,
                   export_dir=stage if arm.method == "sparse" else None)
    tag = {"model": cmd.model, "run_id": cmd.run_id}
    parts = [res.steps.assign(record="step"), res.evals.assign(record="eval"), res.final.assign(record="final")]
    table = pd.concat([p for p in parts if len(p)], ignore_index=True).assign(**tag)
    write_parquet(stage / "finetune.parquet", table)
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
