"""The judged record: a run of one profile, written chunk by chunk into reports/record/ and committed.

    python run_all.py --profile powered --only phase1_week0_baselines --record

A chunk is one notebook (or a few, `--only a,b`). It runs in a scratch copy of the record
(reports/record-staging/, holding the chunks it depends on), and only a chunk that finished ok is moved
into reports/record/: its executed notebook, both HTML pages, its data (parquet, CSV, LaTeX), figures
(inside the record: figures/<notebook>/), scorecard rows, stamp, log and a manifest
(chunks/<notebook>.json: commit, code hash, profile, models, machine, wall time). A crash or a failed
notebook leaves reports/record/ as it was. Then index.html and report.pdf are rebuilt from the chunks
present, and the index names the schedule's notebooks still missing.

Refused in one line, before any work: a chunk whose dependency has no chunk in the record yet (it says
which to run first); a record of another profile or other overrides, unless `--overwrite`, which clears
the record first; and a committed part the chunk would read that is damaged or was made with other settings.

A notebook with parts (esa.phases.parts: one per model, or one per seed of a model) can have one unit
recorded on its own:

    python run_all.py --profile powered --only phase3_week7_cross_model --record --part qwen2.5-coder-0.5b
    python run_all.py --profile powered --only phase5_week13_finetune --record --part smollm2-135m@seed1337

computes that unit's loop body in this process and moves it, whole, into
reports/record/parts/<notebook>/<unit>/ (its tables and part.json: commit, code hash, profile, the settings
that determine it, machine, wall time, file digests). The notebook's chunk then reads every matching committed
part and computes only the other units; its manifest (`parts`) and page say which unit came from which part.
Both print the notebook's parts with their predicted minutes first (as --dry-run does).

Code may change between chunks (a record grows over several sessions): each chunk's (and part's) manifest
names the commit and code hash it ran at, `make verify-record` re-runs a chunk at the code checked out, and
the index says how many code versions the record spans. Nothing here reads a cache left by an earlier session
as input: a chunk recomputes what it needs (deterministically: seeds, strict MKL) or reads the committed
chunks and parts it depends on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from esa import agree
from esa.errors import EsaError
from esa.figures import FIGURES_INSIDE
from esa.params import load_profile, yaml_load
from esa.phases import costs, parts
from esa.runner import docs, schedule
from esa.runner.driver import RunConfig, RunResult, build_index, make_plan, predicted_plan, run
from esa.runner.layout import outputs
from esa.runner.manifest import environment
from esa.runner.state import code_hash, read_stamp
from esa.store import file_digest, folder_lock, read_json, write_json, write_problem

RECORD = "record"
STAGING = "record-staging"  # a plain run id (names stay inside reports/)
LOCK = "record-lock"  # reports/record-lock/: one chunk or part at a time (they share the staging folder)
IDENTITY = "record.json"  # the record's identity: profile and overrides (code is per chunk)
CHUNKS = "chunks"  # chunks/<notebook>.json: one manifest per published chunk
MAX_BYTES = 60 * 2**20  # the committed record stays under 60 MB


def record_dir(root: Path) -> Path:
    return Path(root) / "reports" / RECORD


def chunk_done(rec: Path, notebook: str) -> bool:
    """A chunk is in the record when its manifest and an ok stamp are there."""
    stamp = read_stamp(rec, notebook)
    return (rec / CHUNKS / f"{notebook}.json").is_file() and bool(stamp) and stamp.get("status") == "ok"


def identity(cfg: RunConfig) -> dict[str, Any]:
    return {"profile": cfg.profile, "overrides": dict(cfg.overrides)}


def _same_record(cfg: RunConfig, overwrite: bool) -> bool:
    """Whether the record (if any) is of `cfg`'s profile and overrides; refused in one line when it is not and
    `overwrite` was not given."""
    rec = record_dir(cfg.root)
    mine = identity(cfg)
    theirs = read_json(rec / IDENTITY) if (rec / IDENTITY).is_file() else None
    if theirs is not None and theirs != mine and not overwrite:
        diff = sorted(k for k in mine if theirs.get(k) != mine[k])
        raise EsaError(f"reports/record holds chunks of profile {theirs.get('profile')!r} (differs in "
                       f"{', '.join(diff)}); add --overwrite to clear it and start a new record")
    return theirs is None or theirs == mine


def check(cfg: RunConfig, chosen: list[str], overwrite: bool) -> None:
    """The refusals of the module docstring, before any work."""
    rec = record_dir(cfg.root)
    if not _same_record(cfg, overwrite):
        return  # --overwrite: every dependency is rerun from an empty record, so none can be missing below
    entries = {e.id: e for e in schedule.entries()}
    for nb in chosen:
        for dep in entries[nb].depends_on:
            if dep not in chosen and not chunk_done(rec, dep):
                raise EsaError(f"chunk {nb} needs chunk {dep} in the record first: python run_all.py --profile "
                               f"{cfg.profile} --only {dep} --record")


def run_chunk(cfg: RunConfig, overwrite: bool = False) -> RunResult:
    """Run the chosen notebooks as one chunk and publish those that finished ok (module docstring)."""
    root = Path(cfg.root).resolve()
    rec = record_dir(root)
    plan = make_plan(replace(cfg, run_id=STAGING, with_deps=False))  # every bad input before any work
    chosen = [i.entry.id for i in plan.items]
    check(cfg, chosen, overwrite)
    if overwrite and rec.exists() and (not (rec / IDENTITY).is_file() or read_json(rec / IDENTITY) != identity(cfg)):
        shutil.rmtree(rec)
    if rec.is_dir():
        check_intact(rec)  # what survives (--overwrite of the same profile keeps it) is read by this chunk
        P = load_profile(cfg.profile, cfg.overrides)
        for item in plan.items:  # the committed parts this chunk will read: whole and made with its settings
            parts.check_committed(rec, item.entry.id, P, _part_units(item, P))
    _print_parts(cfg, plan.items, rec)
    with _one_at_a_time(root):
        return _run_chunk(cfg, chosen, root, rec)


def _one_at_a_time(root: Path) -> Any:
    """The record's lock: a second chunk or part would wipe the first's staging folder and publish into the same
    record, so it is refused in one line naming the holder (an flock: a killed holder leaves no stale lock)."""
    return folder_lock(root / "reports" / LOCK, what="the record (one chunk or part at a time)",
                       command="run_all.py --record")


def _run_chunk(cfg: RunConfig, chosen: list[str], root: Path, rec: Path) -> RunResult:
    stage = root / "reports" / STAGING
    shutil.rmtree(stage, ignore_errors=True)
    if rec.is_dir():
        shutil.copytree(rec, stage, ignore=shutil.ignore_patterns("index.html", "report.pdf", IDENTITY))
    stage.mkdir(parents=True, exist_ok=True)
    (stage / FIGURES_INSIDE).touch()
    started = time.time()
    code = {**environment(), "code_hash": code_hash()}  # what the chunk runs at (read before it runs)
    try:
        result = run(replace(cfg, run_id=STAGING, with_deps=False, force=True))
        ok = [nb for nb in chosen if result.results.get(nb, {}).get("status") == "ok"]
        for nb in ok:
            publish(stage, rec, nb, cfg, result.results[nb], started, code)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if ok:
        write_json(rec / IDENTITY, identity(cfg))
        (rec / FIGURES_INSIDE).touch()
        _refresh(cfg, root)
    return result


def _refresh(cfg: RunConfig, root: Path) -> None:
    """Rebuild the record's index and README's block: both count the code versions, which a part adds to."""
    rebuild(cfg)
    if (root / "README.md").is_file() and README_BEGIN in (root / "README.md").read_text():
        update_readme(root)


def _part_units(item: Any, P: Any) -> list[str]:
    """The units a plan item's notebook computes one by one (none without parts)."""
    s = parts.spec(item.entry.id)
    return s.units(P, item.task.parameters["models"]) if s is not None else []


def _print_parts(cfg: RunConfig, items: list[Any], rec: Path) -> None:
    """The chosen notebooks' parts with their predicted minutes and state (the dry run's lines), so the user
    sees before the work what each part and the chunk are predicted to take."""
    profile = load_profile(cfg.profile, cfg.overrides)
    measured = costs.load()
    for item in items:
        if parts.spec(item.entry.id) is None:
            continue
        p = predicted_plan(item, profile, measured)
        lines = parts.plan_lines(p, item.entry.id, profile, item.task.parameters["models"], rec) if p else []
        if lines:
            print("\n".join([f"run_all.py: {item.entry.id}:", *(f"  {ln}" for ln in lines)]), flush=True)


def run_part(cfg: RunConfig, unit: str) -> Path:
    """Compute `unit`'s part of the one notebook of `cfg.only` and move it, whole, into the record (module
    docstring); returns its folder. Every bad input is refused in one line before any work."""
    root = Path(cfg.root).resolve()
    rec = record_dir(root)
    plan = make_plan(replace(cfg, run_id=STAGING, with_deps=False))
    if len(plan.items) != 1:
        raise EsaError("--part needs --only with exactly one notebook (the one the part belongs to), got "
                       f"{', '.join(i.entry.id for i in plan.items)}")
    item = plan.items[0]
    nb = item.entry.id
    P = load_profile(cfg.profile, cfg.overrides)
    spec = parts.check_unit(nb, P, item.task.parameters["models"], unit)
    _same_record(cfg, overwrite=False)
    settings = spec.settings(P, unit)  # a bad setting is refused here, before the model loads
    target = parts.folder(rec, nb, unit)
    unwritable = write_problem(target.parent)
    if unwritable:  # found now, not after the hours of computing
        raise EsaError(f"{target.parent} cannot be written: {unwritable}")
    _print_parts(cfg, plan.items, rec)
    with _one_at_a_time(root):
        return _run_part(cfg, nb, unit, spec, P, settings, rec, target, root)


def _run_part(cfg: RunConfig, nb: str, unit: str, spec: Any, P: Any, settings: dict[str, Any], rec: Path,
              target: Path, root: Path) -> Path:
    print(f"run_all.py: recording part {unit} of {nb} into {target.relative_to(root)}", flush=True)
    code = {**environment(), "code_hash": code_hash()}
    started, t0 = time.time(), time.perf_counter()
    result = spec.compute(P, unit)
    manifest = {"notebook": nb, "unit": unit, "commit": code.get("git_commit"), "git_dirty": code.get("git_dirty"),
                "code_hash": code["code_hash"], "profile": cfg.profile, "overrides": dict(cfg.overrides),
                "settings": settings, "machine": costs.machine(), "seconds": round(time.perf_counter() - t0, 1),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "packages": code.get("packages")}
    parts.write(target, result, manifest, spec.transient)
    if not (rec / IDENTITY).is_file():
        write_json(rec / IDENTITY, identity(cfg))  # a record may start with a part
    if _chunks(rec):
        _refresh(cfg, root)
    return target


def _parts(run_dir: Path, nb: str) -> list[Path]:
    out = outputs(run_dir, nb)
    return [out.executed, out.html, out.html_nocode, out.log, out.data, run_dir / "scorecard" / f"{nb}.json",
            run_dir / "state" / f"{nb}.json", run_dir / "figures" / nb]


def publish(stage: Path, rec: Path, nb: str, cfg: RunConfig, result: dict[str, Any], started: float,
            code: dict[str, Any]) -> None:
    """Move one finished notebook's outputs from the staging run into the record, then its manifest last
    (a chunk counts as present only once its manifest is there)."""
    rec.mkdir(parents=True, exist_ok=True)
    (rec / CHUNKS / f"{nb}.json").unlink(missing_ok=True)
    for src, dst in zip(_parts(stage, nb), _parts(rec, nb), strict=True):
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)
    _relative_figures(rec, nb, stage)
    stamp = read_stamp(rec, nb) or {}
    write_json(rec / CHUNKS / f"{nb}.json", {
        "notebook": nb, "commit": code.get("git_commit"), "git_dirty": code.get("git_dirty"),
        "code_hash": code["code_hash"], "profile": cfg.profile, "overrides": dict(cfg.overrides),
        "models": (stamp.get("parameters") or {}).get("models"), "machine": costs.machine(),
        "seconds": result.get("seconds"), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "packages": code.get("packages"),
        "parts": _origins(rec, nb),  # which unit came from which committed part (and commit)
        "files": _digests(rec, nb),  # xxh3-128 of every file of the chunk: a damaged record is caught, never used
    })


def _origins(rec: Path, nb: str) -> dict[str, Any] | None:
    """Where each unit of a chunk with parts came from (the notebook's data/<nb>/parts.json)."""
    path = rec / "data" / nb / f"{parts.PARTS}.json"
    return read_json(path) if path.is_file() else None


def _files(rec: Path, nb: str) -> list[Path]:
    out = []
    for part in _parts(rec, nb):
        out += sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part] * part.is_file()
    return out


def _digests(rec: Path, nb: str) -> dict[str, str]:
    return {p.relative_to(rec).as_posix(): file_digest(p) for p in _files(rec, nb)}


def damaged(rec: Path, nb: str) -> list[str]:
    """The files of a published chunk that are missing or differ from the digests its manifest recorded."""
    recorded = read_json(rec / CHUNKS / f"{nb}.json").get("files")
    if recorded is None:
        return []  # a chunk published before digests were recorded: nothing to compare with
    now = _digests(rec, nb)
    return sorted(f for f in set(recorded) | set(now) if recorded.get(f) != now.get(f))


def check_intact(rec: Path) -> None:
    """Every published chunk whole, before a chunk reads the record."""
    for nb in _chunks(rec):
        bad = damaged(rec, nb)
        if bad:
            raise EsaError(f"reports/record: chunk {nb} is damaged ({', '.join(bad[:3])}"
                           f"{', ...' if len(bad) > 3 else ''} differ from its manifest's digests); restore it with "
                           f"`git checkout -- reports/record` or re-run it with --record")


def _relative_figures(rec: Path, nb: str, stage: Path) -> None:
    """Figure paths in the chunk's artefact registry, relative to the record (a clone elsewhere reads them)."""
    path = rec / "data" / nb / "artefacts.json"
    if not path.is_file():
        return
    raw = read_json(path)
    for f in raw.get("figures", []):
        for key in ("png", "pdf"):
            p = Path(f[key])
            with_stage = p.is_absolute() and p.is_relative_to(stage)
            f[key] = p.relative_to(stage).as_posix() if with_stage else f[key]
    write_json(path, raw)


def _entries(root: Path) -> list[schedule.Entry]:
    """The schedule of the project at `root` (its params/, whatever ESA_PARAMS_DIR says now)."""
    path = Path(root) / "params" / "schedule.yaml"
    if not path.is_file():
        return schedule.entries()
    data = yaml_load(path.read_text(), str(path)) or {}
    return schedule.entries(list(data.get("notebooks", [])))


def missing(root: Path) -> list[str]:
    """The schedule's notebooks that have no chunk in the record yet, in schedule order."""
    rec = record_dir(root)
    return [e.id for e in _entries(root) if not chunk_done(rec, e.id)]


def rebuild(cfg: RunConfig) -> Path:
    """index.html (and a manifest gathering the chunks) from whatever the record holds."""
    root = Path(cfg.root).resolve()
    rec = record_dir(root)
    chunks = _chunks(rec)
    for nb, made in chunks.items():
        if "files" not in made:  # published before chunks were sealed: sealed now, and it says so
            chunks[nb] = {**made, "files": _digests(rec, nb), "sealed": "after publishing"}
            write_json(rec / CHUNKS / f"{nb}.json", chunks[nb])
    write_json(rec / "manifest.json", {
        "run_id": RECORD, "status": "partial" if missing(root) else "ok", "profile": cfg.profile,
        "overrides": dict(cfg.overrides), "code_versions": code_versions(_pieces(rec)),
        "profile_settings": _profile_settings(cfg), "chunks": chunks, "missing": missing(root),
        "parts": committed_parts(rec),
        "wall_seconds": round(sum(c.get("seconds") or 0 for c in chunks.values()), 1),
        "started": min((c.get("started") or "" for c in chunks.values()), default=None),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "executor": "record chunks", "jobs": 1, "kernel": cfg.kernel,
        "environment": _environment(_pieces(rec)),
    })
    index = build_index(replace(cfg, run_id=RECORD))
    try:
        docs.build_pdf(rec)  # report.pdf from the chunks present, as the index
    except EsaError as err:
        print(f"reports/record/report.pdf not rebuilt: {err}")
    return index


def committed_parts(rec: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Every committed part, by notebook and unit: its commit, code hash, digest and wall time."""
    out = {}
    for nb in sorted(p.name for p in (rec / parts.PARTS).glob("*") if p.is_dir()):
        found = parts.committed(rec, nb)
        if found:
            out[nb] = {u: {k: made.get(k) for k in ("commit", "code_hash", "digest", "seconds", "started")}
                       for u, made in found.items()}
    return out


def _pieces(rec: Path) -> dict[str, dict[str, Any]]:
    """Every chunk's manifest and every part's (as "<notebook> part <unit>"): what the record's code versions
    and commits are counted over."""
    found = {f"{nb} part {u}": made for nb in committed_parts(rec) for u, made in parts.committed(rec, nb).items()}
    return {**_chunks(rec), **found}


def _chunks(rec: Path) -> dict[str, dict[str, Any]]:
    """Every published chunk's manifest, by notebook."""
    return {p.stem: read_json(p) for p in sorted((rec / CHUNKS).glob("*.json"))}


def _environment(chunks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The index's environment line for a record: every commit its chunks ran at, the newest chunk's packages."""
    env = environment()
    commits = sorted({str(c.get("commit"))[:12] for c in chunks.values()})
    newest = max(chunks.values(), key=lambda c: c.get("started") or "", default={})
    return {**env, "git_commit": ", ".join(commits) or None, "packages": newest.get("packages") or env["packages"],
            "git_dirty": any(c.get("git_dirty") for c in chunks.values())}


def code_versions(chunks: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Each code hash the record's chunks ran at, with the commits and chunks made at it (one entry: one code
    version; commits that changed only the record or the docs share their code's entry)."""
    out: dict[str, list[str]] = {}
    for nb, c in chunks.items():
        out.setdefault(str(c.get("code_hash")), []).append(f"{nb} (commit {str(c.get('commit'))[:12]})")
    return out


def _profile_settings(cfg: RunConfig) -> dict[str, Any]:
    from esa.params import load_profile

    return json.loads(json.dumps(load_profile(cfg.profile, cfg.overrides).as_dict(), default=str))


# columns and keys that measure time or place, not results (they differ run to run by nature)
_VOLATILE = ("seconds", "_s", "time", "wall", "duration", "elapsed", "timing", "started", "finished", "path",
             "from_cache", "cache_key", "mask_key", "key")


def _volatile(name: Any) -> bool:
    n = str(name).lower()
    return any(v == n or n.endswith(v) or n.startswith(v) for v in _VOLATILE)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if not _volatile(k)}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


# Bit-exact numbers are promised on the CPU that made a piece. Another CPU (other kernels, other summation
# orders) rounds differently, and a rounding can move a weight whose score ties another's across a top-k or
# bottom-k threshold, so a condition's numbers, and counts such as the weights a perturbation changed, may
# differ by more than rounding (week 5 re-run on Intel Xeon against AMD EPYC: a bottom_k noise condition's NLL by
# 0.3%, one count by 1). There the judgement must still be equal (each criterion's verdict, each table's columns
# and rows); every other difference is listed, floats only when further apart than this (esa.agree).
CROSS_CPU_RTOL = 1e-3
MISSING = "missing in the fresh run"


def _loaded(committed: Path, fresh: Path) -> Iterator[tuple[Path, Any, Any]]:
    """Each table and JSON file of a committed chunk's data with its fresh twin (None when missing), as they are
    compared: tables without the columns that measure time or place, JSON without those keys."""
    import pandas as pd

    for f in sorted(p for p in committed.rglob("*") if p.suffix in (".parquet", ".json") and p.is_file()):
        rel = f.relative_to(committed)
        g = fresh / rel
        if f.suffix == ".parquet":
            a = pd.read_parquet(f)
            b = pd.read_parquet(g) if g.is_file() else None
            yield rel, a[[c for c in a.columns if not _volatile(c)]], \
                None if b is None else b[[c for c in b.columns if not _volatile(c)]]
        elif f.name != "artefacts.json":
            yield rel, _clean(read_json(f)), _clean(read_json(g)) if g.is_file() else None


def _differences(pairs: Iterable[tuple[Path, Any, Any]], rtol: float) -> list[str]:
    out = []
    for rel, a, b in pairs:
        if b is None:
            out.append(f"{rel}: {MISSING}")
        elif rel.suffix == ".parquet":
            if hit := agree.frame_difference(a, b, rtol):
                out.append(f"{rel}: {hit}")
        elif hit := agree.difference(a, b, rtol):
            out.append(f"{rel}: JSON differs at {hit}"[:400])
    return out


def compare(committed: Path, fresh: Path, rtol: float = 0.0) -> list[str]:
    """Differences between two runs of one chunk: every table (parquet, column by column) and every JSON file
    (scorecard rows included) of the chunk, leaving out timing, cache keys and paths; floats exactly, or to
    `rtol` (esa.agree) when the runs were on different CPUs."""
    return _differences(_loaded(committed, fresh), rtol)


def _largest(pairs: Iterable[tuple[Path, Any, Any]]) -> tuple[float, str]:
    """The largest float gap between two runs' tables and JSON as compared (esa.agree.largest; 0 when bit-equal),
    and the file it is in."""
    return max([(0.0, ""), *((agree.largest(a, b), rel.name) for rel, a, b in pairs if b is not None)])


def largest_gap(committed: Path, fresh: Path) -> tuple[float, str]:
    """`_largest` of two runs' folders (timing columns and keys left out, as `compare` leaves them out)."""
    return _largest(_loaded(committed, fresh))


def same_cpu(what: str, made: dict[str, Any]) -> bool:
    """Whether this machine's CPU and cores are those that made the piece (its numbers then compare bit-exactly);
    when not, says so and what is compared instead, in one line."""
    here, there = costs.machine(), made.get("machine") or {}
    if (here.get("cpu"), here.get("cores")) == (there.get("cpu"), there.get("cores")):
        return True
    print(f"note: {what} was recorded on {there.get('cores', '?')} cores of {there.get('cpu', 'an unrecorded CPU')}, "
          f"this is {here.get('cores')} cores of {here.get('cpu')}: numbers are bit-exact only on the recording CPU, "
          "so the judgement is compared (every verdict, every table's columns and rows) and each other difference "
          f"is listed (floats beyond {CROSS_CPU_RTOL:g} of their size)")
    return False


def _cross_cpu(committed: Path, fresh: Path) -> list[str]:
    """On another CPU: lists every difference beyond rounding and returns those of shape (a table's columns or
    rows, a missing file), which no rounding explains."""
    pairs = list(_loaded(committed, fresh))  # read once: listed, then measured
    listed = _differences(pairs, CROSS_CPU_RTOL)
    for d in listed:
        print(f"  differs on another CPU: {d}")
    gap, where = _largest(pairs)
    print(f"largest float gap from the committed record: {gap:.1e} of the value" + (f", in {where}" if where else ""))
    return [d for d in listed if agree.SHAPE in d or MISSING in d]


def _verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {r.get("id"): r.get("verdict") for r in rows}


def _other_code(what: str, made: dict[str, Any]) -> None:
    """Bit-exact numbers are promised at a piece's own code: when the code checked out is other, say which code
    made it (and compare anyway)."""
    now = code_hash()
    if made.get("code_hash") != now:
        print(f"note: {what} ran at code {made.get('code_hash')} (commit {made.get('commit')}); this is code {now}: "
              f"`git checkout {str(made.get('commit'))[:12]}` first to verify it exactly")


def verify(cfg: RunConfig, notebook: str) -> tuple[list[str], bool]:
    """Re-run one committed chunk in a scratch copy of the record and compare its data and scorecard rows
    with the committed ones: bit-exact on the CPU that recorded it, its judgement on another (`same_cpu`);
    returns (the differences (empty: verified), whether the comparison was bit-exact)."""
    root = Path(cfg.root).resolve()
    rec = record_dir(root)
    if not chunk_done(rec, notebook):
        raise EsaError(f"reports/record has no chunk {notebook}; committed chunks: "
                       + (", ".join(sorted(p.stem for p in (rec / CHUNKS).glob("*.json"))) or "none"))
    bad = damaged(rec, notebook)
    if bad:
        return [f"{f}: differs from the digest chunk {notebook}'s manifest recorded" for f in bad], True
    meta = read_json(rec / IDENTITY)
    made = read_json(rec / CHUNKS / f"{notebook}.json")
    _other_code(f"chunk {notebook}", made)
    exact = same_cpu(f"chunk {notebook}", made)
    cfg = replace(cfg, profile=meta["profile"], overrides=meta["overrides"], only=[notebook])
    scratch = root / "reports" / "record-verify"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(rec, scratch, ignore=shutil.ignore_patterns("index.html", "report.pdf"))
    try:
        for part in _parts(scratch, notebook):
            shutil.rmtree(part) if part.is_dir() else part.unlink(missing_ok=True)
        result = run(replace(cfg, run_id=scratch.name, with_deps=False, force=True))
        if result.results.get(notebook, {}).get("status") != "ok":
            return [f"{notebook}: the re-run did not finish ok: {result.failures}"], exact
        ours, fresh = rec / "data" / notebook, scratch / "data" / notebook
        diffs = compare(ours, fresh) if exact else _cross_cpu(ours, fresh)
        a, b = rec / "scorecard" / f"{notebook}.json", scratch / "scorecard" / f"{notebook}.json"
        if a.is_file():
            rows = [read_json(a), read_json(b) if b.is_file() else []]
            hit = agree.difference(*map(_clean, rows)) if exact else agree.difference(*map(_verdicts, rows))
            if hit:
                diffs.append(f"scorecard/{notebook}.json: rows differ at {hit}")
        return diffs, exact
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def verify_part(cfg: RunConfig, notebook: str, unit: str) -> tuple[list[str], bool]:
    """Recompute one committed part (`unit` of `notebook`) in a scratch folder and compare its tables and values
    with the committed ones, as `verify` does for a chunk (a chunk's verification re-reads its parts, so this is
    what re-checks a part's own numbers); returns (the differences (empty: verified), whether bit-exact)."""
    root = Path(cfg.root).resolve()
    rec = record_dir(root)
    meta = read_json(rec / IDENTITY) if (rec / IDENTITY).is_file() else {"profile": cfg.profile, "overrides": {}}
    cfg = replace(cfg, profile=meta["profile"], overrides=meta["overrides"], only=[notebook], with_deps=False,
                  run_id="record-verify")
    make_plan(cfg)  # the notebook and profile checked, and the params folder the record was made with in use
    P = load_profile(cfg.profile, cfg.overrides)
    have = parts.committed(rec, notebook)
    if unit not in have:
        raise EsaError(f"reports/record has no part {unit!r} of {notebook}; committed parts of it: "
                       + (", ".join(sorted(have)) or "none"))
    spec = parts.spec(notebook)
    assert spec is not None  # a committed part belongs to a notebook with parts
    path = parts.folder(rec, notebook, unit)
    bad = parts.problem(path, spec.settings(P, unit))
    if bad:
        return [bad], True
    _other_code(f"part {unit} of {notebook}", have[unit])
    exact = same_cpu(f"part {unit} of {notebook}", have[unit])
    scratch = root / "reports" / "record-verify" / parts.folder_name(unit)
    shutil.rmtree(scratch.parent, ignore_errors=True)
    try:
        parts.write(scratch, spec.compute(P, unit), {"notebook": notebook, "unit": unit}, spec.transient)
        diffs = compare(path, scratch) if exact else _cross_cpu(path, scratch)
        return [d for d in diffs if not d.startswith(parts.PART_FILE)], exact
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)


README_BEGIN, README_END = "<!-- record:begin -->", "<!-- record:end -->"


def summary_sentences(root: Path) -> list[str]:
    """Three sentences computed from the committed record's scorecard: what it holds, what it decided, and
    what contradicts the guide's hypotheses (its FAILs), for README's "what this found"."""
    from esa.report.scorecard import read_all, unique

    rec = record_dir(root)
    done = _chunks(rec)
    if not done:
        return ["The record holds no chunk yet: run `make record CHUNK=phase1_week0_baselines` first."]
    rows = unique(read_all(rec))
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("PASS", "FAIL", "underpowered", "not estimable",
                                                                  "machinery-only")}
    meta = read_json(rec / IDENTITY)
    n_all = len(_entries(root))
    versions = code_versions(_pieces(rec))
    code = "one code version" if len(versions) == 1 else f"{len(versions)} code versions"
    first = (f"The record (profile `{meta['profile']}`, {code}) holds {len(done)} of {n_all} "
             f"notebooks and judges {len(rows)} criteria: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + ".")
    return [first, *verdict_sentences(rows)]


def verdict_sentences(rows: list[Mapping[str, Any]]) -> tuple[str, str]:
    """What the scorecard `rows` confirm beyond Phase 1 and what they contradict, per criterion family, each
    family's share over its judged (PASS or FAIL) rows: a "not estimable" row (no such quantity) is neither."""
    judged = [r for r in rows if r["verdict"] in ("PASS", "FAIL")]
    fams, by_id = _families(judged), {r["id"]: r for r in rows}
    later = {_family(r["id"]) for r in judged if r.get("phase", 0) >= 2}
    held = [f"{fam} ({sum(v == 'PASS' for v in got.values())} of {len(got)})" for fam, got in fams.items()
            if fam in later and "PASS" in got.values()]
    second = ("Beyond the Phase 1 baselines it confirms, by criterion (PASS of judged): " + ", ".join(held) + "."
              if held else "No claim beyond the Phase 1 baselines is confirmed yet.")
    against = []
    for fam, got in fams.items():
        failed = [i for i, v in got.items() if v == "FAIL"]
        if failed:
            against.append(f"{fam} fails {len(failed)} of {len(got)} (e.g. {failed[0]}: "
                           f"{_short(by_id[failed[0]]['measured'])})")
    third = ("Against the guide's hypotheses: " + "; ".join(against) + "."
             if against else "Nothing it has judged so far contradicts the guide's hypotheses.")
    return second, third


def _family(criterion: Any) -> str:
    """A criterion id's family, its first two parts ("P5.prune_gain.obd+protect.vs_wanda.m" -> "P5.prune_gain")."""
    return ".".join(str(criterion).split(".")[:2])


def _families(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Rows grouped by criterion family (`_family`), in order of appearance: family -> {id: verdict}."""
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        out.setdefault(_family(r["id"]), {})[r["id"]] = r["verdict"]
    return out


def _short(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def readme_block(root: Path) -> str:
    return "\n".join([README_BEGIN, " ".join(summary_sentences(root)), README_END])


def update_readme(root: Path) -> bool:
    """Replace README's record block with the sentences computed now; returns whether it changed."""
    path = Path(root) / "README.md"
    text = path.read_text()
    if README_BEGIN not in text:
        raise EsaError(f"README.md has no {README_BEGIN} ... {README_END} block")
    head, rest = text.split(README_BEGIN, 1)
    new = head + readme_block(root) + rest.split(README_END, 1)[1]
    path.write_text(new)
    return new != text


def size(root: Path) -> int:
    return sum(p.stat().st_size for p in record_dir(root).rglob("*") if p.is_file())
