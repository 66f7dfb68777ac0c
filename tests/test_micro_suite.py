"""The micro-suite trains, caches, reloads by name, and leaves nothing half-written behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from esa.errors import EsaError
from esa.models import micro
from esa.models.loader import known_models, load
from esa.phases import phase4

TEST_BUDGET = micro.Budget("unit", tokens_per_param=0.0, seqlen=64, batch_size=4, lr=3e-3, min_steps=25,
                           max_steps=25)


@pytest.fixture
def micro_cache(private_cache_shared_text):
    """A fresh cache for trained models (tests/conftest.py), and the test budget `unit`; returns the root."""
    with micro.BUDGETS.patched(TEST_BUDGET):
        yield private_cache_shared_text


def test_sizes_are_geometric_and_moe_matches_active():
    counts = {}
    for name, spec in micro.MICRO_SUITE.items():
        model = AutoModelForCausalLM.from_config(micro.build_config(spec))
        counts[name] = (sum(p.numel() for p in model.parameters()), micro.active_params(model))
    dense = sorted(v[0] for k, v in counts.items() if k.startswith("micro-llama"))
    assert len(dense) >= 4
    ratios = [b / a for a, b in zip(dense, dense[1:], strict=False)]
    assert all(1.8 < r < 3.5 for r in ratios), ratios
    total, active = counts["micro-mixtral-176k"]
    assert active < total
    assert abs(active - counts["micro-llama-176k"][0]) / counts["micro-llama-176k"][0] < 0.02
    # a plan's step count, from the config on the meta device, is what training runs: tokens over active params
    b = micro.BUDGETS["standard"]
    for name, (_, n_active) in counts.items():
        want = round(b.tokens_per_param * n_active / (b.batch_size * b.seqlen))
        assert micro.planned_steps(name, "standard") == max(b.min_steps, min(b.max_steps, want))


def test_tiny_budget_trains_loss_decreases_and_cache_is_reused(micro_cache, monkeypatch):
    assert not micro.seems_trained("micro-llama-33k", "unit")  # what a plan sees before the training
    lm = load("micro-llama-33k@unit")
    assert lm.info.source == "micro" and lm.info.family == "llama"
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    rec = micro.train_log("micro-llama-33k@unit")
    losses = rec["losses"]
    assert rec["steps"] == 25 and len(losses) == 25
    assert micro.seems_trained("micro-llama-33k", "unit") and not micro.seems_trained("micro-llama-74k", "unit")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # clearly learning
    w = lm.model.model.layers[0].mlp.down_proj.weight.clone()

    def boom(*a, **k):
        raise AssertionError("retrained although a cached copy exists")

    monkeypatch.setattr(micro, "train", boom)
    again = load("micro-llama-33k@unit")
    assert torch.equal(again.model.model.layers[0].mlp.down_proj.weight, w)


def test_crash_mid_training_leaves_nothing(micro_cache, monkeypatch):
    def crash(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(micro, "train", crash)
    with pytest.raises(RuntimeError):
        load("micro-llama-74k@unit")
    assert not micro.is_trained("micro-llama-74k", "unit")
    assert list(Path(micro_cache, "micro").iterdir()) == []


def test_moe_loads_by_name(micro_cache):
    with micro.BUDGETS.patched(micro.Budget("unit", 0.0, 32, 2, min_steps=3, max_steps=3)):
        lm = load("micro-mixtral-176k@unit")
    assert lm.info.moe and lm.info.n_experts == 4 and lm.info.n_params_active < lm.info.n_params
    assert any(s.kind == "expert" for s in lm.inventory) and any(s.kind == "router" for s in lm.inventory)
    out = lm.model(input_ids=torch.randint(3, 259, (1, 16))).logits
    assert torch.isfinite(out).all()


def test_names_and_bad_refs(monkeypatch):
    assert set(micro.MICRO_SUITE) <= set(known_models())
    assert micro.parse_ref("micro-llama-33k@smoke") == ("micro-llama-33k", "smoke")
    monkeypatch.setenv("ESA_MICRO_BUDGET", "smoke")
    assert micro.parse_ref("micro-llama-33k") == ("micro-llama-33k", "smoke")
    with pytest.raises(EsaError, match="budget"):
        micro.parse_ref("micro-llama-33k@forever")
    assert not micro.is_micro("micro-llama-1b")
    # different budgets are different cached models
    assert micro.model_dir("micro-llama-33k", "smoke") != micro.model_dir("micro-llama-33k", "standard")


def test_unigram_baseline_is_a_sane_byte_perplexity():
    ppl = phase4.micro_unigram_ppl(seqlen=256)
    assert 10 < ppl < 60  # English bytes: ~4.3-4.8 bits of unigram entropy
