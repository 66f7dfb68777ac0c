"""Benchmark of the curvature diagonals (not a test): cost per product and error at equal products.

    python tests/bench/bench_curvature.py                          # CPU: smollm2-135m, 1 x 128 tokens
    python tests/bench/bench_curvature.py --model tiny-llama --skip-oracle

1. Cost, on `--model` and identical tokens, interleaved and repeated (the minimum over rounds is kept, so a
   load swing on a shared machine hits every pass alike): a plain forward+backward (math attention), the
   hutchinson_diag metric with P probes and the ggn_mc_diag metric with P samples. Ratios: seconds per
   product over forward+backward, and ggn_mc per sample over Hutchinson per probe (the issue's <= 1.1).
2. Error at an equal number of products against the exact per-matrix diagonals of tiny-llama (one 16 x 32
   matrix, one window): plain Hutchinson and Diag++ against diag(H), ggn_mc against diag(GGN) and, to show
   the quantity differs, against diag(H). Mean over repeats.
Writes reports/bench/curvature-<device>-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def _min_time(fn: Any, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cost(model_name: str, seqlen: int, products: int, rounds: int) -> dict[str, Any]:
    from esa.models import load
    from esa.sensitivity.metrics import METRICS, MetricConfig, batch_loss
    from esa.sensitivity.passes import math_attention

    lm = load(model_name, device="cuda" if torch.cuda.is_available() else "cpu", attn_implementation="eager")
    ids = torch.randint(0, lm.info.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    params = [lm.model.get_parameter(s.name) for s in lm.inventory]

    def fwd_bwd() -> None:
        for p in params:
            p.requires_grad_(True)
        try:
            with math_attention():
                batch_loss(lm.model, ids).backward()
        finally:
            for p in params:
                p.grad = None
                p.requires_grad_(False)

    cfgs = {m: MetricConfig(batch_size=1, probes=products, show_progress=False) for m in ("hutchinson_diag", "ggn_mc_diag")}
    passes = {"forward_backward": fwd_bwd,
              **{m: (lambda m=m: METRICS[m](lm.model, lm.inventory, ids, cfgs[m]).scores) for m in cfgs}}
    fwd_bwd()  # warm-up
    load_before = os.getloadavg()
    times = {k: float("inf") for k in passes}
    for _ in range(rounds):
        for k, fn in passes.items():
            times[k] = min(times[k], _min_time(fn, 1))
    fb = times["forward_backward"]
    # one call = one forward + first backward, then `products` products: the per-product cost is the slope
    per = {m: (times[m] - fb) / products for m in cfgs}
    return {"model": model_name, "seqlen": seqlen, "products": products, "rounds": rounds, "seconds": times,
            "seconds_per_product": per,
            "per_product_vs_forward_backward": {m: per[m] / fb for m in cfgs},
            "ggn_sample_vs_hutchinson_probe": per["ggn_mc_diag"] / per["hutchinson_diag"],
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def oracle(products: list[int], repeats: int) -> dict[str, Any]:
    """Equal-product errors on tiny-llama's layer-1 k_proj (512 weights) against its exact diagonals."""
    from esa.models import load
    from esa.sensitivity import curvature as C
    from esa.sensitivity.metrics import METRICS, MetricConfig, batch_loss

    lm = load("tiny-llama", device="cpu")
    spec = next(s for s in lm.inventory if s.layer == 1 and s.component == "k")
    p = lm.model.get_parameter(spec.name)
    ids = torch.randint(3, 259, (1, 8), generator=torch.Generator().manual_seed(0))
    exact = C.exact_diagonals(lm.model, {spec.name: p}, ids)[spec.name]
    p.requires_grad_(True)
    try:  # the matrix's Hessian block, for Diag++ on flat vectors
        (g,) = torch.autograd.grad(batch_loss(lm.model, ids), [p], create_graph=True)
        (rows,) = torch.autograd.grad(g.reshape(-1), [p], grad_outputs=[torch.eye(p.numel())], is_grads_batched=True)
        hess = rows.reshape(p.numel(), -1).double().detach()
    finally:
        p.requires_grad_(False)
    d_h, d_g = exact["hessian"].reshape(-1).double(), exact["ggn"].reshape(-1).double()
    off = float(hess.square().sum() - hess.diagonal().square().sum())
    rows = []
    for m in products:
        errs: dict[str, list[float]] = {k: [] for k in ("hutchinson_vs_H", "diag_pp_vs_H", "ggn_mc_vs_GGN", "ggn_mc_vs_H")}
        for rep in range(repeats):
            gen = torch.Generator().manual_seed(rep)
            cfg = MetricConfig(batch_size=1, probes=m, seed=rep, hutchinson_output="diag", show_progress=False)
            hut = METRICS["hutchinson_diag"](lm.model, [spec], ids, cfg).scores[spec.name].reshape(-1).double()
            pp = C.diag_pp(lambda x: hess @ x, p.numel(), m, gen)
            gg = METRICS["ggn_mc_diag"](lm.model, [spec], ids, cfg).scores[spec.name].reshape(-1).double()
            errs["hutchinson_vs_H"].append(float((hut - d_h).norm() / d_h.norm()))
            errs["diag_pp_vs_H"].append(float((pp - d_h).norm() / d_h.norm()))
            errs["ggn_mc_vs_GGN"].append(float((gg - d_g).norm() / d_g.norm()))
            errs["ggn_mc_vs_H"].append(float((gg - d_h).norm() / d_h.norm()))
        rows.append({"products": m, **{k: sum(v) / len(v) for k, v in errs.items()},
                     "hutchinson_theory": (off / m) ** 0.5 / float(d_h.norm())})
    spearman = float(torch.corrcoef(torch.stack([d_h.argsort().argsort().double(), d_g.argsort().argsort().double()]))[0, 1])
    return {"matrix": spec.name, "weights": p.numel(), "window_tokens": 8, "repeats": repeats, "rows": rows,
            "ggn_vs_hessian_diag_rel_diff": float((d_g - d_h).norm() / d_h.norm()),
            "ggn_vs_hessian_diag_spearman": spearman, "hessian_diag_negative_fraction": float((d_h < 0).double().mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--products", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--oracle-products", default="6,12,24,48")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--skip-oracle", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("ESA_PROGRESS", "0")
    res: dict[str, Any] = {"cost": cost(args.model, args.seqlen, args.products, args.rounds)}
    if not args.skip_oracle:
        res["oracle"] = oracle([int(x) for x in args.oracle_products.split(",")], args.repeats)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out) if args.out else REPO / "reports" / "bench" / f"curvature-{dev}-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
