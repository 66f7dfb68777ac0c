"""How noisy is the Hutchinson diagonal on a real model, and how much does the MC-GGN diagonal gain? (not a test)

    nice -n 10 python tests/bench/curvature_reliability.py --model smollm2-135m --windows 2 --seqlen 128 --probes 64

Two independent streams of `--probes` products per estimator on the same calibration windows (one forward,
shared): top-100-per-matrix Jaccard and relative disagreement at P = 1, 2, 4, ..., per-weight SNR, the probes
needed (Jaccard >= 0.4 extrapolated; top-k 2 SE clear of the median), and seconds per product. Writes
reports/bench/curvature-reliability-<model>.json and prints the tables quoted in the note.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--probes", type=int, default=64, help="products per stream (two streams per estimator)")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--seed", type=int, default=1337, help="calibration seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("ESA_PROGRESS", "0")
    torch.set_num_threads(args.threads)

    from esa import data
    from esa.models import load
    from esa.sensitivity import curvature

    t0 = time.perf_counter()
    lm = load(args.model, device="cuda" if torch.cuda.is_available() else "cpu", attn_implementation="eager")
    win = data.calibration(lm.tokenizer, args.corpus, args.seqlen, args.windows, args.seed)
    load_s = time.perf_counter() - t0
    out = Path(args.out) if args.out else REPO / "reports" / "bench" / f"curvature-reliability-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def write(res: dict, final: bool) -> None:
        res.update(model=args.model, corpus=args.corpus, calib_seed=args.seed, load_seconds=load_s,
                   total_seconds=time.perf_counter() - t0, torch_threads=args.threads, loadavg=os.getloadavg(),
                   complete=final)
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")  # partial results survive a stopped run

    res = curvature.reliability(lm.model, lm.inventory, win.ids, args.probes, topk=args.topk, seed=0,
                                on_checkpoint=lambda r: write(r, False))
    write(res, True)
    print(f"{args.model}: {res['n_weights'] / 1e6:.1f}M weights in {res['n_matrices']} matrices, {args.windows} x "
          f"{args.seqlen} tokens, top-{args.topk} per matrix; {res['total_seconds']:.0f} s")
    print("estimator    P  jaccard_med  jaccard_mean  rel_error  s/product")
    for r in res["curve"]:
        print(f"{r['estimator']:<10} {r['probes']:>3}  {r['jaccard_median']:.3f}        {r['jaccard_mean']:.3f}"
              f"         {r['rel_error']:.3f}      {r['seconds_per_product']:.2f}")
    for e, s in res["summary"].items():
        j = s["jaccard_target"]
        print(f"{e}: {s['probes']} products per stream: held-out SNR top-k {s['snr_topk_median']:.2f}, median weight "
              f"{s['snr_median_weight']:.2f}; z(top-k vs median) {s['z_topk_vs_median']:.2f}, probes for z>=2 "
              f"{s['probes_needed_z2']:.3g} ({s['matrices_resolved']:.0%} of matrices resolved); probes for "
              f"Jaccard>=0.4: {j['probes']} ({j['method']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
