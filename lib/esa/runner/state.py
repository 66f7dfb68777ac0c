"""Up-to-date checks, per-notebook stamps, the run lock and clean-up after a kill.

A notebook is up to date when its stamp `<run_dir>/state/<id>.json` says `ok` under the same key and
its executed copy exists. The key hashes everything its result depends on: the notebook source, the
injected parameters, the resolved profile, the params/models files of its models, the code of
lib/esa (minus the runner and HTML code, which cannot change a result) and the keys of the notebooks
it depends on. Stamps are written last and atomically, so a kill at any point leaves either a
complete result with its stamp or no stamp (and the notebook runs again).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import esa
from esa.store import content_key, folder_lock, read_json, write_json

# Files of lib/esa that do not influence notebook results (changing them must not rerun everything).
_NOT_RESULT_CODE = ("runner/", "report/html.py")


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_hash(package_dir: Path | None = None) -> str:
    """Hash of every .py file under lib/esa that can change a notebook's result.

    $ESA_CODE_HASH, if set, replaces it: tests pin it so concurrent edits of lib/esa do not make their
    notebooks stale; a user may pin it across a refactor known not to change results (at their own risk).
    """
    if os.environ.get("ESA_CODE_HASH"):
        return os.environ["ESA_CODE_HASH"]
    root = package_dir or Path(esa.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in rel or rel.startswith(_NOT_RESULT_CODE):
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def notebook_key(
    source_hash: str,
    parameters: dict[str, Any],
    profile: dict[str, Any],
    model_files: dict[str, str | None],
    code: str,
    dep_keys: list[str],
    kernel: str,
) -> str:
    return content_key(
        {
            "source": source_hash,
            "parameters": parameters,
            "profile": profile,
            "model_files": model_files,
            "code": code,
            "deps": dep_keys,
            "kernel": kernel,
        }
    )


def stamp_path(run_dir: Path, notebook: str) -> Path:
    return run_dir / "state" / f"{notebook}.json"


def read_stamp(run_dir: Path, notebook: str) -> dict[str, Any] | None:
    """The notebook's last stamp, or None (absent or unreadable: a stamp is only trusted if it parses)."""
    path = stamp_path(run_dir, notebook)
    try:
        stamp = read_json(path)
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def write_stamp(run_dir: Path, notebook: str, stamp: dict[str, Any]) -> Path:
    return write_json(stamp_path(run_dir, notebook), stamp)


def all_stamps(run_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((run_dir / "state").glob("*.json")):
        stamp = read_stamp(run_dir, path.stem)
        if stamp is not None:
            out[path.stem] = stamp
    return out


def is_up_to_date(run_dir: Path, notebook: str, key: str, executed: Path) -> bool:
    stamp = read_stamp(run_dir, notebook)
    return bool(stamp) and stamp.get("status") == "ok" and stamp.get("key") == key and executed.is_file()


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder; a second runner on the same folder fails naming the holder.

    The lock (esa.store.folder_lock, an flock) is released by the kernel when the holder dies, so a
    killed run never leaves a stale lock.
    """
    with folder_lock(run_dir, what="run folder", hint="pick another --run-id"):
        yield


def remove_partial_files(run_dir: Path) -> list[Path]:
    """Delete temporary files a killed run left behind (`.<name>.<random>.tmp` from atomic_path).

    Only called while holding the run lock, so no live writer of this run folder can own them.
    """
    removed = []
    for path in run_dir.rglob(".*.tmp"):
        if path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
