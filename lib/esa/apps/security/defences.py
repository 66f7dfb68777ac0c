"""Defences of a weight set against bit flips: which flips a guard stops, for fault campaigns and attacks.

A `Guard` is a defence from `DEFENCES` plus the protected weights (a target set). Profiles and tables call
the defence the protection mode (`security.protect_mode`); those names stay. Defences:
- `ecc`: an error-correcting code per protected weight corrects every flip in it (the upper bound).
- `parity`: one parity bit per protected weight; a flip pattern with an odd number of bits changes the
  parity, is detected, and the weight is repaired from a clean copy; an even number (two flips in one
  weight) goes unseen. `parity_bits` computes the real parity of the stored bits, so a test can check
  the rule against the model.
- `bounded`: the protected weights are stored so that their exponent cannot flip into a catastrophic
  value: flips of exponent bits other than the LSB are stopped, sign/mantissa/exponent-LSB flips pass
  (|w| at most doubles). Float formats only; int8 flips are bounded already.
A guard filters a fault's flip set (`apply_guard`) and tells an attack which single flips it may not
choose (`blocked_bits`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from esa.apps.security.common import check_targets, contains, rng_for
from esa.apps.security.formats import FlipSet, StorageFormat, Store, popcount
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.perturb.apply import Targets
from esa.registry import Registry


def _bits_mask(bits: tuple[int, ...]) -> int:
    m = 0
    for b in bits:
        m |= 1 << b
    return m


def _ecc(fmt: StorageFormat, mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(mask)


def _parity(fmt: StorageFormat, mask: torch.Tensor) -> torch.Tensor:
    odd = (popcount(mask) % 2) == 1  # detected: repaired from the clean copy
    return torch.where(odd, torch.zeros_like(mask), mask)


def _bounded(fmt: StorageFormat, mask: torch.Tensor) -> torch.Tensor:
    return mask & _bits_mask(fmt.positions("bounded"))


@dataclass(frozen=True)
class Defence:
    name: str
    definition: str
    # xor masks of flips in protected weights -> the part that gets through
    surviving: Callable[[StorageFormat, torch.Tensor], torch.Tensor]
    # the bits a single flip (an attack's step) cannot flip in a protected weight
    single_blocked: Callable[[StorageFormat], tuple[int, ...]]
    floats_only: bool = False


DEFENCES: Registry[Defence] = Registry("protection", (
    Defence("ecc", "every flip in a protected weight is corrected", _ecc,
            lambda f: f.positions("any")),
    Defence("parity", "a parity bit per protected weight: odd flip counts detected and repaired", _parity,
            lambda f: f.positions("any")),
    Defence("bounded", "exponent bits other than the LSB of protected weights cannot flip", _bounded,
            lambda f: tuple(b for b in f.positions("any") if b not in f.positions("bounded")),
            floats_only=True),
), base=Defence)


@dataclass(frozen=True)
class Guard:
    mode: str
    targets: Targets  # the protected weights

    def fraction(self, store: Store) -> float:
        return sum(int(v.numel()) for v in self.targets.values()) / store.total_weights()


def make_guard(mode: str, targets: Targets, fmt: StorageFormat, specs: list[WeightSpec]) -> Guard:
    """Validated guard over the studied weights (an unknown mode or an empty/out-of-range set is an error)."""
    check_mode(mode, fmt)
    return Guard(mode, check_targets(targets, specs, "protected set"))


def check_mode(mode: str, fmt: StorageFormat) -> Defence:
    p = DEFENCES.lookup(mode)
    if p.floats_only and fmt.simulated:
        raise EsaError(f"protection {mode!r} guards a float exponent; format {fmt.name} has none "
                       f"(use {[k for k, v in DEFENCES.items() if not v.floats_only]})")
    return p


def apply_guard(guard: Guard | None, store: Store, flips: FlipSet) -> tuple[FlipSet, int]:
    """(the flips that get through the guard, number of bit flips it stopped)."""
    if guard is None:
        return flips, 0
    defence = DEFENCES[guard.mode]
    out: FlipSet = {}
    stopped = 0
    for name, (idx, mask) in flips.items():
        inside = contains(guard.targets, name, idx)
        if bool(inside.any()):
            through = mask.clone()
            through[inside] = defence.surviving(store.fmt, mask[inside])
            stopped += int((popcount(mask) - popcount(through)).sum())
            keep = through != 0
            idx, mask = idx[keep], through[keep]
        if idx.numel():
            out[name] = (idx, mask)
    return out, stopped


def blocked_bits(guard: Guard | None, fmt: StorageFormat) -> tuple[int, ...]:
    """The bits an attack may not flip in a protected weight (one flip at a time)."""
    return () if guard is None else DEFENCES[guard.mode].single_blocked(fmt)


def parity_bits(store: Store, targets: Targets) -> dict[str, torch.Tensor]:
    """Parity (0/1, int64) of the stored bit pattern of each protected weight, as it is now."""
    return {name: popcount(store.raw(name, idx)).cpu() % 2 for name, idx in targets.items()}


def random_like(targets: Targets, store: Store, seed: int) -> Targets:
    """A random set with `targets`' count per parameter, disjoint from it (the protection control)."""
    return matched_random(targets, {name: store.numel(name) for name in targets}, seed)


def matched_random(targets: Targets, sizes: dict[str, int], seed: int) -> Targets:
    """`random_like` from parameter sizes (param -> number of weights) instead of an open store."""
    out: Targets = {}
    for name, idx in targets.items():
        n, m = int(idx.numel()), int(sizes[name])
        if 2 * n > m:
            raise EsaError(f"cannot draw a disjoint random set of {n} weights from {name} ({m} weights)")
        rng = rng_for(seed, "random_like", name)
        pick = torch.zeros(0, dtype=torch.long)
        while pick.numel() < n:
            draw = torch.from_numpy(rng.integers(0, m, size=2 * n + 8)).long()
            draw = draw[~contains({name: idx}, name, draw)]
            pick = torch.unique(torch.cat([pick, draw]))
        perm = torch.from_numpy(rng.permutation(pick.numel())).long()
        out[name] = torch.sort(pick[perm[:n]]).values
    return out


def magnitude_like(targets: Targets, model: torch.nn.Module) -> Targets:
    """The largest-|w| weights of each parameter, as many as `targets` holds there (the magnitude-k control)."""
    out: Targets = {}
    for name, idx in targets.items():
        w = model.get_parameter(name).detach().reshape(-1).float().abs()
        out[name] = torch.sort(torch.topk(w, int(idx.numel())).indices.cpu()).values
    return out
