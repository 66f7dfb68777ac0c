"""Memory guard: estimates scale as the model of memory says, and the guard fails early and helpfully."""

from __future__ import annotations

import pytest
import torch

from esa import memory
from esa.errors import EsaError
from esa.models import load
from esa.models.inventory import weight_inventory


@pytest.fixture(scope="module")
def fp32():
    return load("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def bf16():
    return load("tiny-llama", dtype="bfloat16", device="cpu")


def test_components_scale_with_batch_and_seqlen(fp32):
    m = fp32.model
    a = memory.estimate(m, "gradient", 2, 32).components
    b = memory.estimate(m, "gradient", 4, 32).components
    c = memory.estimate(m, "gradient", 2, 64).components
    assert b["activations"] == 2 * a["activations"]  # linear in batch
    assert b["logits"] == 2 * a["logits"] and c["logits"] == 2 * a["logits"]  # linear in B and T
    # eager attention keeps (a, T, T) scores: doubling T more than doubles activations
    assert c["activations"] > 2 * a["activations"]
    for k in ("weights", "accumulators"):  # do not depend on the batch
        assert a[k] == b[k] == c[k]
    # the loss's logits buffers are freed before the first gradient exists: the larger of the two is planned
    assert "grads_in_flight" not in a
    one = memory.estimate(m, "gradient", 1, 1).components
    assert "logits" not in one and one["grads_in_flight"] == max(s.numel for s in fp32.inventory) * (4 + 4)
    n_studied = sum(s.numel for s in fp32.inventory)
    assert a["accumulators"] == 4 * n_studied
    assert a["weights"] == 4 * sum(p.numel() for p in m.parameters())


def test_dtype_halves_weights_not_accumulators(fp32, bf16):
    a = memory.estimate(fp32.model, "gradient", 2, 32).components
    b = memory.estimate(bf16.model, "gradient", 2, 32).components
    assert b["weights"] * 2 == a["weights"]
    # the model-dtype part of the activations halves; the RMSNorms' fp32 upcasts and eager's fp32 softmax do not
    assert a["activations"] / 2 < b["activations"] < a["activations"]
    assert b["accumulators"] == a["accumulators"]  # scores are fp32 whatever the model dtype


def test_pass_ordering_and_per_device_sum(fp32):
    tot = {p: memory.estimate(fp32.model, p, 2, 32).total for p in memory.PASSES}
    assert max(tot["eval"], tot["act_mag"]) < tot["gradient"] < tot["hutchinson"]
    # act_mag computes no loss and keeps the last position's logits only (logits_to_keep=1): its peak is its
    # scores or its forward; evaluation keeps every position's logits and, one window at a time, the log-softmax
    # (plus an fp32 copy of the logits when the model is not fp32)
    vocab = fp32.model.get_output_embeddings().weight.shape[0]
    assert "logits" not in memory.estimate(fp32.model, "act_mag", 2, 32).components
    assert memory.estimate(fp32.model, "eval", 2, 32).components["logits"] == 2 * 32 * vocab * 4 + 32 * vocab * 4
    est = memory.estimate(fp32.model, "hutchinson", 2, 32)
    assert list(est.per_device) == ["cpu"]
    assert sum(est.per_device["cpu"].values()) == est.total  # one device holds everything
    assert est.need("cpu", loaded=True) == est.total - est.components["weights"]
    d = est.as_dict()
    assert d["total"] == est.total and "components_gib" in d


def test_guard_raises_on_impossible_budget_with_remedies(fp32):
    with pytest.raises(EsaError) as ei:
        memory.check(fp32.model, "hutchinson", 4, 64, available={"cpu": 10_000})
    msg = str(ei.value)
    est = memory.estimate(fp32.model, "hutchinson", 4, 64)
    assert "not enough memory for hutchinson" in msg and "batch 4 x seqlen 64" in msg
    assert memory._gib(est.need("cpu")) in msg and "9.77 KiB is free" in msg
    for remedy in ("dtype='bfloat16'", "smaller batch size", "device_map='auto'", "max_memory", "offload"):
        assert remedy in msg


def test_guard_passes_feasible_budget_and_real_machine(fp32):
    est = memory.check(fp32.model, "gradient", 4, 64, available={"cpu": 1 << 40})
    assert est.total > 0
    memory.check(fp32.model, "eval", 2, 32)  # the real free memory of this machine holds a tiny model
    assert memory.free_bytes("cpu") > 0


def test_guard_threshold_is_the_estimate(fp32):
    est = memory.estimate(fp32.model, "eval", 2, 32)
    need = est.need("cpu")
    memory.check(fp32.model, "eval", 2, 32, available={"cpu": need}, headroom=1.0)
    with pytest.raises(EsaError):
        memory.check(fp32.model, "eval", 2, 32, available={"cpu": need - 1}, headroom=1.0)


def test_plan_8b_on_meta_before_loading():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    est = memory.estimate(m, "gradient", 1, 512, target="cuda:0")
    assert list(est.per_device) == ["cuda:0"]
    assert 8.0e9 * 2 < est.components["weights"] < 8.1e9 * 2  # Llama-3.1-8B: 8.03B params in bf16
    with pytest.raises(EsaError, match="fewer studied weights"):  # 28 GiB of fp32 accumulators alone
        memory.check(m, "gradient", 1, 512, loaded=False, available={"cuda:0": 40 << 30}, target="cuda:0")
    memory.check(m, "gradient", 1, 512, loaded=False, available={"cuda:0": 80 << 30}, target="cuda:0")


def test_dispatched_model_counts_offload_staging():
    lm = load("tiny-llama", device_map="auto", max_memory={"cpu": 150_000})
    est = memory.estimate(lm.model, "eval", 2, 32)
    assert est.per_device["cpu"]["offload_staging"] > 0
    # offloaded weights are not resident: fewer weight bytes on the cpu than the whole model
    assert est.per_device["cpu"]["weights"] < est.components["weights"]


def test_bad_inputs(fp32):
    with pytest.raises(EsaError, match="unknown pass"):
        memory.estimate(fp32.model, "backprop", 1, 8)
    with pytest.raises(EsaError, match="batch_size"):
        memory.estimate(fp32.model, "eval", 0, 8)


def _meta_llama(dtype: torch.dtype, tie: bool = False) -> torch.nn.Module:
    """A small Llama on the meta device: h 64, I 128, 2 layers, 4 heads of 16, 2 kv heads (kv 32), vocab 256."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tie)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


H, INTER, KV, A, L, V = 64, 128, 32, 4, 2, 256
LINEARS = L * (2 * H * H + 2 * H * KV + 3 * H * INTER) + V * H  # the blocks' Linears and the LM head


def _graph(compute: int, inputs: float) -> int:
    """The training graph of esa.memory at batch 2 x 16: the layer outputs (compute dtype), the norms' fp32
    inputs and SDPA's log-sum-exp, and what the method keeps of the Linears' inputs (bytes per token)."""
    return int(L * 2 * 16 * (compute * (2 * H + 3 * INTER + 2 * KV) + 4 * (2 * H + A) + inputs))


def test_training_plans_count_what_bf16_autocast_adds_on_an_fp32_model():
    """On CUDA the training loop runs under bf16 autocast (esa.apps.training.loop.uses_autocast): an fp32 model's
    Linears keep bf16 casts of their weights and compute in bf16; each method keeps its own inputs."""
    m = _meta_llama(torch.float32)
    work = {"trainable": 1000}

    def est(p: str, autocast: bool, target: str = "cuda:0") -> dict[str, int]:
        return memory.estimate(m, p, 2, 16, target=target, work=work, autocast=autocast).components

    plain, cast = est("finetune_lora", False), est("finetune_lora", True)
    assert plain["activations"] == _graph(4, 4 * (2 * H + INTER)) and "weight_casts" not in plain
    # autocast: bf16 layer outputs, LoRA's bf16 casts of q, k, v, gate and up's fp32 inputs and of the product
    assert cast["activations"] == _graph(2, 2 * (5 * H + INTER)) and cast["weight_casts"] == 2 * LINEARS
    assert cast["optimizer"] == plain["optimizer"] == 16 * 1000
    sparse = est("finetune_sparse", True)  # the hook keeps the norms' fp32 outputs and the bf16 product
    assert sparse["activations"] == _graph(2, 4 * 2 * H + 2 * INTER) and sparse["weight_casts"] == 2 * LINEARS
    # full fine-tuning: the backward's start (graph, casts, logits, head gradient) against the step
    full = memory.estimate(m, "finetune_full", 2, 16, target="cpu", autocast=True).components
    assert "optimizer_step" in full  # a tiny model peaks at the step
    n = sum(p.numel() for p in m.parameters())
    start = (_graph(2, 2 * (5 * H + INTER) + 4 * 2 * H) + 2 * LINEARS + 12 * 2 * 16 * V + 4 * V * H)
    assert sum(full.values()) - full["weights"] - full["optimizer"] == max(start, 4 * n + 2 * 4 * V * H)
    # an accelerator's foreach AdamW holds an fp32 copy of every weight in its step; the CPU's one at a time
    gpu = memory.estimate(m, "finetune_full", 2, 16, target="cuda:0", autocast=True).components
    assert gpu["optimizer_step"] == 4 * n and full["optimizer_step"] == 2 * 4 * V * H


def test_autocast_on_a_bf16_model_changes_only_loras_input_copies():
    m = _meta_llama(torch.bfloat16)
    work = {"trainable": 1000}

    def act(p: str, autocast: bool) -> dict[str, int]:
        return memory.estimate(m, p, 2, 16, target="cuda:0", work=work, autocast=autocast).components

    # frozen bf16 weights keep nothing of their inputs; peft's fp32 copy of each adapted input (4 bytes), made
    # bf16 again by autocast (2 bytes) for q, k, v, o, gate and up (h wide) and down (I wide)
    assert act("finetune_lora", False)["activations"] == _graph(2, 4 * (6 * H + INTER))
    assert act("finetune_lora", True)["activations"] == _graph(2, 2 * (6 * H + INTER))
    assert act("finetune_sparse", True) == act("finetune_sparse", False)  # nothing to cast: no weight casts
    assert act("finetune_sparse", True)["activations"] == _graph(2, 2 * (2 * H + INTER))


def test_loop_plans_the_autocast_it_runs(monkeypatch):
    """The training loop asks the plan with the autocast it is about to enable (CPU: only precision 'bf16')."""
    from esa.apps.training import TrainConfig, train
    from esa.apps.training.loop import uses_autocast
    from esa.apps.training.lora import LoraFT

    assert uses_autocast(torch.device("cuda"), "auto") and not uses_autocast(torch.device("cpu"), "auto")
    assert uses_autocast(torch.device("cpu"), "bf16") and not uses_autocast(torch.device("cuda"), "fp32")
    seen = []

    def check(*a, **k):
        seen.append(k.get("autocast"))
        raise EsaError("stop here")

    monkeypatch.setattr(memory, "check", check)
    lm = load("tiny-llama", device="cpu")
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    for precision in ("auto", "bf16"):
        cfg = TrainConfig(steps=1, batch_size=1, eval_start=False, show_progress=False, precision=precision)
        with pytest.raises(EsaError, match="stop here"):
            train(lm.model, LoraFT(lm.inventory, rank=1), ids, cfg, inventory=lm.inventory)
    assert seen == [False, True]


def test_one_shot_sparsegpt_holds_every_blocks_hessians_and_writes_nothing():
    from esa.apps.pruning import PruneSpec
    from esa.apps.pruning.prune import memory_pass

    m = _meta_llama(torch.float32)
    n = sum(s.numel for s in weight_inventory(m))
    work = {"written": n // 2, "windows": 4}
    seq = memory.estimate(m, "sparsegpt", 1, 32, target="cpu", work=work).components
    one = memory.estimate(m, "sparsegpt_one_shot", 1, 32, target="cpu", work=work).components
    hess = 4 * (3 * H * H + INTER * INTER)  # one block's X^T X per distinct input
    assert seq["hessians"] == hess and "stats" not in seq and seq["backup"] > 0
    assert one["hessians"] == hess and one["stats"] == hess * (L - 1) and "backup" not in one
    wanda = memory.estimate(m, "prune_one_shot", 1, 32, target="cpu", work=work).components
    assert "backup" not in wanda and "calibration" not in wanda  # no block inputs held; the decision peaks here
    assert memory_pass(PruneSpec("sparsegpt", sparsity=0.5)) == "sparsegpt"  # its default: layer-sequential
    assert memory_pass(PruneSpec("sparsegpt", sparsity=0.5, calibration="one-shot")) == "sparsegpt_one_shot"
    assert memory_pass(PruneSpec("wanda", sparsity=0.5, calibration="one-shot")) == "prune_one_shot"
    assert memory_pass(PruneSpec("magnitude", sparsity=0.5)) == "prune_one_shot"  # data-free: nothing written


def _block_job(h: int, inter: int, kv: int, dtype: torch.dtype):
    """One Llama block's seven linears with random weights and calibration Hessians, as SparseGPT gets them."""
    from esa.apps.pruning.core import InputStats, Job
    from esa.apps.pruning.sparsity_patterns import Pattern
    from esa.apps.pruning.spec import PruneSpec
    from esa.models.inventory import WeightSpec

    g = torch.Generator().manual_seed(0)
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (inter, h), "up": (inter, h),
              "down": (h, inter)}
    specs = [WeightSpec(f"model.layers.0.{c}.weight", 0, c, "attention" if c in "qkvo" else "mlp", s)
             for c, s in shapes.items()]
    stats = {}
    for c, cols in (("qkv", h), ("o", h), ("gateup", h), ("down", inter)):
        st = InputStats()
        st.add(torch.randn(2 * cols, cols, generator=g), hessian=True)
        for part in (c if c in ("qkv", "o") else ("gate", "up") if c == "gateup" else ("down",)):
            stats[part] = st
    params = {s.name: (0.02 * torch.randn(*s.shape, generator=g)).to(dtype) for s in specs}
    return Job(specs, params, dict.fromkeys(params, 0.5), Pattern("unstructured"), "matrix",
               PruneSpec("sparsegpt", sparsity=0.5), {}, stats={s.name: stats[s.component] for s in specs})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h, inter, kv", [(64, 256, 32), (128, 128, 128)])
def test_sparsegpt_decision_plan_is_what_its_code_allocates(h, inter, kv, dtype):
    """SparseGPT deciding one block peaks where esa.memory says, on the allocator: with a wide MLP in the down
    projection's factorisation (four (I, I) fp32), with a narrow one in the gate/up column loop. The plan once
    counted the factorisation and the loop as held together (SmolLM2: 1.12x the measured pass)."""
    from esa.apps.pruning.sparsegpt import SparseGPT
    from esa.memtrace import measure

    job = _block_job(h, inter, kv, dtype)
    peak, out = measure(lambda: SparseGPT().decide(job))
    shape = memory.ModelShape(n_params=0, dtype_bytes=dtype.itemsize, n_studied=0, largest_studied=0, hidden=h,
                              intermediate=inter, layers=1, heads=1, vocab=1, materialised_attention=False, kv=kv)
    assert abs(memory._sgpt_decide(shape) / peak.peak - 1) < 0.01, (memory._sgpt_decide(shape), peak.peak)
    blk = 2 * h * h + 2 * h * kv + 3 * h * inter
    assert peak.end == 5 * blk  # what it returns: every matrix's fp32 values and bool mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writing_a_reconstructed_matrix_holds_what_the_plan_says(dtype):
    """prune's write of a SparseGPT matrix (masks.updates_for, then perturb.apply.overwritten): its dense backup
    and, at the peak, the index, the new and old values and the changed-weights count's bool and int64 copy."""
    import contextlib

    from esa.apps.pruning.masks import updates_for
    from esa.memtrace import measure
    from esa.perturb.apply import overwritten

    lin = torch.nn.Linear(512, 256, bias=False).to(dtype)
    n, b = lin.weight.numel(), dtype.itemsize
    new = lin.weight.detach().float() + 1.0  # every kept weight changes, as reconstruction makes them
    pruned = torch.rand(256, 512, generator=torch.Generator().manual_seed(0)) < 0.5
    stack = contextlib.ExitStack()

    def write() -> None:
        stack.enter_context(overwritten(lin, {"weight": updates_for(pruned, new, lin.weight.data)}))

    peak, _ = measure(write)
    stack.close()
    assert abs(peak.peak / (b * n + (memory.SGPT_WRITE + 2 * b) * n) - 1) < 0.02, peak
    assert peak.end == b * n  # the backup alone stays


def test_sparsegpt_plan_is_the_sum_of_its_buffers():
    """The layer-sequential SparseGPT plan of SmolLM2's block shape, from the buffers its code holds (listed here,
    not read from esa.memory): the last block's down projection peaks either while factorised or while written."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    h, inter, kv, windows, t = 576, 1536, 192, 2, 64
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=9,
                      num_key_value_heads=kv // 64, vocab_size=512)  # heads of 64
    cfg._attn_implementation = "sdpa"
    for dtype, b in ((torch.float32, 4), (torch.bfloat16, 2)):
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        specs = [s for s in weight_inventory(m) if s.kind in ("attention", "mlp")]
        blk, down = sum(s.numel for s in specs) // 2, h * inter  # two blocks
        n = 2 * blk
        est = memory.estimate(m, "sparsegpt", 1, t, specs, target="cpu", work={"written": n // 2, "windows": windows})
        held = n // 8 + windows * t * h * b  # masks, the calibration windows' block inputs
        block0 = blk * b + (blk // 2) * b  # the first block's restore backup (a dense copy) and kept values
        hessians = 4 * (3 * h * h + inter * inter)  # X^T X of q/k/v's, o's, gate/up's and down's inputs, fp32
        earlier = 5 * (blk - down)  # q/k/v, o and gate/up decided: fp32 values and a bool mask each
        factor = 4 * 4 * inter * inter + (0 if b == 4 else 4 * down)  # H, its Cholesky factor, H^-1, U (+ fp32 copy)
        deciding = block0 + hessians + earlier + factor
        # writing down: every backup, every decision; its int64 index, new and old values, a bool and its int64 sum
        writing = 2 * blk * b + (blk // 2) * b + hessians + 5 * blk + (8 + b + b + 1 + 8) * down
        assert est.components["hessians"] == hessians
        assert est.need("cpu") == held + max(deciding, writing), (dtype, est.per_device["cpu"])
    # fp32: the write peaks (measured 89.4 MB on SmolLM2's first two blocks, plan 89.8); bf16: the factorisation


def test_gradient_scorers_are_planned_as_the_gradient_pass_they_run(monkeypatch, tmp_path):
    """A gradient scorer prunes from its metric's gradient pass (grad_x_weight, obd: a backward; hutchinson_diag:
    the double backward): its plan is that pass plus pruning's own buffers, not the statistics pass of Wanda it was
    planned as (no backward: under a third of what one-shot grad_x_weight needs here)."""
    from esa.apps.pruning import PruneSpec, prune
    from esa.apps.pruning.prune import memory_pass
    from esa.data import Windows

    for method, metric_pass in (("grad_x_weight", "gradient"), ("obd", "gradient"), ("hutchinson_diag", "hutchinson")):
        assert memory_pass(PruneSpec(method, sparsity=0.5)) == f"prune_{metric_pass}_one_shot"  # their default
        assert memory_pass(PruneSpec(method, sparsity=0.5, calibration="sequential")) == f"prune_{metric_pass}"
    m = _meta_llama(torch.float32)
    specs = [s for s in weight_inventory(m) if s.kind in ("attention", "mlp")]
    n = sum(s.numel for s in specs)
    work = {"written": n // 2, "windows": 4}

    def need(pass_name: str, **kw) -> dict[str, int]:  # what the pass adds to the loaded model
        d = memory.estimate(m, pass_name, 2, 32, specs, target="cpu", **kw).per_device["cpu"]
        return {k: v for k, v in d.items() if k != "weights"}

    one_shot, grad = need("prune_gradient_one_shot", work=work), need("gradient")
    assert one_shot == {**grad, "masks": n // 8}  # the gradient pass over every pruned weight, and the masks
    assert sum(need("prune_one_shot", work=work).values()) < 0.35 * sum(grad.values())
    hutch = need("prune_hutchinson_one_shot", work=work, probes=2)
    assert hutch == {**need("hutchinson", probes=2), "masks": n // 8}
    # layer-sequential: a gradient pass per block scoring that block's weights, the earlier blocks' backup held;
    # the first block's backward runs through both layers, the last block's through one
    block0 = [s for s in specs if s.layer == 0]
    first = memory.estimate(m, "gradient", 2, 32, block0, target="cpu").per_device["cpu"]
    del first["weights"]
    assert need("prune_gradient", work=work) == {**first, "masks": n // 8}  # here the first block's is the largest
    # hutchinson_diag layer-sequentially: the double backward per block, whose create_graph gradients and kept
    # probes cover that block's weights alone (the probes had been planned over every pruned weight)
    hutch0 = memory.estimate(m, "hutchinson", 2, 32, block0, target="cpu", probes=2).per_device["cpu"]
    del hutch0["weights"]
    assert need("prune_hutchinson", work=work, probes=2) == {**hutch0, "masks": n // 8}
    assert hutch0["probe_cache"] == 2 * sum(s.numel for s in block0) < 2 * n
    # a block without studied weights keeps no Linear inputs for the backward (both norms' outputs, the MLP's
    # product): SmolLM2's and Qwen's pruning rows score 2 of 30 and 24 blocks (measured 1.12-1.24x before)
    assert first["activations"] == grad["activations"] - 2 * 32 * 4 * (2 * H + INTER)
    last = memory.ModelShape.of(m, specs)
    assert (last.first_layer, last.last_layer) == (0, L - 1)
    # prune() asks the plan of the pass it runs, with the scorer's probes
    from esa.models import load

    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path))
    lm = load("tiny-llama", device="cpu")
    ids = torch.randint(3, 259, (2, 32), generator=torch.Generator().manual_seed(0))
    calib = Windows(ids, "random", "calib", 32, False, "byt5", 2, (0, 1))
    seen = []

    def check(model, pass_name, *a, **k):
        seen.append((pass_name, k.get("probes")))
        raise EsaError("stop here")

    monkeypatch.setattr(memory, "check", check)
    with pytest.raises(EsaError, match="stop here"):
        prune(lm, PruneSpec("hutchinson_diag", sparsity=0.5, seqlen=32, n_calib=2, batch_size=1, probes=3),
              calib=calib, use_cache=False)
    assert seen == [("prune_hutchinson_one_shot", 3)]
