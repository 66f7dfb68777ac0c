"""Calibration for pruning: layer-sequential (as Wanda and SparseGPT prune) or one dense pass.

- `sequential`: block l is calibrated on the outputs of blocks 0..l-1 *after* they were pruned. The inputs
  of every block are captured once by running the model with each block's forward replaced by a recorder
  that passes its input through (embeddings, masks and rotary tables are computed by the model itself, so
  each block gets exactly the keyword arguments it gets in a real forward -- Gemma's per-layer masks too).
  Then, per block: one dense pass of the block over the calibration batches gathers its linears' input
  statistics (hooks), the method decides, the decision is written into the model in place, and a second
  pass of the now-pruned block produces the next block's inputs. That is two block passes per block, the
  cost Wanda and SparseGPT pay; gradient scorers instead re-score each block with one forward+backward
  of the whole (partly pruned) model, one per block.
- `one-shot`: one dense forward (stopped after the last block: no LM head) gathers every linear's
  statistics, or one gradient pass scores every weight; all blocks are decided from the dense model.
- `none`: data-free scorers (magnitude, random) decide from the weights alone.
Peak memory: the model, the method's accumulators, and one block's calibration activations (the inputs of
every calibration window at the current block, plus one batch's activations inside it).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from esa.apps.pruning.core import Decision, InputStats, Job
from esa.apps.pruning.sparsity_patterns import Pattern
from esa.dispatch import input_device
from esa.errors import EsaError
from esa.hooks import Call, hooked
from esa.models.inventory import WeightSpec
from esa.progress import progress

_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.(\d+))\.")


class _Stop(Exception):
    """Raised after the last block to end a calibration forward early (the LM head is never needed)."""


@dataclass
class Block:
    index: int
    name: str
    module: torch.nn.Module
    specs: list[WeightSpec]


def find_blocks(model: torch.nn.Module, specs: list[WeightSpec]) -> list[Block]:
    """The transformer blocks holding `specs`, in execution order (by block index)."""
    by_name: dict[str, Block] = {}
    for s in specs:
        m = _BLOCK.match(s.name)
        if not m:
            raise EsaError(f"cannot tell which transformer block {s.name} belongs to (expected '...layers.<i>.')")
        name = m.group(1)
        if name not in by_name:
            by_name[name] = Block(int(m.group(2)), name, model.get_submodule(name), [])
        by_name[name].specs.append(s)
    blocks = sorted(by_name.values(), key=lambda b: b.index)
    if len({b.index for b in blocks}) != len(blocks):
        raise EsaError(f"pruned weights live in several block lists ({sorted(by_name)[:4]}); prune one stack at a time")
    return blocks


def batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]


# ---------------------------------------------------------------- statistics
class StatsHooks:
    """Pre-hooks accumulating each linear's InputStats; consecutive calls on the very same tensor share one."""

    def __init__(self, names: list[str], hessian: bool) -> None:
        self.names, self.hessian = names, hessian
        self.stats: dict[str, InputStats] = {}
        self._last: tuple[Any, InputStats] | None = None  # (input tensor, its stats): a strong ref, no id reuse

    def __call__(self, call: Call) -> None:
        x = call.input
        if self._last is not None and self._last[0] is x:
            st = self._last[1]  # q/k/v (gate/up) read the same normalised hidden states: gather once
        else:
            st = self.stats.get(call.name) or InputStats()
            st.add(x, self.hessian)
        if self.stats.setdefault(call.name, st) is not st:
            raise EsaError(f"{call.name} shares its input with different layers from one batch to the next")
        self._last = (x, st)

    def callbacks(self) -> dict[str, Callable[[Call], None]]:
        return {n: self for n in self.names}

    def done(self) -> dict[str, InputStats]:
        self._last = None
        return self.stats


def _modules(specs: list[WeightSpec]) -> list[str]:
    return list(dict.fromkeys(s.module for s in specs))


@torch.no_grad()
def dense_stats(model: torch.nn.Module, blocks: list[Block], ids: torch.Tensor, batch_size: int, hessian: bool,
                show_progress: bool = False) -> dict[str, InputStats]:
    """One dense forward per batch (stopped after the last block) gathering every pruned linear's stats."""
    specs = [s for b in blocks for s in b.specs]
    hooks = StatsHooks(_modules(specs), hessian)

    def stop(call: Call) -> None:
        raise _Stop

    dev = input_device(model)
    with hooked(model, hooks.callbacks(), pre=True), hooked(model, {blocks[-1].name: stop}):
        for batch in progress(batches(ids, batch_size), desc="calibration", disable=not show_progress):
            with contextlib.suppress(_Stop):
                model(input_ids=batch.to(dev), use_cache=False)
    stats = hooks.done()
    return {s.name: stats[s.module] for s in specs}


# ---------------------------------------------------------------- block inputs
@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # per batch: the current block's input (B, T, H)
    calls: list[list[tuple[tuple, dict[str, Any]]]]  # per block, per batch: the other args and kwargs


@torch.no_grad()
def capture_inputs(model: torch.nn.Module, blocks: list[Block], ids: torch.Tensor, batch_size: int) -> BlockInputs:
    """Block 0's input and every block's other arguments, per batch, without running any block."""
    calls: list[list[tuple[tuple, dict[str, Any]]]] = [[] for _ in blocks]
    hidden: list[torch.Tensor] = []

    def recorder(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            h = args[0] if args else kwargs.pop("hidden_states")
            calls[i].append((tuple(args[1:]), kwargs))
            if i == 0:
                hidden.append(h)
            elif h.shape != hidden[-1].shape:
                raise EsaError(f"block {blocks[i].name} received hidden states of shape {tuple(h.shape)}, block 0 "
                               f"{tuple(hidden[-1].shape)}: this architecture's block outputs cannot be passed through")
            if i == len(blocks) - 1:
                raise _Stop
            return h

        return forward

    saved = [(b.module, b.module.__dict__.get("forward")) for b in blocks]  # accelerate may own an instance forward
    dev = input_device(model)
    try:
        for i, b in enumerate(blocks):
            b.module.forward = recorder(i)
        for batch in batches(ids, batch_size):
            try:
                model(input_ids=batch.to(dev), use_cache=False)
            except _Stop:
                continue
            raise EsaError(f"the model's forward never reached block {blocks[-1].name}; cannot calibrate its blocks")
    finally:
        for module, fwd in saved:
            if fwd is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = fwd
    return BlockInputs(hidden, calls)


def block_forward(block: Block, h: torch.Tensor, call: tuple[tuple, dict[str, Any]]) -> torch.Tensor:
    out = block.module(h, *call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- the drivers
@dataclass
class Plan:
    """Everything a calibration run needs; `emit` records decisions, `write` applies them in place."""

    model: torch.nn.Module
    blocks: list[Block]
    method: Any  # registry.Method
    spec: Any  # PruneSpec
    pattern: Pattern
    sparsity: dict[str, float]
    protected: dict[str, torch.Tensor]
    ids: torch.Tensor | None
    emit: Callable[[dict[str, Decision]], None]
    write: Callable[[dict[str, Decision]], None]
    show_progress: bool = False
    timings: list[dict[str, float]] = field(default_factory=list)

    def job(self, specs: list[WeightSpec], **kw: Any) -> Job:
        params = {s.name: self.model.get_parameter(s.name).data for s in specs}
        return Job(specs, params, {s.name: self.sparsity[s.name] for s in specs}, self.pattern, self.spec.group,
                   self.spec, {s.name: self.protected[s.name] for s in specs if s.name in self.protected}, **kw)


def _timed(t0: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _units(plan: Plan) -> Iterator[list[WeightSpec]]:
    """The jobs of a non-sequential run: every block at once for `global`, else one block at a time."""
    if plan.spec.group == "global":
        yield [s for b in plan.blocks for s in b.specs]
    else:
        for b in progress(plan.blocks, desc=f"prune {plan.spec.method}", disable=not plan.show_progress):
            yield b.specs


def run_data_free(plan: Plan) -> None:
    for specs in _units(plan):
        t0 = time.perf_counter()
        plan.emit(plan.method.decide(plan.job(specs)))
        plan.timings.append({"decide_s": _timed(t0)})


def run_one_shot(plan: Plan, stats: dict[str, InputStats] | None = None) -> None:
    """Every block decided from the dense model: one statistics pass, or one gradient pass."""
    needs = plan.method.needs
    all_specs = [s for b in plan.blocks for s in b.specs]
    t0 = time.perf_counter()
    scores = None
    if needs in ("inputs", "hessian") and (stats is None or (needs == "hessian" and any(
            stats[s.name].xtx is None for s in all_specs))):
        stats = dense_stats(plan.model, plan.blocks, plan.ids, plan.spec.batch_size, needs == "hessian",
                            plan.show_progress)
    if needs == "gradients":
        scores = plan.method.score(plan.job(all_specs, model=plan.model, ids=plan.ids))
    plan.timings.append({"calibration_s": _timed(t0)})
    for specs in _units(plan):
        t0 = time.perf_counter()
        kw: dict[str, Any] = {}
        if stats is not None:
            kw["stats"] = {s.name: stats[s.name] for s in specs}
        if scores is not None:
            kw["scores"] = {s.name: scores.pop(s.name) for s in specs}
        plan.emit(plan.method.decide(plan.job(specs, **kw)))
        plan.timings.append({"decide_s": _timed(t0)})


@torch.no_grad()
def _block_stats(plan: Plan, pos: int, inputs: BlockInputs, hessian: bool) -> dict[str, InputStats]:
    """One dense pass of block `pos` over every calibration batch, gathering its linears' statistics."""
    block = plan.blocks[pos]
    hooks = StatsHooks(_modules(block.specs), hessian)
    with hooked(plan.model, hooks.callbacks(), pre=True):
        for h, call in zip(inputs.hidden, inputs.calls[pos], strict=True):
            block_forward(block, h, call)
    stats = hooks.done()
    return {s.name: stats[s.module] for s in block.specs}


def run_sequential(plan: Plan) -> None:
    """Block by block, each calibrated on the outputs of the already-pruned blocks before it."""
    needs = plan.method.needs
    inputs = None
    if needs in ("inputs", "hessian"):
        t0 = time.perf_counter()
        inputs = capture_inputs(plan.model, plan.blocks, plan.ids, plan.spec.batch_size)
        plan.timings.append({"capture_s": _timed(t0)})
    for pos, block in enumerate(progress(plan.blocks, desc=f"prune {plan.spec.method}", disable=not plan.show_progress)):
        t: dict[str, float] = {"block": float(block.index)}
        t0 = time.perf_counter()
        if inputs is not None:
            job = plan.job(block.specs, stats=_block_stats(plan, pos, inputs, needs == "hessian"))
        else:  # gradient scorers: the whole model, in its current (partly pruned) state
            job = plan.job(block.specs, model=plan.model, ids=plan.ids)
            job.scores = plan.method.score(job)
        t["stats_s"] = _timed(t0)
        t0 = time.perf_counter()
        decisions = plan.method.decide(job)
        t["decide_s"] = _timed(t0)
        t0 = time.perf_counter()
        plan.write(decisions)
        plan.emit(decisions)
        del decisions, job
        t["write_s"] = _timed(t0)
        if inputs is not None and pos < len(plan.blocks) - 1:
            t0 = time.perf_counter()
            with torch.no_grad():
                calls = inputs.calls[pos]
                inputs.hidden = [block_forward(block, h, c) for h, c in zip(inputs.hidden, calls, strict=True)]
            t["propagate_s"] = _timed(t0)
        plan.timings.append(t)
