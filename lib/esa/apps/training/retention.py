"""Retention of critical weights during fine-tuning (regularisers against forgetting): one registered entry
per variant. Profiles, flags and tables call them protections (`protections:`, `--protect`); the names stay.

Every variant is a `Retention` in `RETENTIONS` and acts through the two capabilities every method has
(`esa.apps.training.base`): a frozen set handed to `Method.prepare`, and a quadratic penalty built by
`Method.quadratic`. The penalties pull the effective weights w towards the base weights w0:
- `none`: plain fine-tuning.
- `freeze`: the critical set (e.g. super-weight candidates + a top-k, given as a target set) keeps its base
  values bit-exactly.
- `ewc`: (strength / 2) * sum_i F_i (w_i - w0_i)^2 over every weight with a Fisher diagonal F (the caller
  passes F, e.g. the `grad_squared` metric's scores); Kirkpatrick et al.'s elastic weight consolidation
  with the empirical Fisher of the source domain.
- `anchor`: (strength / 2) * sum over the critical set only of (w_i - w0_i)^2.
- `random_freeze`: freeze a control set of the critical set's size, drawn per matrix uniformly from the
  weights outside it (`esa.perturb.controls` random_k, seeded): what freezing that many weights costs when
  they are not the critical ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from esa.apps.training.base import Coef, Method, Penalty
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.perturb.apply import Targets
from esa.perturb.controls import ControlInput, make_control
from esa.registry import Registry


@dataclass
class RetentionSpec:
    """What a retention variant needs. `critical`: param -> flat indices; `fisher`: param -> tensor, its shape."""

    name: str = "none"
    critical: Targets | None = None
    fisher: dict[str, torch.Tensor] | None = None
    strength: float = 1.0  # lambda of the penalties
    seed: int = 0  # random_freeze's draw


@dataclass(frozen=True)
class Retention:
    name: str
    definition: str
    needs_critical: bool = False
    needs_fisher: bool = False
    freezes: bool = False
    frozen: Callable[[RetentionSpec, torch.nn.Module, list[WeightSpec]], Targets | None] = lambda *_: None
    coefs: Callable[[RetentionSpec], dict[str, Coef] | None] = lambda s: None


def _critical(spec: RetentionSpec, model: torch.nn.Module, inventory: list[WeightSpec]) -> Targets:
    return spec.critical or {}


def _random_control(spec: RetentionSpec, model: torch.nn.Module, inventory: list[WeightSpec]) -> Targets:
    return make_control("random_k", ControlInput(model, inventory, top=spec.critical or {}, seed=spec.seed))


def _fisher_coefs(spec: RetentionSpec) -> dict[str, Coef]:
    return {name: Coef(f.detach().float()) for name, f in (spec.fisher or {}).items()}


def _anchor_coefs(spec: RetentionSpec) -> dict[str, Coef]:
    return {name: Coef(torch.ones(idx.numel()), idx.long()) for name, idx in (spec.critical or {}).items()
            if idx.numel()}


RETENTIONS: Registry[Retention] = Registry("protection", (
    Retention("none", "no protection"),
    Retention("freeze", "the critical set keeps its base values", needs_critical=True, freezes=True,
              frozen=_critical),
    Retention("ewc", "(strength/2) sum F (w - w0)^2 with the given Fisher diagonal F", needs_fisher=True,
              coefs=_fisher_coefs),
    Retention("anchor", "(strength/2) sum over the critical set of (w - w0)^2", needs_critical=True,
              coefs=_anchor_coefs),
    Retention("random_freeze", "a random-k control set of the critical set's size (per matrix) is frozen",
              needs_critical=True, freezes=True, frozen=_random_control),
), base=Retention)


def check_retention(spec: RetentionSpec, method: Method, inventory: list[WeightSpec]) -> Retention:
    """Validate a retention variant against a method before any work; returns the registered entry."""
    ret = RETENTIONS.lookup(spec.name)
    if ret.freezes and not method.supports_freeze:
        ok = sorted(n for n, p in RETENTIONS.items() if not p.freezes)
        raise EsaError(f"protection {spec.name!r} is not available with method {method.name!r} (it cannot hold "
                       f"single weights fixed); accepted with {method.name}: {', '.join(ok)}")
    if ret.needs_critical and not (spec.critical and sum(int(v.numel()) for v in spec.critical.values())):
        raise EsaError(f"protection {spec.name!r} needs a non-empty critical set (param -> flat indices)")
    if ret.needs_fisher and not spec.fisher:
        raise EsaError(f"protection {spec.name!r} needs a Fisher diagonal (param -> tensor), e.g. the "
                       "grad_squared metric's scores")
    if not (spec.strength >= 0 and spec.strength < float("inf")):
        raise EsaError(f"protection strength must be a finite number >= 0, got {spec.strength!r}")
    shapes = {s.name: s.shape for s in inventory}
    for name, f in (spec.fisher or {}).items():
        if name in shapes and tuple(f.shape) != tuple(shapes[name]):
            raise EsaError(f"Fisher diagonal of {name} has shape {tuple(f.shape)}, the weight {shapes[name]}")
    return ret


def check_lora_protections(names: Iterable[str], where: str) -> None:
    """Retention variants that freeze single weights cannot act on LoRA (a low-rank update cannot hold them
    fixed): one EsaError naming them, `where` they were asked for (a setting or a flag) and the ones LoRA accepts."""
    bad = [n for n in names if RETENTIONS[n].freezes]
    if bad:
        ok = [n for n, p in RETENTIONS.items() if not p.freezes]
        raise EsaError(f"{where}: {', '.join(bad)} cannot act on LoRA (a low-rank update cannot hold single weights "
                       f"fixed); accepted with lora: {', '.join(ok)}")


def frozen_set(spec: RetentionSpec, model: torch.nn.Module, inventory: list[WeightSpec]) -> Targets | None:
    """The weights this retention variant freezes (None: none)."""
    return RETENTIONS[spec.name].frozen(spec, model, inventory)


def penalty(spec: RetentionSpec, method: Method) -> Penalty | None:
    """The penalty this retention variant adds, built on a prepared method (None: none)."""
    coefs = RETENTIONS[spec.name].coefs(spec)
    return method.quadratic(coefs, spec.strength) if coefs else None


def union(*sets: Targets) -> Targets:
    """Union of target sets (e.g. super-weight candidates + a top-k: the critical set); sorted, unique."""
    out: dict[str, list[torch.Tensor]] = {}
    for s in sets:
        for name, idx in s.items():
            out.setdefault(name, []).append(idx.long().cpu())
    return {name: torch.unique(torch.cat(parts)) for name, parts in out.items()}
