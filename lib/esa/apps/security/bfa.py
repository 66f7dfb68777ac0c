"""Progressive bit search (Rakin et al. 2019, BFA) adapted to language models: one flip per iteration.

Each iteration, with the flips found so far applied in place:
1. one forward+backward of the attack-batch loss (mean next-token NLL) gives the gradient g of every
   searchable weight (streamed: each parameter's gradient is ranked the moment it is ready, then freed);
2. in-layer search: in each weight matrix, every allowed (weight, bit) is scored by the first-order loss
   gain g * dw of flipping that stored bit (dw = change of the dequantised value for int8, of the float
   value itself otherwise); the best one is the matrix's candidate;
3. cross-layer search: each candidate is applied alone and the attack loss re-measured (one forward per
   candidate matrix, `layer_candidates` limits it to the matrices with the largest predicted gains; None =
   all of them, as in BFA); the candidate with the largest real loss is committed.
The attack is judged on held-out windows after every flip: the flips needed to reach `goals` x the
baseline PPL and next-token accuracy below `acc_goal`. It stops when every goal is reached, at the flip
budget, or when the attack loss stops being finite. The search space is a target set (all studied
weights, a critical set, random-k), a bit class (default: the format's bounded class, since one
unbounded float flip collapses almost any model; see collapse.py) and a guard (protected weights whose
blocked bits may not be chosen). The model is restored bit-exactly at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from esa import memory
from esa.apps.security.common import (
    baseline,
    check_factor,
    check_positive_int,
    check_targets,
    contains,
    damage,
    resolve_weights,
)
from esa.apps.security.defences import Guard, blocked_bits, make_guard
from esa.apps.security.formats import (
    FlipSet,
    Store,
    combine,
    describe_flips,
    flipped,
    get_format,
    make_flips,
    n_flips,
    stored,
)
from esa.data import Windows
from esa.errors import EsaError
from esa.evaluate import evaluate
from esa.models.inventory import WeightSpec
from esa.perturb.apply import Targets
from esa.progress import progress
from esa.sensitivity.metrics import batch_loss
from esa.sensitivity.passes import streamed_grads


@dataclass
class AttackConfig:
    fmt: str = "int8"  # storage format (formats.FORMATS)
    max_flips: int = 100  # flip budget
    bits: str | None = None  # bit class the attack may flip; None: the format's bounded class
    goals: tuple[float, ...] = (100.0, 1000.0)  # held-out PPL factors whose flip counts are recorded
    acc_goal: float | None = 0.01  # also record the flips that take next-token accuracy below this
    layer_candidates: int | None = None  # cross-layer: only the L best predicted matrices (None: all)
    batch_size: int | None = None  # held-out evaluation batch size
    seed: int = 0  # random attack: the draw; bfa is deterministic given the attack batch
    show_progress: bool = True

    def validate(self) -> None:
        f = get_format(self.fmt)
        f.positions(self.bits or f.bounded)
        check_positive_int(self.max_flips, "flip budget")
        if not self.goals:
            raise EsaError("an attack needs at least one PPL goal factor")
        for g in self.goals:
            check_factor(g, "attack goal factor")
        if self.acc_goal is not None and not (0.0 < self.acc_goal < 1.0):
            raise EsaError(f"accuracy goal must lie in (0, 1), got {self.acc_goal!r}")
        if self.layer_candidates is not None:
            check_positive_int(self.layer_candidates, "number of candidate layers")


@dataclass
class AttackResult:
    attack: str
    history: pd.DataFrame  # one row per committed flip (bfa) or checkpoint (random)
    # goal label -> flips needed (None: not reached within the budget): the bits that differ from the clean
    # model when the goal is first reached (an iteration may undo an earlier flip: `iterations_to` counts
    # iterations)
    flips_to: dict[str, int | None]
    stop_reason: str
    base: dict[str, float]
    flips: FlipSet  # the final flip set (relative to the stored baseline)
    timing: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    iterations_to: dict[str, int | None] = field(default_factory=dict)  # goal label -> iterations needed

    def summary(self) -> dict[str, Any]:
        return dict(attack=self.attack, stop_reason=self.stop_reason, n_flips=int(len(self.history)),
                    **{f"flips_to_{k}": v for k, v in self.flips_to.items()},
                    **{f"iterations_to_{k}": v for k, v in self.iterations_to.items()},
                    **self.settings, **self.timing)


@dataclass
class _Candidate:
    name: str
    index: int
    bit: int
    gain: float  # predicted first-order loss increase


def goal_labels(cfg: AttackConfig) -> list[str]:
    out = [f"ppl_x{g:g}" for g in cfg.goals]
    if cfg.acc_goal is not None:
        out.append(f"acc_below_{cfg.acc_goal:g}")
    return out


def judge(flips_to: dict[str, int | None], cfg: AttackConfig, n: int, log_ppl: float, accuracy: float,
          base_log_ppl: float) -> bool:
    """Record which goals `n` flips reach (first time only); True when every goal has been reached."""
    d = damage(log_ppl, base_log_ppl)
    for g in cfg.goals:
        if flips_to[f"ppl_x{g:g}"] is None and d >= math.log(g):
            flips_to[f"ppl_x{g:g}"] = n
    if cfg.acc_goal is not None:
        key = f"acc_below_{cfg.acc_goal:g}"
        if flips_to[key] is None and (accuracy < cfg.acc_goal or not math.isfinite(log_ppl)):
            flips_to[key] = n
    return all(v is not None for v in flips_to.values())


def attack_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(batch_loss(model, ids))


def _search_space(specs: list[WeightSpec], targets: Targets | None) -> dict[str, torch.Tensor | None]:
    """param -> flat indices the attack may flip (None: the whole matrix)."""
    if targets is None:
        return {s.name: None for s in specs}
    return dict(check_targets(targets, specs, "attack target set"))


def host_reads_are_free(device: torch.device) -> bool:
    """On the CPU a value read is free, so the ranking may stop early by the bit bounds; on a GPU a read inside
    the backward stalls it, so every bit is ranked on the device and read once after the backward."""
    return device.type == "cpu"


def _in_layer(store: Store, ids: torch.Tensor, space: dict[str, torch.Tensor | None],
              bit_list: tuple[int, ...], guard: Guard | None) -> tuple[list[_Candidate], float]:
    """One forward+backward; each matrix's best (weight, bit) by first-order gain g * dw, and the seconds
    spent ranking (inside the backward pass, as each gradient is ready)."""
    blocked = set(blocked_bits(guard, store.fmt))
    params = {n: store.params[n] for n in space}
    order = tuple(sorted(bit_list, key=lambda b: -store.step_bound(b)))  # falling bound: ties go to the first
    cands: list[_Candidate] = []
    # matrices ranked on a device: name -> (its flat indices or None, (bits, 2) float64 [best gain, its position])
    pending: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    ranking = [0.0]

    def gains(name: str, g: torch.Tensor, idx: torch.Tensor | None, prot: torch.Tensor | None,
              b: int) -> torch.Tensor:
        gain = torch.nan_to_num(g * store.delta(name, b, idx), nan=-math.inf)  # (n,)
        if prot is not None and b in blocked:
            gain[prot] = -math.inf
        return gain

    def fold(name: str, p: torch.nn.Parameter, grad: torch.Tensor) -> None:
        t = time.perf_counter()
        idx = space[name]
        g = grad.detach().reshape(-1)
        g = (g if idx is None else g[idx.to(g.device)]).float()  # (n,)
        prot: torch.Tensor | None = None
        if guard is not None and name in guard.targets and blocked:
            if idx is None:
                prot = guard.targets[name].to(g.device)  # positions into the whole matrix
            else:
                prot = contains(guard.targets, name, idx).nonzero().reshape(-1).to(g.device)
        if not host_reads_are_free(g.device):
            best = []
            for b in order:
                gain = gains(name, g, idx, prot, b)
                j = gain.argmax()
                best.append(torch.stack([gain[j].double(), j.double()]))  # no host read: stays on the device
            pending[name] = (idx, torch.stack(best))
            ranking[0] += time.perf_counter() - t
            return
        best_c = _Candidate(name, -1, -1, -math.inf)
        # gain(b) <= unit * step_bound(b) for every weight, so bits taken in falling bound order can stop
        # as soon as the bound drops below the best gain found: exact, and usually after two or three bits
        unit = store.gain_bound(name, g, idx)
        for b in order:
            if best_c.gain >= unit * store.step_bound(b):
                break
            gain = gains(name, g, idx, prot, b)
            j = int(torch.argmax(gain))
            if float(gain[j]) > best_c.gain:
                best_c = _Candidate(name, int(idx[j]) if idx is not None else j, b, float(gain[j]))
        if best_c.index >= 0:
            cands.append(best_c)
        ranking[0] += time.perf_counter() - t

    with streamed_grads(params, fold):
        batch_loss(store.model, ids).backward()
    t = time.perf_counter()
    by_device: dict[torch.device, list[str]] = {}
    for name, (_, best) in pending.items():
        by_device.setdefault(best.device, []).append(name)
    for names in by_device.values():  # one read per device, after the backward
        rows = torch.stack([pending[n][1] for n in names]).cpu().numpy()  # (matrices, bits, 2)
        for name, r in zip(names, rows, strict=True):
            k = int(r[:, 0].argmax())  # the first bit (in bound order) with the largest gain
            if r[k, 0] > -math.inf:
                idx, j = pending[name][0], int(r[k, 1])
                cands.append(_Candidate(name, int(idx[j]) if idx is not None else j, order[k], float(r[k, 0])))
    ranking[0] += time.perf_counter() - t
    return cands, ranking[0]


def progressive_bit_search(
    model: torch.nn.Module,
    attack_ids: torch.Tensor,
    heldout: Windows | torch.Tensor,
    targets: Targets | None = None,
    cfg: AttackConfig | None = None,
    weights: Sequence[str | WeightSpec] | None = None,
    guard: Guard | None = None,
) -> AttackResult:
    """BFA on `attack_ids` (n, seqlen), judged on `heldout`; see the module docstring."""
    cfg = cfg or AttackConfig()
    cfg.validate()
    f = get_format(cfg.fmt)
    bit_list = f.positions(cfg.bits or f.bounded)
    t_start = time.perf_counter()
    # seconds_gradient: forward+backward including the in-layer ranking (seconds_ranking) done inside it
    timing = dict(seconds_gradient=0.0, seconds_ranking=0.0, seconds_cross_layer=0.0, seconds_heldout=0.0,
                  n_forward_backward=0, n_cross_layer_forwards=0, n_heldout_evals=0)
    specs = resolve_weights(model, weights)
    space = _search_space(specs, targets)
    if guard is not None:
        guard = make_guard(guard.mode, guard.targets, f, specs)
    # one search iteration: the gradient pass over the attack batch, with the store open
    memory.check(model, "bfa", int(attack_ids.shape[0]), int(attack_ids.shape[1]), specs)
    with stored(model, cfg.fmt, specs) as store:
        base = baseline(model, heldout, cfg.batch_size)
        loss = base_attack = attack_loss(model, attack_ids)
        flips_to: dict[str, int | None] = {k: None for k in goal_labels(cfg)}
        judge(flips_to, cfg, 0, base.log_ppl, base.accuracy, base.log_ppl)  # met by the baseline: 0 flips
        iterations_to = dict(flips_to)
        acc: FlipSet = {}
        rows: list[dict[str, Any]] = []
        stop = "flip budget spent"
        steps = range(1, cfg.max_flips + 1)
        for step in progress(steps, desc=f"bfa {cfg.fmt}", disable=not cfg.show_progress):
            with flipped(store, acc):
                t = time.perf_counter()
                cands, t_rank = _in_layer(store, attack_ids, space, bit_list, guard)
                timing["seconds_gradient"] += time.perf_counter() - t
                timing["seconds_ranking"] += t_rank
                timing["n_forward_backward"] += 1
                if not cands:
                    stop = "no flippable candidate left"
                    break
                cands.sort(key=lambda c: -c.gain)
                t = time.perf_counter()
                tried = []
                for c in cands[: cfg.layer_candidates]:
                    one = make_flips({c.name: (torch.tensor([c.index]), torch.tensor([c.bit]))})
                    with flipped(store, one):
                        tried.append((attack_loss(model, attack_ids), c, one))
                timing["seconds_cross_layer"] += time.perf_counter() - t
                timing["n_cross_layer_forwards"] += len(tried)
                # NaN loss ranks highest: a non-finite loss is the most damage a flip can do
                new_loss, best, one = max(tried, key=lambda x: math.inf if math.isnan(x[0]) else x[0])
                desc = describe_flips(store, one).iloc[0].to_dict()
            acc = combine(acc, one)
            net = n_flips(acc)
            t = time.perf_counter()
            with flipped(store, acc) as st:
                r = evaluate(model, heldout, batch_size=cfg.batch_size, show_progress=False)
            timing["seconds_heldout"] += time.perf_counter() - t
            timing["n_heldout_evals"] += 1
            rows.append(dict(step=step, net_flips=net, **desc, predicted_gain=best.gain, attack_loss=new_loss,
                             loss_gain=new_loss - loss, n_layers_evaluated=len(tried), heldout_ppl=r.ppl,
                             heldout_log_ppl=r.log_ppl, heldout_accuracy=r.accuracy, n_inf=st.n_inf,
                             n_nan=st.n_nan,
                             seconds=time.perf_counter() - t_start))
            loss = new_loss
            judge(iterations_to, cfg, step, r.log_ppl, r.accuracy, base.log_ppl)
            if judge(flips_to, cfg, net, r.log_ppl, r.accuracy, base.log_ppl):
                stop = "every goal reached"
                break
            if not math.isfinite(new_loss):
                stop = "attack loss not finite"
                break
    timing["seconds"] = time.perf_counter() - t_start
    settings = dict(format=cfg.fmt, bits=cfg.bits or f.bounded, max_flips=cfg.max_flips,
                    layer_candidates=cfg.layer_candidates, target_size=None if targets is None else
                    int(sum(int(v.numel()) for v in space.values() if v is not None)),
                    guard=None if guard is None else guard.mode,
                    guard_size=None if guard is None else sum(int(v.numel()) for v in guard.targets.values()))
    return AttackResult("bfa", pd.DataFrame(rows), flips_to, stop,
                        dict(ppl=base.ppl, log_ppl=base.log_ppl, accuracy=base.accuracy,
                             attack_loss=base_attack),
                        acc, timing, settings, iterations_to)

