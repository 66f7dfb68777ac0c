"""Parts of a notebook: one unit of its heavy computation (a model, or one seed of a model), recorded and
committed on its own, so that each piece of the judged record fits its 2-hour chunks.

    make record CHUNK=phase3_week7_cross_model PART=qwen2.5-coder-0.5b          (a unit per model)
    make record CHUNK=phase5_week13_finetune PART=smollm2-135m@seed1337         (a unit per seed of a model)
    (run_all.py --profile powered --only <notebook> --record --part <unit>)

A notebook whose loop body is one function of (profile, unit) registers a `PartSpec`: which units it computes,
what a unit is ("model", "seed") and how it is written. The record (esa.runner.record.run_part) can compute
that body for one unit alone and store its result under reports/record/parts/<notebook>/<unit>/: tables as
parquet, the other values in result.json (only what the notebook reads downstream: tables and statistics,
never score maps), and part.json last (commit, code hash, profile, the settings that determine the result,
machine, wall time, a digest of every file). The notebook calls `per_unit`: each unit comes from its
committed part when the run folder holds one (a record chunk runs in a copy of the record), else it is
computed there. A part is refused in one line, never used, when a file differs from its digests or when its
settings differ from the run's.

A unit computed in the chunk goes through the same storage form as a part (`roundtrip`), so the chunk's
tables do not depend on where a unit came from.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from esa.errors import EsaError
from esa.params import Profile, model_params
from esa.phases.study import Plan, duration
from esa.registry import Registry
from esa.store import atomic_folder, content_key, file_digest, read_json, storable, write_json, write_parquet

PARTS = "parts"  # <run or record folder>/parts/<notebook>/<unit>/
PART_FILE = "part.json"  # written last: a folder without it is no part
RESULT_FILE = "result.json"
CHUNK_LIMIT_S = 7200  # the guide: the record is produced in chunks (and parts) of at most 2 hours
Result = dict[str, Any]  # one unit's result: DataFrames (stored as parquet) and JSON-able values


def model_seconds(plan: Plan, unit: str) -> float | None:
    """A model unit's predicted seconds: its conditions in the notebook's plan."""
    return plan.seconds(unit)


@dataclass(frozen=True)
class PartSpec:
    """What one unit of a notebook computes, as a part: the loop body shared by the notebook and the record."""

    notebook: str
    # (profile, the schedule's models of the notebook) -> the units it computes one by one
    units: Callable[[Profile, Sequence[str]], list[str]]
    # (profile, unit) -> the settings that determine that unit's result (compared when a part is read)
    settings: Callable[[Profile, str], dict[str, Any]]
    # (profile, unit) -> the unit's result (loads the model)
    compute: Callable[[Profile, str], Result]
    # result entries a part does not store (too large to commit); the notebook saves them only when it
    # computed the unit itself
    transient: tuple[str, ...] = ()
    unit: str = "model"  # what a unit is, in messages
    syntax: str = "<model>"  # how a unit is written (PART=...)
    # (the notebook's predicted plan, unit) -> the unit's predicted seconds (None: unknown)
    seconds: Callable[[Plan, str], float | None] = model_seconds


SPECS: Registry[PartSpec] = Registry("notebook with parts", key=lambda s: s.notebook)


def specs() -> Registry[PartSpec]:
    """Every registered PartSpec (the phases modules register theirs when imported)."""
    from esa.phases import phase2, phase3, phase5_pruning, phase5_training  # noqa: F401 - importing registers

    return SPECS


def spec(notebook: str) -> PartSpec | None:
    return specs().get(notebook)


def folder_name(unit: str) -> str:
    """A unit's part folder: its name with anything but letters, digits, '.', '_' and '-' as '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", unit)


def folder(run_dir: str | Path, notebook: str, unit: str) -> Path:
    return Path(run_dir) / PARTS / notebook / folder_name(unit)


def unit_of(made: Mapping[str, Any], default: str | None = None) -> str | None:
    """The unit a part.json was made for ("model" in parts recorded before units had a name of their own)."""
    return made.get("unit", made.get("model", default))


def check_unit(notebook: str, P: Profile, models: Sequence[str], unit: str) -> PartSpec:
    """`notebook`'s PartSpec when `unit` is one of its units under profile P; else one EsaError naming them."""
    s = spec(notebook)
    if s is None:
        raise EsaError(f"{notebook} has no parts; notebooks with parts: {', '.join(specs()) or 'none'}")
    units = s.units(P, models)
    if unit not in units:
        raise EsaError(f"{notebook} has no part {unit!r} under profile {P.name}; its parts, one per {s.unit} "
                       f"(PART={s.syntax}): {', '.join(units)}")
    return s


def model_settings(P: Profile, model: str, keys: Sequence[str], **derived: Any) -> dict[str, Any]:
    """`keys` of profile P, the model's reference and `derived` values: a part's settings, as JSON reads them
    back (so a recorded part and this run compare equal exactly when the values are the same)."""
    raw = {"model": model, "ref": model_params(model).ref, **{k: getattr(P, k) for k in keys}, **derived}
    return json.loads(json.dumps(raw, default=str))


# ------------------------------------------------------------------ storage
def _is_table(v: Any) -> bool:
    return isinstance(v, pd.DataFrame)


def _json_form(values: Mapping[str, Any]) -> dict[str, Any]:
    from esa.store import _json_default

    return json.loads(json.dumps(dict(values), default=_json_default))


def roundtrip(result: Result, transient: Sequence[str] = ()) -> Result:
    """`result` as a part stores and reads it (tables through parquet, the rest through JSON); `transient`
    entries pass unchanged."""
    out: Result = {k: v for k, v in result.items() if k in transient}
    stored = {k: v for k, v in result.items() if k not in transient}
    for k, v in stored.items():
        if _is_table(v):
            buf = io.BytesIO()
            storable(v).to_parquet(buf, index=False)
            out[k] = pd.read_parquet(io.BytesIO(buf.getvalue()))
    out.update(_json_form({k: v for k, v in stored.items() if not _is_table(v)}))
    return {k: out[k] for k in result}


def _digests(path: Path) -> dict[str, str]:
    return {p.name: file_digest(p) for p in sorted(path.iterdir()) if p.is_file() and p.name != PART_FILE}


def write(target: Path, result: Result, manifest: Mapping[str, Any], transient: Sequence[str] = ()) -> Path:
    """Store `result` as the part `target`: built in a staging folder beside it and moved into place whole,
    part.json last, so an interrupted write leaves no part (and no half of one)."""
    stored = {k: v for k, v in result.items() if k not in transient}
    with atomic_folder(target) as tmp:
        for name, table in stored.items():
            if _is_table(table):
                write_parquet(tmp / f"{name}.parquet", storable(table))
        write_json(tmp / RESULT_FILE, _json_form({k: v for k, v in stored.items() if not _is_table(v)}))
        files = _digests(tmp)
        write_json(tmp / PART_FILE, {**manifest, "files": files, "digest": content_key(files, n=32)})
    return target


def committed(run_dir: str | Path, notebook: str) -> dict[str, dict[str, Any]]:
    """The manifests of the parts a folder holds for `notebook`, by the unit each was computed for."""
    base = Path(run_dir) / PARTS / notebook
    found = sorted(p / PART_FILE for p in base.iterdir() if not p.name.startswith(".")) if base.is_dir() else []
    out = {}
    for path in found:
        if path.is_file():
            made = read_json(path)
            out[str(unit_of(made, path.parent.name))] = made
    return out


def _where(path: Path) -> str:
    parts = path.parts
    return "/".join(parts[parts.index("reports"):]) if "reports" in parts else str(path)


def problem(path: Path, expected: Mapping[str, Any]) -> str | None:
    """Why the part at `path` must not be used (one line), or None: a file missing or differing from the
    digests part.json recorded, or settings differing from `expected` (the value and what was expected)."""
    try:
        made = read_json(path / PART_FILE)
    except (OSError, ValueError) as err:
        return f"part {_where(path)} cannot be read ({PART_FILE}: {err}); re-record it or remove the folder"
    nb, unit = made.get("notebook"), unit_of(made, path.name)
    fix = f"re-record it (make record CHUNK={nb} PART={unit}) or remove {_where(path)}"
    recorded = made.get("files") or {}
    now = _digests(path)
    bad = sorted(f for f in set(recorded) | set(now) if recorded.get(f) != now.get(f))
    if bad or content_key(recorded, n=32) != made.get("digest"):
        return (f"part {unit} of {nb} is damaged ({', '.join(bad) or PART_FILE} differ from the digests its "
                f"part.json recorded): restore it with `git checkout -- {_where(path)}` or {fix}")
    theirs = made.get("settings") or {}
    diff = [k for k in dict.fromkeys([*expected, *theirs]) if theirs.get(k) != expected.get(k)]
    if diff:
        shown = "; ".join(f"{k} = {json.dumps(theirs.get(k))}, this run expects {json.dumps(expected.get(k))}"
                          for k in diff[:3])
        return f"part {unit} of {nb} was recorded with other settings ({shown}); {fix}"
    return None


def read(path: Path) -> Result:
    """A part's result (check `problem` first): its tables and result.json's values."""
    out: Result = read_json(path / RESULT_FILE)
    for p in sorted(path.glob("*.parquet")):
        out[p.stem] = pd.read_parquet(p)
    return out


def _checked(run_dir: str | Path, s: PartSpec, P: Profile, unit: str) -> Path | None:
    """The folder of `unit`'s committed part when it may be read, None when there is none; one EsaError
    (`problem`'s line) when it is damaged or of other settings."""
    path = folder(run_dir, s.notebook, unit)
    if not (path / PART_FILE).is_file():
        return None
    why = problem(path, s.settings(P, unit))
    if why:
        raise EsaError(why)
    return path


def check_committed(run_dir: str | Path, notebook: str, P: Profile, units: Sequence[str]) -> None:
    """Every committed part of `notebook` for one of `units`, usable, before any work; else one EsaError."""
    s = spec(notebook)
    for unit in units if s is not None else []:
        _checked(run_dir, s, P, unit)


# ------------------------------------------------------------------ the notebook's loop
def origin(made: Mapping[str, Any] | None) -> dict[str, Any]:
    """Where a unit's result came from, as the chunk's page and manifest say it."""
    if made is None:
        return {"from": "computed in this chunk"}
    return {"from": "part", "commit": made.get("commit"), "code_hash": made.get("code_hash"),
            "digest": made.get("digest"), "recorded": made.get("started"), "seconds": made.get("seconds"),
            "machine": made.get("machine")}


def per_unit(run_dir: str | Path, notebook: str, P: Profile, units: Sequence[str],
             on_unit: Callable[[str, Result], None] | None = None) -> tuple[dict[str, Result], dict[str, dict]]:
    """({unit: result}, {unit: origin}) of `notebook`'s loop over units: a unit's committed part under
    `run_dir` when there is one (checked, and refused in one EsaError when damaged or made with other
    settings), else its spec's `compute`. `on_unit(unit, result)` runs after each (e.g. to free memory)."""
    s = spec(notebook)
    if s is None:
        raise EsaError(f"{notebook} has no parts; notebooks with parts: {', '.join(specs()) or 'none'}")
    results, origins = {}, {}
    for unit in units:
        path = _checked(run_dir, s, P, unit)
        if path is not None:
            results[unit], origins[unit] = read(path), origin(read_json(path / PART_FILE))
        else:
            results[unit], origins[unit] = roundtrip(s.compute(P, unit), s.transient), origin(None)
        if on_unit is not None:
            on_unit(unit, results[unit])
    return results, origins


def origin_sentence(origins: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence: which units came from which committed part (commit, when, how long), which were computed."""
    def where(machine: Mapping[str, Any]) -> str:  # parts of one chunk may come from other sessions' machines
        return f"{machine.get('cores', '?')} cores" + (f", {machine['cpu']}" if machine.get("cpu") else "")

    came = [f"{m} from its committed part (commit {str(o.get('commit'))[:12]}, recorded {o.get('recorded')}, "
            f"{float(o.get('seconds') or 0) / 60:.0f} min on {where(o.get('machine') or {})})"
            for m, o in origins.items() if o.get("from") == "part"]
    here = [m for m, o in origins.items() if o.get("from") != "part"]
    out = []
    if came:
        out.append("Read " + "; ".join(came) + ".")
    if here:
        out.append(f"Computed on this page: {', '.join(here)}.")
    return " ".join(out)


# ------------------------------------------------------------------ the plan
def usable(record: str | Path, notebook: str, P: Profile, models: Sequence[str]) -> dict[str, str | None]:
    """Per unit of `notebook` with a committed part under `record`: None when the chunk would read it, else
    why it would be refused."""
    s = spec(notebook)
    if s is None:
        return {}
    have = committed(record, notebook)
    return {u: problem(folder(record, notebook, u), s.settings(P, u)) for u in s.units(P, models) if u in have}


def plan_lines(plan: Plan, notebook: str, P: Profile, models: Sequence[str], record: str | Path) -> list[str]:
    """The dry-run's part lines of a notebook with parts: each unit's predicted part time and whether a part
    is committed (and usable), then what the full chunk would still compute."""
    s = spec(notebook)
    if s is None:
        return []
    each = s.units(P, models)
    have, state = committed(record, notebook), usable(record, notebook, P, models)
    out = [f"parts: one per {s.unit} (make record CHUNK={notebook} PART={s.syntax}; "
           f"reports/record/{PARTS}/{notebook}/):"]
    for u in each:
        made = have.get(u)
        where = ("not committed" if made is None else
                 f"committed (commit {str(made.get('commit'))[:12]}, {float(made.get('seconds') or 0) / 60:.0f} min), "
                 + ("the chunk reads it" if state.get(u) is None else f"refused: {state[u]}"))
        t = s.seconds(plan, u)
        over = f" (over the record's {CHUNK_LIMIT_S // 3600}-hour limit for a chunk or part)" * (
            t is not None and t > CHUNK_LIMIT_S)
        out.append(f"  - {u}: predicted {_minutes(t)}{over}; {where}")
    rest = [u for u in each if not (u in state and state[u] is None)]
    times = [s.seconds(plan, u) for u in rest]
    total = None if any(t is None for t in times) else sum(times)  # type: ignore[arg-type]
    read = len(each) - len(rest)
    out.append(f"the full chunk computes {', '.join(rest) or f'no {s.unit}'}"
               + (f" and reads {read} committed part(s)" if read else "") + f": predicted {_minutes(total)}")
    return out


def _minutes(s: float | None) -> str:
    """Minutes, however long (the record's 2-hour limit reads best as 120 min)."""
    return duration(s) if s is None or s < 90 else f"{s / 60:.0f} min"
