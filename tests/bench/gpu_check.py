"""The GPU check of issue 36: every pass at Llama-3.1-8B's shape, on one GPU and on two, against its plan.

    python tests/bench/gpu_check.py                 # GPU: llama-8b, bf16, 2048 tokens; one GPU, then two if present
    python tests/bench/gpu_check.py --tiny          # CPU: the same passes on a tiny shape, in seconds

The model is built random-initialised directly on the first GPU (no download, no `meta` round trip); for the
two-GPU layout accelerate's `dispatch_model` then moves the second half of the decoder layers (and the final
norm and LM head) to the second GPU. Every pass of the CPU memory ledger (tests/bench/memory_ledger.py: its
pass functions are reused, so both measure the same work) runs once: evaluation, the gradient metrics, the
fused gradient pass, act_mag, Hutchinson, a perturbation, full fine-tuning (fp32 only: refused in bf16),
Wanda and SparseGPT pruning, sparse and LoRA fine-tuning, the int8 store, one bit-search iteration and an
interpretability capture. Before each pass the memory guard is asked (a refusal is recorded, not run); after
it, each GPU's peak (torch.cuda.max_memory_allocated less what was allocated before the pass) is set
against the plan's need on that GPU (esa.memory.estimate(...).need). An out-of-memory error is recorded
too: that is what this check is for. Writes reports/bench/gpu_check-<device>.json after every pass.

Sized for an 8-minute device slot on one H200: 2048 tokens per window, one window per micro-batch, two
calibration windows for pruning, one flip of the bit search; `--passes` narrows it.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
LEDGER = Path(__file__).resolve().parent / "memory_ledger.py"

SHAPES: dict[str, dict[str, Any]] = {
    "llama-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "mixtral-small": dict(arch="mixtral", hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                          vocab_size=32000),
}
TINY_SHAPES: dict[str, dict[str, Any]] = {
    "llama-8b": dict(arch="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=384),
    "mixtral-small": dict(arch="mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=384),
}


def ledger() -> Any:
    """tests/bench/memory_ledger.py as a module: its passes, their inputs and their plan arguments."""
    spec = importlib.util.spec_from_file_location("memory_ledger", LEDGER)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def build(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Random-initialised model built directly on `device` (GPU init of 8B parameters takes seconds)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    kw = {k: v for k, v in shape.items() if k != "arch"}
    cfg = (MixtralConfig if shape["arch"] == "mixtral" else LlamaConfig)(
        **kw, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"  # as every pass loads it; Hutchinson switches to the math kernel itself
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def split_map(model: torch.nn.Module, devices: list[str]) -> dict[str, str]:
    """A device map giving each device an equal run of decoder layers; embeddings on the first, the final norm
    and LM head on the last (accelerate's dispatch then moves each module's weights)."""
    n = model.config.num_hidden_layers
    per = -(-n // len(devices))
    dmap = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    dmap.update({f"model.layers.{i}": devices[i // per] for i in range(n)})
    dmap.update({"model.norm": devices[-1], "lm_head": devices[-1]})
    return dmap


def _devices(model: torch.nn.Module) -> list[str]:
    return sorted({str(p.device) for p in model.parameters()})


def _allocated(devs: list[str]) -> dict[str, int]:
    out = {}
    for d in devs:
        dev = torch.device(d)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            out[d] = int(torch.cuda.memory_allocated(dev))
    return out


def _peaks(base: dict[str, int]) -> dict[str, int]:
    out = {}
    for d, b in base.items():
        torch.cuda.synchronize(torch.device(d))
        out[d] = int(torch.cuda.max_memory_allocated(torch.device(d))) - b
    return out


def run_pass(led: Any, lm: Any, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Guard, run and measure one ledger pass; the plan's need and the measured peak per device."""
    from esa import memory
    from esa.apps.training.loop import uses_autocast
    from esa.memtrace import measure

    b, t = args.batch_size, args.seqlen
    plan_pass, kw = led.plan_args(lm, name, b)
    devs = _devices(lm.model)
    target = devs[0]
    if plan_pass in ("finetune_full", "finetune_sparse", "finetune_lora"):  # as the loop runs it on this device
        kw["autocast"] = uses_autocast(torch.device(target), "bf16" if name.endswith(led.AUTOCAST) else "auto")
    entry: dict[str, Any] = {"pass": name, "plan_pass": plan_pass, "batch": b, "seqlen": t}
    est = memory.estimate(lm.model, plan_pass, b, t, target=target, **kw)
    entry["plan"] = {d: est.need(d) for d in est.per_device}
    entry["components"] = est.per_device
    if name.startswith("finetune_full") and next(lm.model.parameters()).dtype != torch.float32:
        entry.update(status="refused", error="full fine-tuning needs fp32 weights (esa.apps.training.full)")
        return entry
    try:
        memory.check(lm.model, plan_pass, b, t, target=target, **{k: v for k, v in kw.items() if k != "written"})
    except Exception as e:  # the guard refused: record it, do not run
        entry.update(status="refused", error=str(e).splitlines()[0])
        return entry
    run = led.runner(lm, name, b, t)
    base = _allocated(devs)
    t0 = time.perf_counter()
    try:
        if base:
            out = run()
            measured = _peaks(base)
        else:  # CPU (--tiny): the allocator trace the ledger uses
            peak, out = measure(run)
            measured = {"cpu": peak.peak}
        del out
    except torch.cuda.OutOfMemoryError as e:  # the plan was wrong: exactly what this check is for
        entry.update(status="oom", error=str(e).splitlines()[0], plan_total=est.total)
        torch.cuda.empty_cache()
        return entry
    entry.update(status="ok", seconds=round(time.perf_counter() - t0, 3), measured=measured)
    entry["ratio"] = {d: round(entry["plan"].get(d, 0) / max(1, m), 3) for d, m in measured.items()}
    entry["within"] = all(abs(r - 1) <= led.TOLERANCE for r in entry["ratio"].values())
    if base:
        torch.cuda.empty_cache()
    return entry


def run_layout(led: Any, name: str, shape: dict[str, Any], devices: list[str], args: argparse.Namespace,
               report: dict[str, Any], out: Path) -> None:
    """Every requested pass on `shape` spread over `devices` (one or two), written after each pass."""
    from esa.models import weight_inventory
    from esa.store import write_json

    dtype = torch.float32 if args.tiny else torch.bfloat16
    rec: dict[str, Any] = {"model": name, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                           "devices": devices, "passes": []}
    report["layouts"].append(rec)
    t0 = time.perf_counter()
    model = build(shape, torch.device(devices[0]), dtype)
    if len(devices) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, split_map(model, devices))
    rec["build_seconds"] = round(time.perf_counter() - t0, 2)
    lm = led._Loaded(model, weight_inventory(model))
    for p in args.passes:
        try:
            rec["passes"].append(run_pass(led, lm, p, args))
        except Exception as e:  # keep the other passes' numbers; say what broke
            rec["passes"].append({"pass": p, "status": "error", "error": repr(e),
                                  "traceback": traceback.format_exc()[-3000:]})
        r = rec["passes"][-1]
        print(f"{name} on {len(devices)} device(s) {p:16s} {r['status']:8s} plan "
              f"{ {d: round(v / 2**30, 2) for d, v in r.get('plan', {}).items()} } GiB measured "
              f"{ {d: round(v / 2**30, 2) for d, v in r.get('measured', {}).items()} } GiB", flush=True)
        write_json(out, report)
    del lm, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> Path:
    led = ledger()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny shape in fp32 (runs on CPU in seconds)")
    ap.add_argument("--models", default="llama-8b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--gpus", default="1,2", help="layouts to run: GPU counts (those above the machine's are skipped)")
    ap.add_argument("--seqlen", type=int, default=None, help="default 2048 (GPU) / 32 (--tiny)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--passes", default=None, help="comma list of the ledger's passes (default: all; on a GPU "
                    "without the *_autocast repeats, which precision 'auto' already runs there)")
    ap.add_argument("--out", default=None, help="output JSON (default reports/bench/gpu_check-<device>.json)")
    args = ap.parse_args(argv)
    args.seqlen = args.seqlen or (32 if args.tiny else 2048)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default = [p for p in led.PASSES if device.type == "cpu" or not p.endswith(led.AUTOCAST)]
    args.passes = [p for p in args.passes.split(",") if p] if args.passes else default
    bad = [p for p in args.passes if p not in led.PASSES]
    if bad:
        from esa.errors import unknown

        raise unknown("gpu_check pass", bad[0], led.PASSES)
    led.BATCH["b"] = args.batch_size
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

    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    layouts = [["cpu"]] if device.type == "cpu" else \
        [[f"cuda:{i}" for i in range(int(g))] for g in args.gpus.split(",") if 0 < int(g) <= n_gpu]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report: dict[str, Any] = {
        "device": dev_name, "device_type": device.type, "gpus": n_gpu, "tiny": args.tiny, "torch": torch.__version__,
        "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "total_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "tolerance": led.TOLERANCE, "layouts": [],
        "peak_kind": "per GPU: torch.cuda.max_memory_allocated less the allocation before the pass" if n_gpu else
                     "CPU allocator trace (esa.memtrace), as in the memory ledger",
    }
    out = Path(args.out) if args.out else REPO / "reports" / "bench" / \
        f"gpu_check-{'tiny-' if args.tiny else ''}{dev_name.replace(' ', '_').replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for m in names:
        for devs in layouts:
            try:
                run_layout(led, m, shapes[m], devs, args, report, out)
            except Exception as e:  # keep the other layouts' numbers; say what broke
                report["layouts"].append({"model": m, "devices": devs, "status": "error", "error": repr(e),
                                          "traceback": traceback.format_exc()[-3000:]})
            write_json(out, report)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
