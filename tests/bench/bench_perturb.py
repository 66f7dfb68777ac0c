"""Benchmark of a perturbation sweep: wall time / (conditions x one evaluation pass), and peak memory.

    python tests/bench/bench_perturb.py [--model tiny-llama] [--windows 4] [--seqlen 128] [--topk 100]

Targets (issue 4): time ratio <= 1.1; peak memory <= model + one evaluation's activations + the backup of
the selected weights. On CUDA the peak is torch.cuda.max_memory_allocated; on CPU the process's peak RSS
growth over the plain evaluation (coarse). Writes reports/bench/perturb-<model>.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import numpy as np
import pandas as pd
import torch

from esa.evaluate import evaluate
from esa.models import load
from esa.perturb import PerturbSpec, build_groups, run_sweep, weights_hash
from esa.store import REPO_ROOT, write_json


def selection(inv, k: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in inv:
        for e in range(s.n_experts) if s.n_experts else [-1]:
            kk = min(k, s.rows * s.cols // 4)
            for r, f in enumerate(rng.choice(s.rows * s.cols, kk, replace=False)):
                rows.append(dict(seed=seed, param=s.name, expert=e, row=int(f // s.cols), col=int(f % s.cols), rank=r + 1))
    return pd.DataFrame(rows)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args(argv)
    lm = load(a.model, dtype=a.dtype)
    cuda = torch.cuda.is_available()
    dev = lm.model.get_input_embeddings().weight.device
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, min(vocab, 30000), (a.windows, a.seqlen), generator=torch.Generator().manual_seed(0))
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    evaluate(lm.model, ids, show_progress=False)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = rss_mb()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        base = evaluate(lm.model, ids, show_progress=False)
        times.append(time.perf_counter() - t)
    t_eval = statistics.median(times)
    peak_eval = torch.cuda.max_memory_allocated() if cuda else None
    sel = selection(lm.inventory, a.topk, 1)
    groups = build_groups(lm.model, lm.inventory, sel, [1], ["random_k", "magnitude_k"])
    # bit_flip is timed apart: exponent flips create subnormal/inf/NaN weights, which slow CPU matmuls
    # themselves (the model's arithmetic, not the sweep's overhead)
    spec_sets = {"main": [PerturbSpec("sign_flip"), PerturbSpec("gauss_noise", scale=0.5), PerturbSpec("zero")],
                 "bit_flip": [PerturbSpec("bit_flip", prob=0.5)]}
    h0 = weights_hash(lm.model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timing = {}
    for label, specs in spec_sets.items():
        t = time.perf_counter()
        res = run_sweep(lm.model, ids, groups, specs, baseline=base, show_progress=False)
        wall = time.perf_counter() - t
        n = len(res.table)
        timing[label] = {"n_conditions": n, "sweep_wall_s": wall, "ratio": wall / (n * t_eval)}
    k_sel = max(int(res.table["k"].max()), 1)
    backup_bytes = k_sel * next(lm.model.parameters()).element_size()
    out = {
        "model": a.model, "device": str(dev), "dtype": a.dtype, "windows": a.windows, "seqlen": a.seqlen,
        "eval_pass_s": t_eval, "ratio": timing["main"]["ratio"], "timing": timing,
        "target_ratio": 1.1, "restored_bit_exact": weights_hash(lm.model) == h0,
        "model_bytes": model_bytes, "backup_bytes_per_condition": backup_bytes,
        "peak_cuda_eval_bytes": peak_eval, "peak_cuda_sweep_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "rss_growth_over_eval_mb": rss_mb() - rss0, "note": "CPU: peak RSS growth is coarse (ru_maxrss)",
    }
    if cuda:
        out["memory_ok"] = out["peak_cuda_sweep_bytes"] <= peak_eval + backup_bytes + (1 << 20)
    write_json(REPO_ROOT / "reports" / "bench" / f"perturb-{a.model}.json", out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
