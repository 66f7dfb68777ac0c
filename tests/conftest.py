"""Shared test set-up: quiet progress bars, offline hub, and private caches for the tests that ask for one.

A test that writes to the cache takes one of the cache fixtures below (usually for a whole file:
`pytestmark = pytest.mark.usefixtures("private_cache")`), so that it neither reads entries left by other
runs nor leaves its own in $ESA_CACHE_DIR (default ~/.cache/critical-weights):
- `private_cache`: an empty cache of the test's own, `<tmp_path>/cache`;
- `private_cache_shared_text`: the same, but its `corpora` and `tokens` folders are the real cache's (a link),
  so corpora are downloaded and tokenised once for every test while models, scores and masks stay private;
- `module_cache`: one empty cache for all the tests of a module (the corpus is tokenised once per module).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ESA_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _params_dir_as_it_was():
    """An in-process `run_all` points $ESA_PARAMS_DIR at its project's params (the kernels read it): put it
    back after every test, so a later test's project is not read with an earlier one's schedule."""
    before = os.environ.get("ESA_PARAMS_DIR")
    yield
    if before is None:
        os.environ.pop("ESA_PARAMS_DIR", None)
    else:
        os.environ["ESA_PARAMS_DIR"] = before


@pytest.fixture(scope="session")
def tiny_names() -> list[str]:
    from esa.models import TINY_CONFIGS

    return sorted(TINY_CONFIGS)


def _use_cache(monkeypatch: pytest.MonkeyPatch, root: Path, shared: tuple[str, ...] = ()) -> Path:
    """Point $ESA_CACHE_DIR at `root` for one test (progress bars off), its `shared` folders linked to the
    real cache's."""
    from esa.store import cache_dir

    real = {name: cache_dir(name) for name in shared}  # read before the switch: the real cache's folders
    if shared:
        root.mkdir(parents=True, exist_ok=True)
    for name, path in real.items():
        (root / name).symlink_to(path, target_is_directory=True)
    monkeypatch.setenv("ESA_CACHE_DIR", str(root))
    monkeypatch.setenv("ESA_PROGRESS", "0")
    return root


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache of this test's own (`<tmp_path>/cache`, made on first use); returns its root."""
    return _use_cache(monkeypatch, tmp_path / "cache")


@pytest.fixture
def private_cache_shared_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`private_cache` whose `corpora` and `tokens` are the real cache's: the corpus is tokenised once for all
    tests, while the models, scores and masks a test makes stay its own. Returns the root."""
    return _use_cache(monkeypatch, tmp_path / "cache", ("corpora", "tokens"))


@pytest.fixture(scope="module")
def _module_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def module_cache(_module_cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One empty cache shared by the tests of a module (each test is pointed at it); returns its root."""
    return _use_cache(monkeypatch, _module_cache_root)


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
