"""One training loop for every fine-tuning method: AdamW, warmup + cosine, a fixed budget, seeded, resumable.

`train(model, method, train_ids, cfg, ...)` fine-tunes `model` in place through `method` (full, sparse,
LoRA; `esa.apps.training.methods`), optionally under a protection against forgetting
(`esa.apps.training.retention`), and returns a `TrainResult` with the plain trained model, a per-step
table, a per-evaluation table and the drift of tracked weights.

Reproducibility: the batch of step s is a pure function of (seed, s) (seeded permutations of the training
windows, one per epoch), the LoRA initialisation is seeded, and the torch RNG state travels in the
checkpoint. A checkpoint holds the method's trained state, AdamW's moments, the schedule, the RNG state and
the logs after a completed step, written atomically (`esa.store.atomic_path`). A killed run called again
with the same arguments and a *fresh base model* resumes after the last checkpointed step: no step is
applied twice or skipped, and the final weights are bit-identical to an uninterrupted run's. A checkpoint of
a different set-up (config, method, protection, data) is refused.

Precision: fp32 on CPU; bf16 autocast on a GPU (`precision="auto"`), with the loss computed from fp32 logits.
The weights stay in the model's dtype (full fine-tuning refuses any but fp32: they are its master weights);
the memory plan asked before the first step counts what autocast adds (`uses_autocast`, esa.memory).
Evaluations run in the model's dtype.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from esa import memory
from esa.apps.training.base import Method
from esa.apps.training.retention import RetentionSpec, check_retention, frozen_set, penalty
from esa.data import Windows
from esa.dispatch import input_device
from esa.errors import EsaError, unknown
from esa.evaluate import evaluate
from esa.hooks import captured
from esa.models.inventory import WeightSpec
from esa.progress import progress
from esa.store import atomic_path

PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """One run's knobs. The budget is `steps`, or `tokens` (steps = tokens // (batch_size x seqlen))."""

    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 2  # windows per step
    lr: float = 1e-4  # peak learning rate
    warmup_frac: float = 0.1  # linear warmup over this share of the steps (at least one step)
    min_lr_frac: float = 0.1  # the cosine decays to this fraction of the peak
    weight_decay: float = 0.0  # AdamW's decoupled decay (sparse: pulls the delta to 0; full: weights to 0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global norm of the trainables' gradient; None: no clipping
    seed: int = 0
    eval_every: int = 0  # evaluate every n steps; always after the last step (and before the first: eval_start)
    eval_start: bool = True  # evaluate the untrained model at step 0 (off when the caller measured the base once)
    checkpoint_every: int = 50  # with a checkpoint_dir; the last step is always checkpointed
    precision: str = "auto"
    show_progress: bool = True

    def n_steps(self, seqlen: int) -> int:
        """The step budget; one EsaError for a budget of zero steps or an unclear one."""
        if self.steps is not None and self.tokens is not None:
            raise EsaError("give the training budget as steps or as tokens, not both")
        if self.steps is None and self.tokens is None:
            raise EsaError("no training budget: set steps or tokens")
        per_step = self.batch_size * seqlen
        n = self.steps if self.steps is not None else int(self.tokens) // per_step  # type: ignore[arg-type]
        if isinstance(n, bool) or int(n) != n or n <= 0:
            what = (f"steps={self.steps!r}" if self.steps is not None else
                    f"tokens={self.tokens!r} (one step is {self.batch_size} x {seqlen} = {per_step} tokens)")
            raise EsaError(f"a training budget of {max(0, int(n))} steps ({what}); it must be at least one step")
        return int(n)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise unknown("precision", self.precision, PRECISIONS)
        if self.batch_size < 1:
            raise EsaError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EsaError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.warmup_frac < 1.0 or not 0.0 <= self.min_lr_frac <= 1.0:
            raise EsaError("warmup_frac must lie in [0, 1) and min_lr_frac in [0, 1]")
        if self.eval_every < 0 or self.checkpoint_every < 1:
            raise EsaError("eval_every must be >= 0 and checkpoint_every >= 1")


def cosine_lr(step: int, total: int, warmup: int, min_frac: float) -> float:
    """Multiplier of the peak lr at `step`: linear warmup over `warmup` steps, then cosine to `min_frac`."""
    if step < warmup:
        return (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))


def batch_indices(step: int, n_windows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices of step `step`: positions step*B .. step*B+B-1 of an endless sequence of seeded
    permutations (one per epoch), so every window is seen once per epoch and any step can be recomputed."""
    out = []
    perms: dict[int, torch.Tensor] = {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n_windows)
        if epoch not in perms:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n_windows, generator=g)
        out.append(int(perms[epoch][i]))
    return torch.tensor(out, dtype=torch.long)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a batch (B, T) from fp32 logits: the quantity the evaluation's PPL exponentiates."""
    logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimiser's state (AdamW: two moments and a step per trained tensor)."""
    return int(sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                   if torch.is_tensor(v)))


@dataclass
class Evaluator:
    """What the loop measures at each evaluation: held-out target-domain loss/PPL, source-domain PPL
    (forgetting), the values of tracked weights (param, flat index) and any scalar probes of the model."""

    target: Windows | torch.Tensor | None = None
    source: Windows | torch.Tensor | None = None
    tracked: list[tuple[str, int]] = field(default_factory=list)
    probes: dict[str, Callable[[torch.nn.Module], float]] = field(default_factory=dict)
    batch_size: int | None = None
    _initial: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def _groups(self) -> dict[str, torch.Tensor]:
        groups: dict[str, list[int]] = {}
        for name, i in self.tracked:
            groups.setdefault(name, []).append(int(i))
        return {n: torch.tensor(v, dtype=torch.long) for n, v in groups.items()}

    def snapshot(self, method: Method) -> None:
        """Record the tracked weights' base values (call on the prepared, untrained method)."""
        self._initial = {n: method.weight_values(n, idx) for n, idx in self._groups().items()}

    def measure_base(self, model: torch.nn.Module) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The step-0 row of an untrained plain model (what `train` logs first with `eval_start`), measured once
        and shared by every run that starts from this model."""
        def values(name: str, idx: torch.Tensor) -> torch.Tensor:
            p = model.get_parameter(name)
            return p.detach().view(-1)[idx.to(p.device)].float().cpu()

        row, drift = self._measure(model, values, 0, base=True)
        row["tokens"] = 0
        return row, drift

    def measure(self, module: torch.nn.Module, method: Method, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self._measure(module, method.weight_values, step)

    def _measure(self, module: torch.nn.Module, values: Callable[[str, torch.Tensor], torch.Tensor], step: int,
                 base: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        row: dict[str, Any] = {"step": step}
        for label, wins in (("target", self.target), ("source", self.source)):
            if wins is not None:
                res = evaluate(module, wins, batch_size=self.batch_size, show_progress=False)
                row.update({f"{label}_loss": res.log_ppl, f"{label}_ppl": res.ppl})
        for name, fn in self.probes.items():
            row[name] = float(fn(module))
        drift = []
        for name, idx in self._groups().items():
            now = values(name, idx)
            init = now if base else self._initial.get(name, now)
            for j, i in enumerate(idx.tolist()):
                drift.append(dict(step=step, param=name, index=i, value=float(now[j]), initial=float(init[j]),
                                  drift=float(now[j] - init[j])))
        return row, drift


def channel_probe(module_name: str, channel: int, ids: torch.Tensor, what: str = "output"
                  ) -> Callable[[torch.nn.Module], float]:
    """A probe for `Evaluator.probes`: max |activation| of one channel of a module's output (or input) on
    `ids`, e.g. the massive-activation channel a super weight writes (SmolLM2: layers.11.mlp.down_proj
    output channel 507). Works on a peft-wrapped model too (its LoRA layers keep the base module names)."""

    def probe(module: torch.nn.Module) -> float:
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        with torch.no_grad(), captured(base, [module_name], what,
                                       reduce=lambda t: t[..., channel].abs().amax().float()) as seen:
            base(input_ids=ids.to(input_device(base)), use_cache=False)
        return float(torch.stack(seen[module_name]).max())

    return probe


@dataclass
class StepInfo:
    """What a callback sees after each completed step (`step` is 0-based; `step + 1` steps are done)."""

    step: int
    n_steps: int
    loss: float
    lr: float
    module: torch.nn.Module
    method: Method


@dataclass
class TrainResult:
    model: torch.nn.Module  # the plain model holding the trained weights (LoRA merged)
    method: Method
    steps: pd.DataFrame  # step, loss, penalty_loss, lr, grad_norm, seconds
    evals: pd.DataFrame  # step, tokens, target_loss/ppl, source_loss/ppl, penalty, probes...
    drift: pd.DataFrame  # step, param, index, value, initial, drift
    summary: dict[str, Any]


def uses_autocast(device: torch.device, precision: str) -> bool:
    """Whether a step on `device` at `precision` runs under bf16 autocast (what the memory plan must know)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _autocast(device: torch.device, precision: str) -> Any:
    bf16 = uses_autocast(device, precision)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), ("bf16" if bf16 else "fp32")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint(cfg: TrainConfig, method: Method, protect: RetentionSpec, ids: torch.Tensor,
                 n_steps: int) -> dict:
    data = hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()[:16]
    c = asdict(cfg)
    for k in ("show_progress", "eval_every", "eval_start", "checkpoint_every"):  # do not change the trained weights
        c.pop(k)
    c["betas"] = list(c["betas"])
    return dict(config=c, n_steps=n_steps, method=method.signature(), protection=protect.name,
                strength=protect.strength, protect_seed=protect.seed, data=data, shape=list(ids.shape))


def train(
    model: torch.nn.Module,
    method: Method,
    train_ids: Windows | torch.Tensor,
    cfg: TrainConfig,
    *,
    inventory: list[WeightSpec] | None = None,
    protect: RetentionSpec | None = None,
    evaluator: Evaluator | None = None,
    checkpoint_dir: str | Path | None = None,
    callbacks: Iterable[Callable[[StepInfo], None]] = (),
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lm_loss,
) -> TrainResult:
    """Fine-tune `model` (in place) with `method` for cfg's budget; see the module docstring.

    `inventory` is needed by protections that draw control sets (random_freeze) and to check Fisher shapes."""
    ids = train_ids.ids if isinstance(train_ids, Windows) else train_ids
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise EsaError(f"training windows must be a non-empty (n, seqlen) tensor, got shape {tuple(ids.shape)}")
    cfg.validate()
    n_steps = cfg.n_steps(int(ids.shape[1]))
    protect = protect or RetentionSpec()
    inventory = inventory or []
    check_retention(protect, method, inventory)
    callbacks = list(callbacks)
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None

    frozen = frozen_set(protect, model, inventory)
    device = input_device(model)
    bf16 = uses_autocast(device, cfg.precision)  # the plan counts autocast's bf16 casts as the step makes them
    if method.name in ("sparse", "lora"):  # their O(k) state, asked before prepare allocates it (esa.memory)
        n = sum(int(v.numel()) for v in method.targets.values()) if method.name == "sparse" else method.plan.n_trainable
        memory.check(model, f"finetune_{method.name}", cfg.batch_size, int(ids.shape[1]), inventory or None,
                     work={"trainable": n}, autocast=bf16)
    module = method.prepare(model, frozen)
    if method.name == "full":  # the memory plan of one AdamW step, asked before the first (esa.memory)
        try:
            memory.check(model, "finetune_full", cfg.batch_size, int(ids.shape[1]), autocast=bf16)
        except EsaError:
            method.close()
            raise
    try:
        pen = penalty(protect, method)
        opt = torch.optim.AdamW(method.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        warmup = max(1, int(cfg.warmup_frac * n_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_lr(s, n_steps, warmup, cfg.min_lr_frac))
        if evaluator is not None:
            evaluator.snapshot(method)
        autocast, precision = _autocast(device, cfg.precision)
        fp = _fingerprint(cfg, method, protect, ids, n_steps)
        steps_log: list[dict[str, Any]] = []
        evals: list[dict[str, Any]] = []
        drift: list[dict[str, Any]] = []
        start, seconds0, resumed_from = 0, 0.0, None
        if ckpt is not None and ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != fp:
                raise EsaError(f"checkpoint {ckpt} was written by a different run set-up (config, method, "
                               "protection or data); delete it or use another checkpoint_dir")
            method.load_state_dict({k: v.to(device) for k, v in state["method"].items()})
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            steps_log, evals, drift = list(state["steps"]), list(state["evals"]), list(state["drift"])
            start, seconds0, resumed_from = int(state["step"]), float(state["seconds"]), int(state["step"])

        def run_eval(done: int) -> None:
            if evaluator is None:
                return
            row, d = evaluator.measure(module, method, done)
            row["tokens"] = done * cfg.batch_size * int(ids.shape[1])
            if pen is not None:
                row["penalty"] = pen.value()
            evals.append(row)
            drift.extend(d)

        def save(done: int, seconds: float) -> None:
            state = dict(version=CHECKPOINT_VERSION, fingerprint=fp, step=done, method=method.state_dict(),
                         optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=_rng_state(),
                         steps=steps_log, evals=evals, drift=drift, seconds=seconds)
            with atomic_path(ckpt) as tmp:  # type: ignore[arg-type]
                torch.save(state, tmp)

        if start == 0 and cfg.eval_start:
            run_eval(0)
        trainables = method.trainable()
        module.train()
        t_run = time.perf_counter()
        for step in progress(range(start, n_steps), desc=f"train {method.name}", disable=not cfg.show_progress,
                             unit="step"):
            t0 = time.perf_counter()
            batch = ids[batch_indices(step, ids.shape[0], cfg.batch_size, cfg.seed)].to(device)  # (B, T)
            lr = opt.param_groups[0]["lr"]
            with autocast:
                loss = loss_fn(module, batch)
                extra = pen.loss() if pen is not None else None
            total = loss if extra is None else loss + extra
            total.backward()
            if pen is not None:
                pen.add_grad()
            method.before_step()  # after the penalty's gradient, so frozen weights keep a zero gradient
            norm = (torch.nn.utils.clip_grad_norm_(trainables, cfg.grad_clip) if cfg.grad_clip
                    else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in trainables if p.grad is not None)))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            method.after_step()
            done = step + 1
            steps_log.append(dict(step=done, loss=float(loss.detach()),
                                  penalty_loss=float(extra.detach()) if extra is not None else 0.0, lr=lr,
                                  grad_norm=float(norm), seconds=time.perf_counter() - t0))
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == n_steps:
                module.eval()
                run_eval(done)
                module.train()
            if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == n_steps):
                save(done, seconds0 + time.perf_counter() - t_run)
            for cb in callbacks:
                cb(StepInfo(step, n_steps, float(loss.detach()), lr, module, method))
        module.eval()
        seconds = seconds0 + time.perf_counter() - t_run
        opt_bytes = optimizer_state_bytes(opt)
    except BaseException:
        method.close()
        raise
    trained = method.finish()
    per_step = [r["seconds"] for r in steps_log]
    summary = dict(method=method.signature(), protection=protect.name, strength=protect.strength,
                   n_trainable=method.n_trainable, optimizer_state_bytes=opt_bytes, steps=n_steps,
                   tokens=n_steps * cfg.batch_size * int(ids.shape[1]), seconds=round(seconds, 3),
                   seconds_per_step_median=float(pd.Series(per_step).median()) if per_step else math.nan,
                   precision=precision, device=str(device), resumed_from=resumed_from,
                   n_frozen=sum(int(v.numel()) for v in (frozen or {}).values()), config=asdict(cfg))
    return TrainResult(trained, method, pd.DataFrame(steps_log), pd.DataFrame(evals), pd.DataFrame(drift), summary)
