"""Run folders, cache keys, atomic writes, folder locks and cache entries that carry their own checksums.

Nothing half-written is ever read back: every file is written under a temporary name in the same
folder and renamed into place, which is atomic on POSIX file systems. Nothing corrupt is trusted: a
cache entry (a folder or one file) records the size and xxh3-128 digest of its files when written
(`seal`); every read compares sizes, headers and digests (`check`), so a truncated file or a flipped byte
is caught before it is used, and a bad entry is named in one line, quarantined and rebuilt (`cached`,
`usable`). `verify_cache` checks every entry of the cache at once (`make verify-cache`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from filelock import FileLock, Timeout

import esa
from esa.errors import EsaError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """Root of the content-addressed cache ($ESA_CACHE_DIR, default ~/.cache/critical-weights)."""
    return Path(os.environ.get("ESA_CACHE_DIR", Path.home() / ".cache" / "critical-weights"))


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root (created if needed)."""
    path = cache_root().joinpath(*parts)
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


def write_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why nothing can be created in `folder` (or, when it does not exist yet, in the nearest existing folder
    above it, where it would be made), or None. It tries: a file is created and removed, so a read-only
    mount, missing permissions and a file in the way are all caught before any work."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".esa-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return f"{probe} is not writable ({err.strerror or err})"
    return None


def check_cache_writable() -> None:
    """Refuse (EsaError, before any work) a cache root, or a folder of it, that cannot be written: every run
    writes or repairs entries there (scores, masks, tokens, quarantine)."""
    root = cache_root()
    folders = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    for folder in folders:
        problem = write_problem(folder)
        if problem:
            raise EsaError(f"the cache {root} cannot be written: {problem}; point ESA_CACHE_DIR at a writable folder")


PARTIAL = ".partial-"  # a staging folder's name ends in PARTIAL + the PID of the process writing it


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], into: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; its content becomes `path` only if the block succeeds.

    By default the staging folder `.<name>.partial-<pid>` lies beside `path` and replaces it whole. With
    `into`, `path` is a folder that stays (it may hold a lock and earlier outputs): the staging folder is
    `<path>/.partial-<pid>`, and each item it holds is moved into `path` by name, replacing an item of
    that name. Either way a failed block leaves `path` as it was, and a staging folder whose process is
    gone (killed mid-write) is removed by the next writer before it starts.
    """
    path = Path(path)
    if into:
        path.mkdir(parents=True, exist_ok=True)
        where, prefix = path, PARTIAL
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        where, prefix = path.parent, f".{path.name}{PARTIAL}"
    _remove_dead(where, [f"{prefix}*"])
    tmp = where / f"{prefix}{os.getpid()}"
    _remove(tmp)  # this process's own leftover
    tmp.mkdir()
    try:
        yield tmp
        if into:
            for item in tmp.iterdir():
                os.replace(item, path / item.name)
        else:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def storable(df: Any) -> Any:
    """`df` with each object column that mixes value types (a "measured" column of numbers and words)
    written as text, which parquet can store; every other column is left exactly as it is."""
    mixed = [c for c in df.columns if df[c].dtype == object
             and len({type(v) for v in df[c] if v is not None}) > 1]
    return df.astype({c: str for c in mixed}) if mixed else df


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


# ---------------------------------------------------------------- folder locks


class FolderInUse(EsaError):
    """Another live process holds the lock on a folder (a run folder, an out dir); the message names it."""

    def __init__(self, folder: Path, holder: dict[str, Any], what: str = "folder", hint: str = "") -> None:
        self.folder, self.holder = folder, holder
        pid = holder.get("pid")
        who = f"PID {pid}" if pid else "another process (its PID is not recorded yet)"
        extra = ", ".join(str(holder[k]) for k in ("command", "since", "host") if holder.get(k))
        advice = "wait for it to finish" + (f", stop it (kill {pid})" if pid else "")
        advice += f", or {hint}" if hint else ""
        extra = f" ({extra})" if extra else ""
        super().__init__(f"{what} {folder} is in use by {who}{extra}; {advice}")


LOCK_NAME = ".lock"
_HOLDER_NAME = ".lock.holder.json"  # who holds the lock; written by the holder after it has the lock


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike[str], what: str = "folder", hint: str = "", command: str = ""
) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` for the block; a second holder gets FolderInUse naming the first.

    The lock is an flock (the `filelock` library) on `<folder>/.lock`: the kernel releases it when the
    holder dies, even by SIGKILL, so a killed run never leaves a stale lock. The holder's PID, command and
    start time go to `<folder>/.lock.holder.json`, which only the holder writes. `what` and `hint` word
    the error ("run folder", "pick another --run-id").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            holder = dict(read_json(folder / _HOLDER_NAME))
        raise FolderInUse(folder, holder, what, hint) from None
    try:
        write_json(
            folder / _HOLDER_NAME,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            },
        )
        yield folder
    finally:
        lock.release()


# ---------------------------------------------------------------- cache entries with size + hash

MANIFEST_NAME = "esa-manifest.json"  # in a folder entry; beside a file entry as `<name>.esa-manifest.json`
VERIFY_ENV = "ESA_VERIFY_CACHE"  # no longer read: every check compares digests (kept so old settings are harmless)
DIGEST = "xxh3_128"  # the manifest key of a file's digest; manifests of version 1 hold "sha256" instead
_BLOCK = 1 << 23  # 8 MiB reads: large enough that hashing, not the read loop, sets the speed


class CacheCorrupt(EsaError):
    """A cache entry failed its integrity check; `path` names it, `reason` says what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"cache entry {path} is not usable: {reason}")


def manifest_path(entry: str | os.PathLike[str]) -> Path:
    entry = Path(entry)
    return entry / MANIFEST_NAME if entry.is_dir() else entry.with_name(entry.name + "." + MANIFEST_NAME)


def _entry_files(entry: Path) -> list[Path]:
    if entry.is_file():
        return [entry]
    return sorted(p for p in entry.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _hash_file(path: Path, h: Any) -> str:
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """xxh3-128 of a file (hex): what a manifest records and every read compares (tens of GB/s in memory)."""
    return _hash_file(Path(path), xxhash.xxh3_128())


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (hex): the digest of version-1 manifests, still read for entries written then."""
    return _hash_file(Path(path), hashlib.sha256())


def seal(entry: str | os.PathLike[str]) -> Path:
    """Record size and digest of every file of a cache entry (a folder, or one file) in its manifest.

    Call it once the entry is completely written (a folder: before renaming it into place).
    """
    entry = Path(entry)
    if not entry.exists():
        raise FileNotFoundError(entry)
    base = entry if entry.is_dir() else entry.parent
    files = {
        p.relative_to(base).as_posix(): {"size": p.stat().st_size, DIGEST: file_digest(p)}
        for p in _entry_files(entry)
    }
    return write_json(manifest_path(entry), {"version": 2, "files": files})


def check(entry: str | os.PathLike[str], adopt: bool | str = False) -> None:
    """Raise CacheCorrupt unless every file of the entry has the size, header and digest its manifest records.

    Runs on every read: the digest catches same-size damage (a flipped byte), sizes and headers name a
    truncation precisely. A version-1 manifest (SHA-256) is checked by SHA-256, and xxh3-128 is added to it. `adopt`: an entry written before manifests existed, which the caller knows was complete
    (True, or the name of the marker file the old writer put in a finished folder, e.g. "complete"), is
    accepted if every file passes the header check, and is sealed on the spot (there is nothing to compare
    its bytes with; from then on they are checked).
    """
    entry = Path(entry)
    if not entry.exists():
        raise CacheCorrupt(entry, "it does not exist")
    mpath = manifest_path(entry)
    if not mpath.is_file():
        if not (adopt is True or isinstance(adopt, str) and entry.is_dir() and (entry / adopt).is_file()):
            raise CacheCorrupt(entry, f"no manifest {mpath.name} (interrupted while being written?)")
        for path in _entry_files(entry):
            problem = structure_problem(path)
            if problem:
                raise CacheCorrupt(entry, f"{path.name}: {problem}")
        seal(entry)
        log.info("sealed cache entry %s (written before manifests existed)", entry)
        return
    try:
        files = read_json(mpath)["files"]
        if not isinstance(files, dict) or not all(isinstance(w, dict) and "size" in w for w in files.values()):
            raise TypeError("no size per file")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CacheCorrupt(entry, f"unreadable manifest {mpath.name}: {err}") from None
    base = entry if entry.is_dir() else entry.parent
    legacy = False
    for rel, want in files.items():
        path = base / rel
        if not path.is_file():
            raise CacheCorrupt(entry, f"{rel} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise CacheCorrupt(entry, f"{rel} has {size} bytes, its manifest says {want['size']}")
        problem = structure_problem(path)
        if problem:
            raise CacheCorrupt(entry, f"{rel}: {problem}")
        if DIGEST in want:
            if file_digest(path) != want[DIGEST]:
                raise CacheCorrupt(entry, f"{rel}: contents differ from its manifest ({DIGEST} digest)")
        elif "sha256" in want:
            legacy = True
            if file_sha256(path) != want["sha256"]:
                raise CacheCorrupt(entry, f"{rel}: contents differ from its manifest (SHA-256 digest)")
        else:
            raise CacheCorrupt(entry, f"unreadable manifest {mpath.name}: no digest for {rel}")
    if legacy:  # checked in full just now: add the fast digest, keep SHA-256 for older code sharing the cache
        upgraded = {rel: {**want, DIGEST: file_digest(base / rel)} for rel, want in files.items()}
        with contextlib.suppress(OSError):  # a read-only cache keeps the version-1 manifest
            write_json(mpath, {"version": 2, "files": upgraded})


def usable(entry: str | os.PathLike[str], adopt: bool | str = False) -> bool:
    """True if the entry exists and passes `check`; a corrupt entry is quarantined (and False returned)."""
    entry = Path(entry)
    if not entry.exists():
        return False
    try:
        check(entry, adopt)
    except CacheCorrupt as err:
        quarantine(entry, err.reason)
        return False
    return True


def quarantine(entry: str | os.PathLike[str], reason: str) -> Path | None:
    """Move a bad entry (and a file entry's manifest) out of the way, into `<cache>/quarantine/`.

    Returns where it went (None if another process moved it first). It is kept, not deleted, so the
    damage can be inspected; deleting `<cache>/quarantine` is always safe.
    """
    entry = Path(entry)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        rel = entry.resolve().relative_to(cache_root().resolve())
        dest = cache_root() / "quarantine" / rel.parent / f"{rel.name}.{stamp}-{os.getpid()}"
    except ValueError:  # not under the cache root: keep it beside the entry
        dest = entry.with_name(f"{entry.name}.corrupt-{stamp}-{os.getpid()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    base, n = dest, 1
    while dest.exists() or dest.is_symlink():  # the same entry damaged twice within a second
        dest, n = base.with_name(f"{base.name}-{n}"), n + 1
    sidecar = entry.with_name(entry.name + "." + MANIFEST_NAME)
    try:
        os.replace(entry, dest)
    except FileNotFoundError:
        if sidecar.is_file():  # a file entry deleted by hand: its manifest alone must not linger
            with contextlib.suppress(OSError):
                os.replace(sidecar, dest.with_name(dest.name + "." + MANIFEST_NAME))
        return None
    if sidecar.is_file():
        with contextlib.suppress(OSError):
            os.replace(sidecar, dest.with_name(dest.name + "." + MANIFEST_NAME))
    log.warning("cache entry %s is corrupt (%s): moved to %s; it will be recomputed", entry, reason, dest)
    return dest


def cached(
    entry: str | os.PathLike[str],
    build: Callable[[Path], object],
    folder: bool = True,
    adopt: bool | str = False,
    refresh: bool = False,
) -> Path:
    """Path of a checked cache entry, built with `build(tmp)` first if it is absent, corrupt or `refresh`.

    `build` writes the entry's content into `tmp` (an empty folder, or a file path when `folder=False`);
    the result is sealed and renamed into place, so a crash leaves nothing that is read back. A corrupt
    entry is named in a warning, quarantined and rebuilt; `refresh` rebuilds and replaces it regardless
    (what --no-cache means). `adopt`: see `check`.
    """
    entry = Path(entry)
    if entry.exists() and not refresh and usable(entry, adopt):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(entry, folder)
    tmp = _partial(entry, folder, str(os.getpid()))
    _remove(tmp)
    if folder:
        tmp.mkdir()
    try:
        build(tmp)
        if not tmp.exists():
            raise FileNotFoundError(f"building cache entry {entry} wrote nothing to {tmp}")
        if folder:
            seal(tmp)
            if entry.exists() and not refresh and usable(entry):
                return entry  # another process finished the same entry first; its content is identical
            _replace_folder(tmp, entry)
        else:
            _remove(manifest_path(entry))  # the old entry's manifest must never describe the new file
            os.replace(tmp, entry)
            seal(entry)
    finally:
        _remove(tmp)
    return entry


def _replace_folder(tmp: Path, entry: Path) -> None:
    """Rename the finished `tmp` onto `entry`; an old entry is renamed aside first (a folder cannot be
    renamed onto a non-empty one), so readers never see a half-deleted entry."""
    old = entry.with_name(f".{entry.name}.old-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(entry, old)
    try:
        os.replace(tmp, entry)
    except OSError:
        if not usable(entry):  # another process renamed its (identical) entry in between: keep it
            raise
    finally:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _partial(entry: Path, folder: bool, pid: str) -> Path:
    """Temporary name of an entry being built; a file keeps its suffix (np.save and friends add theirs)."""
    if folder:
        return entry.with_name(f".{entry.name}.partial-{pid}")
    return entry.with_name(f".{entry.stem}.partial-{pid}{entry.suffix}")


def _remove_dead_partials(entry: Path, folder: bool) -> None:
    """Delete the partial (and renamed-aside old) entries of builders that were killed (their PID is gone)."""
    _remove_dead(entry.parent, [_partial(entry, folder, "*").name, f".{entry.name}.old-*"])


def _remove_dead(where: Path, patterns: list[str]) -> None:
    """Delete what matches `patterns` in `where` and ends in `.partial-<pid>` / `.old-<pid>` (or holds it
    before a suffix) of a process that is gone."""
    for stale in [p for pattern in patterns for p in where.glob(pattern)]:
        found = re.search(r"\.(?:partial|old)-(\d+)", stale.name)
        if found and int(found.group(1)) != os.getpid() and not pid_alive(int(found.group(1))):
            _remove(stale)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one of another user counts: signalling it is refused)."""
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # alive, owned by someone else; ESRCH (and any other error): gone
    return True


def sealed_entries(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every entry under the cache root that has a manifest (quarantined and half-written ones left out)."""
    root = Path(root) if root is not None else cache_root()
    if not root.is_dir():
        return []
    out = []
    for mpath in sorted(root.rglob(f"*{MANIFEST_NAME}")):
        if "quarantine" in mpath.relative_to(root).parts or mpath.name.startswith("."):
            continue
        entry = mpath.parent if mpath.name == MANIFEST_NAME else mpath.with_name(mpath.name[: -len("." + MANIFEST_NAME)])
        if any(part.startswith(".") and ".partial-" in part for part in entry.parts):
            continue  # being written right now
        out.append(entry)
    return out


def verify_cache(
    root: str | os.PathLike[str] | None = None,
    quarantine_bad: bool = True,
    on_entry: Callable[[Path, str | None], None] | None = None,
) -> list[tuple[Path, str]]:
    """Check every sealed entry under the cache root; returns (entry, reason) of each bad one.

    Bad entries are quarantined (unless `quarantine_bad=False`), so the next run recomputes them.
    `on_entry(entry, reason or None)` is called after each entry is checked (for a report).
    """
    bad: list[tuple[Path, str]] = []
    for entry in sealed_entries(root):
        reason = None
        try:
            check(entry)
        except CacheCorrupt as err:
            reason = err.reason
            bad.append((entry, reason))
            if quarantine_bad:
                quarantine(entry, reason)
        if on_entry is not None:
            on_entry(entry, reason)
    return bad


# ---------------------------------------------------------------- file structure (cheap header checks)


def _safetensors_problem(path: Path, size: int) -> str | None:
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header"
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            return f"header claims {n} bytes but the file has {size}"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    return None if expected == size else f"{size} bytes, its header says {expected} (truncated or padded)"


def _parquet_problem(path: Path, size: int) -> str | None:
    if size < 12:
        return f"{size} bytes, too short for parquet"
    with path.open("rb") as fh:
        start = fh.read(4)
        fh.seek(size - 8)
        tail = fh.read(8)
    if start != b"PAR1" or tail[4:] != b"PAR1":
        return "no parquet magic at both ends (truncated?)"
    footer = struct.unpack("<I", tail[:4])[0]
    return None if footer <= size - 12 else f"footer claims {footer} bytes but the file has {size}"


def _npy_problem(path: Path, size: int) -> str | None:
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            fmt = np.lib.format
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = reader(fh)
            offset = fh.tell()
    except (ValueError, OSError) as err:
        return f"not a readable .npy header ({err})"
    if dtype.hasobject:
        return None
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return None if expected == size else f"{size} bytes, its header says {expected}"


def _json_problem(path: Path, size: int) -> str | None:
    try:
        json.loads(path.read_bytes())
    except ValueError as err:
        return f"not valid JSON ({err})"
    return None


_STRUCTURE: dict[str, Callable[[Path, int], str | None]] = {
    ".safetensors": _safetensors_problem,
    ".parquet": _parquet_problem,
    ".npy": _npy_problem,
    ".json": _json_problem,
}


def structure_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a file's header/size consistency (safetensors, parquet, npy, JSON), or None."""
    path = Path(path)
    checker = _STRUCTURE.get(path.suffix)
    if checker is None:
        return None
    try:
        return checker(path, path.stat().st_size)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, SyntaxError, struct.error) as err:
        return f"unreadable header ({type(err).__name__}: {err})"  # damage inside a header is data, not a bug
