"""Curvature diagonals and how far their per-weight rankings can be trusted.

Plain Hutchinson (`metrics.hutchinson_diag`) is unbiased for diag(H), but its per-weight error is
sqrt(sum_{j != i} H_ij^2 / P): on an LM the off-diagonal mass of a row dwarfs its diagonal, so a ranking
from a few probes can be noise. This module

- measures that noise on the model at hand (`reliability`): two independent probe streams on the same
  windows, their top-k-per-matrix Jaccard and relative disagreement at P = 1, 2, 4, ... probes, the
  per-weight signal-to-noise (|mean| / standard error) at the top-k and the median weight (chosen by one
  stream, judged by the other), and the probes a matrix needs before its top-k stands 2 standard errors
  clear of its median; `resolution_at` turns that into a verdict for a run with P probes;
- offers a lower-variance curvature diagonal at a lower cost per pass, `ggn_mc_diag`: the diagonal of the
  generalised Gauss-Newton (= Fisher for softmax cross-entropy) from gradients of the loss at labels
  sampled from the model's own predictions. E[g g^T] = GGN / N for N tokens, so N * g^2 is unbiased for
  diag(GGN), is never negative, and costs one backward per sample where a Hutchinson probe costs a
  double backward. It is NOT diag(H): diag(H) = diag(GGN) + the residual term sum_t r_t * d^2 z_t/dw^2,
  which is signed and vanishes only where the model fits its targets; reports say so.
- `diag_pp`: Diag++ (Baston & Nakatsukasa 2022), Hutchinson on the residual after an exact low-rank part
  from a sketch, for matrices small enough to hold a few sketch vectors (tiny models, tests, the bench).

The oracle for all of them on tiny models is the exact per-matrix diagonal (`exact_diagonals`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from esa.dispatch import input_device
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.progress import progress
from esa.sensitivity.passes import (
    MetricConfig,
    MetricResult,
    math_attention,
    micro_batches,
    streamed_grads,
    studied_params,
)
from esa.sensitivity.resolved import RESOLVE_Z, median_z_and_needed

ESTIMATORS = ("hutchinson", "ggn_mc")
TARGET_JACCARD = 0.4  # the guide's stability threshold, used for the two-probe-set Jaccard too
MAX_EXTRAPOLATION = 100  # the Jaccard fit is read at most this factor beyond the largest P measured
MIN_FIT_POINTS = 3  # measured P the Jaccard fit needs


# ---------------------------------------------------------------- one forward, many curvature products
class CurvatureProbe:
    """One forward and one create_graph backward of the mean loss of `ids` (one batch), then any number of
    Hessian-vector products and sampled-label gradients from that graph (each costs one more backward)."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], ids: torch.Tensor,
                 need_hvp: bool = True) -> None:
        self.names = list(params)
        self.plist = [params[n] for n in self.names]
        batch = ids.to(input_device(model))
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        self.logits = logits.reshape(-1, logits.shape[-1])
        self.n_tokens = self.logits.shape[0]
        loss = F.cross_entropy(self.logits, batch[:, 1:].reshape(-1))
        self.grads = torch.autograd.grad(loss, self.plist, create_graph=need_hvp, retain_graph=True)
        self.probs = self.logits.detach().softmax(-1)

    def hvp(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hv = torch.autograd.grad(self.grads, self.plist, grad_outputs=[v[n].to(g.dtype) for n, g in
                                                                       zip(self.names, self.grads, strict=True)],
                                 retain_graph=True)
        return dict(zip(self.names, hv, strict=True))

    def sampled_gradient(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Gradient of the mean loss at labels drawn from the model's own predictive distribution."""
        y = torch.multinomial(self.probs, 1, generator=gen).squeeze(-1)
        loss = F.cross_entropy(self.logits, y)
        g = torch.autograd.grad(loss, self.plist, retain_graph=True)
        return dict(zip(self.names, g, strict=True))

    def close(self) -> None:
        del self.grads, self.logits


def rademacher(params: dict[str, torch.nn.Parameter], device: torch.device, seed: int,
               probe: int) -> dict[str, torch.Tensor]:
    """Probe `probe` of seed `seed`: the very vectors `metrics.hutchinson_diag` draws (same generator, order)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + probe)
    return {n: torch.randint(0, 2, p.shape, generator=gen, device=device, dtype=torch.int8).mul_(2).sub_(1).to(p.device)
            for n, p in params.items()}


def ggn_mc_diag(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, cfg: MetricConfig) -> MetricResult:
    """The `ggn_mc_diag` metric: Monte-Carlo diag(GGN) of the mean calibration loss, `cfg.probes` sampled-label
    gradients per micro-batch of `cfg.batch_size` windows (token-weighted like the loss), each folded as
    N * g^2 the moment autograd finishes it. Saliency 0.5 * diag(GGN) * w^2 (or the diagonal itself, as
    `cfg.hutchinson_output` says). Never negative; an estimate of diag(GGN), not of diag(H)."""
    if cfg.probes < 1:
        raise EsaError(f"ggn_mc_diag needs at least 1 sampled-label gradient (probes), got {cfg.probes}")
    if cfg.hutchinson_output not in ("saliency", "diag"):
        raise EsaError(f"unknown hutchinson_output {cfg.hutchinson_output!r}; accepted: diag, saliency")
    params = studied_params(model, specs)
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    dev = input_device(model)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + 17)
    scale = {"w": 0.0}

    def fold(name: str, p: torch.nn.Parameter, g: torch.Tensor) -> None:
        g32 = g.float()
        acc[name].addcmul_(g32, g32, value=scale["w"])

    with streamed_grads(params, fold):
        for batch, w in micro_batches(ids, cfg, "ggn_mc_diag"):
            batch = batch.to(dev)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            logits = logits.reshape(-1, logits.shape[-1])
            probs = logits.detach().softmax(-1)
            # E[g g^T] = GGN / N for the mean loss of N tokens at labels drawn from the model: fold N * g^2
            scale["w"] = w * logits.shape[0] / cfg.probes
            for s in range(cfg.probes):
                y = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
                F.cross_entropy(logits, y).backward(retain_graph=s < cfg.probes - 1)
            del logits, probs
    if cfg.hutchinson_output == "saliency":
        for n, p in params.items():
            acc[n].mul_(p.detach().float().square()).mul_(0.5)
    what = "0.5*diag(GGN)*w^2" if cfg.hutchinson_output == "saliency" else "diag(GGN)"
    return MetricResult(acc, {"variant": f"{what}, {cfg.probes} sampled-label gradients per micro-batch of "
                                         f"{cfg.batch_size} (Monte-Carlo GGN = Fisher; not diag(H))"})


class _grads_on:
    """requires_grad on `params` for the block only (the model is loaded with every gradient off)."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params

    def __enter__(self) -> None:
        for p in self.params.values():
            p.requires_grad_(True)

    def __exit__(self, *exc: Any) -> None:
        for p in self.params.values():
            p.grad = None
            p.requires_grad_(False)


# ---------------------------------------------------------------- reliability measurement
class _Sets:
    """Two independent estimate streams (sets A and B) of one estimator: running sums, and the pooled sum of
    squares for the per-weight standard error."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        z = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        self.sum = [dict(z), {n: t.clone() for n, t in z.items()}]
        self.sumsq = {n: t.clone() for n, t in z.items()}
        self.count = [0, 0]
        self.seconds = 0.0

    def add(self, which: int, est: dict[str, torch.Tensor]) -> None:
        for n, e in est.items():
            self.sum[which][n].add_(e)
            self.sumsq[n].addcmul_(e, e)
        self.count[which] += 1


class _HalfW2(Mapping[str, torch.Tensor]):
    """0.5 * w^2 per matrix, computed when asked: the saliency factor without a model-sized buffer."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.params[name].detach().float().square().mul_(0.5)

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def _topk_sets(sal: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(sal.reshape(-1), min(k, sal.numel())).indices


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = int(torch.isin(a, b).sum())
    return inter / (len(a) + len(b) - inter)


def _compare(sets: _Sets, w2: Mapping[str, torch.Tensor], topk: int) -> dict[str, float]:
    """Sets A and B at their current probe count: per-matrix top-k Jaccard and relative L2 disagreement."""
    jac, num, den = [], 0.0, 0.0
    for n, q in w2.items():
        a, b = sets.sum[0][n] / sets.count[0], sets.sum[1][n] / sets.count[1]
        jac.append(_jaccard(_topk_sets(a * q, topk), _topk_sets(b * q, topk)))
        num += float((a - b).double().square().sum())
        den += float(((a + b) / 2).double().square().sum())
    t = torch.tensor(jac)
    # E||A - B||^2 / 2 is one stream's squared error against the true diagonal d, and E||(A + B) / 2||^2 =
    # ||d||^2 + that error / 2, so both are estimated without an oracle; noise-only streams give no ||d||
    signal = den - num / 4
    return {"jaccard_median": float(t.median()), "jaccard_mean": float(t.mean()), "jaccard_q10": float(t.quantile(0.1)),
            "rel_error": math.sqrt(num / 2 / signal) if signal > 0 else math.nan}


def _snr(sets: _Sets, w2: Mapping[str, torch.Tensor], topk: int) -> dict[str, Any]:
    """Held-out resolution: each matrix's top-k and median-ranked weight are chosen by stream A and judged by
    stream B's independent estimate (chosen and judged by one noisy estimate, pure noise would look resolved:
    the top-k of noise sits far above the median). Per-weight SNR = |mean_B| / SE_B, SE_B = sd / sqrt(P) with
    the per-probe sd pooled over both streams; z = (median top-k score - matrix median) in SE_B; the probes
    for z >= 2 follow from SE ~ 1/sqrt(P) (inf when the median z is within 2 of its SEs of 0)."""
    p = min(sets.count)
    if p < 1 or sum(sets.count) < 2:
        raise EsaError(f"a held-out standard error needs a probe in each stream, got {sets.count}")
    n_all = sum(sets.count)
    top_snr, med_snr, z, need = [], [], [], []
    for n, q in w2.items():
        pooled = (sets.sum[0][n] + sets.sum[1][n]) / n_all
        var = (sets.sumsq[n] / n_all - pooled.square()).clamp_min(0) * (n_all / (n_all - 1))
        sd1 = var.sqrt().reshape(-1)  # per-probe standard deviation of one product
        mean_b = (sets.sum[1][n] / sets.count[1]).reshape(-1)
        sel = (sets.sum[0][n] / sets.count[0] * q).reshape(-1)  # stream A's saliency: the selection
        q1 = q.reshape(-1)
        se_b = sd1 / math.sqrt(sets.count[1])
        snr = mean_b.abs() / se_b.clamp_min(1e-30)
        top = _topk_sets(sel, topk)
        mid = sel.argsort()[sel.numel() // 2]
        top_snr.append(float(snr[top].median()))
        med_snr.append(float(snr[mid]))
        sal_b = mean_b * q1
        gap = float(sal_b[top].median() - sal_b.median())
        sd_top = float((sd1 * q1)[top].median())  # one product's sd of the saliency at the top-k
        z.append(gap / max(sd_top / math.sqrt(sets.count[1]), 1e-300))
        need.append(math.inf if gap <= 0 else (RESOLVE_Z * sd_top / gap) ** 2)

    def med(x: list[float]) -> float:
        return float(torch.tensor(x, dtype=torch.float64).median())

    z_med, z_se, needed = median_z_and_needed(z, need)
    return {"probes": sets.count[1], "snr_topk_median": med(top_snr), "snr_median_weight": med(med_snr),
            "z_topk_vs_median": z_med, "z_se": z_se, "probes_needed_z2": needed,
            "matrices_resolved": float(sum(v >= RESOLVE_Z for v in z) / len(z))}


def extrapolate(points: Sequence[tuple[int, float]], target: float = TARGET_JACCARD) -> dict[str, Any]:
    """Probes for a Jaccard of `target`: the smallest measured P that reaches it, else a straight-line fit of
    logit(J) on log P through >= MIN_FIT_POINTS measured points (J strictly between 0 and 1) solved for the target. A fit
    that reaches the target only past MAX_EXTRAPOLATION x the largest P measured is not estimable (a nearly
    flat curve extrapolates to any number); its solution stays in `fit_probes`."""
    reached = [p for p, j in points if j >= target]
    usable = [(p, j) for p, j in points if 0 < j < 1]
    out: dict[str, Any] = {"target": target, "reached_at": min(reached) if reached else None}
    if len(usable) < MIN_FIT_POINTS:  # two points fix a line exactly: nothing would test the law
        out.update(probes=out["reached_at"], method="measured" if reached else
                   f"not estimable: a fit needs >= {MIN_FIT_POINTS} measured P with 0 < J < 1, got {len(usable)}")
        return out
    x = torch.tensor([math.log(p) for p, _ in usable], dtype=torch.float64)
    y = torch.tensor([math.log(j / (1 - j)) for _, j in usable], dtype=torch.float64)
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm).square().sum()))
    icpt = float(ym - slope * xm)
    fit = icpt + slope * x
    ss = float((y - ym).square().sum())
    r2 = 1 - float((y - fit).square().sum()) / ss if ss > 0 else math.nan
    out.update(slope=slope, intercept=icpt, r2=r2)
    if reached:
        out.update(probes=min(reached), method="measured")
    elif slope <= 0:
        out.update(probes=math.inf, method="not estimable: Jaccard does not grow with probes")
    else:
        fit_p = math.exp((math.log(target / (1 - target)) - icpt) / slope)
        p_max = max(p for p, _ in points)
        if fit_p > MAX_EXTRAPOLATION * p_max:
            out.update(probes=math.inf, fit_probes=fit_p,
                       method=f"not estimable: the fit reaches {target:g} only past {MAX_EXTRAPOLATION}x the largest P "
                              f"measured ({p_max})")
        else:
            out.update(probes=fit_p, method="logit-log fit")
    return out


def reliability(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, probes: int, topk: int = 100,
                seed: int = 0, estimators: Sequence[str] = ESTIMATORS, show_progress: bool = False,
                on_checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Noise of the curvature diagonals on the windows `ids` (one batch: one Hessian, of their mean loss).

    Each estimator runs two independent streams of `probes` products each (Hutchinson: Rademacher probes of
    seeds `seed` and `seed + 1`; ggn_mc: sampled labels), interleaved, all from one forward. At P = 1, 2, 4,
    ... `probes` it records the top-`topk`-per-matrix Jaccard between the streams' saliencies (0.5 * d * w^2)
    and their relative disagreement, with the seconds spent per product; at the end the per-weight SNR from
    all 2 * `probes` products, and the probes needed (Jaccard >= 0.4 extrapolated; z >= 2 from the SE).
    `on_checkpoint` receives the result so far at every checkpoint (long runs on a shared machine).
    """
    unknown_est = [e for e in estimators if e not in ESTIMATORS]
    if unknown_est or not estimators:
        raise EsaError(f"unknown estimator(s) {unknown_est or list(estimators)}; accepted: {', '.join(ESTIMATORS)}")
    if probes < 1:
        raise EsaError(f"reliability needs at least 1 probe per set, got {probes}")
    if topk < 1:
        raise EsaError(f"topk must be at least 1, got {topk}")
    if not specs:
        raise EsaError("no weights to measure")
    params = {s.name: model.get_parameter(s.name) for s in specs}
    w2 = _HalfW2(params)
    dev = input_device(model)
    checkpoints = sorted({min(2**i, probes) for i in range(int(math.log2(probes)) + 2)})
    sets = {e: _Sets(params) for e in estimators}
    gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + 17)
    rows: list[dict[str, Any]] = []
    with _grads_on(params), math_attention():
        t0 = time.perf_counter()
        probe = CurvatureProbe(model, params, ids, need_hvp="hutchinson" in estimators)
        setup = time.perf_counter() - t0
        for i in progress(range(probes), desc="curvature reliability", disable=not show_progress, unit="probe"):
            for e in estimators:
                for which in (0, 1):
                    t0 = time.perf_counter()
                    # in place on the fresh product tensors: no second full-size copy (memory on a shared box)
                    if e == "hutchinson":
                        v = rademacher(params, dev, seed + which, i)
                        est = {n: hv.float().mul_(v[n]) for n, hv in probe.hvp(v).items()}
                        del v
                    else:
                        est = {n: g.float().square_().mul_(probe.n_tokens) for n, g in
                               probe.sampled_gradient(gen).items()}
                    sets[e].seconds += time.perf_counter() - t0
                    sets[e].add(which, est)
                    del est
                if i + 1 in checkpoints:
                    rows.append({"estimator": e, "probes": i + 1, **_compare(sets[e], w2, topk),
                                 "seconds_per_product": sets[e].seconds / (2 * (i + 1))})
            if on_checkpoint is not None and i + 1 in checkpoints and i + 1 < probes:
                on_checkpoint(_result(rows, sets, w2, topk, setup, ids, params))
        probe.close()
    return _result(rows, sets, w2, topk, setup, ids, params)


def _result(rows: list[dict[str, Any]], sets: dict[str, _Sets], w2: Mapping[str, torch.Tensor], topk: int, setup: float,
            ids: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
    summary = {}
    for e, st in sets.items():
        pts = [(r["probes"], r["jaccard_median"]) for r in rows if r["estimator"] == e]
        summary[e] = {**_snr(st, w2, topk), "jaccard_target": extrapolate(pts),
                      "seconds_per_product": st.seconds / max(1, sum(st.count))}
    return {"curve": list(rows), "summary": summary, "setup_seconds": setup, "topk": topk,
            "windows": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "n_weights": sum(p.numel() for p in params.values()),
            "n_matrices": len(params)}


def resolution_at(summary: dict[str, Any], probes: int) -> dict[str, Any]:
    """What the measured per-probe spread says about a run with `probes` probes: the z of its top-k against
    the median (SE shrinks as 1/sqrt(P)) and whether that clears RESOLVE_Z."""
    z_measured, p_measured = summary["z_topk_vs_median"], summary["probes"]
    z = z_measured * math.sqrt(probes / p_measured)
    return {"probes": probes, "z": z, "resolved": z >= RESOLVE_Z, "probes_needed": summary["probes_needed_z2"],
            "jaccard_probes_needed": summary["jaccard_target"]["probes"]}


# ---------------------------------------------------------------- exact oracles and Diag++ (small matrices)
def exact_diagonals(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], ids: torch.Tensor,
                    hessian: bool = True, ggn: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Exact diag(H) and diag(GGN) of the mean loss of `ids` (one batch), per matrix. For tiny matrices only:
    one backward per weight for H, one per logit (tokens x vocab) for the GGN."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    with _grads_on(params):
        batch = ids.to(input_device(model))
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        logits = logits.reshape(-1, logits.shape[-1])
        n_tok, vocab = logits.shape
        loss = F.cross_entropy(logits, batch[:, 1:].reshape(-1))
        plist = list(params.values())
        grads = torch.autograd.grad(loss, plist, create_graph=hessian, retain_graph=True)
        probs = logits.detach().softmax(-1)
        for (name, p), g in zip(params.items(), grads, strict=True):
            out[name] = {}
            # one vmapped backward per quantity (is_grads_batched): row by row is ~20x slower on a CPU
            if hessian:  # row i of H is the gradient of g_i; keep its diagonal
                eye = torch.eye(p.numel(), dtype=g.dtype, device=g.device)
                (rows,) = torch.autograd.grad(g.reshape(-1), [p], grad_outputs=[eye], is_grads_batched=True,
                                              retain_graph=True)
                out[name]["hessian"] = rows.reshape(p.numel(), -1).diagonal().reshape(p.shape).detach()
                del rows, eye
            if ggn:  # GGN = (1/N) sum_t J_t^T (diag p_t - p_t p_t^T) J_t with J_t = dz_t/dw, from per-logit rows
                eye = torch.eye(n_tok * vocab, dtype=logits.dtype, device=logits.device)
                (jac,) = torch.autograd.grad(logits.reshape(-1), [p], grad_outputs=[eye], is_grads_batched=True,
                                             retain_graph=True)
                jac = jac.reshape(n_tok, vocab, -1)
                pj = torch.einsum("tv,tvi->ti", probs, jac)
                d = (torch.einsum("tv,tvi->i", probs, jac.square()) - pj.square().sum(0)) / n_tok
                out[name]["ggn"] = d.reshape(p.shape).detach()
    return out


def diag_pp(hvp: Callable[[torch.Tensor], torch.Tensor], n: int, products: int, gen: torch.Generator,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Diag++ with `products` matrix-vector products of a symmetric n x n operator (flat vectors).

    A third sketches the range (Q = orth(A S)), a third gives the exact diagonal of Q Q^T A, and the last third
    is Hutchinson on the deflated remainder (I - Q Q^T) A, which carries less off-diagonal mass when A has
    a few dominant directions. Unbiased like Hutchinson; better or worse depends on the spectrum (measured).
    """
    if products < 3:
        raise EsaError(f"diag_pp needs at least 3 products (sketch, exact part, residual), got {products}")
    k = products // 3
    m = products - 2 * k

    def rad(cols: int) -> torch.Tensor:
        return torch.randint(0, 2, (n, cols), generator=gen, dtype=torch.int64).to(dtype).mul_(2).sub_(1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([hvp(x[:, j]) for j in range(x.shape[1])], dim=1)

    q, _ = torch.linalg.qr(apply(rad(k)))
    aq = apply(q)
    low = (q * aq).sum(1)  # diag(Q Q^T A) = rowwise <Q_i, (A Q)_i>, A symmetric
    v = rad(m)
    av = apply(v)
    resid = av - q @ (q.T @ av)  # (I - QQ^T) A v
    return low + (v * resid).mean(1)


def hutchinson_flat(hvp: Callable[[torch.Tensor], torch.Tensor], n: int, products: int, gen: torch.Generator,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Plain Hutchinson on flat vectors (the reference for diag_pp at an equal number of products)."""
    v = torch.randint(0, 2, (n, products), generator=gen, dtype=torch.int64).to(dtype).mul_(2).sub_(1)
    return torch.stack([v[:, j] * hvp(v[:, j]) for j in range(products)], 1).mean(1)


# ---------------------------------------------------------------- what the notebooks run and print
def reliability_budget(profile_probes: int, seqlen: int) -> dict[str, int]:
    """The measurement a profile can afford, from its Hutchinson probe count: streams of 2 x that many
    products (so the SE rests on 4x the run's probes) on two windows of <= 128 tokens; a profile of <= 2
    probes (smoke: a machinery check, on week 1's critical path) gets streams of 2 on one window. The deeper
    curve is `make curvature-reliability`'s record."""
    small = profile_probes <= 2
    return {"probes": 2 if small else 2 * profile_probes, "windows": 1 if small else 2,
            "seqlen": min(seqlen, 128)}


def tables(rel: dict[str, Any]) -> tuple[Any, Any]:
    """(curve, summary) DataFrames of a `reliability` result, with the measurement's size in every row."""
    import pandas as pd

    size = {"windows": rel["windows"], "seqlen": rel["seqlen"], "topk_per_matrix": rel["topk"]}
    curve = pd.DataFrame(rel["curve"]).assign(**size)
    # NaN rel_error: the streams' disagreement exceeds their mean's norm, so ||d|| has no positive estimate
    curve["note"] = ["rel_error not estimable: noise exceeds the signal estimate" if not math.isfinite(e) else ""
                     for e in curve["rel_error"]]
    rows = []
    for e, s in rel["summary"].items():
        j = s["jaccard_target"]
        rows.append({"estimator": e, "quantity": "diag(H)" if e == "hutchinson" else "diag(GGN), not diag(H)",
                     "products": s["probes"], "snr_topk_median": s["snr_topk_median"],
                     "snr_median_weight": s["snr_median_weight"], "z_topk_vs_median": s["z_topk_vs_median"],
                     "z_se": s.get("z_se", math.nan), "probes_needed_z2": s["probes_needed_z2"], "matrices_resolved": s["matrices_resolved"],
                     "probes_for_jaccard_0.4": j["probes"], "jaccard_method": j["method"],
                     "seconds_per_product": s["seconds_per_product"], **size})
    return curve, pd.DataFrame(rows)


def summary_lines(rel: dict[str, Any], resolution: dict[str, Any] | None) -> list[str]:
    """Prose from the numbers of a `reliability` result (and the verdict it gives the run's probes)."""
    lines = []
    for e, s in rel["summary"].items():
        j = s["jaccard_target"]
        # every method but "measured" and "logit-log fit" says "not estimable" and why; those two carry a number
        need_txt = (j["method"] if j["method"].startswith("not estimable") else f"{j['probes']:.3g} ({j['method']})")
        z_need = (f"{s['probes_needed_z2']:.3g} (median over matrices)" if math.isfinite(s["probes_needed_z2"]) else
                  f"not estimable (z within 2 of its standard errors, {s.get('z_se', math.nan):.2f}, of 0)")
        lines.append(f"- **{e}** ({'diag(H)' if e == 'hutchinson' else 'diag(GGN), not diag(H)'}; {rel['windows']} x "
                     f"{rel['seqlen']} tokens, 2 streams of {s['probes']} products): held-out per-weight SNR (|mean| / SE) "
                     f"{s['snr_topk_median']:.2f} at the top-{rel['topk']} and {s['snr_median_weight']:.2f} at the median "
                     f"weight; the top-k stands {s['z_topk_vs_median']:.2f} SE above the median "
                     f"({s['matrices_resolved']:.0%} of matrices >= {RESOLVE_Z:g}); probes for z >= {RESOLVE_Z:g}: "
                     f"{z_need}; for a two-stream Jaccard >= {TARGET_JACCARD}: {need_txt}; "
                     f"{s['seconds_per_product']:.2f} s per product.")
    if resolution is not None:
        lines.append(f"- At the profile's {resolution['probes']} Hutchinson probes the top-k stands z = "
                     f"{resolution['z']:.2f} SE above the median: "
                     + ("resolved." if resolution["resolved"] else
                        "not resolved, so its stability and heavy-tail rows below are 'underpowered' (with the "
                        "probes they need) or, with no held-out signal at all, FAIL."))
    return lines


RECORD_COMMAND = "make curvature-reliability"


def record_path(bench_dir: Path, model: str) -> Path:
    """Where tests/bench/curvature_reliability.py records the deeper measurement of `model`."""
    return Path(bench_dir) / f"curvature-reliability-{model}.json"


def read_record(bench_dir: Path, model: str) -> dict[str, Any] | None:
    """The recorded deeper measurement of `model` (a `reliability` result plus its provenance), or None when
    this machine has none or the file is not one (a stopped run's partial record is kept: `complete` says)."""
    path = record_path(bench_dir, model)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not {"curve", "summary", "windows", "seqlen", "topk"} <= rec.keys():
        return None
    for e, summ in rec["summary"].items():  # the extrapolation rule of this code, not of the recording code
        summ["jaccard_target"] = extrapolate([(r["probes"], r["jaccard_median"]) for r in rec["curve"]
                                              if r["estimator"] == e])
    return {**rec, "path": str(path), "recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))}


def record_lines(rec: dict[str, Any] | None, model: str) -> list[str]:
    """Prose for the recorded measurement (or how to make one): what it is, then `summary_lines`."""
    if rec is None:
        return [f"- No deeper measurement of {model} is recorded on this machine: `{RECORD_COMMAND}` measures "
                "both embedded models to 64 products per stream (about 15 and 25 min on 2 CPU cores)."]
    p_max = max(r["probes"] for r in rec["curve"])
    head = (f"- Recorded measurement (not this run): {rec['windows']} x {rec['seqlen']} tokens of "
            f"{rec.get('corpus', '?')}, up to {p_max} products per stream, {rec['recorded']}"
            + ("" if rec.get("complete", False) else " (stopped early: partial)") + f"; `{Path(rec['path']).name}`.")
    curves = []
    for e in rec["summary"]:
        pts = ", ".join(f"{r['probes']}: {r['jaccard_median']:.3f}" for r in rec["curve"] if r["estimator"] == e)
        curves.append(f"- {e}: median two-stream top-{rec['topk']} Jaccard by products per stream: {pts}.")
    return [head, *curves, *summary_lines(rec, None)]
