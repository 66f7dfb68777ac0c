"""Shared test set-up: quiet progress bars, a private cache per session unless one is given."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("ESA_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_names() -> list[str]:
    from esa.models import TINY_CONFIGS

    return sorted(TINY_CONFIGS)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a shared 2-core machine spin-wait for
    each other (a 16 x 32 forward of tiny-llama: 3 ms on one thread, up to 2 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted_tiny_qwen2():
    """tiny-qwen2 with one planted critical weight: a random model barely reacts to any weight, so a larger
    LM head makes its output sensitive, and one huge layer-0 up_proj weight [9, 4] then dominates it.
    Returns (loaded model, the weight's WeightSpec)."""
    import torch

    from esa.models import load

    lm = load("tiny-qwen2", device="cpu")
    spec = next(s for s in lm.inventory if s.layer == 0 and s.component == "up")
    w = lm.model.get_parameter(spec.name)
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(5.0)
        w[9, 4] = 200.0 * w.abs().max()
    return lm, spec
