"""Benchmark of pruning (issue 21): the speed ratios measured in one run, interleaved, min and median.

    python tests/bench/bench_pruning.py [--model smollm2-135m] [--windows 8] [--seqlen 256] [--rounds 3]

Ratios (each round runs every timed step once, in the same order, so drift hits all of them alike):
- `score_mask_vs_scorer_pass[wanda]`: one-shot wanda pruning (statistics pass + scores + masks) / the act_mag
  metric's own calibration pass on the same windows (target <= 1.1);
  `[grad_x_weight]`: one-shot grad_x_weight pruning / the grad_x_weight metric's pass (target <= 1.1);
- `sequential_vs_dense_forward`: layer-sequential wanda pruning / one plain dense forward over the
  calibration windows (target <= 1.2);
- `sparsegpt_vs_wanda_per_block`: layer-sequential SparseGPT / layer-sequential wanda, per block (target <= 2),
  with each one's time split by phase (block statistics pass, decision, in-place write, pruned-block pass).
Peak memory: on CUDA the peak allocated bytes of each pruning against model + accumulators + one block's
calibration activations; on CPU the process's peak RSS growth (coarse). Writes reports/bench/pruning-<model>.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from esa.apps.pruning import PruneSpec, prune
from esa.apps.pruning.prune import pruned_specs
from esa.data import calibration
from esa.models import load
from esa.perturb.apply import weights_hash
from esa.sensitivity.metrics import MetricConfig, get_metric
from esa.store import REPO_ROOT, write_json

TARGETS = {"score_mask_vs_scorer_pass[wanda]": 1.1, "score_mask_vs_scorer_pass[grad_x_weight]": 1.1,
           "sequential_vs_dense_forward": 1.2, "sparsegpt_vs_wanda_per_block": 2.0}
PHASES = ("capture_s", "stats_s", "decide_s", "write_s", "propagate_s")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any, int | None]:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return time.perf_counter() - t, out, peak


def measure(model: str = "smollm2-135m", windows: int = 8, seqlen: int = 256, rounds: int = 3, batch_size: int = 4,
            sparsity: float = 0.5, gradients: bool = True, dtype: str = "float32") -> dict[str, Any]:
    """Run every timed step `rounds` times, interleaved; return times, ratios (min, median) and memory."""
    lm = load(model, dtype=dtype)
    calib = calibration(lm.tokenizer, "shakespeare", seqlen, windows, seed=0)
    ids = calib.ids
    specs = pruned_specs(lm.inventory, PruneSpec("magnitude", sparsity))
    dev = lm.device
    cfg = MetricConfig(batch_size=batch_size, show_progress=False)
    h0 = weights_hash(lm.model)

    def forward() -> None:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch_size):
                lm.model(input_ids=ids[i : i + batch_size].to(dev), use_cache=False)

    def pruning(method: str, mode: str) -> Callable[[], Any]:
        spec = PruneSpec(method, sparsity, calibration=mode, batch_size=batch_size, seqlen=seqlen, n_calib=windows)
        return lambda: prune(lm, spec, calib=calib, use_cache=False)

    steps: dict[str, Callable[[], Any]] = {
        "dense_forward": forward,
        "act_mag_pass": lambda: get_metric("act_mag")(lm.model, specs, ids, cfg),
        "wanda_one_shot": pruning("wanda", "one-shot"),
        "wanda_sequential": pruning("wanda", "sequential"),
        "sparsegpt_sequential": pruning("sparsegpt", "sequential"),
    }
    if gradients:
        steps["grad_x_weight_pass"] = lambda: get_metric("grad_x_weight")(lm.model, specs, ids, cfg)
        steps["grad_x_weight_one_shot"] = pruning("grad_x_weight", "one-shot")
    forward()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {k: [] for k in steps}
    peaks: dict[str, int | None] = {}
    phases: dict[str, list[dict[str, float]]] = {"wanda_sequential": [], "sparsegpt_sequential": []}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(rounds):
        for name, fn in steps.items():
            dt, out, peak = _timed(fn)
            times[name].append(dt)
            peaks[name] = max(peaks.get(name) or 0, peak or 0) if peak is not None else None
            if name in phases:
                phases[name].append({p: float(out.timings.get(p, 0.0)) for p in PHASES})
            del out
    n_blocks = len({s.layer for s in specs})

    def ratio(a: str, b: str, per: float = 1.0) -> dict[str, float]:
        r = [x / y / per for x, y in zip(times[a], times[b], strict=True)]
        return {"min": min(r), "median": statistics.median(r), "rounds": r}

    ratios = {"score_mask_vs_scorer_pass[wanda]": ratio("wanda_one_shot", "act_mag_pass"),
              "sequential_vs_dense_forward": ratio("wanda_sequential", "dense_forward"),
              "sparsegpt_vs_wanda_per_block": ratio("sparsegpt_sequential", "wanda_sequential")}
    if gradients:
        ratios["score_mask_vs_scorer_pass[grad_x_weight]"] = ratio("grad_x_weight_one_shot", "grad_x_weight_pass")
    for k, r in ratios.items():
        r["target"] = TARGETS[k]
        r["meets_target_median"] = r["median"] <= TARGETS[k]
    per_block = {name: {p: statistics.median(ph[p] for ph in rows) / n_blocks for p in PHASES}
                 for name, rows in phases.items()}
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    hidden = lm.info.hidden_size
    act_bytes = windows * seqlen * hidden * 4  # one block's inputs for every window (fp32)
    out = {
        "model": model, "device": str(dev), "dtype": dtype, "windows": windows, "seqlen": seqlen,
        "batch_size": batch_size, "rounds": rounds, "sparsity": sparsity, "n_blocks": n_blocks,
        "torch_threads": torch.get_num_threads(),
        "times_s": {k: {"min": min(v), "median": statistics.median(v), "rounds": v} for k, v in times.items()},
        "ratios": ratios, "per_block_phase_s": per_block,
        "dominant_phase": {name: max(ph, key=ph.get) for name, ph in per_block.items()},
        "restored_bit_exact": weights_hash(lm.model) == h0,
        "model_bytes": model_bytes, "block_inputs_bytes": act_bytes,
        "peak_cuda_bytes": peaks if torch.cuda.is_available() else None,
        "rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0,
        "note": "CPU: peak RSS growth is coarse (ru_maxrss); ratios are per round, then min and median",
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-gradients", action="store_true")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args(argv)
    out = measure(a.model, a.windows, a.seqlen, a.rounds, a.batch_size, gradients=not a.no_gradients, dtype=a.dtype)
    write_json(REPO_ROOT / "reports" / "bench" / f"pruning-{a.model}.json", out)
    print({k: (v["min"], v["median"]) for k, v in out["ratios"].items()})
    print(out["per_block_phase_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
