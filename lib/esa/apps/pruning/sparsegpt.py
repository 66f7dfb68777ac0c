"""SparseGPT (Frantar & Alistarh 2023): prune one linear layer and reconstruct its output from calibration data.

Our own implementation of the published algorithm. For a layer y = W x with calibration inputs X (tokens x
cols), the layer-wise objective is ||X W^T - X W'^T||^2, whose Hessian per row is H = 2 X^T X / n (shared by
all rows). Columns are processed left to right; pruning weight (r, j) with error e = w_rj / [H_F^-1]_jj is
compensated on the not-yet-processed columns F of that row by the optimal brain surgeon (OBS) update
-e * [H_F^-1]_{j, F}. The rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U) are exactly these
updates for the shrinking sets F, so one factorisation serves every column. Updates are lazy: inside a
block of `blocksize` columns they are applied column by column, to the rest of the matrix once per block
(one matmul). Mask selection is adaptive: per column block, the weights with the lowest w^2 / [U]_jj^2 (the
OBS saliency) among the block's current (already updated) values are pruned; for N:M the choice is made
per run of M columns when the run is reached.

Deviations from the reference code, on purpose:
- each matrix (and, with group `row`, each row) prunes exactly floor(sparsity x size) weights: the per-block
  quotas add up to it (the reference prunes every weight <= a per-block threshold, slightly more);
- inputs that are zero on all calibration tokens ("dead" columns) get unit curvature instead of having their
  weights zeroed wholesale, so the sparsity stays exact and protected weights survive;
- linears that read the same input (q/k/v, gate/up) share one Hessian and are solved as one stacked matrix
  (rows are independent given H; masks are still chosen per matrix).
Protected weights are never pruned; like every kept weight they may be adjusted by the reconstruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esa.apps.pruning.core import Decision, Job
from esa.apps.pruning.sparsity_patterns import Pattern, block_quota, lowest_flat, lowest_rows, row_quota
from esa.errors import EsaError


def hessian_inverse_factor(xtx: torch.Tensor, n_tokens: int, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, H = 2 X^T X / n. (cols, cols) fp32."""
    h = xtx.detach().float() * (2.0 / max(1, n_tokens))
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0  # no calibration signal: unit curvature (see the module docstring)
    mean = float(diag.mean())
    diag.add_(damp * mean if mean > 0 else damp)
    try:
        lower = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError as e:
        raise EsaError(f"SparseGPT: the calibration Hessian is not positive definite with damp={damp:g} "
                       "(too few calibration tokens for this layer, or fp32 round-off); raise damp") from e


def reconstruct(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    n_tokens: int,
    sparsity: float | list[float],
    pattern: Pattern,
    group: str = "matrix",
    blocksize: int = 128,
    damp: float = 0.01,
    protected: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    parts: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` (rows, cols) and update its kept weights; returns (new weight fp32, pruned mask).

    `mask` (bool, True = pruned) fixes the pruned set instead of choosing it. `parts` are the row counts of
    matrices stacked in `weight` (they share the input, hence H): the `matrix` group chooses per part, with
    `sparsity` one value or one per part. `protected`: flat indices into `weight` that are never pruned."""
    rows, cols = weight.shape
    parts = parts or [rows]
    sps = sparsity if isinstance(sparsity, list) else [sparsity] * len(parts)
    if sum(parts) != rows or len(sps) != len(parts):
        raise EsaError(f"SparseGPT: parts {parts} / sparsities {sps} do not match a matrix of {rows} rows")
    if pattern.kind == "nm" and blocksize % pattern.m:
        raise EsaError(f"SparseGPT: blocksize {blocksize} must be a multiple of M={pattern.m} for {pattern.label}")
    u = hessian_inverse_factor(xtx, n_tokens, damp)  # (cols, cols)
    # transposed layout (cols, rows): each column of W is one contiguous row here, so the per-column steps
    # of the inner loop touch contiguous memory
    wt = weight.detach().float().t().contiguous()
    pruned_t = torch.zeros(cols, rows, dtype=torch.bool, device=wt.device)
    guard = torch.zeros(rows, cols, dtype=torch.bool, device=wt.device)  # protected
    if protected is not None and protected.numel():
        guard.view(-1)[protected.to(wt.device)] = True
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p)
    spans = list(zip(zip(offsets[:-1], offsets[1:], strict=True), sps, strict=True))
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = wt[i1:i2].clone()  # (B, rows): updated column by column
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)  # (B,)
        if mask is not None:
            m1 = mask[:, i1:i2].to(wt.device).t().contiguous()  # (B, rows)
        elif pattern.kind == "unstructured":
            sal = _saliency(w1.t(), d, guard[:, i1:i2])  # (rows, B)
            m = torch.zeros_like(sal, dtype=torch.bool)
            for (a, b), sp in spans:
                if group == "row":
                    m[a:b] = lowest_rows(sal[a:b], row_quota(sp, cols, i1, i2))
                else:
                    m[a:b] = lowest_flat(sal[a:b], block_quota(sp, b - a, cols, blocksize)[i1 // blocksize])
            m1 = m.t().contiguous()
        else:
            m1 = torch.zeros(i2 - i1, rows, dtype=torch.bool, device=wt.device)
        err1 = _columns(w1, m1, u1, guard[:, i1:i2], pattern if mask is None else None)
        wt[i1:i2] = w1
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)  # lazy batch update of the remaining columns
        pruned_t[i1:i2] = m1
    w, pruned = wt.t().contiguous(), pruned_t.t().contiguous()
    if bool((pruned & guard).any()):
        raise EsaError("SparseGPT: a protected weight was chosen for pruning (protected set too large for a block)")
    return w, pruned


def _columns(w1: torch.Tensor, m1: torch.Tensor, u1: torch.Tensor, guard: torch.Tensor,
             pattern: Pattern | None) -> torch.Tensor:
    """One column block, column by column, in place on w1 (B, rows); returns the OBS errors (B, rows).

    For N:M (`pattern`), each run's mask is chosen in m1 from the weights as updated so far when the run is
    reached; otherwise m1 is fixed. (A batched triangular solve of the same recursion was slower on CPU.)"""
    err = torch.zeros_like(w1)
    d = torch.diagonal(u1)
    keep = (~m1).float()
    for j in range(w1.shape[0]):
        if pattern is not None and pattern.kind == "nm" and j % pattern.m == 0:
            sal = _saliency(w1[j : j + pattern.m].t(), d[j : j + pattern.m], guard[:, j : j + pattern.m])  # (rows, M)
            order = torch.sort(sal, dim=1, stable=True).indices[:, : pattern.n]
            run = torch.zeros_like(sal, dtype=torch.bool).scatter_(1, order, True).t()  # (M, rows)
            m1[j : j + pattern.m] = run
            keep[j : j + pattern.m] = (~run).float()
        e = w1[j] * (1.0 - keep[j]) / d[j]  # (rows,) OBS error of this column's pruned weights
        w1[j:].addr_(u1[j, j:], e, alpha=-1.0)  # compensate on the rest of the block
        w1[j].mul_(keep[j])  # exact zeros where pruned (the update leaves round-off there)
        err[j] = e
    return err


def _saliency(w: torch.Tensor, d: torch.Tensor, guard: torch.Tensor) -> torch.Tensor:
    """OBS saliency w^2 / [U]_jj^2 (lower = cheaper to prune); protected weights +inf."""
    sal = w.square() / d.square().unsqueeze(0)
    return sal.masked_fill(guard, math.inf)


@dataclass(frozen=True)
class SparseGPT:
    """The registered SparseGPT method (same interface as a scorer: `decide(job)`)."""

    name: str = "sparsegpt"
    definition: str = ("OBS reconstruction per layer with H = 2 X^T X / n + damping, lazy column-block updates, "
                       "adaptive mask by w^2 / [chol(H^-1)]_jj^2 (Frantar & Alistarh 2023)")
    needs: str = "hessian"
    default_group: str = "matrix"
    groups: tuple[str, ...] = ("row", "matrix")
    default_calibration: str = "sequential"

    def decide(self, job: Job) -> dict[str, Decision]:
        out: dict[str, Decision] = {}
        for names in _shared_input_groups(job):
            ws = [job.params[n] for n in names]
            rows = [int(w.shape[0]) for w in ws]
            stacked = torch.cat([w.detach().float() for w in ws], dim=0) if len(ws) > 1 else ws[0].detach().float()
            prot = _stack_protected(job, names, ws)
            st = job.stats[names[0]]
            if st.xtx is None:
                raise EsaError(f"SparseGPT: no calibration Hessian was gathered for {names[0]}")
            new, mask = reconstruct(stacked, st.xtx, st.n_tokens, [job.sparsity[n] for n in names], job.pattern,
                                    job.group, job.spec.blocksize, job.spec.damp, prot, parts=rows)
            start = 0
            for n, r in zip(names, rows, strict=True):
                out[n] = Decision(mask[start : start + r], new[start : start + r])
                start += r
        return out


def _shared_input_groups(job: Job) -> list[list[str]]:
    """Matrices of the job grouped by the input statistics object they share, in inventory order."""
    groups: dict[int, list[str]] = {}
    for s in job.specs:
        groups.setdefault(id(job.stats[s.name]), []).append(s.name)
    return list(groups.values())


def _stack_protected(job: Job, names: list[str], ws: list[torch.Tensor]) -> torch.Tensor | None:
    parts, offset = [], 0
    for n, w in zip(names, ws, strict=True):
        idx = job.protected.get(n)
        if idx is not None and idx.numel():
            parts.append(idx.to(w.device).long() + offset)
        offset += w.numel()
    return torch.cat(parts) if parts else None
