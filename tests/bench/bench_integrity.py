"""Benchmark of cache integrity (not a test): digest throughput, and what checking every read costs a run.

    python tests/bench/bench_integrity.py [--model smollm2-135m] [--metrics grad_x_weight,...] [--seeds 1337,123]
                                          [--hash-gib 1]

1. Throughput: xxh3-128 (what esa.store records and checks), BLAKE2b and SHA-256 over `--hash-gib` GiB held in
   memory (a 64 MiB buffer hashed repeatedly; best of 2), and `esa.store.file_digest` on a 256 MiB file just
   written (so in the page cache: the digest, not the disk, is measured).
2. Cost in a run: the smoke profile's week-1 scoring (Phase 2 week 1: its metrics x seeds on its model, its
   windows and seqlen; `--metrics` / `--seeds` narrow it) is run twice into a fresh ESA_CACHE_DIR whose
   models, gguf, corpora and tokens folders are the real cache's (nothing re-downloaded or re-dequantised):
   once scoring (the entries are written) and once reading every entry back. Every `esa.store.check` in
   either pass (the GGUF file, the dequantised model, the corpus, the tokens, the score entries) is timed;
   reported: the seconds spent checking over the seconds of the scoring pass (target < 0.02), and the same
   for the cached pass, where checking is a larger share of a much shorter run.
Writes reports/bench/integrity-<device>-<model>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import xxhash

from esa import store
from esa.params import load_profile
from esa.recipes import Recipe, load_configured
from esa.store import REPO_ROOT, write_json

TARGET = 0.02  # checking every read may cost at most 2% of the scoring pass
SHARED = ("models", "gguf", "corpora", "tokens")


def throughput(gib: float) -> dict[str, float]:
    """GB/s (10^9 bytes a second) of each digest over `gib` GiB in memory, and of file_digest on a file."""
    block = os.urandom(1 << 26)
    rounds = max(1, round(gib * 2**30 / len(block)))
    out: dict[str, float] = {}
    for name, make in (("xxh3_128", xxhash.xxh3_128), ("blake2b", hashlib.blake2b), ("sha256", hashlib.sha256)):
        best = float("inf")
        for _ in range(2):
            h, t0 = make(), time.perf_counter()
            for _ in range(rounds):
                h.update(block)
            h.hexdigest()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_memory_gb_s"] = rounds * len(block) / best / 1e9
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        path = Path(tmp) / "f.bin"
        with path.open("wb") as fh:
            for _ in range(4):
                fh.write(block)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            store.file_digest(path)
            best = min(best, time.perf_counter() - t0)
        out["file_digest_page_cache_gb_s"] = path.stat().st_size / best / 1e9
    return out


class _Timed:
    """esa.store.check with its calls and seconds counted (usable, cached and MaskSet.load all go through it)."""

    def __init__(self) -> None:
        self.real, self.calls, self.seconds, self.bytes = store.check, 0, 0.0, 0
        self.kinds: list[str] = []  # the cache folder of each checked entry (scores, models, tokens, ...)

    def __call__(self, entry: Any, *args: Any, **kw: Any) -> None:
        t0 = time.perf_counter()
        try:
            self.real(entry, *args, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            path = Path(entry)
            with contextlib.suppress(ValueError):
                self.kinds.append(path.relative_to(store.cache_root()).parts[0])
            self.bytes += sum(p.stat().st_size for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())


def week1(model: str, metrics: list[str], seeds: list[int]) -> dict[str, Any]:
    prof = load_profile("smoke")
    real_root = store.cache_root()
    before = os.environ.get("ESA_CACHE_DIR")
    timed = _Timed()
    passes: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-integrity-cache-") as tmp:
            for name in SHARED:  # read from the real cache: nothing downloaded or dequantised again
                (real_root / name).mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).symlink_to(real_root / name, target_is_directory=True)
            os.environ["ESA_CACHE_DIR"] = tmp
            store.check = timed  # type: ignore[assignment]
            recipe = Recipe.of(prof, show_progress=False)  # the settings (and cache keys) week 1 uses
            for label in ("scoring", "cached"):
                calls0, secs0, bytes0, kinds0 = timed.calls, timed.seconds, timed.bytes, len(timed.kinds)
                t0 = time.perf_counter()
                if label == "scoring":
                    t_load = time.perf_counter()
                    lm = load_configured(model)  # the model load's own checks (GGUF, dequantised folder) count
                    load_s = time.perf_counter() - t_load
                runs = recipe.score_model(lm, model, metrics, seeds)
                assert all(r.from_cache == (label == "cached") for r in runs.values()), label
                wall = time.perf_counter() - t0
                checks = timed.seconds - secs0
                passes[label] = {"seconds": wall, "check_calls": timed.calls - calls0, "check_seconds": checks,
                                 "checked_bytes": timed.bytes - bytes0, "check_over_pass": checks / wall,
                                 "checked_kinds": sorted(timed.kinds[kinds0:])}
            passes["scoring"]["model_load_s"] = load_s
    finally:
        store.check = timed.real  # type: ignore[assignment]
        if before is None:
            os.environ.pop("ESA_CACHE_DIR", None)
        else:
            os.environ["ESA_CACHE_DIR"] = before
    return {"model": model, "metrics": metrics, "seeds": seeds, "windows": prof.max_samples, "seqlen": prof.seqlen,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "passes": passes,
            "target_check_over_scoring_pass": TARGET}


def main(argv: list[str] | None = None) -> int:
    prof = load_profile("smoke")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=prof.models[0])
    ap.add_argument("--metrics", default=",".join(prof.metrics), help="comma list (default: the smoke profile's)")
    ap.add_argument("--seeds", default=",".join(map(str, prof.seeds)), help="comma list (default: the smoke profile's)")
    ap.add_argument("--hash-gib", type=float, default=1.0, help="GiB hashed in memory per digest")
    a = ap.parse_args(argv)
    out: dict[str, Any] = {"throughput": throughput(a.hash_gib), "hash_gib": a.hash_gib}
    for k, v in out["throughput"].items():
        print(f"{k}: {v:.2f} GB/s")
    out["week1"] = week1(a.model, [m for m in a.metrics.split(",") if m], [int(s) for s in a.seeds.split(",") if s])
    for label, p in out["week1"]["passes"].items():
        print(f"{label} pass: {p['seconds']:.1f} s, {p['check_calls']} checks ({', '.join(p['checked_kinds'])}) of {p['checked_bytes'] / 1e6:.0f} MB in "
              f"{p['check_seconds']:.3f} s = {100 * p['check_over_pass']:.2f}% of the pass"
              + (f" (target < {100 * TARGET:.0f}%)" if label == "scoring" else ""))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = REPO_ROOT / "reports" / "bench" / f"integrity-{device}-{a.model}.json"
    write_json(path, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
