"""The loader: tiny models of every architecture, inventories, descriptions, and bad references."""

from __future__ import annotations

import pytest
import torch

from esa.errors import EsaError
from esa.models import EMBEDDED, TINY_CONFIGS, inventory_without_weights, load, parse_dtype, weight_inventory
from esa.models.inventory import classify

EXPECTED_FAMILY = {"tiny-qwen2": "qwen2", "tiny-llama": "llama", "tiny-mistral": "mistral", "tiny-phi3": "phi3",
                   "tiny-mixtral": "mixtral", "tiny-gptneox": "gpt_neox"}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_models_load_and_describe(name):
    lm = load(name, device="cpu")
    info = lm.info
    assert info.family == EXPECTED_FAMILY[name]
    assert info.n_params == sum(p.numel() for p in lm.model.parameters())
    assert info.n_layers == 2 and info.source == "tiny"
    assert not any(p.requires_grad for p in lm.model.parameters())
    # every block has attention and (dense or expert) MLP weights, all 2-D or 3-D expert tensors
    kinds = {s.kind for s in lm.inventory}
    assert "attention" in kinds and (kinds & {"mlp", "expert"})
    assert {s.layer for s in lm.inventory} == {0, 1}
    assert info.n_weights_studied == sum(s.numel for s in lm.inventory)
    if name == "tiny-mixtral":
        assert info.moe and info.n_experts == 4 and "router" in kinds
        assert info.n_params_active < info.n_params
    else:
        assert not info.moe and info.n_params_active == info.n_params


def test_tiny_models_are_seeded():
    a, b, c = load("tiny-llama", seed=1), load("tiny-llama", seed=1), load("tiny-llama", seed=2)
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


def test_inventory_excludes_norms_embeddings_and_head_unless_asked():
    lm = load("tiny-llama")
    names = [s.name for s in lm.inventory]
    assert not any("norm" in n or "embed" in n or "lm_head" in n for n in names)
    full = weight_inventory(lm.model, include_embeddings=True, include_lm_head=True)
    assert {s.kind for s in full} >= {"embedding", "lm_head"}


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.0.self_attn.qkv_proj.weight", ("qkv", "attention")),
        ("model.layers.0.self_attn.v_proj.weight", ("v", "attention")),
        ("model.layers.3.mlp.gate_up_proj.weight", ("gate_up", "mlp")),
        ("model.layers.3.mlp.down_proj.weight", ("down", "mlp")),
        ("model.layers.1.mlp.gate.weight", ("router", "router")),
        ("model.layers.1.mlp.experts.down_proj", ("down", "expert")),
        ("gpt_neox.layers.0.attention.dense.weight", ("o", "attention")),
        ("model.layers.0.input_layernorm.weight", None),
    ],
)
def test_classify(name, expected):
    assert classify(name) == expected


def test_unravel_ravel_roundtrip_for_expert_tensors():
    lm = load("tiny-mixtral")
    spec = next(s for s in lm.inventory if s.kind == "expert")
    flat = torch.randperm(spec.numel)[:50]
    e, r, c = spec.unravel(flat)
    assert torch.equal(spec.ravel(e, r, c), flat)
    p = lm.model.get_parameter(spec.name)
    assert torch.equal(p.reshape(-1)[flat], p[e, r, c])


def test_bad_references_give_clear_errors():
    with pytest.raises(EsaError, match="unknown model 'no-such-model'.*smollm2-135m.*tiny-llama"):
        load("no-such-model")
    with pytest.raises(EsaError, match="does not exist"):
        load("/nonexistent/model.gguf")
    with pytest.raises(EsaError, match="unknown dtype 'float8'.*bfloat16"):
        parse_dtype("float8")


def test_hub_id_offline_error_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EsaError, match="meta-llama/Llama-3.1-8B.*network.*smollm2-135m"):
        load("meta-llama/Llama-3.1-8B")


def test_inventory_without_weights_is_the_loaded_inventory_and_none_for_an_unknown_hub_id(monkeypatch):
    for name in ("tiny-llama", "tiny-mixtral"):
        inv = inventory_without_weights(name)
        assert inv is not None
        assert [(s.name, s.shape) for s in inv] == [(s.name, s.shape) for s in load(name, device="cpu").inventory]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert inventory_without_weights("esa-tests/no-such-model") is None  # neither cached nor published: no config


def test_bf16_load():
    lm = load("tiny-llama", dtype="bf16")
    assert lm.info.dtype == "bfloat16"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_models_load_from_cache(name):
    lm = load(name)
    assert lm.info.source == "embedded"
    assert lm.info.n_params > 100e6
    assert lm.info.family in ("llama", "gemma3", "gemma3_text", "qwen2")
    assert lm.info.instruct == EMBEDDED[name].instruct


@pytest.mark.slow
def test_one_parse_per_gguf_reads_the_same_fields_and_tensors():
    """The dequantisation speed-up shares one reader per file and slices plain arrays: every metadata field
    and every tensor must come out exactly as gguf's own reader gives them (SmolLM2's real 49k vocabulary)."""
    import gguf
    import numpy as np

    from esa.models import embedded, loader

    path = embedded.gguf_path("smollm2-135m")
    plain = gguf.GGUFReader(path)
    with loader._one_parse_per_gguf():
        fast = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is fast  # config, weights and tokenizer share one parse
    assert gguf.GGUFReader is type(plain)  # restored
    assert list(fast.fields) == list(plain.fields)
    for name, f in plain.fields.items():
        g = fast.fields[name]
        assert (g.offset, g.types, g.data) == (f.offset, f.types, f.data), name
        assert len(g.parts) == len(f.parts) and all(
            a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(g.parts, f.parts, strict=True)), name
    assert [t.name for t in fast.tensors] == [t.name for t in plain.tensors]
    for a, b in zip(fast.tensors, plain.tensors, strict=True):
        assert (a.tensor_type, a.data_offset, list(a.shape)) == (b.tensor_type, b.data_offset, list(b.shape))
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


@pytest.mark.slow
def test_thread_count_does_not_change_losses_or_gradients():
    """run_all --jobs N gives each notebook its share of the cores (esa.runner.executors); that must change
    the wall time only: SmolLM2's loss and every weight gradient are bit-identical at 1 and 2 threads (with
    MKL's strict reproducibility mode, which `import esa` sets: without it they differ on some CPUs)."""
    import os

    assert os.environ.get("MKL_CBWR") == "AUTO,STRICT"
    lm = load("smollm2-135m")
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    params = list(lm.model.parameters())
    for p in params:
        p.requires_grad_(True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            loss = lm.model(ids, labels=ids).loss
            results.append((loss.detach(), torch.autograd.grad(loss, params)))
    finally:
        torch.set_num_threads(before)
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
