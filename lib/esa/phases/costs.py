"""Measured costs per window on the machine at hand, so a plan predicts its seconds from numbers, not hopes.

    python tests/bench/bench_costs.py [--models smollm2-135m,gemma3-270m] [--seqlen 256]   (make costs)

times, per model, the passes every notebook is made of, on `windows` windows of `seqlen` tokens after one
warm-up: an evaluation window (forward + loss), a gradient window (forward + backward), an act_mag window
(forward with input hooks), a curvature product (one Hessian-vector product of hutchinson_diag), the
load, and an item of the offline zero-shot next-line task (its four candidates scored through lm-eval, as the
pruning study scores every condition; per item, since the items' lengths are the task's, not `seqlen`);
and, per micro-suite member (`train`: they differ 15x in size and are trained where they are first
used), a training step of its budget (forward, backward, AdamW update, esa.models.micro.step_seconds) per
window of the step's batch. It writes reports/bench/costs.json with the machine (cores, CPU model). A plan
multiplies its units by these (linear in windows and in tokens per window, which holds for the windows sizes
we plan: compute-bound matmuls); with no measurement for a model the prediction is None and the plan says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esa.store import REPO_ROOT, write_json

KINDS = ("eval", "grad", "act", "hvp", "load", "zeroshot", "train")
ZS_ITEMS = 16  # next-line items timed per model (after a 2-item warm-up)
DEFAULT = REPO_ROOT / "reports" / "bench" / "costs.json"
RECORD = REPO_ROOT / "reports" / "record" / "costs.json"  # committed with the record: the machine that made it


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), model)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "cpu": model, "platform": platform.platform()}


@dataclass(frozen=True)
class Costs:
    """Seconds per window of `seqlen` tokens, per model and pass kind (KINDS), on `machine`."""

    seqlen: int
    per_window: dict[str, dict[str, float]]  # model -> kind -> seconds per window (load: per load)
    machine: dict[str, Any]

    def seconds(self, model: str, kind: str, windows: float = 1.0, seqlen: int | None = None) -> float | None:
        """Predicted seconds for `windows` windows of `seqlen` tokens (None: `model` was not measured): the
        model's own measurement (a micro-suite member's `train`), else its family's."""
        own = self.per_window.get(_member(model), {}).get(kind)
        per = own if own is not None else self.per_window.get(_family(model), {}).get(kind)
        if per is None:
            return None
        if kind == "load":
            return per
        if kind == "zeroshot":
            return per * windows  # `windows` counts items here
        return per * windows * (seqlen or self.seqlen) / self.seqlen

    def same_machine(self) -> bool:
        return self.machine == machine()


def _member(model: str) -> str:
    """A micro-suite reference without its budget (`micro-llama-33k@standard` -> `micro-llama-33k`)."""
    return model.partition("@")[0]


def _family(model: str) -> str:
    """Micro-suite and tiny models cost what their smallest measured kin costs: measured as one entry each."""
    if model.startswith("micro-"):
        return "micro"
    if model.startswith("tiny-"):
        return "tiny"
    return model


def load(path: Path | None = None) -> Costs | None:
    """The measured costs (this machine's bench file, else the record's), or None when none was measured."""
    for p in ([path] if path else [DEFAULT, RECORD]):
        if p is not None and p.is_file():
            raw = json.loads(p.read_text())
            return Costs(int(raw["seqlen"]), raw["per_window"], raw.get("machine", {}))
    return None


def save(costs: Costs, path: Path = DEFAULT) -> Path:
    return write_json(path, {"seqlen": costs.seqlen, "per_window": costs.per_window, "machine": costs.machine,
                             "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})


def measure(models: list[str], seqlen: int = 256, windows: int = 2, train: list[str] | None = None) -> Costs:
    """Time each pass of KINDS but `train` on each model (after one warm-up window), on the evaluation split;
    and the training step of each micro-suite reference in `train` (`name@budget`), per window of its batch."""
    per = {_family(m): _measure_one(m, seqlen, windows) for m in models}
    for ref in train or []:
        per.setdefault(_member(ref), {})["train"] = _measure_train(ref, seqlen)
    return Costs(seqlen, per, machine())


def _measure_train(ref: str, seqlen: int) -> float:
    from esa.models import micro

    name, budget = micro.parse_ref(ref)
    b = micro.BUDGETS[budget]
    return micro.step_seconds(name, budget) / (b.batch_size * b.seqlen / seqlen)


def _measure_one(name: str, seqlen: int, windows: int) -> dict[str, float]:
    import torch

    from esa.data import evaluation
    from esa.models import load as load_model
    from esa.sensitivity.metrics import METRICS, MetricConfig
    from esa.zeroshot import build_next_line, zero_shot_columns

    t0 = time.perf_counter()
    lm = load_model(name, device="cpu", attn_implementation="sdpa")  # as recipes load: the Hessian pass runs math SDPA
    load_s = time.perf_counter() - t0
    ids = evaluation(lm.tokenizer, "shakespeare", seqlen, n_windows=windows + 1, seed=0,
                     max_positions=lm.info.max_positions or None).ids
    model, cfg = lm.model, MetricConfig(batch_size=1, probes=1, show_progress=False)

    def timed(fn: Any) -> float:
        fn(ids[:1])  # warm-up: allocations, kernels
        t = time.perf_counter()
        fn(ids[1:])
        return (time.perf_counter() - t) / windows

    def forward(x: torch.Tensor) -> None:
        with torch.no_grad():
            model(x, labels=x)

    def backward(x: torch.Tensor) -> None:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            model(x, labels=x).loss.backward()
            for p in model.parameters():
                p.grad = None
                p.requires_grad_(False)

    zero_shot_columns(model, lm.tokenizer, build_next_line("shakespeare", n_items=2))  # warm-up
    t = time.perf_counter()
    zero_shot_columns(model, lm.tokenizer, build_next_line("shakespeare", n_items=ZS_ITEMS))
    zeroshot = (time.perf_counter() - t) / ZS_ITEMS
    return {"eval": timed(forward), "grad": timed(backward),
            "act": timed(lambda x: METRICS["act_mag"](model, lm.inventory, x, cfg)),
            "hvp": timed(lambda x: METRICS["hutchinson_diag"](model, lm.inventory, x, cfg)), "load": load_s,
            "zeroshot": zeroshot}


# ------------------------------------------------------------------ a GPU, planned from FLOPs
# No GPU is lent here, so a GPU's seconds per pass are planned, not measured: a pass's matmul FLOPs (per parameter
# and token: 2 forward, 6 forward + backward, 12 for a Hessian-vector product's double backward, 8 for a training
# step) at a utilisation these small batches reach, or, when that is shorter, the launch floor of the kernels its
# layers run (a 135M model's 256-token forward is launch-bound: ~3.8 ms of launches against 0.2 ms of matmuls).
PASS_FLOPS = {"eval": 2.0, "act": 2.0, "grad": 6.0, "hvp": 12.0, "train": 8.0}
PASS_LAUNCHES = {"eval": 1.0, "act": 1.0, "grad": 3.0, "hvp": 6.0, "train": 4.0}  # forward-launch multiples


@dataclass(frozen=True)
class Gpu:
    """The assumptions a GPU is planned from (no measurement: see `planned`)."""

    name: str
    peak_flops: float  # dense bf16 matmul FLOP/s
    utilisation: float  # of peak, at these batch sizes
    launch_s: float  # seconds per kernel launch (with its Python dispatch)
    kernels_per_layer: int  # kernels one transformer block's forward launches
    load_s: float  # loading a model already in the cache onto the device
    item_passes: float = 4.0  # a zero-shot item: its four candidates, each a short forward (launch-bound)


H100 = Gpu("one H100 SXM, planned from FLOPs (989 TFLOP/s bf16 dense at 30%, 5 us per launch, 25 launches per "
           "block; not measured)", 989e12, 0.30, 5e-6, 25, 5.0)
GPUS = {"h100": H100}


@dataclass(frozen=True)
class PlannedGpu:
    """Costs' interface (`seconds`, `machine`, `same_machine`) for a GPU planned from FLOPs: per model, its block
    matrices and LM head from its config (nothing loaded), per pass the longer of FLOP time and launch floor."""

    gpu: Gpu
    seqlen: int = 256

    @property
    def machine(self) -> dict[str, Any]:
        return {"cores": None, "cpu": self.gpu.name}

    def same_machine(self) -> bool:
        return True  # a plan for the GPU it names, wherever it is printed

    def seconds(self, model: str, kind: str, windows: float = 1.0, seqlen: int | None = None) -> float | None:
        shape = _shape(model)
        if shape is None:
            return None
        params, layers = shape
        if kind == "load":
            return self.gpu.load_s
        floor = layers * self.gpu.kernels_per_layer * self.gpu.launch_s
        if kind == "zeroshot":
            return windows * self.gpu.item_passes * floor
        tokens = windows * (seqlen or self.seqlen)
        flops = PASS_FLOPS[kind] * params * tokens / (self.gpu.peak_flops * self.gpu.utilisation)
        return max(flops, windows * PASS_LAUNCHES[kind] * floor)


@functools.cache  # a plan asks per condition; the config is built once per model
def _shape(model: str) -> tuple[float, int] | None:
    """(matmul parameters: block matrices and LM head, blocks) of `model` from its config alone, or None."""
    from esa.models.loader import inventory_without_weights, shape_source
    from esa.params import model_params

    ref = model_params(model).ref
    inv, source = inventory_without_weights(ref), shape_source(ref)
    if not inv or source is None:
        return None
    cfg = source[1]()
    cfg = getattr(cfg, "text_config", None) or cfg
    head = int(getattr(cfg, "vocab_size", 0) or 0) * int(getattr(cfg, "hidden_size", 0) or 0)
    return float(sum(w.numel for w in inv) + head), max(1, len({w.layer for w in inv if w.layer >= 0}))
