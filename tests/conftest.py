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
