"""Sensitivity metrics: one score per studied weight, higher = more critical.

Every metric is one registered `Metric` object in `METRICS`, holding everything known about it: its
computation, the settings that enter its cache key, whether it can share a backward pass with other
gradient metrics (`fold`), the memory pass the guard estimates for it, whether it needs a double
backward (run under SDPA's math kernel, `math_attention`), and its one-line definition, which reports print. A metric is called as

    METRICS[name](model, specs, ids, cfg: MetricConfig) -> MetricResult

`specs` are the `WeightSpec`s to score, `ids` the calibration windows (n, seqlen). Scores come back in
fp32, one tensor per parameter with the parameter's shape, whatever the model dtype.

Memory discipline (naive fp32 accumulation of every gradient does not fit an 8B model on one 80 GB GPU,
measured; see README "Scaling out"): gradients are folded
into the fp32 accumulators by `register_post_accumulate_grad_hook` the moment autograd finishes each
parameter's gradient, and the `.grad` is freed at once, so the model never holds all gradients and all
accumulators together. Only the studied parameters have `requires_grad` on.

Definitions (b = one calibration micro-batch of `cfg.batch_size` windows, weighted by its token count):
- grad_x_weight (default): |w * g| with g the gradient of the mean calibration loss (SNIP-style
  first-order Taylor). `cfg.per_batch=True`: mean_b |w * g_b|.
- grad_squared: mean_b g_b^2 (empirical Fisher diagonal over micro-batches); `cfg.times_w2`: times w^2.
- act_mag: |W_ij| * ||X_j||_2 over all calibration tokens (Wanda). For 3-D MoE experts X is the tokens
  routed to that expert (captured from the experts module's routing inputs).
- hutchinson_diag: diag(H) ~ mean over Rademacher probes v of v * Hv (double backward), saliency
  0.5 * diag(H) * w^2 (signed: noise or negative curvature ranks low). The spread across probes is
  reported in `extras`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from esa.dispatch import input_device
from esa.errors import EsaError
from esa.hooks import Call, hooked
from esa.memory import PROBE_CACHE_BYTES
from esa.models.inventory import WeightSpec
from esa.registry import Registry
from esa.sensitivity.curvature import ggn_mc_diag
from esa.sensitivity.passes import (
    MetricConfig,
    MetricResult,
    math_attention,
    micro_batches,
    streamed_grads,
    studied_params,
)

MetricFn = Callable[[torch.nn.Module, list[WeightSpec], torch.Tensor, MetricConfig], MetricResult]


# ---------------------------------------------------------------- shared machinery (and esa.sensitivity.passes)
def _device(model: torch.nn.Module) -> torch.device:
    """Where input ids go: the embedding's execution device (also right for accelerate-dispatched models)."""
    return input_device(model)


def batch_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of one micro-batch (B, T), computed in fp32."""
    batch = batch.to(_device(model))
    logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


# ---------------------------------------------------------------- gradient metrics
class _GradFold:
    """One gradient metric's fp32 accumulators: `fold` each micro-batch's gradient, `finish` at the end."""

    name = ""

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: MetricConfig) -> None:
        self.cfg = cfg
        self.acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}

    def _in_order(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Accumulators filled lazily, back in the weights' order (ties rank by it); zeros for a weight that
        no micro-batch reached (an expert no token was routed to)."""
        self.acc = {n: self.acc[n] if n in self.acc else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    for n, p in params.items()}

    def fold(self, name: str, p: torch.nn.Parameter, g: torch.Tensor, w: float) -> None:
        raise NotImplementedError

    def finish(self, params: dict[str, torch.nn.Parameter]) -> MetricResult:
        raise NotImplementedError


class _GradXWeight(_GradFold):
    name = "grad_x_weight"

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: MetricConfig) -> None:
        self.cfg = cfg
        # filled by the first fold: a fresh zero-filled fp32 copy of every studied weight costs as much as a
        # fifth of a CPU backward (first-touch page faults), and the first micro-batch's gradient is freed anyway
        self.acc = {}

    def fold(self, name: str, p: torch.nn.Parameter, g: torch.Tensor, w: float) -> None:
        acc = self.acc.get(name)
        if self.cfg.per_batch:
            term = (p.detach().float() * g.float()).abs_()
            self.acc[name] = term.mul_(w) if acc is None else acc.add_(term, alpha=w)
        elif acc is not None:  # sum of token-weighted batch gradients = gradient of the mean calibration loss
            acc.add_(g, alpha=w)
        elif w == 1.0 and g.dtype == torch.float32 and g.is_contiguous():
            self.acc[name] = g  # the only micro-batch: its gradient is the sum (streamed_grads drops .grad next)
        else:
            self.acc[name] = g.float().mul(w)  # = 0 + w * g, without a zero-filled buffer; g may be shared

    def finish(self, params: dict[str, torch.nn.Parameter]) -> MetricResult:
        self._in_order(params)
        if not self.cfg.per_batch:
            for n, p in params.items():
                self.acc[n].mul_(p.detach()).abs_()  # |w * g|, in place: no second full-size buffer
        variant = "per_batch mean_b|w*g_b|" if self.cfg.per_batch else "|w * g_mean|"
        return MetricResult(self.acc, {"variant": variant})


class _GradSquared(_GradFold):
    name = "grad_squared"

    def fold(self, name: str, p: torch.nn.Parameter, g: torch.Tensor, w: float) -> None:
        g32 = g.float()
        self.acc[name].addcmul_(g32, g32, value=w)

    def finish(self, params: dict[str, torch.nn.Parameter]) -> MetricResult:
        if self.cfg.times_w2:
            for n, p in params.items():
                self.acc[n].mul_(p.detach().float().square())
        return MetricResult(self.acc, {"variant": "mean_b g_b^2 * w^2" if self.cfg.times_w2 else "mean_b g_b^2"})


def fused_gradients(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor,
                    cfgs: dict[str, MetricConfig]) -> dict[str, MetricResult]:
    """Several gradient metrics from one forward+backward per micro-batch.

    Each metric folds the same gradient tensors as its own pass would, in the same order, so every result
    is bit-identical to running that metric alone (tested); the cost is one pass instead of one per metric,
    at the price of one more fp32 accumulator per metric.
    """
    folds_of = {m: METRICS[m].fold for m in cfgs if m in METRICS and METRICS[m].fold is not None}
    if len(folds_of) != len(cfgs) or not cfgs:
        raise EsaError(f"fused_gradients takes gradient metrics {fusable()}, got {list(cfgs)}")
    sizes = {c.batch_size for c in cfgs.values()}
    if len(sizes) != 1:
        raise EsaError(f"fused gradient metrics must share one batch size, got {sorted(sizes)}")
    params = studied_params(model, specs)
    folds = [folds_of[m](params, c) for m, c in cfgs.items()]
    weight = {"w": 0.0}

    def fold(name: str, p: torch.nn.Parameter, g: torch.Tensor) -> None:
        for f in folds:
            f.fold(name, p, g, weight["w"])

    first = next(iter(cfgs.values()))
    with streamed_grads(params, fold):
        for batch, w in micro_batches(ids, first, "+".join(cfgs)):
            weight["w"] = w
            batch_loss(model, batch).backward()
    return {f.name: f.finish(params) for f in folds}


def _gradient_metric(name: str) -> MetricFn:
    def compute(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, cfg: MetricConfig) -> MetricResult:
        return fused_gradients(model, specs, ids, {name: cfg})[name]

    return compute


# ---------------------------------------------------------------- activation magnitude
def expert_routing_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states (T, H), top_k_index (T, k)) from a transformers-5 experts module call."""
    names = list(inspect.signature(module.forward).parameters)
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    if "hidden_states" not in bound or "top_k_index" not in bound:
        raise EsaError(
            f"act_mag cannot read the routed tokens of {type(module).__name__}: its forward takes {names}, "
            "expected (hidden_states, top_k_index, ...)"
        )
    return bound["hidden_states"], bound["top_k_index"]


def act_mag(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, cfg: MetricConfig) -> MetricResult:
    params = studied_params(model, specs)
    sq: dict[str, torch.Tensor] = {}  # param -> sum over tokens of x_j^2: (cols,) or (E, cols)
    by_module: dict[str, list[tuple[WeightSpec, str]]] = {}  # owning module name -> its studied weights
    for spec in specs:
        parent, _, attr = spec.name.rpartition(".")
        by_module.setdefault(parent, []).append((spec, attr))
        lead = (spec.n_experts,) if spec.n_experts else ()
        sq[spec.name] = torch.zeros(*lead, spec.cols, dtype=torch.float32, device=params[spec.name].device)
    callbacks = {
        name: (_expert_hook(model.get_submodule(name), entries, sq) if any(s.n_experts for s, _ in entries)
               else _linear_hook(entries, sq))
        for name, entries in by_module.items()
    }
    with torch.no_grad(), hooked(model, callbacks):
        for batch, _ in micro_batches(ids, cfg, "act_mag"):
            model(input_ids=batch.to(_device(model)), use_cache=False, **_last_logit_only(model))
    scores = {}
    for name, p in params.items():
        norm = sq.pop(name).sqrt_()  # ||X_j||_2
        # (out, in) * (1, in), or (E, out, in) * (E, 1, in)
        scores[name] = p.detach().float().abs().mul_(norm.unsqueeze(-2))
    return MetricResult(scores, {"variant": "|W_ij| * ||X_j||_2 (routed tokens for experts)"})


def _last_logit_only(model: torch.nn.Module) -> dict[str, int]:
    """act_mag reads the blocks' inputs only: the LM head is needed for no position, and on a large vocabulary it
    is a fifth to a quarter of a forward (SmolLM2, Qwen2.5). transformers' causal LMs take `logits_to_keep`;
    1 is the least they allow."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _linear_hook(entries: list[tuple[WeightSpec, str]], sq: dict[str, torch.Tensor]) -> Callable[[Call], None]:
    def hook(call: Call) -> None:
        x = call.input
        for spec, _ in entries:
            if x.shape[-1] != spec.cols:
                raise EsaError(
                    f"act_mag: input of {spec.module} has {x.shape[-1]} features but the weight has {spec.cols} "
                    "columns; this module is not a plain linear layer"
                )
            x2 = x.detach().reshape(-1, spec.cols).float()  # (tokens, in)
            sq[spec.name].add_((x2 * x2).sum(0))

    return hook


def _expert_hook(module: torch.nn.Module, entries: list[tuple[WeightSpec, str]],
                 sq: dict[str, torch.Tensor]) -> Callable[[Call], None]:
    attrs = {attr for _, attr in entries}
    if not attrs <= {"gate_up_proj", "down_proj"} or not hasattr(module, "gate_up_proj"):
        raise EsaError(
            f"act_mag supports fused 3-D experts (gate_up_proj, down_proj) only; {type(module).__name__} has {sorted(attrs)}"
        )

    def hook(call: Call) -> None:
        mod = call.module
        hidden, top_k_index = expert_routing_inputs(mod, call.args, call.kwargs)
        x = hidden.detach().reshape(-1, hidden.shape[-1]).float()  # (T, H)
        n_exp = mod.gate_up_proj.shape[0]
        routed = F.one_hot(top_k_index.long().clamp(max=n_exp), n_exp + 1)[..., :n_exp].sum(1) > 0  # (T, E)
        for spec, attr in entries:
            if attr == "gate_up_proj":
                sq[spec.name].add_(routed.float().T @ (x * x))  # (E, T) @ (T, H) -> (E, H)
            else:
                # down_proj sees act(gate) * up of its own tokens: recompute it per expert (the experts
                # module does not expose it); this costs one more expert forward in act_mag only.
                with torch.no_grad():
                    for e in range(n_exp):
                        tok = routed[:, e].nonzero().squeeze(-1)
                        if tok.numel() == 0:
                            continue
                        h = F.linear(hidden.reshape(-1, hidden.shape[-1])[tok], mod.gate_up_proj[e])
                        gate, up = h.chunk(2, dim=-1)
                        inter = (mod.act_fn(gate) * up).float()  # (t_e, I)
                        sq[spec.name][e].add_((inter * inter).sum(0))

    return hook


# ---------------------------------------------------------------- Hutchinson
def hutchinson_diag(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, cfg: MetricConfig) -> MetricResult:
    if cfg.hutchinson_groups > 1 and len(specs) > 1:
        # diag(H) restricted to a subset of weights is the same entries of diag(H): probing the weights in
        # groups keeps the estimate unbiased (with fewer off-diagonal terms in its noise) and divides the
        # memory of accumulators, probes and create_graph gradients by the number of groups.
        n = min(cfg.hutchinson_groups, len(specs))
        chunks = [specs[i::n] for i in range(n)]
        sub = MetricConfig(**{**cfg.__dict__, "hutchinson_groups": 1})
        parts = [hutchinson_diag(model, chunk, ids, sub) for chunk in chunks]
        scores = {k: v for part in parts for k, v in part.scores.items()}
        spreads = [part.extras["spread"] for part in parts]
        return MetricResult(scores, {"variant": parts[0].extras["variant"] + f", {n} parameter groups",
                                     "spread": spreads[0] if n == 1 else {"groups": spreads}})
    if cfg.probes < 1:
        raise EsaError(f"hutchinson_diag needs at least 1 probe, got {cfg.probes}")
    if cfg.hutchinson_output not in ("saliency", "diag"):
        raise EsaError(f"unknown hutchinson_output {cfg.hutchinson_output!r}; accepted: diag, saliency")
    params = studied_params(model, specs)
    names = list(params)
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    # spread: per-probe estimates at a fixed sample of each matrix's weights, and per-probe traces
    gen_idx = torch.Generator().manual_seed(cfg.seed + 7919)
    sample_idx = {  # drawn with replacement: a randperm of a 58M-weight matrix would cost seconds per matrix
        n: torch.randint(0, p.numel(), (cfg.spread_sample,), generator=gen_idx).to(p.device)
        for n, p in params.items()
    }
    per_probe = {n: torch.zeros(cfg.probes, len(sample_idx[n]), dtype=torch.float32, device=p.device)
                 for n, p in params.items()}
    # per-probe traces stay on each weight's device and reach the host once, after the last window
    trace_d = {n: torch.zeros(cfg.probes, dtype=torch.float64, device=p.device) for n, p in params.items()}
    state: dict[str, Any] = {"w": 0.0, "probe": 0, "v": {}}

    def fold(name: str, p: torch.nn.Parameter, hv: torch.Tensor) -> None:
        est = state["v"][name].float().mul_(hv.float())  # v * Hv for this micro-batch
        est.mul_(state["w"])
        acc[name].add_(est, alpha=1.0 / cfg.probes)
        per_probe[name][state["probe"]].add_(est.view(-1)[sample_idx[name]])
        trace_d[name][state["probe"]] += est.sum(dtype=torch.float64)

    dev = _device(model)
    n_weights = sum(p.numel() for p in params.values())
    keep_probes = cfg.probes * n_weights <= PROBE_CACHE_BYTES  # int8: one byte per weight per probe

    def draw(probe: int) -> dict[str, torch.Tensor]:
        # drawn on one device (same numbers whatever the split), then moved to the weight's device; the same
        # v for a probe in every window, so each probe's estimate is v * (H_mean v)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + probe)
        # v stays int8 (+-1): the graph of v.g saves v, and int8 halves that memory against bf16
        return {n: torch.randint(0, 2, p.shape, generator=gen, device=dev, dtype=torch.int8).mul_(2).sub_(1).to(p.device)
                for n, p in params.items()}

    probes = [draw(i) for i in range(cfg.probes)] if keep_probes else None
    # Window outer, probe inner: the forward and the create_graph backward of a window are paid once and
    # every probe only adds the second backward (retain_graph), so a probe costs ~one backward, not a
    # forward + two backwards. One window at a time: the double-backward graph is the memory peak, and the
    # Hessian of the mean loss is the token-weighted mean of the windows' Hessians, so this is the same
    # estimate as larger batches.
    with streamed_grads(params, fold), math_attention():
        for batch, w in micro_batches(ids, MetricConfig(batch_size=1, show_progress=cfg.show_progress), "hutchinson_diag"):
            state["w"] = w
            loss = batch_loss(model, batch)
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
            for probe in range(cfg.probes):
                state["probe"] = probe
                state["v"] = probes[probe] if probes is not None else draw(probe)
                # Hv = d(v . g)/dw, as the vector-Jacobian product of g with v (no v . g graph to build);
                # the hook folds each parameter's Hv as soon as it is complete
                torch.autograd.backward(grads, grad_tensors=[state["v"][n].to(g.dtype) for g, n in
                                                             zip(grads, names, strict=True)],
                                        retain_graph=probe < cfg.probes - 1)
            del grads, loss
            state["v"] = {}
    del probes

    trace = torch.stack([trace_d[n].cpu() for n in names], dim=1)  # (probes, matrices)
    spread = _hutchinson_spread(per_probe, trace, names)
    if cfg.hutchinson_output == "saliency":
        for n, p in params.items():
            acc[n].mul_(p.detach().float().square()).mul_(0.5)
    return MetricResult(acc, {"variant": f"0.5*diag(H)*w^2, {cfg.probes} Rademacher probes"
                              if cfg.hutchinson_output == "saliency" else "diag(H)", "spread": spread})


def _hutchinson_spread(per_probe: dict[str, torch.Tensor], trace: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """How noisy the estimate is: relative standard error of the probe mean at sampled weights, and of traces."""
    n_probes = trace.shape[0]
    if n_probes < 2:
        return {"probes": n_probes, "note": "one probe: no spread can be estimated"}
    rel_se = []
    for n in names:
        vals = per_probe[n].double()  # (P, S)
        mean, sd = vals.mean(0), vals.std(0)
        rel = (sd / math.sqrt(n_probes)) / mean.abs().clamp_min(1e-30)
        rel_se.append(rel.cpu())
    rel_all = torch.cat(rel_se)
    tr_mean, tr_sd = trace.mean(0), trace.std(0)
    tr_rel = (tr_sd / math.sqrt(n_probes)) / tr_mean.abs().clamp_min(1e-30)
    return {
        "probes": n_probes,
        "weight_rel_se_median": float(rel_all.median()),
        "weight_rel_se_q90": float(rel_all.quantile(0.9)),
        "trace_rel_se_median": float(tr_rel.median()),
        "note": "standard error of the probe mean / |mean|, per weight at sampled weights and per matrix trace",
    }


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Derived:
    """A score computed from a metric's score and the weight, matrix by matrix, when the metric is scored."""

    name: str
    definition: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (score, weight) -> derived score, same shape
    applies: Callable[[MetricConfig], bool] = lambda cfg: True


def _obd(fisher: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return fisher * w.detach().float().square()


# The OBD saliency mean_b g_b^2 * w^2 (optimal brain damage with the empirical Fisher diagonal): one quantity,
# one name, `obd`, wherever it appears: this derived score of grad_squared; grad_squared run with times_w2
# (the same product, `acc * w.float()^2`, so the two rank identically: tests/test_score_cache.py); the pruning
# scorer `obd` (esa.apps.pruning.scorers, grad_squared with times_w2); fine-tuning's selection `obd`. Only the
# phase-2 tables name its selections `grad_squared_x_w2` (esa.phases.phase2.OBD_LABEL), a table value kept.
OBD = Derived("obd", "grad_squared x w^2 (the OBD saliency), from the Fisher diagonal without a second pass",
              _obd, lambda cfg: not cfg.times_w2)


@dataclass(frozen=True)
class Metric:
    """Everything known about one metric; `METRICS[name](model, specs, ids, cfg)` computes it."""

    name: str
    definition: str  # one line, printed into every report that uses the metric
    compute: MetricFn
    key: Callable[[MetricConfig], dict[str, Any]]  # the MetricConfig settings that change the result (cache key)
    memory_pass: str  # the pass esa.memory estimates for it
    fold: type[_GradFold] | None = None  # set: a gradient fold that can share one backward (fused_gradients)
    double_backward: bool = False  # needs a twice-differentiable attention (eager / math SDPA)
    derived: tuple[Derived, ...] = ()  # scores folded from this one at scoring time (their candidates are cached)

    def derived_for(self, cfg: MetricConfig) -> list[Derived]:
        return [d for d in self.derived if d.applies(cfg)]

    def __call__(self, model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor,
                 cfg: MetricConfig) -> MetricResult:
        return self.compute(model, specs, ids, cfg)


def _hutchinson_key(cfg: MetricConfig) -> dict[str, Any]:
    # no batch_size: always one window at a time (memory), see hutchinson_diag
    d: dict[str, Any] = {"probes": cfg.probes, "probe_seed": cfg.seed, "output": cfg.hutchinson_output}
    if cfg.hutchinson_groups > 1:
        d["groups"] = cfg.hutchinson_groups
    return d


METRICS: Registry[Metric] = Registry("metric", (
    Metric("grad_x_weight", "|w * g|, g = gradient of the mean calibration loss (first-order Taylor, SNIP); "
           "per_batch: mean_b |w * g_b|", _gradient_metric("grad_x_weight"),
           lambda c: {"batch_size": c.batch_size, "per_batch": c.per_batch}, "gradient", fold=_GradXWeight),
    Metric("grad_squared", "mean_b g_b^2 over calibration micro-batches (empirical Fisher diagonal); "
           "times_w2: x w^2 (OBD saliency)", _gradient_metric("grad_squared"),
           lambda c: {"batch_size": c.batch_size, "times_w2": c.times_w2}, "gradient", fold=_GradSquared,
           derived=(OBD,)),
    # act_mag sums over tokens: independent of batching, so no batch_size in its key
    Metric("act_mag", "|W_ij| * ||X_j||_2 over calibration tokens (Wanda; routed tokens for MoE experts)",
           act_mag, lambda c: {}, "act_mag"),
    Metric("hutchinson_diag", "0.5 * diag(H) * w^2, diag(H) = mean over Rademacher probes v of v * Hv "
           "(Hutchinson, double backward)", hutchinson_diag, _hutchinson_key, "hutchinson", double_backward=True),
    # a lower-variance curvature diagonal of a different quantity (esa.sensitivity.curvature)
    Metric("ggn_mc_diag", "0.5 * diag(GGN) * w^2, diag(GGN) = mean over labels sampled from the model of N * g^2 "
           "(Monte-Carlo Gauss-Newton = Fisher diagonal; not diag(H))", ggn_mc_diag,
           lambda c: {"samples": c.probes, "sample_seed": c.seed, "output": c.hutchinson_output,
                      "batch_size": c.batch_size}, "gradient"),
), base=Metric)


def fusable() -> list[str]:
    """The metrics that can share one forward+backward per micro-batch (see fused_gradients)."""
    return [m.name for m in METRICS.values() if m.fold is not None]


def get_metric(name: str) -> Metric:
    return METRICS.lookup(name)
