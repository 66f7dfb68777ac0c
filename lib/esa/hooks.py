"""One way to look inside a forward pass: `hooked(model, callbacks)` and `captured(model, names, ...)`.

Every method that reads module inputs or outputs (act_mag, the super-weight detector, channel maxima, MoE
routing load, the interpretability role tests) goes through this module, so hooks are always removed,
also when the forward raises, and every callback sees the same thing: `Call(name, module, args, kwargs,
output)` with keyword arguments bound (output is None for a pre-hook).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from esa.errors import EsaError


@dataclass
class Call:
    """One call of a hooked module."""

    name: str  # the module's name in the model
    module: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]
    output: Any  # None in a pre-hook

    @property
    def input(self) -> torch.Tensor:
        """The first positional input (or the first keyword input when there is none)."""
        if self.args:
            return self.args[0]
        if self.kwargs:
            return next(iter(self.kwargs.values()))
        raise EsaError(f"module {self.name} was called without inputs")


Callback = Callable[[Call], Any]


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise EsaError(f"the model has no module {name!r} to hook") from e


@contextlib.contextmanager
def hooked(model: torch.nn.Module, callbacks: Mapping[str, Callback], pre: bool = False) -> Iterator[None]:
    """Call `callbacks[name](Call)` on every forward of each named module while the block runs.

    `pre=True` hooks the call before the module runs (the output is None); a callback that returns a
    value replaces the output (forward) or the (args, kwargs) pair (pre), as torch's hooks do."""
    handles = []
    try:
        for name, fn in callbacks.items():
            module = _module(model, name)
            if pre:
                def pre_hook(mod: torch.nn.Module, args: tuple, kwargs: dict, name: str = name,
                             fn: Callback = fn) -> Any:
                    return fn(Call(name, mod, args, kwargs, None))

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def hook(mod: torch.nn.Module, args: tuple, kwargs: dict, output: Any, name: str = name,
                         fn: Callback = fn) -> Any:
                    return fn(Call(name, mod, args, kwargs, output))

                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def captured(model: torch.nn.Module, names: Iterable[str], what: str = "output",
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each named module's input or output on every call: {name: [tensor per call]}.

    `reduce` maps the detached tensor to what is kept (e.g. a per-channel max), so a long pass keeps
    only what the caller reads."""
    if what not in ("input", "output"):
        raise EsaError(f"captured: what must be 'input' or 'output', got {what!r}")
    names = list(names)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def record(call: Call) -> None:
        t = call.input if what == "input" else call.output
        if isinstance(t, tuple):
            t = t[0]
        t = t.detach()
        seen[call.name].append(reduce(t) if reduce else t)

    with hooked(model, {n: record for n in names}):
        yield seen
