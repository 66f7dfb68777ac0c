"""One model across several devices: accelerate's `device_map`, and what each pass may do with it.

A model loaded with a `device_map` (`"auto"`, `"balanced"`, `"sequential"`, or an explicit dict) has its
blocks on several devices; accelerate's hooks move activations between them, and the top-level hook
returns outputs to the input's device. Blocks mapped to `"disk"` (or to `"cpu"` when a GPU is the main
device) are *offloaded*: their parameters are `meta` placeholders, and the real values are loaded into
a fresh temporary tensor for each forward call, then dropped.

What that means for each pass (checked by tests/test_device_map.py):
- evaluation: works for any split, offloaded or not; inputs go to the input embedding's execution device.
- per-weight sensitivity metrics (gradients, Hutchinson, act_mag) and in-place perturbations work on
  *resident* parameters, on whatever device each one lives. On an *offloaded* parameter they cannot:
  the gradient lands on the temporary copy (the `meta` placeholder never sees it), and an in-place
  write goes to the placeholder, never to the stored weights. Results would be silently empty or
  unperturbed, so `require_resident` refuses them with an EsaError that says what to do instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from esa.errors import EsaError, unknown
from esa.store import cache_dir

log = logging.getLogger(__name__)

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def available_devices() -> list[str]:
    """Device names a model can be put on here: cpu, then cuda:0.. and mps / xpu:0.. where present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names += ["xpu"] + [f"xpu:{i}" for i in range(xpu.device_count())]
    return names


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch.device for a --device value, or one EsaError naming the value and the devices accepted here.

    None means the default: cuda if available, else cpu. Called before anything is loaded, so a typo
    (`tpu9`) or a GPU request on a machine without one stops the run at once, not after loading a model.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device).strip().lower()
    accepted = available_devices()
    here = f"accepted on this machine: {', '.join(accepted)}"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise EsaError(f"unknown device {str(device)!r}; {here}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "no CUDA GPU is visible"
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a build without CUDA"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise EsaError(f"device {str(device)!r} needs CUDA, but {why} (CUDA_VISIBLE_DEVICES={visible}); "
                       f"{here}")
    if str(dev) in accepted:
        return dev
    raise EsaError(f"device {str(device)!r} is not available; {here}")


def dispatch(
    model: torch.nn.Module,
    device_map: str | dict[str, Any],
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> torch.nn.Module:
    """Spread an already-built model (tiny and micro models are built, not loaded) over devices.

    Same semantics as `from_pretrained(device_map=..., max_memory=..., offload_folder=...)`: a strategy
    name is turned into a map by accelerate from `max_memory` (on a CPU-only machine, e.g.
    `{"cpu": "2GB"}` puts what does not fit on disk); blocks mapped to "disk" are written to
    `offload_folder` (default: a fresh temporary folder under the cache).
    """
    from accelerate import dispatch_model
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise unknown("device_map strategy", device_map, DEVICE_MAP_STRATEGIES,
                          hint="or pass a dict {module name: device}")
        if device_map == "sequential":
            budget = get_max_memory(max_memory)
        else:
            budget = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        device_map = dict(infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split))
    if "disk" in device_map.values() and offload_folder is None:
        offload_folder = default_offload_folder()
    dispatch_model(model, device_map=device_map, offload_dir=str(offload_folder) if offload_folder else None)
    model.hf_device_map = dict(device_map)  # what from_pretrained records; reports read it
    return model


def default_offload_folder() -> Path:
    """A fresh folder for disk-offloaded weights (one per load: parallel workers must not share one)."""
    return Path(tempfile.mkdtemp(prefix="offload-", dir=cache_dir("offload")))


def is_dispatched(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "hf_device_map", None)) and len(set(model.hf_device_map.values())) > 1


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else its first parameter's device."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    devs = [p.device for p in module.parameters()]
    real = [d for d in devs if d.type != "meta"]
    if real:
        return real[0]
    return devs[0] if devs else torch.device("cpu")  # meta: a model built for planning, not loaded


def input_device(model: torch.nn.Module) -> torch.device:
    """The device input ids must be on: the input embedding's execution device (meta when offloaded)."""
    return execution_device(model.get_input_embeddings())


def offloaded(model: torch.nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Names of parameters (all, or those in `names`) that are offloaded placeholders on `meta`."""
    if names is None:
        return [n for n, p in model.named_parameters() if p.device.type == "meta"]
    return [n for n in names if model.get_parameter(n).device.type == "meta"]


def require_resident(model: torch.nn.Module, names: Iterable[str], what: str) -> None:
    """Raise EsaError if any of `names` is offloaded: `what` (a metric, a perturbation) needs the real weights."""
    names = list(names)
    off = offloaded(model, names)
    if not off:
        return
    dmap = getattr(model, "hf_device_map", {}) or {}
    where = sorted({str(d) for d in dmap.values() if d in ("cpu", "disk")}) or ["cpu/disk"]
    raise EsaError(
        f"{what} needs the studied weights resident on a device, but {len(off)} of {len(names)} are offloaded to "
        f"{'/'.join(where)} by the device_map (e.g. {off[0]}): accelerate loads an offloaded weight into a temporary "
        "copy for each forward, so gradients and in-place writes would never reach it (scores would be empty, "
        "perturbations would not happen). Give the model enough device memory for its weights (device_map='auto' "
        "over more GPUs, a larger max_memory, dtype='bfloat16'), or study only the resident weights "
        "(filter the inventory with esa.dispatch.resident_specs). Evaluation alone works with offload."
    )


def resident_specs(model: torch.nn.Module, specs: list[Any]) -> list[Any]:
    """The WeightSpecs whose parameters are resident (not offloaded)."""
    return [s for s in specs if model.get_parameter(s.name).device.type != "meta"]


def devices_of(model: torch.nn.Module) -> list[torch.device]:
    """Every real device holding or executing part of the model (execution devices of offloaded blocks too)."""
    devs = {p.device for p in model.parameters() if p.device.type != "meta"}
    for m in model.modules():
        hook = getattr(m, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            devs.add(torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}"))
    return sorted(devs, key=str) or [torch.device("cpu")]


def describe_map(model: torch.nn.Module) -> dict[str, Any]:
    """For reports: modules per device and how many parameters are resident vs offloaded."""
    dmap = getattr(model, "hf_device_map", None) or {}
    per_dev: dict[str, int] = {}
    for d in dmap.values():
        per_dev[str(d)] = per_dev.get(str(d), 0) + 1
    n_off = sum(p.numel() for p in model.parameters() if p.device.type == "meta")
    n_all = sum(p.numel() for p in model.parameters())
    return {"modules_per_device": per_dev, "params_offloaded": n_off, "params_total": n_all}
