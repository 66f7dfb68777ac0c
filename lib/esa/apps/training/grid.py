"""A grid of fine-tuning runs on one loaded model: every arm once per seed, from the same base weights.

An `Arm` is one run's recipe: a method (sparse, lora, full), what sparse fine-tuning trains (a metric's
per-matrix top-k, or an equal-count control), the trained share of the studied weights, and a protection;
`arms` expands a study's settings into the grid. `run_arms` measures the base once on the shared `Data`,
then for each seed draws that seed's inputs from its sensitivity scores (`seed_inputs`: top-k sets, the
controls' reference, the critical set, the Fisher diagonal) and trains every arm, restoring the base weights
bit-exactly after each run. A run that cannot be set up (e.g. LoRA cannot match a tiny count) is a result:
its row says why.

**Domains.** Target: a registered domain (GSM8K with worked solutions, `esa.apps.training.domains`; train /
held-out problems split by SHA-256 of the question). Source: a corpus's eval split (Shakespeare offline), for
forgetting. Every run of a model is evaluated on the same held-out target windows and the same source
windows, and tracks the super-weight candidates and the massive-activation channel they write.

**Quantities** (nats per token, from the mean next-token NLL of the windows; `final_row`):
- gain = target loss before - after training (higher: more learnt);
- forgetting = source loss after - before (higher: more forgotten).

**Seeds.** The unit of replication is the seed: it picks the calibration sample of the sensitivity scores,
the draw of the random controls, the order of training batches and the LoRA initialisation.

The study's settings reach this layer as any object with the attributes of `GridSettings` (the phase's
`Settings`); scores arrive as a mapping (metric, seed) -> a score run with `.full()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch

from esa.apps.training.base import Method
from esa.apps.training.domains import describe_domain, domain_windows
from esa.apps.training.export import SparseDelta
from esa.apps.training.loop import Evaluator, TrainConfig, channel_probe, train
from esa.apps.training.lora import LoraFT
from esa.apps.training.methods import make_method
from esa.apps.training.retention import RetentionSpec, union
from esa.apps.training.sparse import SparseFT, count_at_density, targets_at_density
from esa.data import Windows, evaluation
from esa.errors import EsaError
from esa.models import LoadedModel
from esa.perturb.apply import Targets, weights_hash
from esa.perturb.controls import CONTROLS, ControlInput, make_control
from esa.sensitivity.superweights import DEFAULT_PROMPT, detect_superweights

Scores = Mapping[tuple[str, int], Any]  # (metric, seed) -> a score run (`.full()`: param -> scores)


class GridSettings(Protocol):
    """What the grid reads of a study's settings."""

    domain: str
    selections: list[str]
    controls: list[str]
    baselines: list[str]
    densities: list[float]
    protections: list[str]
    protect_method: str
    seqlen: int
    train_windows: int | None
    target_windows: int
    source_windows: int
    critical_metric: str
    critical_density: float
    full_scope: str

    def lr_of(self, method: str) -> float: ...

    def strength_of(self, protection: str) -> float: ...

    def train_config(self, seed: int, lr: float, show_progress: bool = False) -> TrainConfig: ...


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


def reference(S: GridSettings) -> Arm:
    """The unprotected run the protections act on: full FT, or LoRA at the first density."""
    return Arm(S.protect_method, density=S.densities[0] if S.protect_method == "lora" and S.densities else None)


def arms(S: GridSettings) -> list[Arm]:
    """The grid in run order: per density the sparse selections, their controls and LoRA; full FT; protections."""
    out: list[Arm] = []
    for d in S.densities:
        out += [Arm("sparse", s, d) for s in S.selections]
        out += [Arm("sparse", c, d) for c in S.controls]
        if "lora" in S.baselines:
            out.append(Arm("lora", density=d))
    ref = reference(S)
    if "full" in S.baselines or (S.protections and S.protect_method == "full"):
        out.append(Arm("full"))
    if S.protections and ref not in out:
        out.append(ref)
    out += [replace(ref, protection=p) for p in S.protections if p != "none"]
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Pair:
    """Two arms the grid pairs by seed: `a` against `b` on `value` (gain or forgetting)."""

    family: str  # sparse_vs_random, gap (to LoRA at equal count and to full FT) or protection
    kind: str  # sparse_vs_random, gap_lora, gap_full, protect_<p>, freeze_vs_random
    key: str  # <selection>@<density>, or the protection
    a: str
    b: str
    value: str

    @property
    def name(self) -> str:
        """The kind, then the key where the kind does not already say it (a protection's does)."""
        return self.kind if self.family == "protection" else f"{self.kind}.{self.key}"


def pairs(S: GridSettings) -> list[Pair]:
    """What the grid is built to compare, family by family: each selection against its random-k control at
    equal count, against LoRA at equal count and against full FT (gain); the unprotected reference against
    each protection of it, and the random freeze against the critical freeze (forgetting)."""
    keyed = [(f"{s}@{d:g}", d, Arm("sparse", s, d).label) for d in S.densities for s in S.selections]
    out = [Pair("sparse_vs_random", "sparse_vs_random", k, a, Arm("sparse", "random_k", d).label, "gain")
           for k, d, a in keyed]
    for k, d, a in keyed:
        out += [Pair("gap", f"gap_{b}", k, a, Arm(b, density=d if b == "lora" else None).label, "gain")
                for b in ("lora", "full") if b in S.baselines]
    ref = reference(S).label
    out += [Pair("protection", f"protect_{p}", p, ref, f"{ref}+{p}", "forgetting") for p in S.protections if p != "none"]
    if "freeze" in S.protections and "random_freeze" in S.protections:
        out.append(Pair("protection", "freeze_vs_random", "freeze_vs_random", f"{ref}+random_freeze", f"{ref}+freeze",
                        "forgetting"))
    return out


def control_reference(S: GridSettings) -> str:
    """The metric whose top-k the equal-count controls match: the first selection, else the critical metric."""
    return S.selections[0] if S.selections else S.critical_metric


# ------------------------------------------------------------------ inputs shared by every run of one model
@dataclass
class Data:
    """Windows and probes shared by every run of one model."""

    train: Windows
    target: Windows
    source: Windows
    tracked: list[tuple[str, int]]  # super-weight candidates (param, flat index)
    probes: dict[str, Callable[[torch.nn.Module], float]]
    super_weights: pd.DataFrame  # the candidates tracked (layer, param, row, col, weight, flagged)
    domain: dict[str, Any]  # the target domain (esa.apps.training.domains.describe_domain)
    n_studied: int  # the studied weights of the model

    def describe(self, seeds: list[int]) -> dict[str, Any]:
        return dict(train=self.train.describe(), target=self.target.describe(), source=self.source.describe(),
                    tracked=self.super_weights.to_dict("records"), domain=self.domain, seeds=seeds,
                    n_studied=self.n_studied)

    def evaluator(self) -> Evaluator:
        return Evaluator(target=self.target, source=self.source, tracked=self.tracked, probes=self.probes)


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


def prepare_data(lm: LoadedModel, S: GridSettings, source_corpus: str) -> Data:
    """Training and held-out windows of the target domain, source windows of `source_corpus`, probes."""
    tok, maxpos = lm.tokenizer, lm.info.max_positions or None
    train_w = domain_windows(tok, S.domain, "train", S.seqlen, n_windows=S.train_windows,
                             seed=0 if S.train_windows else None, max_positions=maxpos)
    target = domain_windows(tok, S.domain, "heldout", S.seqlen, n_windows=S.target_windows, seed=0,
                            max_positions=maxpos)
    source = evaluation(tok, source_corpus, S.seqlen, n_windows=S.source_windows, seed=0, max_positions=maxpos)
    sw = super_weight_rows(lm)
    shapes = {s.name: s.shape for s in lm.inventory}
    tracked = [(r.param, int(r.row) * int(shapes[r.param][-1]) + int(r.col)) for r in sw.itertuples()]
    probes: dict[str, Callable[[torch.nn.Module], float]] = {}
    if len(sw):
        top = sw.sort_values("out_max", ascending=False).iloc[0]
        ids = tok(DEFAULT_PROMPT, return_tensors="pt")["input_ids"]
        # the massive-activation channel: the row the strongest candidate writes, on the detector's prompt
        probes["massive_act"] = channel_probe(str(top.param).removesuffix(".weight"), int(top.row), ids)
    return Data(train_w, target, source, tracked, probes, sw.reset_index(drop=True), describe_domain(S.domain),
                sum(s.numel for s in lm.inventory))


# ------------------------------------------------------------------ what each seed's scores select
def metric_scores(runs: Scores, metric: str, seed: int, lm: LoadedModel) -> dict[str, torch.Tensor]:
    """A selection metric's scores for one seed; obd = grad_squared x w^2 (the OBD saliency)."""
    base = "grad_squared" if metric == "obd" else metric
    scores = runs[(base, seed)].full()
    if metric != "obd":
        return dict(scores)
    return {n: s.float() * lm.model.get_parameter(n).detach().float() ** 2 for n, s in scores.items()}


def needed_metrics(S: GridSettings, arm_list: list[Arm]) -> list[str]:
    """The sensitivity metrics the arms read (through the score cache)."""
    want = {a.selection for a in arm_list if a.family == "sparse"}
    if any(a.family == "control" for a in arm_list):
        want.add(control_reference(S))
    if any(a.protection in ("freeze", "anchor", "random_freeze") for a in arm_list):
        want.add(S.critical_metric)
    if any(a.protection == "ewc" for a in arm_list):
        want.add("grad_squared")
    return sorted({"grad_squared" if m == "obd" else m for m in want})


@dataclass
class SeedInputs:
    """The selections and protection inputs of one seed (all drawn from that seed's scores)."""

    seed: int
    top: dict[tuple[str, float], Targets]  # (metric, density) -> per-matrix top-k
    critical: Targets
    fisher: dict[str, torch.Tensor] | None

    def targets(self, arm: Arm, lm: LoadedModel, S: GridSettings,
                scores: dict[str, torch.Tensor] | None) -> Targets | None:
        if arm.method != "sparse":
            return None
        if arm.family == "sparse":
            return self.top[(arm.selection, arm.density)]  # type: ignore[index]
        inp = ControlInput(lm.model, lm.inventory, top=self.top[(control_reference(S), arm.density)],  # type: ignore[index]
                           seed=self.seed, scores=scores)
        return make_control(arm.selection, inp)


def seed_inputs(lm: LoadedModel, S: GridSettings, seed: int, runs: Scores, data: Data,
                arm_list: list[Arm]) -> tuple[SeedInputs, dict[str, torch.Tensor] | None]:
    """One seed's top-k sets, critical set (+ the tracked super weights) and normalised Fisher diagonal, and
    the controls' reference scores."""
    top: dict[tuple[str, float], Targets] = {}
    metrics = {a.selection for a in arm_list if a.family == "sparse"}
    if any(a.family == "control" for a in arm_list):
        metrics.add(control_reference(S))
    ref_scores = None
    for m in sorted(metrics):
        sc = metric_scores(runs, m, seed, lm)
        if m == control_reference(S):
            ref_scores = sc
        for d in S.densities:
            top[(m, d)] = targets_at_density(sc, lm.inventory, d)
    critical: Targets = {}
    if any(a.protection in ("freeze", "anchor", "random_freeze") for a in arm_list):
        sc = metric_scores(runs, S.critical_metric, seed, lm)
        sw: dict[str, list[int]] = {}
        for param, idx in data.tracked:
            sw.setdefault(param, []).append(idx)
        critical = union(targets_at_density(sc, lm.inventory, S.critical_density),
                         {p: torch.tensor(v, dtype=torch.long) for p, v in sw.items()})
    fisher = None
    if any(a.protection == "ewc" for a in arm_list):
        raw = metric_scores(runs, "grad_squared", seed, lm)
        mean = float(sum(float(v.double().sum()) for v in raw.values()) / sum(v.numel() for v in raw.values()))
        if not mean > 0:
            raise EsaError(f"the grad_squared Fisher diagonal of seed {seed} is all zero; EWC has nothing to weigh")
        # normalised to mean 1 per studied weight, so ewc_strength is on the scale of anchor_strength
        fisher = {n: (v.float() / mean) for n, v in raw.items()}
    return SeedInputs(seed, top, critical, fisher), ref_scores


def build_method(arm: Arm, lm: LoadedModel, targets: Targets | None, S: GridSettings, seed: int) -> Method:
    if arm.method == "sparse":
        return make_method("sparse", lm.inventory, targets=targets, density=arm.density)
    if arm.method == "lora":
        n = count_at_density(arm.density, lm.inventory)  # type: ignore[arg-type]
        return make_method("lora", lm.inventory, n_trainable=n, density=arm.density, seed=seed)
    return make_method("full", lm.inventory, scope=S.full_scope)


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


def restore(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base[n])


def run_arm(lm: LoadedModel, arm: Arm, inputs: SeedInputs, S: GridSettings, data: Data,
            ref_scores: dict[str, torch.Tensor] | None, base_eval: tuple[dict[str, Any], list[dict[str, Any]]],
            export_dir: Path | None = None, show_progress: bool = False) -> ArmRun:
    """One training run from the current (base) weights; the caller restores the base afterwards."""
    seed = inputs.seed
    try:
        targets = inputs.targets(arm, lm, S, ref_scores)
        method = build_method(arm, lm, targets, S, seed)
    except EsaError as e:  # e.g. LoRA cannot match the count at this density: a result, said in the table
        return ArmRun(arm, seed, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {}, error=str(e))
    spec = RetentionSpec(arm.protection, critical=inputs.critical or None,
                       fisher=inputs.fisher if arm.protection == "ewc" else None,
                       strength=S.strength_of(arm.protection), seed=seed)
    res = train(lm.model, method, data.train, S.train_config(seed, S.lr_of(arm.method), show_progress),
                inventory=lm.inventory, protect=spec, evaluator=data.evaluator())
    lm.model = res.model  # LoRA: the merged plain model
    if export_dir is not None and isinstance(method, SparseFT):
        SparseDelta.from_sparse(method, res.model, notes={"arm": arm.label, "seed": seed}).save(
            export_dir / f"sparse_delta_seed{seed}.safetensors")
    row0, drift0 = base_eval
    evals = pd.concat([pd.DataFrame([row0]), res.evals], ignore_index=True)
    drift = pd.concat([pd.DataFrame(drift0), res.drift], ignore_index=True)
    summary = dict(res.summary)
    if isinstance(method, LoraFT):
        summary["lora_plan"] = method.plan.describe()
    return ArmRun(arm, seed, res.steps, evals, drift, summary)


def run_arms(lm: LoadedModel, S: GridSettings, arm_list: list[Arm], seeds: list[int], runs: Scores, data: Data,
             export_dir: Path | None = None, show_progress: bool = False,
             check_restored: bool = True) -> tuple[list[ArmRun], bool]:
    """Every arm for every seed from the same base weights (restored bit-exactly after each run); the runs
    and whether the weights hash back to the base's (True unchecked)."""
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    h0 = weights_hash(lm.model) if check_restored else ""
    base_eval = data.evaluator().measure_base(lm.model)
    done: list[ArmRun] = []
    try:
        for seed in seeds:
            inputs, ref_scores = seed_inputs(lm, S, seed, runs, data, arm_list)
            for arm in arm_list:
                try:
                    done.append(run_arm(lm, arm, inputs, S, data, ref_scores, base_eval, export_dir,
                                        show_progress=show_progress))
                finally:
                    restore(lm.model, base)
    finally:
        restore(lm.model, base)
    return done, (weights_hash(lm.model) == h0) if check_restored else True


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

    def records(self) -> pd.DataFrame:
        """The steps, evaluations and final rows in one table, `record` saying which."""
        parts = [self.steps.assign(record="step"), self.evals.assign(record="eval"), self.final.assign(record="final")]
        return pd.concat([p for p in parts if len(p)], ignore_index=True)

    @classmethod
    def of(cls, model: str, settings: dict[str, Any], done: list[ArmRun], data: dict[str, Any], seconds: float,
           restored: bool) -> Result:
        """The runs' tables, each row tagged with its arm and seed."""
        def tagged(attr: str) -> pd.DataFrame:
            parts = [getattr(r, attr).assign(arm=r.arm.label, seed=r.seed) for r in done if len(getattr(r, attr))]
            return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

        final = pd.DataFrame([final_row(r) for r in done]).assign(model=model)
        return cls(model, settings, final, tagged("steps"), tagged("evals"), tagged("drift"), data, seconds, restored)
