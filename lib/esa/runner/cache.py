"""`python -m esa.runner.cache`: what the score cache holds, removing entries, and what a profile will add.

    python -m esa.runner.cache du [--by model|metric|seed|format]
    python -m esa.runner.cache prune [--older-than DAYS] [--model NAME] [--stale] [--dry-run]
    python -m esa.runner.cache plan --profile NAME [--model M ...]
    python -m esa.runner.cache verify [--keep]

`du`: entries and bytes of `<cache>/scores` by model, metric, seed and entry format (format 1 = stale,
written by older code and never read by this one; an entry whose meta.json cannot be read is stale too),
plus one line with the size of every other top-level cache folder (models, gguf, tokens, masks, ...).
`prune`: deletes the score entries matching every filter given (at least one); an entry is first renamed
to `.<name>.pruned-<pid>`, so a reader never sees it half-deleted, then removed. `--stale` also takes the
leftovers of killed writers (`.partial-<pid>`, `.pruned-<pid>` folders whose process is gone).
`plan`: the score-cache bytes a profile's Phase 2 scoring adds per model (metrics x seeds, the seeds
being `seeds` and `highres_seeds`), candidates only and with full bf16 maps (`keep_scores`), from the
same estimate the disk guard uses (`esa.sensitivity.engine.entry_bytes`). Inventories come from the
model's config, built on the meta device (no weights, no download; `esa.models.inventory_without_weights`
knows the same references): a tiny or micro model's own config, an embedded model's dequantised folder or
GGUF header, a hub model's config in the local Hugging Face cache, else its published dimensions
(`esa.models.loader.PUBLISHED`).
`verify` (`make verify-cache`): every sealed entry of every kind (scores, masks, models, micro, corpora,
tokens, gguf) checked for sizes, headers and digests, one line per kind (entries, bytes, GB/s) and one line
per damaged entry, which is moved to `<cache>/quarantine/` (kept in place with `--keep`) so it is recomputed;
entries without a manifest are counted as unsealed (sealed or replaced at their next read). Exit 1 if any
entry was damaged.

Every bad argument is one line naming the value and what is accepted, exit status 2, before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from esa import store
from esa.errors import EsaError
from esa.store import cache_root, pid_alive, read_json

SCORES = "scores"  # the score cache's folder under the cache root (esa.sensitivity.engine)
BY = ("model", "metric", "seed", "format")
_LEFTOVER = re.compile(r"\.(?:partial|old|pruned)-(\d+)$")

# ---------------------------------------------------------------- sizes and entries


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (or of the file itself); symlinks are not followed."""
    if not path.is_dir() or path.is_symlink():
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return 0
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, f)).st_size
    return total


@dataclass
class Entry:
    """One child of the score cache folder."""

    path: Path
    format: str  # "2" (this code's), "1" (older code), "unreadable", "leftover" (a writer's temporary)
    model: str | None
    metric: str | None
    seed: int | None
    bytes: int
    mtime: float  # of meta.json (the entry's completion), else of the folder
    writer_alive: bool = False  # a leftover whose process still runs: never removed

    @property
    def stale(self) -> bool:
        """Never read by this code: an older format, unreadable, or a dead writer's leftover."""
        from esa.sensitivity.engine import FORMAT

        return self.format != str(FORMAT) and not self.writer_alive

    @property
    def label(self) -> str:
        from esa.sensitivity.engine import FORMAT

        if self.format == str(FORMAT):
            return self.format
        if self.format == "leftover":
            return "leftover (writing)" if self.writer_alive else "leftover (stale)"
        return f"{self.format} (stale)"


def _entry(path: Path) -> Entry:
    size = tree_bytes(path)
    meta_path = path / "meta.json"
    try:
        mtime = (meta_path if meta_path.is_file() else path).lstat().st_mtime
    except OSError:
        mtime = time.time()
    found = _LEFTOVER.search(path.name)
    if path.name.startswith(".") or found:
        alive = bool(found) and pid_alive(int(found.group(1)))  # type: ignore[union-attr]
        return Entry(path, "leftover", None, None, None, size, mtime, writer_alive=alive)
    try:
        meta = read_json(meta_path)
        settings = meta.get("settings") or {}
        fmt = meta.get("format", 1)
        seed = meta.get("seed", settings.get("seed"))
        return Entry(path, str(fmt), settings.get("model"), meta.get("metric", settings.get("metric")),
                     int(seed) if seed is not None else None, size, mtime)
    except (OSError, ValueError, TypeError, AttributeError):
        return Entry(path, "unreadable", None, None, None, size, mtime)


def scan(root: Path | None = None) -> list[Entry]:
    """Every child of `<root>/scores` (root: the cache root), sorted by name; nothing is created."""
    folder = (root or cache_root()) / SCORES
    if not folder.is_dir():
        return []
    return [_entry(p) for p in sorted(folder.iterdir())]


def entries_frame(entries: list[Entry]) -> pd.DataFrame:
    rows = [{"model": e.model or "?", "metric": e.metric or "?", "seed": e.seed, "format": e.label, "entries": 1,
             "bytes": e.bytes} for e in entries]
    df = pd.DataFrame(rows, columns=[*BY, "entries", "bytes"])
    df["seed"] = df["seed"].astype("Int64")  # numeric order; an unreadable entry's is missing
    return df


def du_table(entries: list[Entry], by: list[str] | None = None) -> pd.DataFrame:
    """Entries and bytes per group (`by`: some of model, metric, seed, format; default all), with a total row."""
    by = list(by or BY)
    df = entries_frame(entries)
    table = df.groupby(by, sort=True, as_index=False, dropna=False)[["entries", "bytes"]].sum()
    if "seed" in by:
        table["seed"] = [("?" if pd.isna(s) else str(s)) for s in table["seed"]]
    total = {c: "" for c in by}
    total[by[0]] = "total"
    total.update(entries=int(df["entries"].sum()), bytes=int(df["bytes"].sum()))
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table["entries"] = table["entries"].astype(int)
    table["bytes"] = table["bytes"].astype("int64")
    table["size"] = table["bytes"].map(human)
    return table


def other_folders(root: Path | None = None) -> dict[str, int]:
    """Bytes of every top-level cache folder (and loose file) other than the score cache."""
    root = root or cache_root()
    if not root.is_dir():
        return {}
    return {p.name: tree_bytes(p) for p in sorted(root.iterdir()) if p.name != SCORES}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---------------------------------------------------------------- prune


def select(entries: list[Entry], older_than: float | None = None, model: str | None = None,
           stale: bool = False, now: float | None = None) -> list[Entry]:
    """The entries matching every filter given; a live writer's temporary folder never matches."""
    if older_than is None and model is None and not stale:
        raise EsaError("prune needs at least one filter: --older-than DAYS, --model NAME or --stale")
    now = time.time() if now is None else now
    out = []
    for e in entries:
        if e.writer_alive:
            continue
        if older_than is not None and now - e.mtime <= older_than * 86400:
            continue
        if model is not None and e.model != model:
            continue
        if stale and not e.stale:
            continue
        out.append(e)
    return out


def remove(entry: Entry) -> bool:
    """Rename the entry aside (a reader sees it whole or not at all), then delete it; False if already gone."""
    aside = entry.path.with_name(f".{entry.path.name}.pruned-{os.getpid()}")
    try:
        os.replace(entry.path, aside)
    except FileNotFoundError:
        return False
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
    return True


def prune(entries: list[Entry], dry_run: bool = False, out: Callable[[str], None] = print) -> int:
    """Remove `entries` (or, with `dry_run`, only say so); returns the bytes freed (or that would be)."""
    freed = 0
    verb = "would remove" if dry_run else "removed"
    for e in entries:
        if dry_run or remove(e):
            freed += e.bytes
            what = f"{e.model or '?'} {e.metric or '?'} seed {'?' if e.seed is None else e.seed}, format {e.label}"
            out(f"{verb} {e.path.name} ({what}, {human(e.bytes)})")
    out(f"{'would free' if dry_run else 'freed'} {freed} bytes ({human(freed)}) in {len(entries)} entries")
    return freed


# ---------------------------------------------------------------- plan


def shape_source(name: str) -> tuple[str, Callable[[], Any]]:
    """(where the shape comes from, a function building the model's transformers config) for a params/models
    name or raw reference (esa.models.loader.shape_source); an EsaError naming the accepted models when there
    is no offline shape."""
    from esa.models.loader import shape_source as model_shape_source
    from esa.params import model_params

    ref = model_params(name).ref
    found = model_shape_source(ref)
    if found is None:
        raise EsaError(f"model {name!r}: no shape for {ref!r} offline (not in the local Hugging Face cache, no "
                       f"published shape here); accepted: {', '.join(plan_models())}")
    return found


def plan_models() -> list[str]:
    """Names whose shape is known offline: params/models, embedded, tiny and micro-suite models."""
    from esa.models import known_models
    from esa.params import available_models

    return sorted(set(available_models()) | set(known_models()))


def meta_inventory(config: Any) -> list[Any]:
    """The weight inventory of a model built from `config` on the meta device (esa.models.loader.meta_inventory)."""
    from esa.models.loader import meta_inventory as build

    return build(config)


def plan(profile: str, models: list[str] | None = None, overrides: dict[str, Any] | None = None) -> pd.DataFrame:
    """Per model: the score-cache entries and bytes of `profile`'s Phase 2 scoring, candidates only
    (`bytes`) and with full maps (`bytes_keep_scores`); `models` default to the profile's."""
    from esa.params import load_profile
    from esa.sensitivity.engine import entry_bytes
    from esa.sensitivity.metrics import METRICS, MetricConfig

    P = load_profile(profile, overrides)
    names = list(dict.fromkeys(models or P.models))
    sources = {n: shape_source(n) for n in names}  # every model checked before any is built
    seeds = sorted(set(P.seeds) | set(P.highres_seeds))
    derived = {m: len(METRICS[m].derived_for(MetricConfig())) for m in P.metrics}
    rows = []
    for name in names:
        where, config = sources[name]
        inv = meta_inventory(config())
        n_weights = sum(s.numel for s in inv)
        row: dict[str, Any] = {"model": name, "shape_from": where, "matrices": sum(max(1, s.n_experts) for s in inv),
                               "studied_weights": n_weights, "metrics": len(P.metrics), "seeds": len(seeds),
                               "entries": len(P.metrics) * len(seeds), "depth": P.candidate_depth}
        for col, keep in (("bytes", False), ("bytes_keep_scores", True)):
            row[col] = len(seeds) * sum(entry_bytes(inv, P.candidate_depth, keep, derived[m]) for m in P.metrics)
        row["bytes_per_weight"] = row["bytes"] / max(1, n_weights * row["entries"])
        rows.append(row)
    return pd.DataFrame(rows)


def free_bytes(root: Path | None = None) -> int:
    """Free bytes of the file system holding the cache root (or its nearest existing parent)."""
    path = (root or cache_root()).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse with one error line (no usage block), exit status 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; accepted: a number of days >= 0 (e.g. 30, 0.5)")
    return value


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m esa.runner.cache", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser,
                            metavar="{du,prune,plan,verify}")
    du = sub.add_parser("du", help="score-cache size by model, metric, seed and format; other cache folders")
    du.add_argument("--by", choices=BY, help="one grouping column (default: all four)")
    pr = sub.add_parser("prune", help="delete score entries matching every filter given")
    pr.add_argument("--older-than", type=_days, metavar="DAYS", help="entries completed more than DAYS ago")
    pr.add_argument("--model", metavar="NAME", help="entries of this model (as du lists it)")
    pr.add_argument("--stale", action="store_true", help="format-1, unreadable and dead writers' leftovers")
    pr.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    pl = sub.add_parser("plan", help="projected score-cache bytes of a profile's Phase 2 scoring")
    pl.add_argument("--profile", required=True, metavar="NAME")
    pl.add_argument("--model", action="append", metavar="M", help="a model (repeatable; default: the profile's)")
    ve = sub.add_parser("verify", help="check every cache entry's sizes, headers and digests; quarantine bad ones")
    ve.add_argument("--keep", action="store_true", help="only report damaged entries, leave them in place")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    prog = "python -m esa.runner.cache"
    try:
        if args.command == "du":
            return _du(args)
        if args.command == "prune":
            return _prune(args, prog)
        if args.command == "verify":
            return _verify(args)
        return _plan(args, prog)
    except EsaError as err:
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2


def _du(args: argparse.Namespace) -> int:
    root = cache_root()
    entries = scan(root)
    print(f"score cache {root / SCORES}: {len(entries)} entries, "
          f"{sum(e.stale for e in entries)} stale (format 1 or unreadable: written by older code, never read)")
    if entries:
        print(du_table(entries, [args.by] if args.by else None).to_string(index=False))
    others = other_folders(root)
    listed = ", ".join(f"{k} {human(v)}" for k, v in others.items()) or "none"
    print(f"other cache folders: {listed} (total {sum(others.values())} bytes, {human(sum(others.values()))})")
    return 0


def verify(root: Path | None = None, keep: bool = False, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Check every sealed entry under `root` (esa.store.verify_cache); per kind (the top-level folder): entries,
    bytes, seconds and damaged ones; unsealed entries (no manifest) counted apart. Returns the report."""
    root = root or cache_root()
    kinds: dict[str, dict[str, Any]] = {}
    last = [time.perf_counter()]

    def on_entry(entry: Path, reason: str | None) -> None:
        now = time.perf_counter()
        kind = entry.relative_to(root).parts[0]
        k = kinds.setdefault(kind, {"entries": 0, "bytes": 0, "seconds": 0.0, "bad": [], "unsealed": 0})
        k["entries"] += 1
        k["seconds"] += now - last[0]
        k["bytes"] += _sealed_bytes(entry)
        if reason is not None:
            k["bad"].append(str(entry))
            out(f"damaged: {entry}: {reason} ({'left in place' if keep else 'moved to the quarantine'})")
        last[0] = time.perf_counter()

    store.verify_cache(root, quarantine_bad=not keep, on_entry=on_entry)
    for kind, n in _unsealed(root).items():
        kinds.setdefault(kind, {"entries": 0, "bytes": 0, "seconds": 0.0, "bad": [], "unsealed": 0})["unsealed"] = n
    for kind, k in sorted(kinds.items()):
        rate = k["bytes"] / k["seconds"] / 1e9 if k["seconds"] > 0 else float("nan")
        out(f"{kind}: {k['entries']} entries, {human(k['bytes'])}, {len(k['bad'])} damaged, {k['unsealed']} unsealed; "
            f"checked in {k['seconds']:.2f} s ({rate:.2f} GB/s)")
    n_bad = sum(len(k["bad"]) for k in kinds.values())
    out(f"verified {sum(k['entries'] for k in kinds.values())} entries under {root}: {n_bad} damaged")
    return kinds


def _sealed_bytes(entry: Path) -> int:
    """Bytes of an entry's files as its manifest records them (the entry may have been moved aside)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        files = read_json(store.manifest_path(entry))["files"]
        return sum(int(f["size"]) for f in files.values())
    return 0


def _unsealed(root: Path) -> dict[str, int]:
    """Per kind, the entries without a manifest (a writer's temporaries and the quarantine left out)."""
    counts: dict[str, int] = {}
    for kind in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("quarantine", "offload")):
        for item in kind.iterdir():
            if item.name.startswith(".") or item.name.endswith(store.MANIFEST_NAME) or _LEFTOVER.search(item.name):
                continue
            if not store.manifest_path(item).is_file():
                counts[kind.name] = counts.get(kind.name, 0) + 1
    return counts


def _verify(args: argparse.Namespace) -> int:
    kinds = verify(keep=args.keep)
    return 1 if any(k["bad"] for k in kinds.values()) else 0


def _prune(args: argparse.Namespace, prog: str) -> int:
    if args.older_than is None and args.model is None and not args.stale:
        print(f"{prog} prune: error: give at least one filter: --older-than DAYS, --model NAME or --stale "
              "(all given filters must match)", file=sys.stderr)
        return 2
    entries = scan()
    if args.model is not None:
        models = sorted({e.model for e in entries if e.model})
        if args.model not in models:
            print(f"{prog} prune: error: --model {args.model!r}: no score cache entry is of that model; models in "
                  f"the cache: {', '.join(models) or 'none'}", file=sys.stderr)
            return 2
    chosen = select(entries, args.older_than, args.model, args.stale)
    prune(chosen, args.dry_run)
    return 0


def _plan(args: argparse.Namespace, prog: str) -> int:
    from esa.params import available_profiles

    if args.profile not in available_profiles():
        print(f"{prog} plan: error: unknown profile {args.profile!r}; accepted: {', '.join(available_profiles())}",
              file=sys.stderr)
        return 2
    table = plan(args.profile, args.model)
    show = table.copy()
    total = {c: "" for c in show.columns}
    total.update(model="total", entries=int(show["entries"].sum()), studied_weights=int(show["studied_weights"].sum()),
                 bytes=int(show["bytes"].sum()), bytes_keep_scores=int(show["bytes_keep_scores"].sum()))
    show = pd.concat([show, pd.DataFrame([total])], ignore_index=True)
    show["size"] = show["bytes"].map(human)
    show["size_keep_scores"] = show["bytes_keep_scores"].map(human)
    show["bytes_per_weight"] = [f"{v:.4f}" if v != "" else "" for v in show["bytes_per_weight"]]
    print(f"profile {args.profile}: Phase 2 score cache, {int(table['metrics'].iloc[0])} metrics x "
          f"{int(table['seeds'].iloc[0])} seeds (seeds | highres_seeds) per model, depth {int(table['depth'].iloc[0])}")
    print(show.drop(columns=["metrics", "seeds", "depth"]).to_string(index=False))
    free = free_bytes()
    print(f"free space at {cache_root()}: {free} bytes ({human(free)}); candidates only need "
          f"{human(int(table['bytes'].sum()))}, with keep_scores {human(int(table['bytes_keep_scores'].sum()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
