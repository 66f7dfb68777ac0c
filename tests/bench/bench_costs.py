"""Seconds per window of each pass on this machine (esa.phases.costs), for the plans' predictions.

    python tests/bench/bench_costs.py [--models ...] [--train ...] [--seqlen 256] [--windows 2]   (make costs)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from esa.models.micro import MICRO_SUITE
from esa.phases import costs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,micro-llama-480k@smoke,tiny-llama")
    p.add_argument("--train", default=",".join(f"{m}@standard" for m in MICRO_SUITE),
                   help="micro-suite members whose training step to time (name@budget: the budget's batch)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--out", type=Path, default=costs.DEFAULT)
    a = p.parse_args(argv)
    c = costs.measure([m.strip() for m in a.models.split(",") if m.strip()], a.seqlen, a.windows,
                      [m.strip() for m in a.train.split(",") if m.strip()])
    path = costs.save(c, a.out)
    for m, k in c.per_window.items():
        print(f"{m}: " + ", ".join(f"{kind} {v:.2f} s" for kind, v in k.items()))
    print(f"{c.machine['cores']} cores, {c.machine['cpu']}; written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
