"""Cost of keying the score cache by content: esa.models.loader.weights_digest on SmolLM2-135M (fp32 and
bf16), first call (hashes every parameter and buffer) and a repeat call (the per-model cache).

    PYTHONPATH=lib nice -n 15 python tests/bench/bench_digest.py
"""

from __future__ import annotations

import time

from esa.models import load
from esa.models.loader import weights_digest


def main() -> None:
    for dtype in ("float32", "bfloat16"):
        lm = load("smollm2-135m", dtype=dtype, device="cpu")
        n_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
        t0 = time.perf_counter()
        weights_digest(lm.model)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        weights_digest(lm.model)
        again = time.perf_counter() - t0
        print(f"smollm2-135m {dtype}: {n_bytes / 2**20:.0f} MiB of parameters, first digest {first:.3f} s "
              f"({n_bytes / first / 2**30:.1f} GiB/s), cached repeat {again * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
