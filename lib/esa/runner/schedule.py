"""Which notebooks a run executes, for which models, in which order.

`params/schedule.yaml` lists notebooks (id, phase, week, title, models, depends_on). This module turns
it plus the command line (`--only`, `--models`) into an ordered list of `Entry` objects: selection by
phase (`2`), phase/week (`2/3`) or notebook id, dependencies of the selection added (an up-to-date
dependency costs nothing, a missing one would make its dependants fail), and a topological order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from esa.errors import EsaError
from esa.params import Profile, load_schedule


@dataclass(frozen=True)
class Entry:
    id: str
    phase: int
    week: int
    title: str = ""
    models_spec: Any = "profile"  # "profile" | "phase1" | [names]
    depends_on: tuple[str, ...] = field(default_factory=tuple)
    study: str | None = None  # the esa.phases study whose plan() says what the notebook computes

    @property
    def phase_week(self) -> str:
        return f"{self.phase}/{self.week}"


# How a schedule entry's `models` field maps onto the profile; an explicit list is used as is.
MODEL_SETS: dict[str, str] = {"profile": "models", "phase1": "phase1_models", "phase4": "phase4_models",
                              "several": "several_models"}


def entries(raw: list[dict[str, Any]] | None = None) -> list[Entry]:
    """The schedule as `Entry` objects, validated (unique ids, known dependencies, no cycles)."""
    raw = load_schedule() if raw is None else raw
    out: list[Entry] = []
    for i, item in enumerate(raw):
        missing = [k for k in ("id", "phase", "week") if k not in item]
        if missing:
            raise EsaError(f"schedule.yaml entry #{i + 1} lacks {missing}; every entry needs id, phase, week")
        out.append(
            Entry(
                id=str(item["id"]),
                phase=int(item["phase"]),
                week=int(item["week"]),
                title=str(item.get("title", "")),
                models_spec=item.get("models", "profile"),
                depends_on=tuple(str(d) for d in item.get("depends_on", []) or []),
                study=item.get("study"),
            )
        )
    ids = [e.id for e in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise EsaError(f"schedule.yaml lists notebook id(s) {dupes} more than once")
    for e in out:
        bad = [d for d in e.depends_on if d not in ids]
        if bad:
            raise EsaError(
                f"schedule.yaml: {e.id} depends on unknown notebook(s) {bad}; known: {', '.join(ids)}"
            )
    topo_order(out)  # raises on a cycle
    return out


def topo_order(items: list[Entry]) -> list[Entry]:
    """Dependencies first; otherwise the schedule's own order (stable Kahn's algorithm)."""
    by_id = {e.id: e for e in items}
    done: set[str] = set()
    order: list[Entry] = []
    pending = list(items)
    while pending:
        ready = [e for e in pending if all(d in done or d not in by_id for d in e.depends_on)]
        if not ready:
            raise EsaError(f"schedule.yaml: dependency cycle among {[e.id for e in pending]}")
        first = ready[0]  # one at a time keeps the yaml order wherever dependencies allow it
        order.append(first)
        done.add(first.id)
        pending.remove(first)
    return order


def _parse_token(token: str, items: list[Entry]) -> list[Entry]:
    if token.isdigit():
        return [e for e in items if e.phase == int(token)]
    if "/" in token:
        phase, _, week = token.partition("/")
        if phase.isdigit() and week.isdigit():
            return [e for e in items if e.phase == int(phase) and e.week == int(week)]
    return [e for e in items if e.id == token]


def select(items: list[Entry], only: list[str] | None, with_deps: bool = True) -> tuple[list[Entry], list[str]]:
    """Entries matching `only` (plus their dependencies) in run order, and the ids added as dependencies.

    `with_deps=False` (`run_all.py --no-deps`): the selection alone. Notebooks compute (or read from the
    engine's cache) what they need, so a dependency only orders work; leaving it out is for re-running
    one expensive notebook without its upstream ones.

    Each token is a phase (`1`), a phase/week (`2/3`) or a notebook id; tokens may be comma lists.
    A token that matches nothing is an error listing what exists.
    """
    tokens = [t.strip() for chunk in (only or []) for t in chunk.split(",") if t.strip()]
    if not tokens:
        return topo_order(items), []
    chosen: set[str] = set()
    for token in tokens:
        hit = _parse_token(token, items)
        if not hit:
            phases = sorted({str(e.phase) for e in items})
            weeks = sorted({e.phase_week for e in items})
            raise EsaError(
                f"--only {token!r} matches no notebook; accepted: a phase ({', '.join(phases)}), "
                f"a phase/week ({', '.join(weeks)}) or a notebook id ({', '.join(e.id for e in items)})"
            )
        chosen.update(e.id for e in hit)
    by_id = {e.id: e for e in items}
    added: list[str] = []
    stack = list(chosen) if with_deps else []
    while stack:  # close over dependencies
        for dep in by_id[stack.pop()].depends_on:
            if dep not in chosen:
                chosen.add(dep)
                added.append(dep)
                stack.append(dep)
    return topo_order([e for e in items if e.id in chosen]), sorted(added)


def resolve_models(entry: Entry, profile: Profile, models: list[str] | None) -> list[str]:
    """The model list a notebook receives: `--models` if given, else the schedule entry's choice."""
    if models:
        return list(models)
    spec = entry.models_spec
    if isinstance(spec, str):
        if spec not in MODEL_SETS:
            raise EsaError(
                f"schedule.yaml: {entry.id} has models {spec!r}; accepted: {', '.join(MODEL_SETS)} or a list"
            )
        return list(getattr(profile, MODEL_SETS[spec]) or profile.models)  # an empty set: the profile's models
    return [str(m) for m in spec]
