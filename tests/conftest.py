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
