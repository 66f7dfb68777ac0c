"""What every fine-tuning method gives the training loop and the retention variants: the `Method` interface.

A method decides which numbers the optimiser owns (all weights, a flat delta per selected set, LoRA factors)
and how they reach the model. The loop only ever calls this interface, so adding a method is one class and
one registry entry (`esa.apps.training.methods.METHODS`).

Protections need two capabilities of a method, both stated in terms of the *effective* weights w (what the
forward pass uses) and the base weights w0 (the model as handed to `prepare`):
- `prepare(model, frozen=T)`: the weights in T keep their base values bit-exactly for the whole run;
- `quadratic(coefs, strength)`: a penalty (strength / 2) * sum_i c_i (w_i - w0_i)^2 over the given weights,
  returned as a `Penalty` that either adds its exact gradient to the trainables' `.grad` (cheap, no graph)
  or gives a differentiable loss term.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from esa.errors import EsaError
from esa.perturb.apply import Targets


@dataclass
class Coef:
    """Penalty weights for one parameter: `idx` None -> `c` has the parameter's shape (dense, e.g. a Fisher
    diagonal); else `c` is (n,) for the flat indices `idx` (e.g. ones on the critical set)."""

    c: torch.Tensor
    idx: torch.Tensor | None = None


class Penalty(ABC):
    """A quadratic pull towards the base weights, built by `Method.quadratic`."""

    strength: float

    def loss(self) -> torch.Tensor | None:
        """A differentiable term to add to the training loss, or None when `add_grad` does the work."""
        return None

    def add_grad(self) -> None:
        """Add the penalty's exact gradient to the trainables' `.grad` (after backward, before clipping)."""
        return None  # default: nothing to do

    @abstractmethod
    def value(self) -> float:
        """The penalty's current value (for logs; may cost a pass over the penalised weights)."""


class Method(ABC):
    """One way of fine-tuning. Lifecycle: construct (validates, no work) -> prepare -> steps -> finish."""

    name: ClassVar[str]
    supports_freeze: ClassVar[bool] = True

    @abstractmethod
    def prepare(self, model: torch.nn.Module, frozen: Targets | None = None) -> torch.nn.Module:
        """Make `model` trainable by this method; returns the module to call (may wrap `model`)."""

    @abstractmethod
    def trainable(self) -> list[torch.nn.Parameter]:
        """The tensors the optimiser owns (the only ones with optimiser state)."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": self.trainable(), "weight_decay": weight_decay}]

    @property
    def n_trainable(self) -> int:
        return int(sum(p.numel() for p in self.trainable()))

    def before_step(self) -> None:
        """After backward, before clipping and the optimiser step (e.g. mask the gradients of frozen weights)."""
        return None  # default: nothing to do

    def after_step(self) -> None:
        """After the optimiser step (e.g. write the deltas into the weights, restore frozen weights)."""
        return None  # default: nothing to do

    @abstractmethod
    def quadratic(self, coefs: dict[str, Coef], strength: float) -> Penalty:
        """The penalty (strength / 2) * sum c (w - w0)^2 over the weights named in `coefs`."""

    @abstractmethod
    def weight_values(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Effective values (fp32, detached, CPU) of parameter `name` (its name in the base model) at flat `idx`."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to restore the trained state onto a freshly prepared base model."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def signature(self) -> dict[str, Any]:
        """What identifies this method's set-up in a checkpoint (a resume with another set-up is refused)."""
        return {"method": self.name, "n_trainable": self.n_trainable}

    @abstractmethod
    def finish(self) -> torch.nn.Module:
        """End training: remove hooks/wrappers; returns the plain model holding the trained weights."""

    def close(self) -> None:
        """Remove hooks after a failed run (weights stay as of the last step). Safe to call twice."""
        return None  # default: nothing to do


def check_frozen(model: torch.nn.Module, frozen: Targets) -> dict[str, torch.nn.Parameter]:
    """The parameters a frozen set names, with its indices checked against their sizes."""
    params = dict(model.named_parameters())
    out = {}
    for name, idx in frozen.items():
        if name not in params:
            raise EsaError(f"frozen set names parameter {name!r}, which is not in the model")
        p = params[name]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise EsaError(f"frozen indices out of range for {name} ({p.numel()} weights)")
        out[name] = p
    return out


class InPlaceMethod(Method):
    """A method that trains the base model's own parameters (full, sparse): it keeps the prepared model, and
    a weight's effective value is read straight from it."""

    model: torch.nn.Module | None = None

    def weight_values(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        p = self._model().get_parameter(name)
        return p.detach().view(-1)[idx.to(p.device)].float().cpu()

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise EsaError("the method has not been prepared on a model")
        return self.model
