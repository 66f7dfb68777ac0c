"""Benchmark of fine-tuning (issue 15), all on one model and the same tokens, in one run:

- step time of sparse fine-tuning at density 1% vs a LoRA step at equal trainable count (target <= 1.1x);
- optimiser memory (bytes of AdamW state, measured) at each density vs LoRA at equal count and full FT;
- step time with each protection vs the unprotected step (target <= 1.05x), for full and sparse FT.

    python tests/bench/bench_training.py [--model smollm2-135m] [--batch 2] [--seqlen 128] [--steps 4] [--rounds 3]
                                         [--protect-methods sparse,full] [--threads N]

Step times are the loop's own per-step wall times (`TrainResult.steps.seconds`: forward, backward, penalty,
clipping, AdamW, write-back) with the first step of each block dropped (optimiser state is created there).
Conditions are timed in alternating blocks (`--rounds`), so a change of machine load hits all of them
alike; a ratio is the median of per-round ratios, with their range. Token ids are random (timing does
not depend on them); the selection is per-matrix magnitude top-k and the Fisher diagonal random positive
numbers, because neither value changes the work a step does. Writes reports/bench/training-<model>.json.
Benchmarks measure and do not assert.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Any

import torch

from esa.apps.training import (
    FullFT,
    RetentionSpec,
    SparseFT,
    TrainConfig,
    make_method,
    targets_at_density,
    train,
)
from esa.errors import EsaError
from esa.models import load
from esa.store import REPO_ROOT, write_json

DENSITIES = (1e-4, 1e-3, 1e-2, 5e-2)
RETENTIONS = ("none", "freeze", "anchor", "ewc", "random_freeze")


def _step_times(lm, method, ids: torch.Tensor, steps: int, inventory=None, protect: RetentionSpec | None = None
                ) -> tuple[list[float], int, int]:
    """Per-step seconds of one block (first step dropped), optimiser bytes, trainable count."""
    res = train(lm.model, method, ids, TrainConfig(steps=steps + 1, batch_size=ids.shape[0], lr=1e-6,
                                                   show_progress=False), inventory=inventory, protect=protect)
    lm.model = res.model  # LoRA returns the merged plain model
    return res.steps["seconds"].tolist()[1:], res.summary["optimizer_state_bytes"], res.summary["n_trainable"]


def _ratio(rounds: list[dict[str, float]], a: str, b: str) -> dict[str, Any]:
    per_round = [r[a] / r[b] for r in rounds]
    return dict(ratio=statistics.median(per_round), min=min(per_round), max=max(per_round),
                per_round=[round(x, 4) for x in per_round])


def bench_training(model: str = "smollm2-135m", batch: int = 2, seqlen: int = 128, steps: int = 4,
                   rounds: int = 3, densities: tuple[float, ...] = DENSITIES,
                   protect_methods: tuple[str, ...] = ("sparse", "full")) -> dict[str, Any]:
    """Every ratio of the issue in one run; returns the JSON-able result."""
    t_start = time.perf_counter()
    lm = load(model, dtype="float32")
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, min(vocab, 30000), (batch, seqlen), generator=torch.Generator().manual_seed(0))
    mags = {s.name: lm.model.get_parameter(s.name).detach().abs() for s in lm.inventory}
    n_studied = sum(s.numel for s in lm.inventory)
    n_params = sum(p.numel() for p in lm.model.parameters())
    out: dict[str, Any] = dict(model=model, batch=batch, seqlen=seqlen, steps_per_block=steps, rounds=rounds,
                               n_params=n_params, n_studied=n_studied, torch_threads=torch.get_num_threads(),
                               device="cuda" if torch.cuda.is_available() else "cpu",
                               machine=dict(python=platform.python_version(), torch=torch.__version__))

    # 1. sparse at 1% vs LoRA at equal count, alternating blocks
    t1 = targets_at_density(mags, lm.inventory, 1e-2)
    times: list[dict[str, float]] = []
    for _ in range(rounds):
        row = {}
        for name in ("sparse", "lora"):
            method = SparseFT(t1) if name == "sparse" else make_method("lora", lm.inventory, targets=t1)
            secs, _, _ = _step_times(lm, method, ids, steps)
            row[name] = statistics.median(secs)
        times.append(row)
    out["sparse_vs_lora_1pct"] = dict(**_ratio(times, "sparse", "lora"), target=1.1,
                                      sparse_s=statistics.median(r["sparse"] for r in times),
                                      lora_s=statistics.median(r["lora"] for r in times))

    # 2. optimiser memory per density vs LoRA at equal count and full FT (one short block each)
    memory = []
    for d in densities:
        targets = targets_at_density(mags, lm.inventory, d)
        _, sparse_bytes, k = _step_times(lm, SparseFT(targets), ids, 1)
        row: dict[str, Any] = dict(density=d, k=k, sparse_bytes=sparse_bytes, sparse_bytes_per_k=sparse_bytes / k)
        try:
            lora = make_method("lora", lm.inventory, targets=targets)
            _, lora_bytes, n_lora = _step_times(lm, lora, ids, 1)
            row.update(lora_trainable=n_lora, lora_bytes=lora_bytes, lora_rank=lora.plan.describe())
        except EsaError as e:  # a count below rank 1 everywhere cannot be matched: say so, do not skip silently
            row.update(lora_trainable=None, lora_bytes=None, lora_refused=str(e))
        memory.append(row)
    _, full_bytes, n_full = _step_times(lm, FullFT(), ids, 1)
    out["optimizer_memory"] = dict(per_density=memory, full_bytes=full_bytes, full_trainable=n_full)

    # 3. protected vs unprotected steps
    critical = targets_at_density(mags, lm.inventory, 1e-3)
    gen = torch.Generator().manual_seed(0)
    fisher = {s.name: torch.rand(s.shape, generator=gen) for s in lm.inventory}
    protected: dict[str, Any] = {}
    for mname in protect_methods:
        times = []
        for _ in range(rounds):
            row = {}
            for pname in RETENTIONS:
                method = SparseFT(t1) if mname == "sparse" else FullFT()
                spec = RetentionSpec(pname, critical=critical, fisher=fisher, strength=1.0)
                secs, _, _ = _step_times(lm, method, ids, steps, lm.inventory, spec)
                row[pname] = statistics.median(secs)
            times.append(row)
        protected[mname] = {p: dict(**_ratio(times, p, "none"), target=1.05,
                                    step_s=statistics.median(r[p] for r in times)) for p in RETENTIONS}
    out["protected_vs_unprotected"] = protected
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--protect-methods", default="sparse,full")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a shared, "
                    "oversubscribed CPU one thread per process is faster and steadier")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = bench_training(a.model, a.batch, a.seqlen, a.steps, a.rounds,
                         protect_methods=tuple(m for m in a.protect_methods.split(",") if m))
    path = write_json(REPO_ROOT / "reports" / "bench" / f"training-{a.model}.json", res)
    s = res["sparse_vs_lora_1pct"]
    print(f"sparse 1% / LoRA step: {s['ratio']:.3f} (rounds {s['min']:.3f}-{s['max']:.3f}; target <= 1.1)")
    for row in res["optimizer_memory"]["per_density"]:
        lora = f"{row['lora_bytes'] / 2**20:.1f} MiB" if row["lora_bytes"] else "refused"
        print(f"density {row['density']:g}: k={row['k']} sparse {row['sparse_bytes'] / 2**20:.2f} MiB, LoRA {lora}")
    print(f"full FT optimiser state {res['optimizer_memory']['full_bytes'] / 2**20:.0f} MiB")
    for m, rows in res["protected_vs_unprotected"].items():
        print(m, {p: round(r["ratio"], 3) for p, r in rows.items()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
