"""Full fine-tuning: the optimiser owns every weight (or every studied weight), the baseline of Phase 5.

Frozen weights (protection `freeze`) have their gradients zeroed before clipping and the optimiser step, so
they neither move nor count in the gradient norm, and their raw bit patterns are written back after each
step, so that even weight decay leaves them bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch

from esa.apps.training.base import Coef, InPlaceMethod, Penalty, check_frozen
from esa.errors import EsaError, unknown
from esa.models.inventory import WeightSpec
from esa.perturb.apply import INT_VIEW, Targets

SCOPES = ("all", "studied")


class DensePenalty(Penalty):
    """(strength / 2) * sum c (w - w0)^2 on weights the optimiser owns directly; exact gradient, no graph.

    Dense coefficients (a Fisher diagonal) cost one copy of w0 and two passes per step (foreach ops); index
    coefficients (the critical set) cost O(n)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], coefs: dict[str, Coef], strength: float) -> None:
        self.strength = float(strength)
        self.dense: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (p, c, w0)
        self.sparse: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (p, idx, c, w0)
        for name, coef in coefs.items():
            if name not in params:
                continue  # a weight the optimiser does not own never moves: its penalty stays 0
            p = params[name]
            with torch.no_grad():
                if coef.idx is None:
                    if tuple(coef.c.shape) != tuple(p.shape):
                        raise EsaError(f"penalty weights for {name} have shape {tuple(coef.c.shape)}, "
                                       f"the parameter {tuple(p.shape)}")
                    self.dense.append((p, coef.c.detach().to(p.device, p.dtype), p.detach().clone()))
                else:
                    idx = coef.idx.to(p.device).long()
                    self.sparse.append((p, idx, coef.c.detach().to(p.device, p.dtype).reshape(-1),
                                        p.detach().view(-1)[idx].clone()))

    def add_grad(self) -> None:
        with torch.no_grad():
            if self.dense:
                ps = [p for p, _, _ in self.dense]
                for p in ps:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                diffs = torch._foreach_sub([p.detach() for p in ps], [w0 for _, _, w0 in self.dense])
                torch._foreach_addcmul_([p.grad for p in ps], [c for _, c, _ in self.dense], diffs,
                                        value=self.strength)
            for p, idx, c, w0 in self.sparse:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.view(-1).index_add_(0, idx, self.strength * c * (p.detach().view(-1)[idx] - w0))

    def value(self) -> float:
        total = 0.0
        with torch.no_grad():
            for p, c, w0 in self.dense:
                total += float((c.double() * (p.detach().double() - w0.double()) ** 2).sum())
            for p, idx, c, w0 in self.sparse:
                total += float((c.double() * (p.detach().view(-1)[idx].double() - w0.double()) ** 2).sum())
        return 0.5 * self.strength * total


class FullFT(InPlaceMethod):
    """Every parameter (`scope="all"`) or every studied weight (`scope="studied"`, needs `inventory`) trains."""

    name = "full"

    def __init__(self, scope: str = "all", inventory: list[WeightSpec] | None = None,
                 decay_matrices_only: bool = True) -> None:
        if scope not in SCOPES:
            raise unknown("full fine-tuning scope", scope, SCOPES)
        if scope == "studied" and not inventory:
            raise EsaError("full fine-tuning with scope='studied' needs the weight inventory")
        self.scope = scope
        self.names = [s.name for s in inventory] if scope == "studied" and inventory else None
        self.decay_matrices_only = decay_matrices_only  # AdamW practice: no decay on norms and biases
        self.model: torch.nn.Module | None = None
        self.params: dict[str, torch.nn.Parameter] = {}
        self._frozen: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def prepare(self, model: torch.nn.Module, frozen: Targets | None = None) -> torch.nn.Module:
        self.model = model
        named = dict(model.named_parameters())
        names = self.names if self.names is not None else list(named)
        low = sorted({str(named[n].dtype).removeprefix("torch.") for n in names if named[n].dtype != torch.float32})
        if low:  # AdamW writes straight into the weights: they are the master weights, and must be fp32
            raise EsaError(f"full fine-tuning needs fp32 weights, the model has {', '.join(low)}: AdamW steps of "
                           "~1e-4 of a weight round away in bf16 (8 significant bits), which would handicap the full "
                           "baseline against sparse FT and LoRA (fp32 deltas and adapters); load the model in float32 "
                           "(dtype: float32; autocast still computes in bf16 on a GPU)")
        model.requires_grad_(False)
        self.params = {n: named[n] for n in names}
        for p in self.params.values():
            p.requires_grad_(True)
        self._frozen = []
        for name, p in check_frozen(model, frozen or {}).items():
            idx = frozen[name].to(p.device).long()  # type: ignore[index]
            if idx.numel() == 0 or name not in self.params:
                continue
            ints = p.detach().view(INT_VIEW[p.dtype]).view(-1)  # shares storage: raw bit patterns
            self._frozen.append((p, idx, ints, ints[idx].clone()))
        return model

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        if not self.decay_matrices_only:
            return super().param_groups(weight_decay)
        decay = [p for p in self.params.values() if p.dim() >= 2]
        rest = [p for p in self.params.values() if p.dim() < 2]
        return [g for g in ({"params": decay, "weight_decay": weight_decay},
                            {"params": rest, "weight_decay": 0.0}) if g["params"]]

    def before_step(self) -> None:
        with torch.no_grad():
            for p, idx, _, _ in self._frozen:
                if p.grad is not None:
                    p.grad.view(-1).index_fill_(0, idx, 0)

    def after_step(self) -> None:
        with torch.no_grad():
            for _, idx, ints, raw in self._frozen:
                ints.index_copy_(0, idx, raw)

    def quadratic(self, coefs: dict[str, Coef], strength: float) -> Penalty:
        return DensePenalty(self.params, coefs, strength)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise EsaError(f"checkpoint lacks trained weights {missing[:3]}")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])

    def signature(self) -> dict[str, Any]:
        return {**super().signature(), "scope": self.scope, "n_frozen": sum(int(i.numel()) for _, i, _, _ in self._frozen)}

    def finish(self) -> torch.nn.Module:
        model = self._model()
        self.close()
        return model

    def close(self) -> None:
        if self.model is not None:
            self.model.requires_grad_(False)
