"""Adversarial vulnerability: the worst loss increase a bounded weight perturbation of a target set can cause.

Projected gradient ascent in weight space (Madry-style PGD, sign steps) on the attack-batch loss:
delta is non-zero only on the target set and |delta_i| <= r_i, with the radius r_i one of `RADII`:
- `abs`: eps * |w_i| (each weight may move by a fraction eps of itself; a zero weight cannot move);
- `std`: eps * std of the weight's matrix (each expert slice is a matrix of its own).
Step size alpha = step_frac * r (default 2.5 / steps, so the walk can cross the box), start at zero
(or uniform in the box with `random_start`), `steps` iterations, each one forward+backward with the
perturbation written in place (esa.perturb.apply.overwritten) and undone. The iterate with the largest
attack loss is kept and judged on held-out windows. Values are written in the parameter's dtype, so a
radius below its resolution (bf16: 2^-8 relative) rounds to no change: `frac_unmoved` reports the share
of target weights whose stored value did not change, and `realised_linf` the largest |change| / r.
Comparing target sets of equal size (critical vs random-k vs magnitude-k) at each eps is `pgd_compare`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from esa.apps.security.common import (
    baseline,
    check_positive_int,
    check_targets,
    n_targets,
    resolve_weights,
    rng_for,
)
from esa.data import Windows
from esa.errors import EsaError, unknown
from esa.evaluate import evaluate
from esa.models.inventory import WeightSpec
from esa.perturb.apply import Targets, overwritten
from esa.progress import progress
from esa.sensitivity.metrics import batch_loss
from esa.sensitivity.passes import streamed_grads

RADII = {
    "abs": "eps * |w| (relative to each weight)",
    "std": "eps * std of the weight's matrix",
}


def _radius(p: torch.Tensor, idx: torch.Tensor, radius: str) -> torch.Tensor:
    """(n,) fp32 radius unit per selected weight: |w| or its matrix's std."""
    w = p.detach().reshape(-1)[idx.to(p.device)].float()
    if radius == "abs":
        return w.abs()
    if p.dim() == 3:
        per = p.detach().float().flatten(1).std(dim=1)  # (E,)
        return per[(idx.to(p.device) // (p.shape[1] * p.shape[2]))]
    return p.detach().float().std().expand(idx.numel()).clone()


def _check_budgets(budgets: Sequence[float]) -> list[float]:
    out = [float(b) for b in budgets]
    if not out:
        raise EsaError("no perturbation budget given")
    for b in out:
        if not (b > 0) or math.isinf(b):
            raise EsaError(f"an L-infinity budget must be a finite number > 0, got {b!r}")
    return out


def pgd_attack(
    model: torch.nn.Module,
    attack_ids: torch.Tensor,
    targets: Targets,
    budgets: Sequence[float],
    radius: str = "abs",
    steps: int = 10,
    step_frac: float | None = None,
    heldout: Windows | torch.Tensor | None = None,
    weights: Sequence[str | WeightSpec] | None = None,
    random_start: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> pd.DataFrame:
    """One row per budget eps: attack loss before/after, its increase, and the held-out damage if given."""
    if radius not in RADII:
        raise unknown("L-infinity radius", radius, RADII)
    budgets = _check_budgets(budgets)
    steps = check_positive_int(steps, "number of PGD steps")
    alpha_frac = 2.5 / steps if step_frac is None else float(step_frac)
    if not (alpha_frac > 0) or math.isinf(alpha_frac):
        raise EsaError(f"PGD step fraction must be a finite number > 0, got {step_frac!r}")
    specs = resolve_weights(model, weights)
    targets = check_targets(targets, specs, "adversarial target set")
    params = dict(model.named_parameters())
    for name in targets:
        if not params[name].is_floating_point():
            raise EsaError(f"PGD needs floating weights; {name} is {params[name].dtype}")
    # (n,) per target parameter: the clean values and the radius unit
    w0 = {n: params[n].detach().reshape(-1)[i.to(params[n].device)].float() for n, i in targets.items()}
    unit = {n: _radius(params[n], i, radius) for n, i in targets.items()}
    base_loss = _loss(model, attack_ids)
    base = baseline(model, heldout, batch_size) if heldout is not None else None
    grads: dict[str, torch.Tensor] = {}  # param -> gradient at the target indices (n,), refilled every step

    def fold(name: str, p: torch.nn.Parameter, grad: torch.Tensor) -> None:
        grads[name] = grad.detach().reshape(-1)[targets[name].to(grad.device)].float()

    rows = []
    for eps in progress(budgets, desc="pgd", disable=not show_progress):
        r = {n: eps * u for n, u in unit.items()}
        if random_start:
            g = torch.Generator().manual_seed(int(rng_for(seed, "pgd", eps).integers(2**62)))
            delta = {n: (torch.rand(v.shape, generator=g).to(v.device) * 2 - 1) * v for n, v in r.items()}
        else:
            delta = {n: torch.zeros_like(v) for n, v in r.items()}
        best_loss, best_delta = -math.inf, delta
        for t in range(steps + 1):  # steps forward+backward passes, then one forward for the last iterate
            grads.clear()
            upd = {n: (targets[n], w0[n] + delta[n]) for n in targets}
            with overwritten(model, upd):
                if t == steps:
                    loss = _loss(model, attack_ids)
                else:
                    with streamed_grads({n: params[n] for n in targets}, fold):
                        loss_t = batch_loss(model, attack_ids)
                        loss = float(loss_t.detach())
                        loss_t.backward()
            if loss > best_loss or math.isnan(loss):
                best_loss, best_delta = loss, delta
            if math.isnan(loss) or t == steps:
                break
            delta = {n: torch.clamp(delta[n] + alpha_frac * r[n] * torch.sign(grads[n]), -r[n], r[n])
                     for n in targets}
        upd = {n: (targets[n], w0[n] + best_delta[n]) for n in targets}
        row: dict[str, Any] = dict(eps=eps, radius=radius, steps=steps, n_targets=n_targets(targets),
                                   base_attack_loss=base_loss, attack_loss=best_loss,
                                   loss_increase=best_loss - base_loss)
        with overwritten(model, upd):
            moved, linf = 0, 0.0
            for n, i in targets.items():
                now = params[n].detach().reshape(-1)[i.to(params[n].device)].float()
                change = (now - w0[n]).abs()
                moved += int((change > 0).sum())
                rr = r[n]
                ok = rr > 0
                if bool(ok.any()):
                    linf = max(linf, float((change[ok] / rr[ok]).max()))
            row.update(frac_unmoved=1 - moved / n_targets(targets), realised_linf=linf)
            if heldout is not None and base is not None:
                ev = evaluate(model, heldout, batch_size=batch_size, show_progress=False)
                row.update(base_heldout_log_ppl=base.log_ppl, heldout_log_ppl=ev.log_ppl, heldout_ppl=ev.ppl,
                           heldout_damage=ev.log_ppl - base.log_ppl, heldout_accuracy=ev.accuracy)
        rows.append(row)
    return pd.DataFrame(rows)


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(batch_loss(model, ids))


def pgd_compare(
    model: torch.nn.Module,
    attack_ids: torch.Tensor,
    sets: dict[str, Targets],
    budgets: Sequence[float],
    **kw: Any,
) -> pd.DataFrame:
    """PGD on each labelled target set (critical, random-k, magnitude-k, ...) at each budget, in one table.

    Sets of unequal size are allowed but flagged (`equal_size` False): the comparison is meant at equal k."""
    if not sets:
        raise EsaError("pgd_compare needs at least one target set")
    sizes = {label: n_targets(t) for label, t in sets.items()}
    frames = [pgd_attack(model, attack_ids, t, budgets, **kw).assign(set=label) for label, t in sets.items()]
    return pd.concat(frames, ignore_index=True).assign(equal_size=len(set(sizes.values())) == 1)
