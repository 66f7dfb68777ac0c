"""LoRA through `peft` (the kept library; no hand-written LoRA), at a trainable count matched to a sparse set.

Targets: the studied nn.Linear weights (the same matrices sparse fine-tuning selects from), so the two
compare at equal trainable count on the same weights. A module of shape (out, in) at rank r trains
r * (in + out) numbers. `plan_lora` picks the ranks for a requested count N: every module gets
r = N // S (S = sum of in + out), and the remainder is filled by giving rank r + 1 to modules taken in a
fixed order that spreads them over the layers (peft's `rank_pattern`), until no further module fits; the
planned count then misses N by less than one module's in + out. A count below S (rank 1 everywhere) cannot
be matched and is refused, as is a plan that misses N by more than `tolerance`. The scale alpha / r is the
same for every module (`alpha_per_rank`). Dropout 0 and a seeded initialisation make runs reproducible.

Protections: `anchor` and `ewc` act on the effective update s * B @ A (gathered at the critical indices, or
dense per matrix for a Fisher diagonal, which costs one (out, in) product per matrix and step); `freeze`
cannot hold single weights of a low-rank update fixed and is refused.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from esa.apps.training.base import Coef, Method, Penalty
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.perturb.apply import Targets

ADAPTER = "default"
_SPREAD = (math.sqrt(5) - 1) / 2  # golden-ratio stride: consecutive picks land far apart in the layer order


@dataclass(frozen=True)
class LoraPlan:
    ranks: dict[str, int]  # module name -> rank
    n_trainable: int
    requested: int | None

    @property
    def base_rank(self) -> int:
        return min(self.ranks.values())

    def describe(self) -> dict[str, Any]:
        rs = list(self.ranks.values())
        return dict(n_trainable=self.n_trainable, requested=self.requested, rank_min=min(rs), rank_max=max(rs),
                    n_modules=len(rs), n_at_rank_max=sum(r == max(rs) for r in rs))


def lora_specs(inventory: list[WeightSpec]) -> list[WeightSpec]:
    """The studied weights LoRA can adapt: 2-D (dense) matrices; MoE expert tensors are left out."""
    specs = [s for s in inventory if not s.n_experts and len(s.shape) == 2 and s.kind != "router"]
    if not specs:
        raise EsaError("LoRA needs dense 2-D linear weights; the inventory has none")
    return specs


def plan_lora(inventory: list[WeightSpec], n_trainable: int | None = None, rank: int | None = None,
              tolerance: float = 0.01) -> LoraPlan:
    """Ranks per module for a requested trainable count (or one rank for all); EsaError if it cannot match."""
    specs = lora_specs(inventory)
    cost = {s.module: s.rows + s.cols for s in specs}  # numbers per unit of rank
    total = sum(cost.values())
    if n_trainable is not None and (isinstance(n_trainable, bool) or int(n_trainable) != n_trainable
                                    or n_trainable <= 0):
        raise EsaError(f"LoRA trainable count must be a positive integer, got {n_trainable!r}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise EsaError(f"LoRA rank must be a positive integer, got {rank!r}")
        plan = LoraPlan({m: rank for m in cost}, rank * total, n_trainable)
    elif n_trainable is None:
        raise EsaError("LoRA needs a rank or a trainable count to match")
    else:
        n = int(n_trainable)
        base = n // total
        if base == 0:
            raise EsaError(
                f"LoRA cannot match {n} trainable parameters: rank 1 on the {len(cost)} target matrices already "
                f"trains {total}; use a larger density (at least {total / sum(s.numel for s in specs):.3%} of "
                "these weights) or fewer target matrices")
        ranks = dict.fromkeys(cost, base)
        left = n - base * total
        names = list(cost)
        for i in sorted(range(len(names)), key=lambda i: (i * _SPREAD) % 1.0):
            if cost[names[i]] <= left:
                ranks[names[i]] += 1
                left -= cost[names[i]]
        plan = LoraPlan(ranks, n - left, n)
    if plan.requested is not None:
        miss = abs(plan.n_trainable - plan.requested) / plan.requested
        if miss > tolerance:
            how = (f"at rank {rank}" if rank is not None else
                   f"at ranks {min(plan.ranks.values())}-{max(plan.ranks.values())} (the closest plan)")
            hint = "give the count, not a rank" if rank is not None else "use a larger count or a larger tolerance"
            raise EsaError(f"LoRA {how} trains {plan.n_trainable} parameters, {miss:.1%} away from the requested "
                           f"{plan.requested} (tolerance {tolerance:.1%}); {hint}")
    return plan


class LoraPenalty(Penalty):
    """(strength / 2) * sum c (s B A)_ij^2: a differentiable loss term on the LoRA factors."""

    def __init__(self, layers: dict[str, Any], coefs: dict[str, Coef], strength: float) -> None:
        self.strength = float(strength)
        self.terms: list[tuple[Any, torch.Tensor | None, torch.Tensor]] = []  # (lora layer, idx, c)
        for name, coef in coefs.items():
            layer = layers.get(name[: -len(".weight")] if name.endswith(".weight") else name)
            if layer is None:
                continue  # not adapted: never moves
            w = layer.base_layer.weight
            if coef.idx is None:
                if tuple(coef.c.shape) != tuple(w.shape):
                    raise EsaError(f"penalty weights for {name} have shape {tuple(coef.c.shape)}, the weight "
                                   f"{tuple(w.shape)}")
                self.terms.append((layer, None, coef.c.detach().to(w.device).float()))
            else:
                self.terms.append((layer, coef.idx.to(w.device).long(), coef.c.detach().reshape(-1).to(w.device).float()))

    def loss(self) -> torch.Tensor | None:
        if not self.terms:
            return None
        total = None
        for layer, idx, c in self.terms:
            d = _update(layer, idx)
            term = (c * d * d).sum()
            total = term if total is None else total + term
        return 0.5 * self.strength * total  # type: ignore[operator]

    def value(self) -> float:
        with torch.no_grad():
            out = self.loss()
        return 0.0 if out is None else float(out)


def _update(layer: Any, idx: torch.Tensor | None) -> torch.Tensor:
    """The layer's effective weight change s * B @ A, dense (out, in) or at flat `idx` (n,). fp32."""
    a = layer.lora_A[ADAPTER].weight.float()  # (r, in)
    b = layer.lora_B[ADAPTER].weight.float()  # (out, r)
    s = float(layer.scaling[ADAPTER])
    if idx is None:
        return s * (b @ a)
    cols = a.shape[1]
    rows, cs = idx // cols, idx % cols
    return s * (b[rows] * a[:, cs].t()).sum(-1)  # (n,)


class LoraFT(Method):
    """LoRA adapters on the studied linear weights at a planned rank; merged into the weights at `finish`."""

    name = "lora"
    supports_freeze = False

    def __init__(self, inventory: list[WeightSpec], n_trainable: int | None = None, rank: int | None = None,
                 alpha_per_rank: float = 2.0, tolerance: float = 0.01, seed: int = 0) -> None:
        self.plan = plan_lora(inventory, n_trainable=n_trainable, rank=rank, tolerance=tolerance)
        self.alpha_per_rank = float(alpha_per_rank)
        self.seed = int(seed)
        self.peft: Any = None
        self.layers: dict[str, Any] = {}  # module name in the base model -> peft LoRA layer

    def config(self) -> LoraConfig:
        base = self.plan.base_rank
        extra = {re.escape(m): r for m, r in self.plan.ranks.items() if r != base}
        return LoraConfig(r=base, lora_alpha=self.alpha_per_rank * base, target_modules=list(self.plan.ranks),
                          rank_pattern=extra, alpha_pattern={k: self.alpha_per_rank * r for k, r in extra.items()},
                          lora_dropout=0.0, bias="none")

    def prepare(self, model: torch.nn.Module, frozen: Targets | None = None) -> torch.nn.Module:
        if frozen and any(v.numel() for v in frozen.values()):
            raise EsaError("LoRA cannot freeze single weights (a low-rank update moves whole rows and columns); "
                           "use protection none, anchor or ewc with method lora")
        self.close()
        model.requires_grad_(False)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            # peft asks the model `is_gradient_checkpointing`, which transformers 5 flags as deprecated on
            # every call; nothing here uses gradient checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            torch.manual_seed(self.seed)  # peft draws A from the global generator
            self.peft = get_peft_model(model, self.config())
        base = self.peft.get_base_model()
        self.layers = {m: base.get_submodule(m) for m in self.plan.ranks}
        n = self.n_trainable
        if n != self.plan.n_trainable:
            raise EsaError(f"peft built {n} trainable parameters, the plan {self.plan.n_trainable}")
        return self.peft

    def trainable(self) -> list[torch.nn.Parameter]:
        if self.peft is None:
            return []
        return [p for p in self.peft.parameters() if p.requires_grad]

    @property
    def n_trainable(self) -> int:
        return int(sum(p.numel() for p in self.trainable())) if self.peft is not None else self.plan.n_trainable

    def quadratic(self, coefs: dict[str, Coef], strength: float) -> Penalty:
        return LoraPenalty(self.layers, coefs, strength)

    def weight_values(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        with torch.no_grad():
            layer = self.layers.get(module)
            if layer is None:
                w = self.peft.get_base_model().get_parameter(name)
                return w.detach().view(-1)[idx.to(w.device)].float().cpu()
            w = layer.base_layer.weight
            idx = idx.to(w.device)
            return (w.detach().view(-1)[idx].float() + _update(layer, idx)).cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.peft.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {n: p for n, p in self.peft.named_parameters() if p.requires_grad}
        if set(own) != set(state):
            raise EsaError("checkpoint's LoRA parameters do not match this LoRA plan")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n])

    def signature(self) -> dict[str, Any]:
        return {**super().signature(), **self.plan.describe(), "alpha_per_rank": self.alpha_per_rank,
                "seed": self.seed}

    def finish(self) -> torch.nn.Module:
        """Merge the adapters into the base weights (peft's merge) and return the plain model."""
        if self.peft is None:
            raise EsaError("the method has not been prepared on a model")
        model = self.peft.merge_and_unload()
        model.requires_grad_(False)
        self.peft, self.layers = None, {}
        return model

    def close(self) -> None:
        """Drop the adapters unmerged: the base weights were never written, so the model is the base again."""
        if self.peft is not None:
            self.peft.unload().requires_grad_(False)
            self.peft, self.layers = None, {}
