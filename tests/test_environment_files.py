"""The install's files agree with their one source (pyproject.toml's ranges, the Makefile's lists):
environment.yml is generated in sync, both lock files pin every dependency inside its range, pin torch at
the Makefile's version and leave torch's CUDA runtime out; the library itself pins no torch."""

from __future__ import annotations

import re

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from esa.runner.environment import ENV_YML, LOCK, OLDEST, drop_cuda_runtime, makefile_vars, render_yml
from esa.store import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
MAKE = makefile_vars((REPO_ROOT / "Makefile").read_text())


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / name).read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            pkg, _, version = line.partition("==")
            pins[canonicalize_name(pkg)] = version.split(";")[0].strip()
    return pins


def _requirements() -> list[Requirement]:
    extras = MAKE["EXTRAS"].split(",")
    opt = PYPROJECT["project"]["optional-dependencies"]
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"] + [r for e in extras for r in opt[e]]]


def test_environment_yml_is_generated_in_sync():
    assert (REPO_ROOT / ENV_YML).read_text() == render_yml((REPO_ROOT / LOCK).read_text(), MAKE), \
        "environment.yml is stale: python -m esa.runner.environment yml"


@pytest.mark.parametrize("lock, torch", [(LOCK, "TORCH"), (OLDEST, "TORCH_OLDEST")])
def test_locks_pin_every_requirement_inside_its_range(lock, torch):
    pins = _pins(lock)
    assert pins["torch"] == MAKE[torch]  # the build make installs first
    assert not [p for p in pins if re.match(r"(nvidia-|cuda-|triton$)", p)]
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock} does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} outside {req}"


def test_oldest_lock_holds_the_floors_of_the_core_stack():
    pins = _pins(OLDEST)
    floors = {canonicalize_name(r.name): next((s.version for s in r.specifier if s.operator == ">="), None)
              for r in _requirements()}
    for name in ("transformers", "accelerate"):
        assert Version(pins[name]) == Version(floors[name]), f"{OLDEST} tests {name} {pins[name]}, not its floor {floors[name]}"


def test_the_library_pins_no_torch():
    (torch,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch")]
    assert not any(s.operator == "==" for s in torch.specifier) and torch.specifier.contains("2.6.0")
    assert torch.specifier.contains(MAKE["TORCH"]) and not torch.specifier.contains("3.0")


def test_drop_cuda_runtime_removes_pins_and_their_via_lines():
    lock = "numpy==2.0\n    # via torch\nnvidia-cublas==13.1\n    # via\n    #   torch\ntriton==3.7\n    # via torch\ntorch==2.13.0\n"
    assert drop_cuda_runtime(lock) == "numpy==2.0\n    # via torch\ntorch==2.13.0\n"
