"""One study shape, spelled once: settings -> plan -> run -> criteria -> findings.

Every Phase 5 application (and, step by step, every week) is a `Study`:

    S = study.settings(profile, overrides)          typed: the profile section + overrides, validated once
    plan = study.plan(S, profile, models)            conditions, n each, the criterion each serves, cost
    results = study.run(plan)                        one result per model
    rows = study.criteria(results, plan, evidence)   Criterion rows (verdicts with power)
    text = study.findings(results, plan)             Markdown sentences computed from the numbers

`plan()` loads nothing; it is the one source of `--dry-run`, of the power-planned profile's sizes and of the
runner's resources. esa-runner reaches a study through its `Request`: a dataclass whose fields carry an
`option(...)` each. The command layer (`esa.cli`) turns those fields into flags and help text (method lists
read from the registries at that moment) and parses their values; the study only validates the typed request
against the run (`study.job`) and computes it (`study.run_job`); no command-line parsing happens in this layer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from esa.data import HUB_CORPORA, check_corpus
from esa.errors import EsaError, unknown
from esa.params import Profile, check_seed, model_params, section
from esa.store import write_problem

if TYPE_CHECKING:
    from esa.models import LoadedModel
    from esa.recipes import Recipe

T = TypeVar("T")


# ---------------------------------------------------------------- settings
Check = Callable[[Any, str], None]  # (value, "section.key") -> None, or one EsaError naming the key


def setting(default: Any = MISSING, check: Check | None = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """A Settings field with a meaning check run by `build_settings` (types are checked by esa.params.section)."""
    meta = {"check": check} if check is not None else {}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def build_settings(profile: Profile, name: str, cls: type[T], overrides: Mapping[str, Any] | None = None) -> T:
    """The profile's section `name` merged with `overrides` as `cls`: types checked key by key, then every
    field's `check`; one EsaError naming the profile's key and what is accepted. Checks that join several
    fields stay with the study (its `validate`)."""
    merged = {**(getattr(profile, name) or {}), **dict(overrides or {})}
    view = Profile(**{**profile.as_dict(), name: merged})
    S = section(view, name, cls)
    for f in fields(cls):  # type: ignore[arg-type]
        check = f.metadata.get("check")
        if check is not None:
            check(getattr(S, f.name), f"{name}.{f.name}")
    return S


def optional(check: Check) -> Check:
    """`check`, except that None (the profile's value) passes."""
    return lambda v, where: None if v is None else check(v, where)


def each(check: Check, *, nonempty: bool = False, unique: bool = False) -> Check:
    """`check` on every item of a list; optionally refuse an empty list or duplicates."""
    def run(values: Any, where: str) -> None:
        items = list(values or [])
        if nonempty and not items:
            raise EsaError(f"{where} is empty; give at least one value")
        for v in items:
            check(v, where)
        if unique and len(set(items)) != len(items):
            raise EsaError(f"{where} has duplicates: {items}")
    return run


def one_of(accepted: Callable[[], Iterable[str]]) -> Check:
    """A name the registry (read at check time) holds."""
    def run(v: Any, where: str) -> None:
        names = list(accepted())
        if v not in names:
            raise unknown(where, v, names)
    return run


def at_least(low: float) -> Check:
    def run(v: Any, where: str) -> None:
        if not (isinstance(v, int | float) and v >= low):
            raise EsaError(f"{where} must be a number >= {low:g}, got {v!r}")
    return run


def fraction(what: str = "a share") -> Check:
    """A number strictly between 0 and 1."""
    def run(v: Any, where: str) -> None:
        if not (isinstance(v, int | float) and math.isfinite(v) and 0 < v < 1):
            raise EsaError(f"{where} must be {what} in (0, 1), got {v!r}")
    return run


def finite(v: Any, where: str) -> None:
    if not (isinstance(v, int | float) and math.isfinite(v)):
        raise EsaError(f"{where} must be a finite number, got {v!r}")


def seed_value(v: Any, where: str) -> None:
    check_seed(v, where)


def corpus(v: Any, where: str) -> None:
    check_corpus(v)


def new_path(v: Any, where: str) -> None:
    """An output path that does not exist yet, in a folder that can be written (checked before any work, so
    nothing is computed for nothing)."""
    if Path(v).exists():
        raise EsaError(f"{where} {v} exists; give a new folder")
    problem = write_problem(Path(v))
    if problem:
        raise EsaError(f"{where} {v} cannot be created: {problem}; give a folder you can write")


# ---------------------------------------------------------------- esa-runner requests
@dataclass(frozen=True)
class Option:
    """How one field of a study's `Request` appears on the command line (read by the command layer)."""

    help: str
    choices: Callable[[], Iterable[str]] | None = None  # read when the help is built: a registry's names
    const: Any = None  # the value of a flag given without one (None: the flag takes a value)
    metavar: str | None = None
    accepts: str | None = None  # what a value must be, for the one-line error (default: from the field's type)
    check: Check | None = None  # a meaning check on the typed value, run by the command layer before any work


def option(help: str, *, choices: Callable[[], Iterable[str]] | None = None, const: Any = None,
           metavar: str | None = None, accepts: str | None = None, check: Check | None = None,
           default: Any = None) -> Any:
    """A `Request` field that is a command-line flag: `--<field-name>` (underscores become dashes). With
    `choices` and no `check`, the value must be one of them."""
    if check is None and choices is not None and const is None:
        check = one_of(choices)
    return field(default=default, metadata={"option": Option(help, choices, const, metavar, accepts, check)})


def options(request: type) -> list[tuple[Field, Option]]:
    """The (field, option) pairs of a Request class, in declaration order."""
    return [(f, f.metadata["option"]) for f in fields(request) if "option" in f.metadata]


def flag_name(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def given(request: Any) -> list[str]:
    """The flags of `request` that were set (not their default)."""
    out = []
    for f, _ in options(type(request)):
        default = f.default if f.default is not MISSING else None
        if getattr(request, f.name) != default:
            out.append(f.name)
    return out


@dataclass(frozen=True)
class RunContext:
    """What esa-runner has settled before a study sees its request: the profile, the model, the run's recipe
    (every common flag merged with the profile) and which common flags the user set explicitly."""

    profile: Profile
    model: str
    recipe: Recipe
    explicit: frozenset[str] = frozenset()  # common flags given on the command line (e.g. {"corpus", "seqlen"})
    dry_run: bool = False


# ---------------------------------------------------------------- plans
@dataclass(frozen=True)
class Planned:
    """One condition of a plan: what is evaluated, how many units, for which criterion, at what cost."""

    model: str
    label: str
    n: int
    unit: str  # "windows", "seeds", "trials", "inputs", "steps"
    serves: tuple[str, ...] = ()  # criterion ids (or id prefixes) this condition's numbers decide
    seconds: float | None = None  # predicted on this machine; None: no measured cost to predict from
    peak_bytes: int | None = None
    kind: str = "eval"  # the pass each unit costs (esa.phases.costs.KINDS); windows of `seqlen` tokens
    seqlen: int | None = None
    per_unit: float = 1.0  # passes per unit (e.g. windows per training step, windows per seed)
    also: tuple[tuple[str, float], ...] = ()  # further (kind, passes per unit) each unit costs, at `seqlen`
    once: tuple[tuple[str, float], ...] = ()  # further (kind, passes) the condition costs once, whatever n
    # the model whose measured costs price it, when it is not `model` (the security notebook trains twins of a
    # micro-suite model beside the models it studies: that work is the notebook's, priced at the micro model's)
    priced_as: str | None = None

    @property
    def priced(self) -> str:
        return self.priced_as or self.model

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "label": self.label, "n": self.n, "unit": self.unit,
                "serves": list(self.serves), "seconds": self.seconds, "peak_bytes": self.peak_bytes}


def as_windows(windows: float, seqlen: int, at: int) -> float:
    """`windows` windows of `seqlen` tokens counted in windows of `at` tokens: a pass costs in proportion to its
    tokens (esa.phases.costs), so a condition whose passes differ in length prices each at its one `seqlen`."""
    return windows * seqlen / at


def _predicted(costs: Any, c: Planned) -> float | None:
    parts = [costs.seconds(c.priced, kind, c.n * per, c.seqlen) for kind, per in ((c.kind, c.per_unit), *c.also)]
    parts += [costs.seconds(c.priced, kind, passes, c.seqlen) for kind, passes in c.once]
    return None if any(x is None for x in parts) else float(sum(parts))


@dataclass
class Plan:
    """What a study will compute, from settings alone (nothing loaded)."""

    study: str
    profile: Profile  # the run's profile (a plan is what `run` computes, so it carries everything run needs)
    models: list[str]
    settings: Any  # the study's validated Settings
    conditions: list[Planned]
    setup: dict[str, Any] = field(default_factory=dict)  # what every condition shares (calibration, evaluation)
    notes: list[str] = field(default_factory=list)

    def seconds(self, model: str | None = None) -> float | None:
        """The predicted total (of `model`'s conditions when given), or None when any has no prediction."""
        s = [c.seconds for c in self.conditions if model is None or c.model == model]
        return None if not s or any(x is None for x in s) else float(sum(s))  # type: ignore[arg-type]

    def predict(self, costs: Any) -> Plan:
        """Fill each condition's predicted seconds from measured per-window costs (esa.phases.costs.Costs):
        n units x per_unit passes of `kind`; a condition already predicted keeps its number."""
        if costs is not None:
            self.conditions = [c if c.seconds is not None else replace(c, seconds=_predicted(costs, c))
                               for c in self.conditions]
        return self

    def for_model(self, model: str) -> list[Planned]:
        return [c for c in self.conditions if c.model == model]

    def as_dict(self) -> dict[str, Any]:
        return {"study": self.study, "profile": self.profile.name, "models": list(self.models), "setup": self.setup,
                "notes": list(self.notes), "predicted_seconds": self.seconds(),
                "conditions": [c.as_dict() for c in self.conditions]}

    def lines(self, conditions: bool = True, where: str = "on this machine") -> list[str]:
        """The plan as text (the command layer prints it; notebooks log it); `where` the seconds are predicted."""
        total = self.seconds()
        per = {m: len(self.for_model(m)) for m in self.models}
        head = (f"{self.study} plan, profile {self.profile.name}: models {', '.join(self.models)}; "
                + ", ".join(f"{n} conditions for {m}" for m, n in per.items())
                + (f"; predicted {duration(total)} {where}" if total is not None else ""))
        out = [head] + [f"  {k}: {_flat(v)}" for k, v in self.setup.items()] + [f"  note: {n}" for n in self.notes]
        if conditions:
            for c in self.conditions:
                cost = f", ~{duration(c.seconds)}" if c.seconds is not None else ""
                serves = f" -> {', '.join(c.serves)}" if c.serves else ""
                out.append(f"  - [{c.model}] {c.label}: n = {c.n} {c.unit}{cost}{serves}")
        return out


def _flat(v: Any) -> str:
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {_flat(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_flat(x) for x in v) + "]"
    return str(v)


def duration(s: float | None) -> str:
    """Seconds as people read a plan's prediction ("45 s", "12 min", "2.1 h"; "unknown" for None)."""
    if s is None or not math.isfinite(s):
        return "unknown"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def hub_notes(corpora: Iterable[str], models: Iterable[str]) -> list[str]:
    """A plan's note naming the corpora and models that only the hub (or a local HF cache) provides."""
    hub = sorted(c for c in corpora if c in HUB_CORPORA) + [m for m in models if "/" in model_params(m).ref]
    if not hub:
        return []
    off = " -- HF_HUB_OFFLINE=1 is set here" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return [f"needs the hub (or a local HF cache) for: {', '.join(hub)}{off}"]


# ---------------------------------------------------------------- the shape
@dataclass(frozen=True)
class Study:
    """A study: its names, its esa-runner request, and the five steps every week goes through.

    A study module ends with `STUDY = Study(...)`; `esa.phases.command.STUDIES` lists them. Every callable
    takes the typed objects the earlier steps made, so a notebook, esa-runner and the power planner build them
    the same way.
    """

    name: str  # the profile section and the key of its part of esa-runner's summary.json
    title: str  # the command-line group's title
    Request: type  # esa-runner's request: a dataclass of `option` fields
    trigger: tuple[str, ...]  # Request fields of which at least one must be set to ask for the study
    # (profile, overrides) -> the typed, validated Settings
    settings: Callable[[Profile, Mapping[str, Any] | None], Any]
    # (settings, profile, models or None: the study's default) -> Plan; loads nothing
    plan: Callable[[Any, Profile, Sequence[str] | None], Plan]
    # plan -> {model: result}
    run: Callable[[Plan], dict[str, Any]]
    # (results, plan, evidence) -> [Criterion]
    criteria: Callable[[Mapping[str, Any], Plan, str], list[Any]]
    # (results, plan) -> Markdown sentences computed from the numbers
    findings: Callable[[Mapping[str, Any], Plan], list[str]]
    # (request, run context) -> a validated job (with `.settings` and `.describe()`); raises EsaError
    job: Callable[[Any, RunContext], Any]
    # (job, command, loaded model, the run's sensitivity runs, stage folder) -> its summary part
    run_job: Callable[[Any, Any, LoadedModel, Any, Path], dict[str, Any]]


def check_request(study: Study, request: Any) -> bool:
    """Whether `request` asks for `study`; a flag of the study given without its trigger is one EsaError."""
    set_ = given(request)
    if any(t in set_ for t in study.trigger):
        return True
    if set_:
        triggers = " or ".join(flag_name(next(f for f in fields(study.Request) if f.name == t)) for t in study.trigger)
        raise EsaError(f"--{set_[0].replace('_', '-')} needs {triggers} (it only changes the {study.name} run)")
    return False
