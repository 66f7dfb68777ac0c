"""A run's memory plan before anything is loaded: each pass's peak on one accelerator, and the GPUs it needs.

The model is built on the meta device from its shape alone (`esa.models.loader.shape_source`: a tiny or
micro config, an embedded GGUF header, a local folder, the local Hugging Face cache, or the published
dimensions recorded for the guide's hub models), so planning Llama-3.1-8B reads no weight and downloads
nothing. Each pass's peak is `esa.memory.estimate` (whose factors the CPU memory ledger measures,
tests/bench/memory_ledger.py); a pass that does not fit one GPU gets the smallest count of GPUs over which
a device map spreads it (`gpus_needed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from esa import memory
from esa.apps.pruning.prune import memory_pass
from esa.apps.pruning.registry import get_method
from esa.apps.pruning.spec import PruneSpec
from esa.errors import EsaError
from esa.evaluate import auto_batch_size
from esa.models import parse_dtype
from esa.models.inventory import weight_inventory
from esa.models.loader import shape_source
from esa.params import model_params
from esa.recipes import Recipe
from esa.sensitivity.metrics import METRICS

# components one device holds whole under a device map (the rest spreads with the layers): the logits, the
# largest gradient in flight, offload staging, and pruning's (its block's decision too) and the int8 store's
# one-block working sets
WHOLE = ("logits", "grads_in_flight", "offload_staging", "calibration", "hessians", "decide", "quantise")
GPU_BYTES = 80 * memory.GIB  # "one 80 GB GPU" (A100/H100 80GB), of which memory.HEADROOM is used
MAX_GPUS = 64


@dataclass
class PassPlan:
    label: str  # what runs: evaluation, a metric, the fused gradient metrics, a perturbation
    pass_name: str  # esa.memory's pass
    batch_size: int
    estimate: memory.MemoryEstimate
    gpus: int | None  # GPUs a device map needs for it (None: more than MAX_GPUS)


def meta_model(name: str, dtype: str) -> tuple[torch.nn.Module, str]:
    """(the model of params/models name or reference `name` on the meta device with SDPA, where its shape came
    from); an EsaError when no shape is known offline."""
    from transformers import AutoModelForCausalLM

    ref = model_params(name).ref
    found = shape_source(ref)
    if found is None:
        raise EsaError(f"no memory plan for {name!r}: its shape is not known offline ({ref!r} is not in the local "
                       "Hugging Face cache and has no published shape here)")
    source, build = found
    config = build()
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    return model, source


def gpus_needed(est: memory.MemoryEstimate, capacity: int = GPU_BYTES, headroom: float = memory.HEADROOM) -> int | None:
    """The fewest GPUs of `capacity` bytes whose device map holds the pass: weights, accumulators, activations
    and Hutchinson's buffers spread with the layers; the logits, the largest gradient in flight and offload
    staging stay whole on one device. None past MAX_GPUS."""
    c = est.components
    whole = sum(c.get(k, 0) for k in WHOLE)
    spread = est.total - whole - host_bytes(est)
    usable = headroom * capacity
    if whole >= usable:
        return None
    n = max(1, math.ceil(spread / (usable - whole)))
    return n if n <= MAX_GPUS else None


def host_bytes(est: memory.MemoryEstimate) -> int:
    """What a pass keeps in host memory, not on a GPU (esa.memory.HOST_PARTS)."""
    return sum(est.components.get(k, 0) for k in memory.HOST_PARTS.get(est.pass_name, ()))


STUDIES = ("prune", "finetune", "security", "interpret")  # the schedule's Phase 5 studies (Entry.study)
# the training passes run under bf16 autocast on CUDA (esa.apps.training.loop.uses_autocast, precision 'auto')
AUTOCAST = ("finetune_full", "finetune_sparse", "finetune_lora")


def app_passes(profile: Any, model: torch.nn.Module,
               studies: tuple[str, ...] = STUDIES) -> list[tuple[str, str, int, int, dict[str, int]]]:
    """(label, pass, batch size, seqlen, work) of the Phase 5 passes `profile` configures on `model` for
    `studies`: pruning (Wanda at the sweep's largest sparsity, SparseGPT, and the section's gradient scorers by
    the gradient pass they run, each in the section's calibration mode), sparse fine-tuning at its largest density and LoRA at the same trainable count, the int8 store and
    one bit-search iteration, and an interpretability capture. (Full fine-tuning: `finetune_plan`.)"""
    n = sum(s.numel for s in weight_inventory(model))
    out: list[tuple[str, str, int, int, dict[str, int]]] = []
    pr = getattr(profile, "pruning", None) or {}
    if pr and "prune" in studies:
        sp, mode = max(pr.get("sweep") or [0.5]), pr.get("calibration")
        calib, t, b = int(pr.get("calib_windows", 128)), int(pr.get("calib_seqlen", 2048)), int(pr.get("batch_size", 1))
        by_pass: dict[str, list[str]] = {}  # the memory pass of each method planned, and its methods
        for method in ("wanda", "sparsegpt", *(m for m in pr.get("methods") or [] if get_method(m).needs == "gradients")):
            by_pass.setdefault(memory_pass(PruneSpec(method, sparsity=sp, calibration=mode)), []).append(method)
        for pass_name, methods in by_pass.items():
            out.append((f"pruning {', '.join(methods)} at {sp:g} ({calib} x {t} calibration windows)", pass_name, b, t,
                        {"written": int(sp * n), "windows": calib}))
    ft = getattr(profile, "finetune", None) or {}
    if ft and "finetune" in studies:
        k = int(max(ft.get("densities") or [0.01]) * n)
        b, t = int(ft.get("batch_size", 8)), int(ft.get("seqlen", 512))
        out.append((f"sparse fine-tuning step ({k:,} weights, AdamW)", "finetune_sparse", b, t, {"trainable": k}))
        out.append((f"LoRA step ({k:,} adapter numbers, AdamW)", "finetune_lora", b, t, {"trainable": k}))
    sec = getattr(profile, "security", None) or {}
    if sec and "security" in studies:
        out.append(("int8 store (codes + host backup)", "int8_store", 1, 1, {}))
        out.append(("bit search iteration (int8, gradient pass)", "bfa", int(sec.get("attack_windows", 4)),
                    int(sec.get("attack_seqlen", 256)), {}))
    it = getattr(profile, "interpret", None) or {}
    if it and "interpret" in studies:
        out.append(("interpretability capture", "capture", int(it.get("n_inputs", 32)),
                    max(int(it.get("input_seqlen", 64)), int(it.get("probe_seqlen", 128))), {}))
    return out


def app_plan(name: str, profile: Any, dtype: str, capacity: int = GPU_BYTES,
             studies: tuple[str, ...] = STUDIES) -> list[PassPlan]:
    """The Phase 5 passes of `profile` for `studies` on model `name` in `dtype`, planned on the meta device,
    with full fine-tuning's step when the profile fine-tunes."""
    model, _ = meta_model(name, dtype)
    rows = []
    probes = int(getattr(profile, "hutchinson_probes", 1) or 1)  # a hutchinson_diag pruning scorer's
    for label, pass_name, b, t, work in app_passes(profile, model, studies):
        est = memory.estimate(model, pass_name, b, t, target="cuda:0", work=work, autocast=pass_name in AUTOCAST,
                              probes=probes if pass_name in memory.HUTCHINSON else 1)
        rows.append(PassPlan(label, pass_name, b, est, gpus_needed(est, capacity)))
    ft = getattr(profile, "finetune", None) or {}
    # full fine-tuning runs as a baseline, or as the method the protections act on (esa.apps.training.grid.arms)
    full = "full" in ft.get("baselines", ["full"]) or (ft.get("protections", ["none"]) and
                                                       ft.get("protect_method", "full") == "full")
    if ft and full and "finetune" in studies:
        rows.append(finetune_plan(name, int(ft.get("batch_size", 8)), int(ft.get("seqlen", 512)), capacity))
    return rows


def passes(recipe: Recipe, model: torch.nn.Module) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(label, pass, batch size, estimate arguments) of every pass a run of `recipe` makes on `model`."""
    specs = weight_inventory(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    eval_bs = auto_batch_size(recipe.seqlen, vocab)
    out = [("evaluation", "eval", eval_bs, {})]
    for m in recipe.metrics:
        kw = {"probes": recipe.hutchinson_probes} if METRICS[m].memory_pass == "hutchinson" else {}
        out.append((m, METRICS[m].memory_pass, recipe.batch_size, kw))
    folded = [m for m in recipe.metrics if METRICS[m].fold is not None]
    if len(folded) >= 2:
        out.append(("+".join(folded) + " (fused)", "grad_fused", recipe.batch_size, {}))
    written = recipe.topk * len(specs) if recipe.mode == "per_layer" else recipe.topk
    out.append((f"perturbation (top-{recipe.topk} {recipe.mode})", "perturb", eval_bs, {"written": written}))
    return out


def plan(name: str, recipe: Recipe, capacity: int = GPU_BYTES) -> tuple[list[PassPlan], str]:
    """Every pass's plan for model `name` under `recipe` (on meta: nothing loaded), and the shape's source."""
    model, source = meta_model(name, recipe.dtype)
    rows = []
    for label, pass_name, bs, kw in passes(recipe, model):
        est = memory.estimate(model, pass_name, bs, recipe.seqlen, target="cuda:0", **kw)
        rows.append(PassPlan(label, pass_name, bs, est, gpus_needed(est, capacity)))
    return rows, source


def finetune_plan(name: str, batch_size: int, seqlen: int, capacity: int = GPU_BYTES) -> PassPlan:
    """One full fine-tuning step (AdamW, under bf16 autocast as on CUDA) of model `name`: always on fp32 weights
    (esa.apps.training.full refuses others, having no separate master weights)."""
    model, _ = meta_model(name, "float32")
    est = memory.estimate(model, "finetune_full", batch_size, seqlen, target="cuda:0", autocast=True)
    return PassPlan("full fine-tuning step (fp32 weights, AdamW)", "finetune_full", batch_size, est,
                    gpus_needed(est, capacity))


def rows_of(name: str, recipe: Recipe, profile: Any = None, capacity: int = GPU_BYTES,
            studies: tuple[str, ...] = STUDIES) -> tuple[list[PassPlan], str]:
    """Every pass's plan for model `name`: the scoring run of `recipe` (`plan`) and, given `profile`, the Phase 5
    passes of `studies` (`app_plan`); and the shape's source."""
    rows, source = plan(name, recipe, capacity)
    if profile is not None:
        rows += app_plan(name, profile, recipe.dtype, capacity, studies)
    return rows, source


def lines(name: str, recipe: Recipe, capacity: int = GPU_BYTES, profile: Any = None) -> list[str]:
    """The plan as the dry run prints it: one line per pass, its peak, and one GPU or the count it needs.
    `profile`: to add its pruning, fine-tuning (full FT's step too), security and interpretability passes."""
    rows, source = rows_of(name, recipe, profile, capacity)
    cap = f"{capacity / memory.GIB:.0f} GiB"
    out = [f"memory plan: {name} ({source}, {recipe.dtype}, SDPA; built on the meta device, nothing loaded), "
           f"seqlen {recipe.seqlen}, one GPU = {cap} used up to {memory.HEADROOM:.0%}:"]
    for r in rows:
        parts = ", ".join(f"{k} {v / memory.GIB:.1f}" for k, v in r.estimate.components.items())
        verdict = ("fits one GPU" if r.gpus == 1 else f"needs {r.gpus} GPUs (device_map over {r.gpus} x {cap})"
                   if r.gpus else f"does not fit {MAX_GPUS} GPUs")
        host = host_bytes(r.estimate)
        peak = (r.estimate.total - host) / memory.GIB
        where = f" + {host / memory.GIB:.1f} GiB host" if host else ""
        out.append(f"  {r.label}: batch {r.batch_size} x {r.estimate.seqlen}, peak {peak:.1f} GiB{where} ({parts} GiB): "
                   f"{verdict}")
    return out


def gpus_for(models: list[str], recipe: Recipe, capacity: int = GPU_BYTES, profile: Any = None,
             study: str | None = None) -> int:
    """The GPUs a notebook needs: the most any of its passes needs on any of `models`. Its passes are every
    pass of `recipe` (scoring: each Phase 5 notebook scores too) and, for the notebook of a Phase 5 `study`
    (the schedule entry's `study`), that study's passes under `profile` (pruning, fine-tuning, security,
    interpretability). 1 for a model without an offline shape, or a pass no GPU count holds: the run then fails
    with the memory guard's message instead of waiting forever."""
    studies = (study,) if study in STUDIES else ()
    need = 1
    for name in models:
        try:
            rows, _ = rows_of(name, recipe, profile if studies else None, capacity, studies)
        except EsaError:
            continue
        need = max([need, *(r.gpus for r in rows if r.gpus)])
    return need
