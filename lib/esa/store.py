"""Run folders, cache keys and atomic writes.

Nothing half-written is ever read back: every file is written under a temporary name in the same
folder and renamed into place, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import esa

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir(*parts: str) -> Path:
    """Root of the content-addressed cache ($ESA_CACHE_DIR, default ~/.cache/critical-weights)."""
    root = Path(os.environ.get("ESA_CACHE_DIR", Path.home() / ".cache" / "critical-weights"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    commit = git_commit()
    return f"{esa.__version__}+{commit[:12]}" if commit else esa.__version__


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def content_key(spec: dict[str, Any], n: int = 16) -> str:
    """Stable short hash of a JSON-able spec (sorted keys), used to name cached artifacts."""
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(path: str | os.PathLike[str], df: Any) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and paths appear in summaries; make them plain JSON.
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def source_hash(*modules: str, n: int = 12) -> str:
    """Hash of the source files of `modules` (dotted names): the code identity of a cached artifact.

    Unlike the git commit, it changes exactly when the code that produced an artifact changes, so
    unrelated commits keep the cache and uncommitted edits to that code invalidate it.
    """
    import importlib.util

    h = hashlib.sha256()
    for mod in sorted(modules):
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.origin:
            raise ValueError(f"no source for module {mod!r}")
        h.update(mod.encode())
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:n]
