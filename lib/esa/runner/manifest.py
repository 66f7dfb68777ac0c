"""The run manifest: what produced the results (commit, versions, machine, parameters) and how it went.

Versions are read from package metadata (importlib.metadata), so writing a manifest imports nothing
heavy (no torch).
"""

from __future__ import annotations

import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any

from esa.store import REPO_ROOT, git_commit

PACKAGES = (
    "critical-weights",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "gguf",
    "datasets",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "pingouin",
    "matplotlib",
    "seaborn",
    "papermill",
    "jupytext",
    "nbconvert",
    "ipykernel",
    "submitit",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_dirty() -> bool | None:
    try:
        res = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(res.stdout.strip()) if res.returncode == 0 else None


def gpus() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.startswith("GPU ")]


# Nothing in esa changes torch's TF32 switches, so its kernels run with torch's defaults: on an Ampere or newer
# GPU an fp32 profile's matmuls run in full fp32 (several times slower than bf16, and not TF32's 10-bit mantissa)
TF32 = ("off for matmuls (torch.backends.cuda.matmul.allow_tf32 = False, torch's default; esa never turns it on): "
        "fp32 profiles compute in full fp32 on the GPU; cuDNN's TF32 (convolutions, unused here) keeps torch's default")


def environment() -> dict[str, Any]:
    return {
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "gpus": (found := gpus()),
        "tf32": TF32 if found else None,  # stated wherever a GPU ran the notebooks
        "packages": package_versions(),
    }
