"""Benchmark of the score cache (not a test): entry size on disk, write and read time against the scoring pass.

    python tests/bench/bench_cache.py [--model smollm2-135m] [--metric grad_x_weight] [--windows 2] [--seqlen 128]

The model and its calibration windows come from the usual cache; the scoring itself writes into a fresh
temporary ESA_CACHE_DIR (one per round and variant), candidates only and with the bf16 full map
(`keep_scores`). Each variant is scored once fresh (`metric_s`: the scoring pass; `write_cache_s`) and then
read back by the same `score` call (`load_cache_s`; `cached_call_s`: the whole cached call, with the entry's
integrity check; `select_and_stats_s`: the candidates, ties and statistics computed before the write, reported
beside it; with a full map, `full_map_read_s`: every weight's score materialised from the file).
Reported: bytes on disk and per studied weight (targets <= 0.05 B candidates only, <= 2 B with the full map),
write / scoring pass and read / scoring pass (target <= 0.05; the minimum over rounds, medians beside), the
disk guard's `entry_bytes` estimate against the measured size, and the Llama-3.1-8B projection of the
extended profile's Phase 2 from the same code (`esa.runner.cache.plan`).
Writes reports/bench/cache-<device>-<model>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from esa.data import Calibration
from esa.recipes import load_configured
from esa.runner.cache import plan, tree_bytes
from esa.sensitivity.engine import entry_bytes, score
from esa.sensitivity.metrics import METRICS, MetricConfig
from esa.store import REPO_ROOT, cache_dir, write_json

TARGETS = {"bytes_per_weight[candidates]": 0.05, "bytes_per_weight[keep_scores]": 2.0,
           "write_over_metric": 0.05, "read_over_metric": 0.05}


def one(lm: Any, metric: str, calib: Calibration, windows: Any, cfg: MetricConfig, keep: bool) -> dict[str, Any]:
    """Score fresh into an empty cache, then read the entry back; sizes and timings of both."""
    fresh = score(lm, metric, calib, cfg=cfg, windows=windows, keep_scores=keep)
    assert not fresh.from_cache, "the temporary cache was not empty"
    folder = cache_dir("scores") / fresh.key
    t0 = time.perf_counter()
    cached = score(lm, metric, calib, cfg=cfg, windows=windows, keep_scores=keep)
    call = time.perf_counter() - t0
    assert cached.from_cache
    rec = {"metric_s": fresh.timings["metric_s"], "select_and_stats_s": fresh.timings["select_and_stats_s"],
           "write_cache_s": fresh.timings["write_cache_s"], "load_cache_s": cached.timings["load_cache_s"],
           "cached_call_s": call, "bytes": tree_bytes(folder),
           "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir())}}
    if keep:
        t0 = time.perf_counter()
        n = sum(cached.scores[name].numel() for name in cached.scores)  # type: ignore[union-attr]
        rec["full_map_read_s"] = time.perf_counter() - t0
        rec["full_map_weights"] = n
    return rec


def measure(model: str, metric: str, n_windows: int, seqlen: int, rounds: int, seed: int) -> dict[str, Any]:
    lm = load_configured(model)
    calib = Calibration("shakespeare", seqlen, n_windows, seed)
    windows = calib.windows(lm.tokenizer, max_positions=lm.info.max_positions or None)
    cfg = MetricConfig(batch_size=n_windows, seed=seed, show_progress=False)
    n_studied = sum(s.numel for s in lm.inventory)
    n_derived = len(METRICS[metric].derived_for(cfg))
    before = os.environ.get("ESA_CACHE_DIR")
    variants: dict[str, list[dict[str, Any]]] = {"candidates": [], "keep_scores": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
            for r in range(rounds):
                for name in variants:
                    os.environ["ESA_CACHE_DIR"] = str(Path(tmp) / f"{name}-{r}")
                    variants[name].append(one(lm, metric, calib, windows, cfg, name == "keep_scores"))
    finally:
        if before is None:
            os.environ.pop("ESA_CACHE_DIR", None)
        else:
            os.environ["ESA_CACHE_DIR"] = before
    out: dict[str, Any] = {
        "model": model, "metric": metric, "windows": n_windows, "seqlen": seqlen, "rounds": rounds,
        "device": str(lm.device), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "studied_weights": n_studied, "matrices": len(lm.inventory), "depth": 1000, "variants": {}, "ratios": {},
    }
    for name, runs in variants.items():
        keep = name == "keep_scores"
        measured = runs[0]["bytes"]
        estimate = entry_bytes(lm.inventory, 1000, keep, n_derived)
        write = [r["write_cache_s"] / r["metric_s"] for r in runs]
        read = [r["load_cache_s"] / r["metric_s"] for r in runs]
        call = [r["cached_call_s"] / r["metric_s"] for r in runs]
        select = [r["select_and_stats_s"] / r["metric_s"] for r in runs]  # before the write, not part of it
        out["variants"][name] = {"runs": runs, "bytes": measured, "bytes_per_weight": measured / n_studied,
                                 "entry_bytes_estimate": estimate, "estimate_over_measured": estimate / measured}
        out["ratios"][f"bytes_per_weight[{name}]"] = {"value": measured / n_studied,
                                                      "target": TARGETS[f"bytes_per_weight[{name}]"]}
        for key, vals in (("write_over_metric", write), ("read_over_metric", read), ("cached_call_over_metric", call),
                          ("select_and_stats_over_metric", select)):
            out["ratios"][f"{key}[{name}]"] = {"min": min(vals), "median": statistics.median(vals),
                                               "target": TARGETS.get(key)}
    proj = plan("extended", ["llama-3.1-8b"]).iloc[0]
    out["llama_3_1_8b_extended"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in proj.items()}
    out["llama_3_1_8b_extended"].update(gib=proj["bytes"] / 2**30, gib_keep_scores=proj["bytes_keep_scores"] / 2**30)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--metric", default="grad_x_weight", choices=sorted(METRICS))
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337)
    a = ap.parse_args(argv)
    out = measure(a.model, a.metric, a.windows, a.seqlen, a.rounds, a.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = REPO_ROOT / "reports" / "bench" / f"cache-{device}-{a.model}.json"
    write_json(path, out)
    for name, v in out["variants"].items():
        print(f"{name}: {v['bytes']} bytes on disk, {v['bytes_per_weight']:.4f} B a studied weight, "
              f"estimate/measured {v['estimate_over_measured']:.3f}")
    for key, v in out["ratios"].items():
        shown = f"{v['value']:.4f}" if "value" in v else f"min {v['min']:.4f} median {v['median']:.4f}"
        print(f"{key}: {shown} (target {v['target']})")
    ll = out["llama_3_1_8b_extended"]
    print(f"Llama-3.1-8B extended Phase 2: {ll['entries']} entries, {ll['gib']:.3f} GiB candidates only, "
          f"{ll['gib_keep_scores']:.1f} GiB with keep_scores")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
