"""How many selected weights a small perturbation leaves unchanged in bf16: top-k against random_k.

bf16 keeps 8 significant bits, so gauss_noise of s * std(matrix) is below half a unit in the last place of any
weight with |w| > about 2^8 s std / 2; top-k weights are often large, random_k weights rarely, so at small s
the top-k set is perturbed less than its control (issue 36, finding 6). This measures the unchanged share
(`PerturbStats.n_changed`) per group and scale on one model, writing reports/bench/bf16-perturbation-bias.json:

    .venv/bin/python tests/bench/bf16_perturbation_bias.py          # SmolLM2 in bf16, ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esa.data import Calibration
from esa.models import load
from esa.perturb import build_groups, perturbed
from esa.perturb.ops import PerturbSpec
from esa.sensitivity.engine import score
from esa.sensitivity.metrics import MetricConfig

OUT = Path(__file__).resolve().parents[2] / "reports" / "bench" / "bf16-perturbation-bias.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--scales", default="0.005,0.01,0.02,0.1,1.0")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    lm = load(a.model, dtype=a.dtype, device="cpu", attn_implementation="sdpa")
    calib = Calibration("shakespeare", 128, 2, 1337)  # the selection only needs to be a plausible top-k
    run = score(lm, "grad_x_weight", calib, MetricConfig(batch_size=1, show_progress=False), use_cache=False)
    sel = run.topk(a.topk, "per_layer", lm.inventory)
    groups = build_groups(lm.model, lm.inventory, sel, [1337], ["random_k"])
    rows = []
    for scale in (float(s) for s in a.scales.split(",")):
        for (group, _), targets in groups.items():
            with perturbed(lm.model, targets, PerturbSpec("gauss_noise", scale=scale), seed=0) as st:
                pass
            share = (st.n_weights - st.n_changed) / max(1, st.n_weights)
            rows.append({"scale": scale, "group": group, "written": st.n_weights, "unchanged": st.n_weights - st.n_changed,
                         "unchanged_share": round(share, 4)})
            print(f"gauss_noise {scale:g} sigma, {group}: {rows[-1]['unchanged']} of {st.n_weights} unchanged "
                  f"({share:.3f})", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "dtype": a.dtype, "topk": a.topk, "metric": "grad_x_weight",
                                       "mode": "per_layer", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
