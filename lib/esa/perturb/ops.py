"""The perturbations, behind one registry of `Perturbation` objects.

Every perturbation maps the selected values of one weight matrix to new values:
`fn(values, spec, ctx) -> new_values`, with `values` a 1-D tensor (n,) in the parameter's storage dtype
and the result in the same dtype. `ctx` carries what a perturbation may need beyond the values: the
matrix's standard deviation (for `gauss_noise`) and a seeded generator (noise and bit draws), so one
(seed, condition) always gives the same perturbation. Its registry entry also holds its dose axis, whether
it has bit variants, what it needs from the context, its table label and its one-line definition.

- `sign_flip`: w -> -scale * w (scale 1 is the plain sign flip).
- `gauss_noise`: w + N(0, (scale * sigma)^2); sigma is the weight matrix's standard deviation
  (`sigma="std"`, the default; each expert slice is its own matrix) or |w| itself (`sigma="abs"`,
  multiplicative noise).
- `zero`: w -> 0.
- `bit_flip`: with probability `prob` per selected weight, flip one bit of its stored value (integer
  view of bf16/fp16/fp32). Which bit is explicit: `any` (uniform over all bits), `exponent` (uniform over
  the exponent bits), `sign`, `msb-exponent` (the exponent's top bit, the flip most likely to overflow), or
  `lsb-exponent` (the exponent's lowest bit: the value is doubled or halved). Uniform exponent flips at
  p = 0.5 overflow some weight of every group, so they cannot tell critical from random weights;
  `lsb-exponent` is the bounded, magnitude-relative variant that can. A sweep's `perturbation` column
  names non-default bit choices as `bit_flip[<bits>]` so the two are analysed as separate types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from esa.errors import EsaError, unknown
from esa.registry import Registry

# IEEE layouts: (integer view dtype, total bits, sign bit, exponent bits as [lo, hi] inclusive).
BIT_LAYOUTS: dict[torch.dtype, tuple[torch.dtype, int, int, tuple[int, int]]] = {
    torch.float32: (torch.int32, 32, 31, (23, 30)),
    torch.float16: (torch.int16, 16, 15, (10, 14)),
    torch.bfloat16: (torch.int16, 16, 15, (7, 14)),
}
BIT_CHOICES = ("any", "exponent", "sign", "msb-exponent", "lsb-exponent")
DEFAULT_BITS = "exponent"
SIGMA_CHOICES = ("std", "abs")


@dataclass(frozen=True)
class PerturbSpec:
    """One perturbation condition. Fields a perturbation does not use are ignored by it."""

    name: str
    scale: float = 1.0  # sign_flip multiplier, gauss_noise sigma multiplier
    prob: float = 0.5  # bit_flip: probability that a selected weight gets a flipped bit
    bits: str = "exponent"  # bit_flip: which bits may flip (BIT_CHOICES)
    sigma: str = "std"  # gauss_noise: "std" of the matrix or "abs" = |w|

    def __post_init__(self) -> None:
        PERTURBATIONS.lookup(self.name)
        if not (self.scale >= 0) or self.scale == float("inf"):
            raise EsaError(f"perturbation scale must be a finite number >= 0, got {self.scale!r}")
        if not (0.0 <= self.prob <= 1.0):
            raise EsaError(f"perturbation probability must be in [0, 1], got {self.prob!r}")
        if self.bits not in BIT_CHOICES:
            raise unknown("bit choice", self.bits, BIT_CHOICES)
        if self.sigma not in SIGMA_CHOICES:
            raise unknown("gauss_noise sigma", self.sigma, SIGMA_CHOICES)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def kind(self) -> str:
        """The perturbation type as tables and statistics name it (bit choices other than the default apart)."""
        return PERTURBATIONS[self.name].kind(self)

    def label(self) -> str:
        return PERTURBATIONS[self.name].label(self)

    def dose(self) -> float:
        """Where this condition sits on its perturbation's dose axis."""
        return PERTURBATIONS[self.name].dose_of(self)


@dataclass
class OpContext:
    """What a perturbation may use besides the values (one weight matrix at a time)."""

    generator: torch.Generator  # CPU generator: draws are device-independent and reproducible
    matrix_std: float | torch.Tensor = 1.0  # std of the matrix each value comes from: scalar or (n,), fp32
    extra: dict[str, Any] = field(default_factory=dict)


PerturbFn = Callable[[torch.Tensor, PerturbSpec, OpContext], torch.Tensor]


def _sign_flip(values: torch.Tensor, spec: PerturbSpec, ctx: OpContext) -> torch.Tensor:
    return (values.float() * -spec.scale).to(values.dtype)


def _zero(values: torch.Tensor, spec: PerturbSpec, ctx: OpContext) -> torch.Tensor:
    return torch.zeros_like(values)


def _gauss_noise(values: torch.Tensor, spec: PerturbSpec, ctx: OpContext) -> torch.Tensor:
    w = values.float()  # (n,)
    noise = torch.randn(w.shape, generator=ctx.generator).to(w.device)  # (n,) drawn on CPU: reproducible
    sigma = w.abs() if spec.sigma == "abs" else torch.as_tensor(ctx.matrix_std, dtype=torch.float32).to(w.device)
    return (w + noise * sigma * spec.scale).to(values.dtype)


def bit_positions(dtype: torch.dtype, bits: str) -> list[int]:
    """Bit indices (0 = least significant) that `bits` may flip in a value of `dtype`."""
    if dtype not in BIT_LAYOUTS:
        raise EsaError(f"bit_flip supports storage dtypes {[str(d) for d in BIT_LAYOUTS]}, got {dtype}")
    _, total, sign, (elo, ehi) = BIT_LAYOUTS[dtype]
    return {
        "any": list(range(total)),
        "exponent": list(range(elo, ehi + 1)),
        "sign": [sign],
        "msb-exponent": [ehi],
        "lsb-exponent": [elo],  # the value doubles or halves: bounded, never overflows
    }[bits]


def flip_bits(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Flip bit `positions[i]` of `values[i]` (positions < 0: leave the value alone). Exact, via int views."""
    int_dtype, total, _, _ = BIT_LAYOUTS[values.dtype]
    # Work in int64 on the unsigned pattern: 1 << 31 (or 1 << 15) does not fit the signed view itself.
    full = (1 << total) - 1
    raw = values.contiguous().view(int_dtype).long() & full  # (n,) unsigned bit pattern
    pos = positions.to(raw.device).long()
    mask = torch.where(pos >= 0, torch.ones_like(pos) << pos.clamp(min=0), torch.zeros_like(pos))
    flipped = raw ^ mask
    signed = torch.where(flipped >= (1 << (total - 1)), flipped - (1 << total), flipped)  # back to two's compl.
    return signed.to(int_dtype).view(values.dtype)


def _bit_flip(values: torch.Tensor, spec: PerturbSpec, ctx: OpContext) -> torch.Tensor:
    allowed = torch.tensor(bit_positions(values.dtype, spec.bits))
    n = values.numel()
    hit = torch.rand(n, generator=ctx.generator) < spec.prob  # (n,) which weights get a flip
    choice = allowed[torch.randint(len(allowed), (n,), generator=ctx.generator)]  # (n,) which bit
    positions = torch.where(hit, choice, torch.full_like(choice, -1))
    return flip_bits(values, positions)


@dataclass(frozen=True)
class Perturbation:
    """Everything known about one perturbation: its function and how sweeps, tables and reports treat it."""

    name: str
    definition: str  # one line, printed into reports
    fn: PerturbFn
    dose: str | None  # the PerturbSpec field a dose-response varies ("scale", "prob"), None: one dose (1)
    bit_variants: bool = False  # `bits` picks a variant; non-default variants are analysed as types of their own
    matrix_std: bool = False  # needs each selected weight's matrix standard deviation (OpContext.matrix_std)
    float_bits: bool = False  # acts on the stored float bit pattern: bf16/fp16/fp32 parameters only

    def dose_of(self, spec: PerturbSpec) -> float:
        return 1.0 if self.dose is None else float(getattr(spec, self.dose))

    def kind(self, spec: PerturbSpec) -> str:
        return f"{self.name}[{spec.bits}]" if self.bit_variants and spec.bits != DEFAULT_BITS else self.name

    def label(self, spec: PerturbSpec) -> str:
        if self.dose == "prob":
            return f"{self.name}(p={spec.prob:g}{f',{spec.bits}' if self.bit_variants else ''})"
        return f"{self.name}(x{spec.scale:g})" if self.dose == "scale" else self.name

    def specs(self, scales: list[float], probs: list[float], bits: list[str]) -> list[PerturbSpec]:
        """The conditions of a sweep: one per dose (x bit variant)."""
        if self.dose == "scale":
            return [PerturbSpec(self.name, scale=s) for s in scales]
        if self.dose == "prob":
            return [PerturbSpec(self.name, prob=p, bits=b) for b in (bits if self.bit_variants else [DEFAULT_BITS])
                    for p in probs]
        return [PerturbSpec(self.name)]


PERTURBATIONS: Registry[Perturbation] = Registry("perturbation", (
    Perturbation("sign_flip", "w -> -scale * w", _sign_flip, "scale"),
    Perturbation("gauss_noise", "w + N(0, (scale * std(matrix))^2) (sigma='abs': std |w|)", _gauss_noise, "scale",
                 matrix_std=True),
    Perturbation("zero", "w -> 0", _zero, None),
    Perturbation("bit_flip", "with probability prob, flip one bit (of the chosen class) of the stored value",
                 _bit_flip, "prob", bit_variants=True, float_bits=True),
), base=Perturbation)


def sweep_specs(perturbations: list[str], scales: list[float], probs: list[float],
                bits: str | list[str] = DEFAULT_BITS) -> list[PerturbSpec]:
    """The PerturbSpec list of a sweep: every dose of each perturbation (x bit variants where it has them)."""
    bit_list = [bits] if isinstance(bits, str) else list(bits)
    return [spec for name in perturbations for spec in get_perturbation(name).specs(scales, probs, bit_list)]


def get_perturbation(name: str) -> Perturbation:
    return PERTURBATIONS.lookup(name)


def parse_perturbations(names: str | list[str]) -> list[str]:
    """'sign_flip,zero' or a list -> validated list of registry names."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    items = [n for n in items if n]
    if not items:
        raise EsaError("no perturbation given; accepted: " + ", ".join(sorted(PERTURBATIONS)))
    for n in items:
        PERTURBATIONS.lookup(n)
    return items


def parse_scales(value: float | str | list[float]) -> list[float]:
    """1.0, '0.005,0.01' or [..] -> list of validated (finite, >= 0) scales."""
    if isinstance(value, str):
        try:
            out = [float(v) for v in value.split(",") if v.strip()]
        except ValueError as e:
            raise EsaError(f"perturbation scale must be a number or a comma list of numbers, got {value!r}") from e
    elif isinstance(value, (list, tuple)):
        out = [float(v) for v in value]
    else:
        out = [float(value)]
    if not out:
        raise EsaError("no perturbation scale given")
    for s in out:
        if not (s >= 0) or s == float("inf"):
            raise EsaError(f"perturbation scale must be a finite number >= 0, got {s!r}")
    return out
