"""Sparse fine-tuning: train only a selected set of weights, with optimiser state that grows with k, not the model.

The optimiser owns one flat fp32 delta per selected parameter, `delta` of shape (n,) for the n selected flat
indices `idx` of that parameter; the model's weights stay frozen (no `.grad`, no Adam moments). After every
optimiser step the effective weights are written in place, `W.view(-1)[idx] = base + delta` (computed in
fp32, cast to W's dtype), so the forward pass needs no extra work and every unselected weight stays
bit-identical to the base model. The same formula re-applies an exported delta bit-exactly
(`esa.apps.training.export`).

Gradients of the deltas, two backends:
- `sampled` (nn.Linear weights): an identity node on the Linear's output carries the delta into the graph;
  its backward computes only the selected entries of dL/dW = dy^T x, grad[n] = sum_t dy[t, r_n] x[t, c_n],
  as a sampled dense-dense product (`torch.sparse.sampled_addmm` on the CSR pattern of the selection). The
  dense weight gradient is never formed, so a step costs a frozen-weight forward + backward (as LoRA's does)
  plus the sampled product and the saved Linear input.
- `dense` (any other parameter: 3-D MoE experts, embeddings): the weight gets a dense `.grad` for the moment
  autograd finishes it; a post-accumulate hook gathers the selected entries into the delta's grad and frees
  it at once. The step costs what full fine-tuning's backward does; the optimiser state is still O(k).

`frozen` (protection `freeze`) removes weights from the selection: they are never written.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from esa.apps.training.base import Coef, InPlaceMethod, Penalty, check_frozen
from esa.errors import EsaError, unknown
from esa.hooks import Call, hooked
from esa.models.inventory import WeightSpec
from esa.perturb.apply import Targets
from esa.sensitivity.select import topk_flat

BACKENDS = ("auto", "sampled", "dense")


def check_density(density: object, where: str = "density") -> float:
    """`density` as a float in (0, 1] (the fraction of the studied weights to train), else one EsaError naming
    `where` (a settings key or a flag)."""
    ok = isinstance(density, int | float) and not isinstance(density, bool) and math.isfinite(float(density))
    if not ok or not 0.0 < float(density) <= 1.0:  # type: ignore[arg-type]
        raise EsaError(f"{where} must lie in (0, 1] (a fraction of the studied weights; 0.001 = 0.1%), "
                       f"got {density!r}")
    return float(density)  # type: ignore[arg-type]


def per_matrix_count(density: float, spec: WeightSpec) -> int:
    """Weights a density selects in each matrix of `spec` (an expert slice is a matrix of its own)."""
    return round(density * spec.rows * spec.cols)


def count_at_density(density: float, inventory: list[WeightSpec]) -> int:
    """How many weights a per-matrix selection at `density` trains; an EsaError when that is none."""
    density = check_density(density)
    k = sum(per_matrix_count(density, s) * max(1, s.n_experts) for s in inventory)
    if k == 0:
        total = sum(s.numel for s in inventory)
        raise EsaError(f"density {density:g} selects no weight: every matrix has fewer than {1 / density:.0f} "
                       f"weights ({total} studied weights); raise the density")
    return k


def targets_at_density(scores: dict[str, torch.Tensor], inventory: list[WeightSpec], density: float) -> Targets:
    """Per matrix, the round(density x matrix size) highest-scoring weights (ties -> lower flat index first).

    The same count per matrix as the random-k control of `esa.perturb.controls` draws."""
    count_at_density(density, inventory)  # validates, and refuses a density that selects nothing
    out: Targets = {}
    for spec in inventory:
        if spec.name not in scores:
            raise EsaError(f"no scores for {spec.name}")
        flat = scores[spec.name].reshape(-1)
        n, size = per_matrix_count(density, spec), spec.rows * spec.cols
        parts = [topk_flat(flat[off : off + size], n)[1].cpu() + off
                 for off in range(0, spec.numel, size)] if n else []
        if parts:
            out[spec.name] = torch.sort(torch.cat(parts)).values
    return out


class _SampledGrad(torch.autograd.Function):
    """Identity on a Linear's output y that makes y depend on the delta of its selected weights."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, entry: _Entry) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.entry = entry
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        return dy, None, ctx.entry.sampled_grad(dy, x), None


@dataclass
class _Entry:
    """One selected parameter: flat indices, base values, the trained delta and how its gradient is found."""

    name: str
    param: torch.nn.Parameter  # the model's weight (frozen for `sampled`)
    idx: torch.Tensor  # (n,) sorted flat indices, on the weight's device
    base: torch.Tensor  # (n,) fp32 base values (exact: every float format here embeds in fp32)
    delta: torch.nn.Parameter  # (n,) fp32, what the optimiser owns
    backend: str
    module: str = ""  # owning nn.Linear (sampled)
    pattern: torch.Tensor | None = None  # (out, in) CSR pattern of idx, zero values (sampled)

    def sampled_grad(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Selected entries of dy^T x: (n,) in CSR order, which is sorted flat order."""
        d = dy.reshape(-1, dy.shape[-1]).float()  # (B*T, out)
        xs = x.reshape(-1, x.shape[-1]).float()  # (B*T, in)
        return torch.sparse.sampled_addmm(self.pattern, d.t(), xs, beta=0.0).values()  # type: ignore[arg-type]

    def write(self) -> None:
        """W[idx] = base + delta, in fp32 then cast: the formula an exported delta re-applies."""
        with torch.no_grad():
            # index_copy_, not `flat[idx] = v`: on CPU the indexed assignment costs ~8x more per step
            self.param.view(-1).index_copy_(0, self.idx, (self.base + self.delta).to(self.param.dtype))


def _csr_pattern(idx: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = idx // cols, idx % cols  # idx sorted -> rows ascending, columns ascending within a row (CSR order)
    crow = torch.zeros(rows + 1, dtype=torch.long, device=idx.device)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=rows), 0)
    with warnings.catch_warnings():  # torch flags CSR as beta on every construction; the use here is tested
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, c, torch.zeros(idx.numel(), device=idx.device), size=(rows, cols),
                                       check_invariants=True)


def _is_plain_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


class SparsePenalty(Penalty):
    """(strength / 2) * sum c delta^2 over the selected weights that carry a coefficient; O(k), exact gradient.

    w - w0 is the delta (the written weight is base + delta rounded to the weight's dtype)."""

    def __init__(self, entries: list[_Entry], coefs: dict[str, Coef], strength: float) -> None:
        self.strength = float(strength)
        self.terms: list[tuple[torch.nn.Parameter, torch.Tensor | None, torch.Tensor]] = []  # (delta, pos, c)
        for e in entries:
            if e.name not in coefs:
                continue
            coef = coefs[e.name]
            if coef.idx is None:  # dense coefficients: read them at the selected weights
                if coef.c.numel() != e.param.numel():
                    raise EsaError(f"penalty weights for {e.name} have {coef.c.numel()} entries, the parameter "
                                   f"{e.param.numel()}")
                c = coef.c.reshape(-1).to(e.idx.device)[e.idx].float()
                self.terms.append((e.delta, None, c))
                continue
            want = coef.idx.to(e.idx.device).long()
            pos = torch.searchsorted(e.idx, want).clamp(max=e.idx.numel() - 1)
            hit = e.idx[pos] == want  # penalised weights that are trained; the others never move
            if bool(hit.any()):
                self.terms.append((e.delta, pos[hit], coef.c.reshape(-1).to(e.idx.device)[hit].float()))

    def add_grad(self) -> None:
        with torch.no_grad():
            for delta, pos, c in self.terms:
                if delta.grad is None:
                    delta.grad = torch.zeros_like(delta)
                if pos is None:
                    delta.grad.addcmul_(c, delta, value=self.strength)
                else:
                    delta.grad.index_add_(0, pos, self.strength * c * delta[pos])

    def value(self) -> float:
        with torch.no_grad():
            total = sum(float((c.double() * (delta if pos is None else delta[pos]).double() ** 2).sum())
                        for delta, pos, c in self.terms)
        return 0.5 * self.strength * total


class SparseFT(InPlaceMethod):
    """Train `targets` (param -> flat indices) only. `backend`: auto (sampled for nn.Linear, else dense)."""

    name = "sparse"

    def __init__(self, targets: Targets, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise unknown("sparse fine-tuning backend", backend, BACKENDS)
        if not targets or sum(int(v.numel()) for v in targets.values()) == 0:
            raise EsaError("sparse fine-tuning needs a non-empty selection (param -> flat indices)")
        self.targets = {k: torch.unique(v.long().cpu()) for k, v in targets.items() if v.numel()}
        self.backend = backend
        self.entries: list[_Entry] = []
        self.model: torch.nn.Module | None = None
        self.n_removed = 0
        self._stack: contextlib.ExitStack | None = None

    def prepare(self, model: torch.nn.Module, frozen: Targets | None = None) -> torch.nn.Module:
        self.close()
        self.model = model
        model.requires_grad_(False)
        check_frozen(model, self.targets)
        frozen = frozen or {}
        check_frozen(model, frozen)
        self.entries, self.n_removed = [], 0
        for name, idx in self.targets.items():
            if name in frozen and frozen[name].numel():
                keep = ~torch.isin(idx, frozen[name].cpu())
                self.n_removed += int((~keep).sum())
                idx = idx[keep]
            if idx.numel():
                self.entries.append(self._entry(model, name, idx))
        if not self.entries:
            raise EsaError("the frozen set covers the whole selection: nothing is left to train")
        self._stack = contextlib.ExitStack()
        sampled = {e.module: e for e in self.entries if e.backend == "sampled"}
        if sampled:
            self._stack.enter_context(hooked(model, {m: self._hook(e) for m, e in sampled.items()}))
        for e in self.entries:
            if e.backend == "dense":
                e.param.requires_grad_(True)
                self._stack.callback(e.param.requires_grad_, False)
                self._stack.callback(e.param.register_post_accumulate_grad_hook(self._gather(e)).remove)
        return model

    def _entry(self, model: torch.nn.Module, name: str, idx: torch.Tensor) -> _Entry:
        p = model.get_parameter(name)
        if not p.is_contiguous():
            raise EsaError(f"parameter {name} is not contiguous; cannot write its selected weights in place")
        idx = idx.to(p.device)
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        owner = model.get_submodule(module_name) if module_name else model
        linear = _is_plain_linear(owner) and owner.weight is p
        backend = self.backend if self.backend != "auto" else ("sampled" if linear else "dense")
        if backend == "sampled" and not linear:
            raise EsaError(f"backend 'sampled' needs an nn.Linear weight; {name} is not one (use 'dense' or 'auto')")
        delta = torch.nn.Parameter(torch.zeros(idx.numel(), dtype=torch.float32, device=p.device))
        base = p.detach().view(-1)[idx].float().clone()
        pattern = _csr_pattern(idx, p.shape[0], p.shape[1]) if backend == "sampled" else None
        return _Entry(name, p, idx, base, delta, backend, module_name, pattern)

    @staticmethod
    def _hook(e: _Entry):
        def fn(call: Call) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None  # evaluation: the weights already hold base + delta
            return _SampledGrad.apply(call.output, call.input.detach(), e.delta, e)
        return fn

    @staticmethod
    def _gather(e: _Entry):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.view(-1)[e.idx].float()  # type: ignore[union-attr]
            e.delta.grad = g if e.delta.grad is None else e.delta.grad + g
            p.grad = None  # the dense gradient lives only until its selected entries are read
        return hook

    def trainable(self) -> list[torch.nn.Parameter]:
        return [e.delta for e in self.entries]

    def after_step(self) -> None:
        for e in self.entries:
            e.write()

    def quadratic(self, coefs: dict[str, Coef], strength: float) -> Penalty:
        return SparsePenalty(self.entries, coefs, strength)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {e.name: e.delta.detach() for e in self.entries}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for e in self.entries:
            if e.name not in state or state[e.name].shape != e.delta.shape:
                raise EsaError(f"checkpoint has no delta of {e.delta.numel()} weights for {e.name}")
            with torch.no_grad():
                e.delta.copy_(state[e.name])
            e.write()

    def selection(self) -> Targets:
        """The weights actually trained (the targets minus any frozen ones), on CPU."""
        return {e.name: e.idx.cpu() for e in self.entries}

    def base_values(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """param -> (flat idx, base values in the weight's dtype), both on CPU: what export needs."""
        return {e.name: (e.idx.cpu(), e.base.to(e.param.dtype).cpu()) for e in self.entries}

    def signature(self) -> dict[str, Any]:
        return {**super().signature(), "n_removed": self.n_removed,
                "backends": sorted({e.backend for e in self.entries})}

    def finish(self) -> torch.nn.Module:
        model = self._model()
        self.close()
        return model

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
