"""Benchmark of the role catalogue (issue 19): wall time for n weights, against its forward passes.

    python tests/bench/bench_interpret.py [--model tiny-llama] [--weights 100] [--inputs 16] [--seqlen 32] [--threads N]

The weights are the global top-n of act_mag on the same inputs. Cost model: one baseline pass plus two
passes per weight (weight zeroed, matched control zeroed); `overhead` = catalogue time / (passes x one plain
forward over the inputs) shows what the hooks, the in-place ablations and the statistics add. Writes
reports/bench/interpret-<model>.json. Benchmarks measure, they do not assert.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esa.apps.interpret import RoleConfig, catalogue, criterion, run_roles
from esa.dispatch import input_device
from esa.models import load
from esa.perturb import weights_hash
from esa.sensitivity.metrics import MetricConfig, get_metric
from esa.sensitivity.select import select_topk
from esa.store import REPO_ROOT, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--weights", type=int, default=100)
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a CPU shared "
                    "with other jobs, 1 avoids OpenMP spin-waits that can slow a pass many times over")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t = time.perf_counter()
    lm = load(a.model, dtype=a.dtype, attn_implementation="eager")
    t_load = time.perf_counter() - t
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, min(vocab, 30000), (a.inputs, a.seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm.model(input_ids=ids.to(input_device(lm.model)), use_cache=False)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            lm.model(input_ids=ids.to(input_device(lm.model)), use_cache=False)
            times.append(time.perf_counter() - t)
    t_fwd = statistics.median(times)
    scores = get_metric("act_mag")(lm.model, lm.inventory, ids, MetricConfig(show_progress=False)).scores
    sel = select_topk(scores, lm.inventory, a.weights, "global").assign(metric="act_mag")
    h0 = weights_hash(lm.model)
    t = time.perf_counter()
    rep = run_roles(lm.model, lm.tokenizer, lm.inventory, sel, ids, cfg=RoleConfig(show_progress=False))
    t_cat = time.perf_counter() - t
    passes = rep.timing["forward_passes"]
    out = {
        "model": a.model, "n_weights": len(rep.weights), "inputs": [a.inputs, a.seqlen],
        "roles": list(catalogue()["role"]), "load_seconds": round(t_load, 2),
        "catalogue_seconds": round(t_cat, 2), "seconds_per_weight": round(t_cat / max(1, len(rep.weights)), 3),
        "baseline_seconds": round(rep.timing["baseline_seconds"], 3), "forward_passes": passes,
        "plain_forward_seconds": round(t_fwd, 4), "overhead": round(t_cat / (passes * t_fwd), 3),
        "restored_bit_exact": weights_hash(lm.model) == h0, "criterion": criterion(rep),
        "threads": torch.get_num_threads(), "device": str(input_device(lm.model)),
    }
    path = REPO_ROOT / "reports" / "bench" / f"interpret-{a.model}.json"
    write_json(path, out)
    print(out)
    print(f"wrote {path}")
    return 0 if out["restored_bit_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
