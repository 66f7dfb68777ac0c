"""Memory guard: estimates scale as the model of memory says, and the guard fails early and helpfully."""

from __future__ import annotations

import pytest
import torch

from esa import memory
from esa.errors import EsaError
from esa.models import load


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
    for k in ("weights", "accumulators", "grads_in_flight"):  # do not depend on the batch
        assert a[k] == b[k] == c[k]
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
