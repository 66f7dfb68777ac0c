"""The measured memory ledger: every pass's peak on the CPU allocator against the plan of esa.memory.

For each model (tiny-llama, SmolLM2-135M, and a random-initialised model of Qwen2.5-0.5B's shape built from a
local config), dtype (fp32, bf16) and sequence length, each pass runs once under `esa.memtrace.measure` (torch's
profiler, allocator events, not resident memory), and `esa.memory.estimate(...).need("cpu")` gives the plan's
number for the same pass. The ledger records both, their ratio, and per pass a least-squares fit of the measured
peaks as bytes per studied weight + bytes per (token x layer x hidden) + bytes per (token x vocab).

    .venv/bin/python tests/bench/memory_ledger.py                     # every model, writes reports/bench/memory-ledger.json
    .venv/bin/python tests/bench/memory_ledger.py --models tiny-llama --seqlens 64

Each measurement is one short pass (1 window of 64 or 128 tokens); the whole ledger takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from esa import memory
from esa.evaluate import evaluate
from esa.memtrace import measure
from esa.models import load
from esa.models.inventory import weight_inventory
from esa.perturb.apply import perturbed
from esa.perturb.ops import PerturbSpec
from esa.sensitivity.metrics import METRICS, MetricConfig, fused_gradients

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "reports" / "bench" / "memory-ledger.json"
TOLERANCE = 0.15  # the plan must land within this share of the measured peak
QWEN_SHAPE = "qwen2.5-0.5b-shape"
MODELS = ("tiny-llama", "smollm2-135m", QWEN_SHAPE)
PROBES = 2
PERTURB_SHARE = 0.01  # perturbation pass: this share of every studied matrix is written (a large top-k)
SPARSITY = 0.5  # pruning: Wanda's and SparseGPT's usual share
CALIB_WINDOWS = 2  # pruning: calibration windows (their block inputs are held for the whole pass)
SPARSE_DENSITY = 0.01  # sparse fine-tuning: share of the studied weights trained
LORA_RANK = 4
PRUNE_BLOCKS = 2  # pruning: the blocks pruned (see pruned_specs)
# the full ledger: every pass of every model in both dtypes at these seqlens (Qwen's shape, the slowest: 64)
GRID_SEQLENS: dict[str, tuple[int, ...]] = {"tiny-llama": (64, 128), "smollm2-135m": (64, 128), QWEN_SHAPE: (64,)}
# rows of the full ledger left out on purpose, and why (none: every row was measured, the last ones on 2 shared
# cores); any other row a run lacks is listed with NOT_IN_RUN
_SHARED_CPU = ("not measured: too slow or too large for the shared 2-core CPU it was last measured on; measure it "
               "on a free machine with --models {model} --dtypes {dtype} --passes {pass} --append")
NOT_MEASURED: dict[tuple[str, str, str], str] = {}
NOT_IN_RUN = ("not measured: this run's --models/--dtypes/--seqlens/--passes left it out and --out held no earlier "
              "row of it (measure it with --append)")


def _qwen_config() -> Any:
    """Qwen2.5-0.5B's published dimensions (its config.json), written here: no hub, no download."""
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                       tie_word_embeddings=True)


def qwen_shape(dtype: torch.dtype) -> _Loaded:
    """Qwen2.5-0.5B's shape with random weights."""
    from transformers import AutoModelForCausalLM

    cfg = _qwen_config()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return _Loaded(model, weight_inventory(model))


class _Loaded:
    """What the passes read of a LoadedModel: the model, its studied weights and the info pruning keys on."""

    def __init__(self, model: torch.nn.Module, inventory: list[Any]) -> None:
        from types import SimpleNamespace

        self.model, self.inventory = model, inventory
        self.info = SimpleNamespace(ref="ledger", dtype=str(next(model.parameters()).dtype), max_positions=0)


def meta_model(name: str, dtype: torch.dtype) -> _Loaded:
    """The model's shape on the meta device (what the plan reads), to re-plan rows measured before."""
    from transformers import AutoModelForCausalLM

    from esa.models.loader import shape_source

    cfg = _qwen_config() if name == QWEN_SHAPE else shape_source(name)[1]()  # type: ignore[index]
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return _Loaded(model, weight_inventory(model))


def load_model(name: str, dtype: torch.dtype) -> Any:
    if name == QWEN_SHAPE:
        return qwen_shape(dtype)
    lm = load(name, dtype=dtype, device="cpu", attn_implementation="sdpa")
    return lm


def _ids(model: torch.nn.Module, b: int, t: int) -> torch.Tensor:
    vocab = model.get_output_embeddings().weight.shape[0]
    return torch.randint(3, min(vocab, 4000), (b, t), generator=torch.Generator().manual_seed(t))


def _targets(lm: Any) -> dict[str, torch.Tensor]:
    if next(lm.model.parameters()).device.type == "meta":  # planning only: the count is what matters
        return {s.name: torch.empty(max(1, int(PERTURB_SHARE * s.numel)), dtype=torch.long) for s in lm.inventory}
    g = torch.Generator().manual_seed(0)
    return {s.name: torch.randperm(s.numel, generator=g)[: max(1, int(PERTURB_SHARE * s.numel))].sort().values
            for s in lm.inventory}


# pass -> (the plan's pass name, the plan's extra arguments, a function of (lm, ids) running it once)
def _eval(lm: Any, ids: torch.Tensor) -> Any:
    return evaluate(lm.model, ids, batch_size=ids.shape[0], show_progress=False)


BATCH = {"b": 1}  # windows per micro-batch (main's --batch)
# micro-batches per pass: a gradient pass's second micro-batch runs with every accumulator allocated (its
# steady state); the others hold nothing across windows, and Hutchinson allocates its buffers up front
WINDOWS = {"grad_x_weight": 2, "grad_fused": 2, "finetune_full": 2, "finetune_sparse": 2, "finetune_lora": 2,
           "finetune_full_autocast": 2, "finetune_sparse_autocast": 2, "finetune_lora_autocast": 2,
           "prune_wanda": CALIB_WINDOWS, "prune_sparsegpt": CALIB_WINDOWS, "prune_wanda_one_shot": CALIB_WINDOWS,
           "prune_sparsegpt_one_shot": CALIB_WINDOWS, "prune_grad_x_weight": CALIB_WINDOWS,
           "prune_grad_x_weight_one_shot": CALIB_WINDOWS, "prune_hutchinson_diag": CALIB_WINDOWS,
           "prune_hutchinson_diag_one_shot": CALIB_WINDOWS}
# training passes measured again under bf16 autocast (the CPU's, standing for the CUDA runs' precision 'auto')
AUTOCAST = "_autocast"


def _metric(name: str) -> Callable[[Any, torch.Tensor], Any]:
    def run(lm: Any, ids: torch.Tensor) -> Any:
        cfg = MetricConfig(batch_size=BATCH["b"], probes=PROBES, seed=1, show_progress=False)
        return METRICS[name](lm.model, lm.inventory, ids, cfg).scores
    return run


def _fused(lm: Any, ids: torch.Tensor) -> Any:
    cfg = MetricConfig(batch_size=BATCH["b"], show_progress=False)
    return fused_gradients(lm.model, lm.inventory, ids, {"grad_x_weight": cfg, "grad_squared": cfg})


def _perturb(lm: Any, ids: torch.Tensor) -> Any:
    targets = _targets(lm)  # drawn outside: the caller's selection, not the pass's memory
    def run() -> Any:
        with perturbed(lm.model, targets, PerturbSpec("sign_flip", scale=1.0), seed=0):
            return evaluate(lm.model, ids, batch_size=ids.shape[0], show_progress=False)
    return run


def _train_config(precision: str) -> Any:
    from esa.apps.training import TrainConfig

    return TrainConfig(steps=2, batch_size=BATCH["b"], eval_start=False, grad_clip=1.0, show_progress=False,
                       precision=precision)


def _finetune(precision: str) -> Callable[[Any, torch.Tensor], Any]:
    """Two steps of full fine-tuning (the second runs with AdamW's moments allocated: its steady state). It
    trains the model in place, which changes no later pass's memory."""
    def run(lm: Any, ids: torch.Tensor) -> Any:
        from esa.apps.training import FullFT, train

        return train(lm.model, FullFT(), ids, _train_config(precision)).summary
    return run


# ---------------------------------------------------------------- application passes (Phase 5)


def pruned_specs(lm: Any) -> list[Any]:
    """What the pruning passes prune: the linears of the first PRUNE_BLOCKS blocks (SparseGPT's column loop is
    slow on the CPU; the plan is per block plus what grows with the pruned weights, so a few blocks test it)."""
    return [s for s in lm.inventory if s.kind in ("attention", "mlp") and s.layer < PRUNE_BLOCKS]


def _work(lm: Any, pass_name: str, b: int) -> dict[str, int]:
    """The plan's `work` for an application pass as the ledger runs it."""
    n = sum(s.numel for s in lm.inventory)
    if pass_name.startswith("prune_"):
        n = sum(s.numel for s in pruned_specs(lm))
        return {"written": int(SPARSITY * n), "windows": CALIB_WINDOWS * b}
    if pass_name.startswith("finetune_sparse"):
        return {"trainable": sum(max(1, int(SPARSE_DENSITY * s.numel)) for s in lm.inventory)}
    if pass_name.startswith("finetune_lora"):
        from esa.apps.training.lora import lora_specs

        return {"trainable": LORA_RANK * sum(sum(s.shape[-2:]) for s in lora_specs(lm.inventory))}
    return {}


def _calib(ids: torch.Tensor) -> Any:
    from esa.data import Windows

    return Windows(ids, "ledger", "train", int(ids.shape[1]), False, "ledger", int(ids.shape[0]),
                   tuple(range(ids.shape[0])))


def _prune(method: str, calibration: str = "sequential") -> Callable[[Any, torch.Tensor], Any]:
    def run(lm: Any, ids: torch.Tensor) -> Any:
        from esa.apps.pruning import PruneSpec, prune

        spec = PruneSpec(method, sparsity=SPARSITY, seqlen=int(ids.shape[1]), n_calib=int(ids.shape[0]),
                         batch_size=BATCH["b"], calibration=calibration, kinds=("attention", "mlp"), probes=PROBES)
        return prune(lm, spec, calib=_calib(ids), specs=pruned_specs(lm), use_cache=False).masks
    return run


def _train(method_of: Callable[[Any], Any], precision: str = "auto") -> Callable[[Any, torch.Tensor], Any]:
    def run(lm: Any, ids: torch.Tensor) -> Any:
        from esa.apps.training import train

        method = method_of(lm)
        try:
            return train(lm.model, method, ids, _train_config(precision), inventory=lm.inventory).summary
        finally:
            method.close()
    return run


def sparse_targets(lm: Any) -> dict[str, torch.Tensor]:
    """The sparse fine-tuning selection, drawn before the measurement (the caller's selection, not the pass's
    memory); cloned, so that no full permutation stays alive behind a slice."""
    g = torch.Generator().manual_seed(0)
    return {s.name: torch.randperm(s.numel, generator=g)[: max(1, int(SPARSE_DENSITY * s.numel))].clone()
            for s in lm.inventory}


def _lora_method(lm: Any) -> Any:
    from esa.apps.training.lora import LoraFT

    return LoraFT(lm.inventory, rank=LORA_RANK)


def _int8(lm: Any, ids: torch.Tensor) -> Any:
    from esa.apps.security.formats import stored

    with stored(lm.model, "int8", lm.inventory) as store:
        return store.quant_rel_error


def _bfa(lm: Any, ids: torch.Tensor) -> Any:
    """One bit-search iteration (one flip, two candidate matrices) judged on the same windows."""
    from esa.apps.security.bfa import AttackConfig, progressive_bit_search

    cfg = AttackConfig(max_flips=1, layer_candidates=2, batch_size=BATCH["b"], show_progress=False)
    return progressive_bit_search(lm.model, ids, ids, cfg=cfg, weights=lm.inventory).summary()


def _capture(lm: Any, ids: torch.Tensor) -> Any:
    from esa.apps.interpret.anatomy import anatomy
    from esa.apps.interpret.passes import Wants, forward_capture

    wants = Wants(residual=True, stopwords=torch.arange(3, 13))
    return forward_capture(lm.model, anatomy(lm.model), ids, wants, batch_size=BATCH["b"])


PASSES: dict[str, tuple[str, dict[str, Any], Callable[[Any, torch.Tensor], Any]]] = {
    "eval": ("eval", {}, _eval),
    "grad_x_weight": ("gradient", {}, _metric("grad_x_weight")),
    "grad_fused": ("grad_fused", {}, _fused),
    "act_mag": ("act_mag", {}, _metric("act_mag")),
    "hutchinson_diag": ("hutchinson", {"probes": PROBES}, _metric("hutchinson_diag")),
    "perturb": ("perturb", {}, None),  # built per model (its targets, their count: `written`): below
    "finetune_full": ("finetune_full", {}, _finetune("auto")),  # fp32 only: full fine-tuning refuses bf16 weights
    "prune_wanda": ("prune", {}, _prune("wanda")),
    "prune_sparsegpt": ("sparsegpt", {}, _prune("sparsegpt")),
    "prune_wanda_one_shot": ("prune_one_shot", {}, _prune("wanda", "one-shot")),
    "prune_sparsegpt_one_shot": ("sparsegpt_one_shot", {}, _prune("sparsegpt", "one-shot")),
    # gradient scorers: their metric's gradient pass (per block, or once: their default) plus pruning's buffers
    "prune_grad_x_weight": ("prune_gradient", {}, _prune("grad_x_weight")),
    "prune_grad_x_weight_one_shot": ("prune_gradient_one_shot", {}, _prune("grad_x_weight", "one-shot")),
    "prune_hutchinson_diag": ("prune_hutchinson", {"probes": PROBES}, _prune("hutchinson_diag")),
    "prune_hutchinson_diag_one_shot": ("prune_hutchinson_one_shot", {"probes": PROBES},
                                       _prune("hutchinson_diag", "one-shot")),
    "finetune_sparse": ("finetune_sparse", {}, None),  # built per model (its selection): runner()
    "finetune_lora": ("finetune_lora", {}, _train(_lora_method)),
    "int8_store": ("int8_store", {}, _int8),
    "bfa": ("bfa", {}, _bfa),
    "capture": ("capture", {}, _capture),
    "finetune_full" + AUTOCAST: ("finetune_full", {"autocast": True}, _finetune("bf16")),
    "finetune_sparse" + AUTOCAST: ("finetune_sparse", {"autocast": True}, None),
    "finetune_lora" + AUTOCAST: ("finetune_lora", {"autocast": True}, _train(_lora_method, "bf16")),
}


def runner(lm: Any, pass_name: str, b: int, t: int) -> Callable[[], Any]:
    """Ledger pass `pass_name` on `lm` at batch b x seqlen t, ready to run once (its inputs drawn outside)."""
    fn = PASSES[pass_name][2]
    ids = _ids(lm.model, b * WINDOWS.get(pass_name, 1), t)
    if pass_name.startswith("finetune_sparse"):
        from esa.apps.training.sparse import SparseFT

        targets = sparse_targets(lm)
        fn = _train(lambda _: SparseFT(targets), "bf16" if pass_name.endswith(AUTOCAST) else "auto")
    return _perturb(lm, ids) if pass_name == "perturb" else (lambda: fn(lm, ids))


def measure_pass(lm: Any, pass_name: str, b: int, t: int) -> dict[str, Any]:
    """One pass on `lm` at batch b x seqlen t: measured peak, the plan's need and their ratio."""
    plan_pass = PASSES[pass_name][0]
    run = runner(lm, pass_name, b, t)
    t0 = time.perf_counter()
    peak, out = measure(run)
    seconds = time.perf_counter() - t0
    del out
    row = {"pass": pass_name, "plan_pass": plan_pass, "batch": b, "seqlen": t, "measured": peak.peak,
           "measured_end": peak.end, "seconds": round(seconds, 2)}
    return {**row, **planned(lm, row)}


def plan_args(lm: Any, pass_name: str, b: int) -> tuple[str, dict[str, Any]]:
    """(esa.memory's pass, its estimate arguments) for ledger pass `pass_name` run at batch b on `lm`."""
    plan_pass, kw, _ = PASSES[pass_name]
    if pass_name == "perturb":
        kw = {"written": sum(int(v.numel()) for v in _targets(lm).values())}
    elif plan_pass in memory.APP_PASSES:
        kw = {**kw, "work": _work(lm, pass_name, b)}
    pruning = plan_pass.startswith(("prune", "sparsegpt"))
    return plan_pass, {**kw, "specs": pruned_specs(lm) if pruning else lm.inventory}


def plan_of(lm: Any, pass_name: str, b: int, t: int) -> dict[str, Any]:
    """The plan's need for ledger pass `pass_name` at batch b x seqlen t (esa.memory as it is now), and its
    components."""
    plan_pass, kw = plan_args(lm, pass_name, b)
    est = memory.estimate(lm.model, plan_pass, b, t, target="cpu", **kw)
    return {"plan": est.need("cpu"), "components": {k: v for k, v in est.per_device["cpu"].items() if k != "weights"}}


def planned(lm: Any, row: dict[str, Any]) -> dict[str, Any]:
    """The plan's need for a measured row, its ratio to the measurement and components."""
    out = plan_of(lm, row["pass"], row["batch"], row["seqlen"])
    ratio = out["plan"] / max(1, row["measured"])
    return {"plan": out["plan"], "ratio": round(ratio, 4), "within": abs(ratio - 1) <= TOLERANCE,
            "components": out["components"]}


def _refused(pass_name: str, dtype: str) -> bool:
    """Full fine-tuning refuses non-fp32 weights (no fp32 master weights: esa.apps.training.full)."""
    return pass_name.startswith("finetune_full") and dtype != "float32"


def not_measured(rows: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Every row of the full ledger (GRID_SEQLENS x dtypes x PASSES) that `rows` lacks, planned on the meta
    device, with the reason it was not measured: listed, never silently absent."""
    have = {(r["model"], r["dtype"], r["pass"], r["seqlen"]) for r in rows}
    out: list[dict[str, Any]] = []
    for model, seqlens in GRID_SEQLENS.items():
        for dtype in ("float32", "bfloat16"):
            lm = None
            for pass_name in PASSES:
                for t in seqlens:
                    if _refused(pass_name, dtype) or (model, dtype, pass_name, t) in have:
                        continue
                    lm = lm or meta_model(model, getattr(torch, dtype))
                    why = NOT_MEASURED.get((model, dtype, pass_name), NOT_IN_RUN)
                    out.append({"model": model, "dtype": dtype, "pass": pass_name, "batch": batch, "seqlen": t,
                                "status": "not measured", "reason": why.format(**{"model": model, "dtype": dtype,
                                                                                  "pass": pass_name}),
                                **plan_of(lm, pass_name, batch, t)})
    return out


def features(lm: Any, b: int, t: int) -> dict[str, float]:
    s = memory.ModelShape.of(lm.model, lm.inventory)
    return {"studied": s.n_studied, "token_layer_hidden": b * t * s.layers * s.hidden, "token_vocab": b * t * s.vocab}


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pass and dtype: measured = a * studied + c * (tokens x layers x hidden) + d * (tokens x vocab),
    least squares (non-negative by clipping), and its worst relative error over the rows."""
    out: dict[str, Any] = {}
    keys = ("studied", "token_layer_hidden", "token_vocab")
    for key in sorted({(r["pass"], r["dtype"]) for r in rows}):
        sub = [r for r in rows if (r["pass"], r["dtype"]) == key]
        x = torch.tensor([[float(r["features"][k]) for k in keys] for r in sub], dtype=torch.float64)
        y = torch.tensor([float(r["measured"]) for r in sub], dtype=torch.float64)
        scale = x.abs().amax(0).clamp_min(1.0)
        coef = torch.linalg.lstsq(x / scale, y.unsqueeze(1)).solution.squeeze(1) / scale
        coef = coef.clamp_min(0.0)
        pred = x @ coef
        err = ((pred - y).abs() / y.clamp_min(1.0)).max().item()
        out[f"{key[0]}/{key[1]}"] = {**{f"bytes_per_{k}": round(float(c), 3) for k, c in zip(keys, coef, strict=True)},
                                     "max_rel_error": round(err, 3), "n": len(sub)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seqlens", default="64,128")
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out that this run does not measure again (every row is re-planned "
                         "with esa.memory as it is now), so the slow models can be measured one at a time")
    a = ap.parse_args(argv)
    passes = a.passes.split(",")
    bad = [p for p in passes if p not in PASSES]
    if bad:
        print(f"memory_ledger: unknown pass {bad[0]!r}; accepted: {', '.join(PASSES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    BATCH["b"] = a.batch
    rows: list[dict[str, Any]] = []
    for name in a.models.split(","):
        for dt in a.dtypes.split(","):
            lm = load_model(name, getattr(torch, dt))
            for t in (int(s) for s in a.seqlens.split(",")):
                for p in passes:
                    if _refused(p, dt):
                        continue
                    r = measure_pass(lm, p, a.batch, t)
                    r.update(model=name, dtype=dt, features=features(lm, a.batch, t))
                    rows.append(r)
                    print(f"{name:20s} {dt:9s} T={t:<4d} {p:16s} measured {r['measured'] / 2**20:9.2f} MiB  "
                          f"plan {r['plan'] / 2**20:9.2f} MiB  ratio {r['ratio']:.3f}{'' if r['within'] else '  MISS'}",
                          flush=True)
            del lm
    if a.append and Path(a.out).is_file():
        def key(r: dict[str, Any]) -> tuple[Any, ...]:
            return r["model"], r["dtype"], r["pass"], r["batch"], r["seqlen"]

        measured = {key(r) for r in rows}
        kept = [r for r in json.loads(Path(a.out).read_text())["rows"] if key(r) not in measured]
        metas: dict[tuple[str, str], Any] = {}
        for r in kept:
            key = (r["model"], r["dtype"])
            metas[key] = metas.get(key) or meta_model(r["model"], getattr(torch, r["dtype"]))
            r.update(planned(metas[key], r))
        rows = kept + rows
    missing = not_measured(rows, a.batch)
    report = {"tolerance": TOLERANCE, "measure": "torch.profiler CPU allocator events (esa.memtrace)",
              "torch": torch.__version__, "rows": rows, "fit": fit(rows) if rows else {},
              "within": sum(r["within"] for r in rows), "n": len(rows),
              "not_measured": missing, "n_not_measured": len(missing)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    left_out = [r for r in missing if r["reason"] == NOT_IN_RUN]
    for r in missing:
        if r["reason"] != NOT_IN_RUN:  # the rows left out on purpose, one line each (all are in --out)
            print(f"{r['model']:20s} {r['dtype']:9s} T={r['seqlen']:<4d} {r['pass']:16s} plan "
                  f"{r['plan'] / 2**20:9.2f} MiB  {r['reason']}")
    print(f"memory ledger: {report['within']}/{report['n']} measured passes within +-{TOLERANCE:.0%} of the plan; "
          f"not measured: {len(missing) - len(left_out)} listed above, {len(left_out)} left out of this run "
          f"(each in {a.out} with its plan and reason)")
    return 0 if report["within"] == report["n"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
