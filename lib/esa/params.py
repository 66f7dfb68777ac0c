"""Profiles, per-model files and the schedule under params/, as typed objects.

A profile holds every knob of a run; a notebook receives `profile` (a name) and optional `overrides`
from papermill and asks this module for the merged result, so the CLI, run_all and JupyterLab all
see the same settings.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from esa.errors import EsaError, unknown
from esa.store import REPO_ROOT


def params_dir() -> Path:
    return Path(os.environ.get("ESA_PARAMS_DIR", REPO_ROOT / "params"))


@dataclass
class Profile:
    name: str
    description: str = ""
    corpus: str = "shakespeare"
    dtype: str = "float32"
    seqlen: int = 256  # tokens per window, evaluation and calibration alike
    eval_windows: int | None = 8  # None: every window of the eval split
    max_samples: int = 4  # calibration windows per seed
    seeds: list[int] = field(default_factory=lambda: [1337])
    topk: int = 100
    mode: str = "per_layer"
    metrics: list[str] = field(default_factory=lambda: ["grad_x_weight"])
    hutchinson_probes: int = 2
    batch_size: int = 4
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    phase1_models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    # Phase 4 scaling/architecture: a suite of sizes (micro-suite `name@budget` and/or real models)
    phase4_models: list[str] = field(default_factory=list)
    perturbations: list[str] = field(default_factory=lambda: ["sign_flip"])
    perturb_scale: float = 1.0
    perturb_prob: float = 0.5
    bit_flip_bits: list[str] = field(default_factory=lambda: ["exponent"])  # bit_flip variants (ops.BIT_CHOICES)
    dose_scales: list[float] = field(default_factory=lambda: [0.01, 0.1])
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    perturb_eval_windows: int | None = None  # Phase 3 sweeps: evaluation windows per condition (None: eval_windows)
    highres_topk: int = 500  # Phase 2 week 3: the high-resolution top-k
    highres_seeds: list[int] = field(default_factory=lambda: [1337, 123, 999, 2024, 7])  # week 3 seeds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in (params_dir() / "profiles").glob("*.yaml"))


def load_profile(name: str, overrides: dict[str, Any] | None = None) -> Profile:
    """The named profile with `overrides` applied on top (unknown keys are an error, not ignored)."""
    path = params_dir() / "profiles" / f"{name}.yaml"
    if not path.is_file():
        raise unknown("profile", name, available_profiles())
    data = yaml.safe_load(path.read_text()) or {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(Profile)}
    extra = sorted(set(data) - known)
    if extra:
        raise EsaError(f"unknown profile setting(s) {extra} in {path.name} or overrides; accepted: {sorted(known)}")
    return Profile(**data)


@dataclass
class ModelParams:
    name: str
    ref: str
    display: str = ""
    family: str = ""
    instruct: bool = False
    device_map: str | None = None
    published: dict[str, Any] = field(default_factory=dict)


def available_models() -> list[str]:
    return sorted(p.stem for p in (params_dir() / "models").glob("*.yaml"))


def model_params(name: str) -> ModelParams:
    """The params/models/<name>.yaml entry; a name without a file is taken as a raw model reference."""
    path = params_dir() / "models" / f"{name}.yaml"
    if not path.is_file():
        return ModelParams(name=name, ref=name, display=name)
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", name)
    data.setdefault("display", name)
    return ModelParams(**data)


def load_schedule() -> list[dict[str, Any]]:
    path = params_dir() / "schedule.yaml"
    return list((yaml.safe_load(path.read_text()) or {}).get("notebooks", []))
