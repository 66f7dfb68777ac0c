"""The GPU check of issue 6: one prepared script, run once on a GPU machine (not a test).

    python tests/bench/gpu_check.py                 # GPU: Mixtral-shaped MoE + Llama-3.1-8B-shaped, bf16
    python tests/bench/gpu_check.py --tiny          # CPU: the same path on tiny shapes, in seconds

For each model: build it random-initialised directly on the device (no download, no `meta` round trip),
then run, one after the other on random token windows: evaluation (esa.evaluate), grad_x_weight over
every studied weight (esa.sensitivity.metrics), a per-matrix top-k (esa.sensitivity.select) and one
perturbation sweep (sign_flip on the top-k and a random_k control, esa.perturb.run_sweep). Before each
pass the memory guard's estimate is recorded (and checked: a pass the guard refuses is recorded as
refused, not run); after it, wall time and the measured peak (CUDA: torch.cuda.max_memory_allocated;
CPU: peak resident set size of the process). Writes reports/bench/gpu_check-<device>.json atomically.

Shapes: `mixtral-small` keeps Mixtral-8x7B's routing (8 experts, top-2, SwiGLU experts, GQA) at a width
that fits one GPU with room for fp32 scores; `llama-8b` is Llama-3.1-8B's shape (hidden 4096, 32
layers, intermediate 14336, 32 heads / 8 kv heads, vocab 128256).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]

SHAPES: dict[str, dict[str, Any]] = {
    "mixtral-small": dict(arch="mixtral", hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                          vocab_size=32000),
    "llama-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
TINY_SHAPES: dict[str, dict[str, Any]] = {
    "mixtral-small": dict(arch="mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=384),
    "llama-8b": dict(arch="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=384),
}


def build(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Random-initialised model built directly on `device` (GPU init of 8B parameters takes seconds)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    kw = {k: v for k, v in shape.items() if k != "arch"}
    cfg = (MixtralConfig if shape["arch"] == "mixtral" else LlamaConfig)(
        **kw, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"  # grad_x_weight is first order: the fused kernels are fine
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process-lifetime peak RSS (Linux: KiB)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    _peak_reset(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, {"seconds": round(time.perf_counter() - t0, 4), "peak_bytes": _peak(device),
                 "peak_gib": round(_peak(device) / 2**30, 3)}


def run_model(name: str, shape: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from esa import memory
    from esa.evaluate import evaluate
    from esa.models import weight_inventory
    from esa.perturb import PerturbSpec, build_groups, run_sweep
    from esa.sensitivity.metrics import METRICS, MetricConfig
    from esa.sensitivity.select import select_topk

    dtype = torch.float32 if args.tiny else torch.bfloat16
    rec: dict[str, Any] = {"model": name, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                           "batch_size": args.batch_size, "seqlen": args.seqlen, "passes": {}}
    model, t_build = timed(device, lambda: build(shape, device, dtype))
    inventory = weight_inventory(model)
    rec.update(build=t_build, n_params=sum(p.numel() for p in model.parameters()),
               n_studied=sum(s.numel for s in inventory))
    gen = torch.Generator().manual_seed(1)
    vocab = shape["vocab_size"]
    eval_ids = torch.randint(3, vocab, (args.eval_windows, args.seqlen), generator=gen)
    calib_ids = torch.randint(3, vocab, (args.calib_windows, args.seqlen), generator=gen)

    def guarded(pass_name: str, fn: Callable[[], Any]) -> Any:
        entry: dict[str, Any] = {}
        rec["passes"][pass_name if pass_name not in rec["passes"] else f"{pass_name}_2"] = entry
        try:
            guard = "eval" if pass_name == "sweep" else METRICS[pass_name].memory_pass if pass_name in METRICS \
                else pass_name
            est = memory.check(model, guard, args.batch_size, args.seqlen, inventory)
            entry["estimate"] = est.as_dict()
        except Exception as e:  # the guard refused: record it, do not run
            entry.update(status="refused", error=str(e))
            return None
        try:
            out, t = timed(device, fn)
        except torch.cuda.OutOfMemoryError as e:  # the estimate was wrong: exactly what this check is for
            entry.update(status="oom", error=str(e).splitlines()[0])
            torch.cuda.empty_cache()
            return None
        entry.update(status="ok", **t)
        entry["estimate_over_measured"] = round(entry["estimate"]["total"] / max(1, t["peak_bytes"]), 3)
        return out

    base = guarded("eval", lambda: evaluate(model, eval_ids, batch_size=args.batch_size, show_progress=False))
    if base is not None:
        rec["passes"]["eval"].update(log_ppl=base.log_ppl, accuracy=base.accuracy)
    res = guarded("grad_x_weight", lambda: METRICS["grad_x_weight"](model, inventory, calib_ids,
                                                         MetricConfig(batch_size=args.batch_size, show_progress=False)))
    if res is None or base is None:
        return rec
    sel, t_sel = timed(device, lambda: select_topk(res.scores, inventory, args.k, mode="per_layer"))
    sel["seed"] = 0
    rec["select"] = {**t_sel, "rows": len(sel)}
    res.scores.clear()  # free the fp32 scores before the sweep
    groups = build_groups(model, inventory, sel, seeds=[0], controls=["random_k"])
    sweep = guarded("sweep", lambda: run_sweep(model, eval_ids, groups, [PerturbSpec("sign_flip")], baseline=base,
                                               batch_size=args.batch_size, show_progress=False))
    if sweep is not None:
        rec["passes"]["sweep"]["conditions"] = sweep.table[["group", "k", "log_ppl", "delta_log_ppl",
                                                            "seconds"]].to_dict("records")
    return rec


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes in fp32 (runs on CPU in seconds)")
    ap.add_argument("--models", default="mixtral-small,llama-8b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--seqlen", type=int, default=None, help="default 512 (GPU) / 32 (--tiny)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 2 (GPU) / 2 (--tiny)")
    ap.add_argument("--eval-windows", type=int, default=None, help="default 16 (GPU) / 4 (--tiny)")
    ap.add_argument("--calib-windows", type=int, default=None, help="default 8 (GPU) / 4 (--tiny)")
    ap.add_argument("--k", type=int, default=16, help="top-k per weight matrix for the sweep")
    ap.add_argument("--out", default=None, help="output JSON (default reports/bench/gpu_check-<device>.json)")
    args = ap.parse_args(argv)
    args.seqlen = args.seqlen or (32 if args.tiny else 512)
    args.batch_size = args.batch_size or 2
    args.eval_windows = args.eval_windows or (4 if args.tiny else 16)
    args.calib_windows = args.calib_windows or (4 if args.tiny else 8)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        print("no GPU: the full shapes need one (the 8B model alone is 16 GB in bf16); use --tiny on CPU",
              file=sys.stderr)
        raise SystemExit(2)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m not in shapes:
            from esa.errors import unknown

            raise unknown("gpu_check model", m, shapes)

    from esa.store import write_json

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report: dict[str, Any] = {
        "device": dev_name, "device_type": device.type, "tiny": args.tiny, "torch": torch.__version__,
        "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "total_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "models": [],
        "peak_kind": "torch.cuda.max_memory_allocated, reset before each pass" if device.type == "cuda" else
                     "peak RSS of the whole process so far (CPU: not per pass; estimate_over_measured not meaningful)",
    }
    out = Path(args.out) if args.out else REPO / "reports" / "bench" / \
        f"gpu_check-{'tiny-' if args.tiny else ''}{dev_name.replace(' ', '_').replace('/', '_')}.json"
    for m in names:
        try:
            report["models"].append(run_model(m, shapes[m], args, device))
        except Exception as e:  # keep the other model's numbers; say what broke
            report["models"].append({"model": m, "status": "error", "error": repr(e),
                                     "traceback": traceback.format_exc()[-4000:]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)  # after each model: a crash in the second keeps the first's numbers
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
