"""Profiles, per-model files and the schedule under params/, as typed objects.

A profile holds every knob of a run; a notebook receives `profile` (a name) and optional `overrides`
from papermill and asks this module for the merged result, so the CLI, run_all and JupyterLab all
see the same settings.
"""

from __future__ import annotations

import os
import re
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from esa.errors import EsaError, unknown
from esa.store import REPO_ROOT


def params_dir() -> Path:
    return Path(os.environ.get("ESA_PARAMS_DIR", REPO_ROOT / "params"))


@dataclass
class Profile:
    name: str
    description: str = ""
    corpus: str = "shakespeare"
    dtype: str = "float32"
    seqlen: int = 256  # tokens per window, evaluation and calibration alike
    eval_windows: int | None = 8  # None: every window of the eval split
    max_samples: int = 4  # calibration windows per seed
    # week 1 (metric validation): calibration windows per seed of every metric but hutchinson_diag (None:
    # max_samples), so that each metric's top-k resolves on held-out windows (esa.sensitivity.resolution)
    validation_samples: int | None = None
    seeds: list[int] = field(default_factory=lambda: [1337])
    topk: int = 100
    mode: str = "per_layer"
    metrics: list[str] = field(default_factory=lambda: ["grad_x_weight"])
    hutchinson_probes: int = 2
    batch_size: int = 4
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    phase1_models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    # the notebooks whose criteria compare models (schedule `models: several`: week 2, the synthesis); empty:
    # the profile's `models`
    several_models: list[str] = field(default_factory=list)
    # week 2: the metrics on those of `several_models` that are not in `models` (None: `metrics`)
    several_metrics: list[str] | None = None
    # Phase 4 scaling/architecture: a suite of sizes (micro-suite `name@budget` and/or real models)
    phase4_models: list[str] = field(default_factory=list)
    perturbations: list[str] = field(default_factory=lambda: ["sign_flip"])
    perturb_scale: float = 1.0
    perturb_prob: float = 0.5
    bit_flip_bits: list[str] = field(default_factory=lambda: ["exponent"])  # bit_flip variants (ops.BIT_CHOICES)
    dose_scales: list[float] = field(default_factory=lambda: [0.01, 0.1])
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    perturb_eval_windows: int | None = None  # Phase 3 sweeps: evaluation windows per condition (None: eval_windows)
    # sequential evaluation (esa.stats.sequential): {} = every condition on every window (fixed n); a mapping
    # (first_windows: windows per seed at the first look, spending: pocock | obf) makes the Phase 3 sweeps add
    # windows in doubling looks, up to perturb_eval_windows, until each comparison is decided
    sequential: dict[str, Any] = field(default_factory=dict)
    # True: the sizes come from a power plan (the judged record's profile): a PASS or FAIL counts as evidence at
    # these sizes, each row stating them; False: below the research guide's GPU budget a verdict is shown as
    # machinery-only (smoke)
    planned: bool = False
    highres_topk: int = 500  # Phase 2 week 3: the high-resolution top-k
    # score cache: per-matrix depth of the stored top/bottom candidates (every top-k with k <= it is exact),
    # and whether entries also keep every weight's score (bf16, 2 bytes a weight) for deep readers
    candidate_depth: int = 1000
    keep_scores: bool = False
    highres_seeds: list[int] = field(default_factory=lambda: [1337, 123, 999, 2024, 7])  # week 3 seeds
    # Phase 3 week 7: models added to `models` for the cross-architecture test (a trained MoE, a third family)
    cross_model_extra: list[str] = field(default_factory=lambda: ["tiny-mixtral"])
    # week 7: evaluation windows of a model's zero-alone ranks (the first n perturbation windows), by model;
    # a model not listed uses every perturbation window
    zero_alone_windows: dict[str, int] = field(default_factory=dict)
    # Phase 5: one mapping per application, checked by its phases module (esa.phases.phase5_*.settings)
    pruning: dict[str, Any] = field(default_factory=dict)  # week 13a
    finetune: dict[str, Any] = field(default_factory=dict)  # week 13b: protection and sparse fine-tuning
    security: dict[str, Any] = field(default_factory=dict)  # week 14
    interpret: dict[str, Any] = field(default_factory=dict)  # week 15

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in (params_dir() / "profiles").glob("*.yaml"))


PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
PLAIN_RULE = "letters, digits, '.', '_' and '-', not starting with a dot"


def is_plain_name(name: Any) -> bool:
    """A name that stays inside the folder it is joined to: no separator, no leading dot (so no `..`)."""
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None


def check_plain_name(name: Any, what: str) -> str:
    """`name` if it is plain (is_plain_name), else one EsaError naming `what` (e.g. "--run-id") and the rule."""
    if not is_plain_name(name):
        raise EsaError(f"{what} {name!r} is not a plain name ({PLAIN_RULE}); it becomes a folder or file name")
    return name


def profile_path(name: str) -> Path:
    """The file of profile `name`: params/profiles/<name>.yaml for a plain name, or `name` itself when it is the
    path of an existing .yaml file; anything else (a name with `/` or `..` that is not such a file) is refused."""
    if is_plain_name(name):
        path = params_dir() / "profiles" / f"{name}.yaml"
        if path.is_file():
            return path
        if not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            raise unknown("profile", name, available_profiles())
    if isinstance(name, str) and name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name)
    raise EsaError(f"profile {name!r}: give a profile name ({PLAIN_RULE}; accepted: {', '.join(available_profiles())}) "
                   "or the path of an existing .yaml file")


# Sizes and counts: the smallest value that makes sense (0 or a negative size is a typo, not a request).
MINIMUM: dict[str, int] = {
    "seqlen": 2,  # a BOS token plus at least one predicted token
    "eval_windows": 1,
    "max_samples": 1,
    "validation_samples": 1,
    "topk": 1,
    "hutchinson_probes": 1,
    "batch_size": 1,
    "perturb_eval_windows": 1,
    "highres_topk": 1,
    "candidate_depth": 1,
}
T = TypeVar("T")
SEED_MAX = 2**32 - 1  # numpy's legacy seeding and the metrics' derived torch seeds stay in range below this
OVERRIDES = "from --set / overrides"


def load_profile(name: str, overrides: dict[str, Any] | None = None) -> Profile:
    """The named profile with `overrides` applied on top.

    Every value is checked before anything runs: unknown keys, values of the wrong type (against the
    Profile annotations) and zero or negative sizes are one EsaError naming the key, where it came from
    (the file and line, or the overrides) and what is accepted.
    """
    path = profile_path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EsaError(f"profile file {path} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    data = yaml_load(text, str(path))
    if data is None:
        raise EsaError(f"profile file {path} is empty; a profile is a mapping of settings, e.g. `name: {path.stem}`")
    if not isinstance(data, dict):
        raise EsaError(f"{path}: a profile is a mapping of settings (key: value), got {type(data).__name__}")
    data.setdefault("name", path.stem)
    lines = _key_lines(text)
    where = {k: f"{path}, line {lines[k]}" if k in lines else str(path) for k in data}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for k, v in given.items():  # a Phase 5 section given as overrides merges into the profile's section
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    where.update({k: OVERRIDES for k in given})
    known = {f.name for f in fields(Profile)}
    extra = sorted(set(data) - known)
    if extra:
        raise EsaError(f"unknown profile setting(s) {extra} in {path.name} or overrides; accepted: {sorted(known)}")
    hints = get_type_hints(Profile)
    for key, value in data.items():
        data[key] = check_setting(key, value, hints[key], where[key])
    profile = Profile(**data)
    for key in ("topk", "highres_topk"):
        if getattr(profile, key) > profile.candidate_depth and not profile.keep_scores:
            raise EsaError(f"profile setting {key} = {getattr(profile, key)} is deeper than candidate_depth = "
                           f"{profile.candidate_depth}, the candidates a score cache entry stores per matrix: "
                           f"raise candidate_depth to >= {getattr(profile, key)} or set keep_scores: true")
    return profile


def check_setting(key: str, value: Any, hint: Any, where: str) -> Any:
    """`value` converted to the annotated type (an int where a float is expected), or an EsaError."""
    ok, converted = _conform(value, hint)
    if not ok:
        raise EsaError(f"profile setting {key} = {value!r} ({where}): expected {_describe(hint)}")
    base = key.rsplit(".", 1)[-1]  # a section's key ("finetune.seeds") is checked like the top-level one
    low = MINIMUM.get(base)
    if low is not None and converted is not None and converted < low:
        raise EsaError(f"profile setting {key} = {value!r} ({where}): must be >= {low}")
    if base in ("seeds", "highres_seeds"):
        if not converted:
            raise EsaError(f"profile setting {key} ({where}): give at least one seed")
        for seed in converted:
            check_seed(seed, f"profile setting {key} ({where})")
        if len(set(converted)) != len(converted):
            raise EsaError(f"profile setting {key} = {value!r} ({where}): has duplicates; give each seed once")
    if base == "perturb_prob" and not 0.0 <= converted <= 1.0:
        raise EsaError(f"profile setting {key} = {value!r} ({where}): a probability, between 0 and 1")
    return converted


def section(profile: Profile, name: str, cls: type[T]) -> T:
    """The profile's mapping `name` (a Phase 5 application's settings) as the dataclass `cls`.

    Keys not in `cls` and values of the wrong type are one EsaError naming the profile, the key and what is
    accepted; keys left out take `cls`'s defaults.
    """
    given = getattr(profile, name) or {}
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    extra = sorted(set(given) - known)
    if extra:
        raise EsaError(f"unknown setting(s) {extra} in profile {profile.name!r}, section {name}; "
                       f"accepted: {sorted(known)}")
    hints = get_type_hints(cls)
    where = f"profile {profile.name!r}, section {name}"
    return cls(**{k: check_setting(f"{name}.{k}", v, hints[k], where) for k, v in given.items()})


def check_seed(seed: Any, where: str) -> int:
    """A seed as an int in 0 .. SEED_MAX, or an EsaError naming `where` (e.g. "--seeds")."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise EsaError(
            f"{where}: seed {seed!r} is not accepted; seeds are integers 0 .. {SEED_MAX} (2**32 - 1)"
        )
    return seed


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(does `value` fit the type hint, the value converted to it)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            ok, converted = _conform(value, arg)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        if not isinstance(value, list):
            return False, value
        done = [_conform(v, item) for v in value]
        return all(ok for ok, _ in done), [v for _, v in done]
    if hint is Any or origin is dict or hint is dict:
        return (hint is Any or isinstance(value, dict)), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, hint), value


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        return f"a list of {_describe(item).removeprefix('an ').removeprefix('a ')}s"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def yaml_load(text: str, where: str) -> Any:
    """yaml.safe_load; malformed YAML or a tag such as !!python/object is one EsaError naming `where`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise EsaError(yaml_error(err, where)) from None


def yaml_error(err: yaml.YAMLError, where: str) -> str:
    """One line for a YAML error: where, line and column (1-based), and the parser's complaint."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    at = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
    tag = re.search(r"constructor for the tag '([^']+)'", problem)
    if tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return (
            f"{where}: the YAML tag {shown} at {at} is not accepted; give plain values "
            "(numbers, strings, true/false, null, [lists], {mappings})"
        )
    context = getattr(err, "context", None)
    return f"{where}: not valid YAML at {at}: {problem}" + (f" ({context})" if context else "")


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of each top-level key of a YAML mapping (compose builds nodes, constructs nothing)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


@dataclass
class ModelParams:
    name: str
    ref: str
    display: str = ""
    family: str = ""
    instruct: bool = False
    device_map: str | None = None
    published: dict[str, Any] = field(default_factory=dict)


def available_models() -> list[str]:
    return sorted(p.stem for p in (params_dir() / "models").glob("*.yaml"))


def model_params(name: str) -> ModelParams:
    """The params/models/<name>.yaml entry; a name without a file is taken as a raw model reference."""
    path = params_dir() / "models" / f"{name}.yaml"
    if not is_plain_name(name) or not path.is_file():  # a path or hub id is a reference, never a params file
        return ModelParams(name=name, ref=name, display=name)
    data = yaml_load(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise EsaError(f"{path}: a model file is a mapping (ref: ...), not {type(data).__name__}")
    known = {f.name for f in fields(ModelParams)}
    extra = sorted(set(data) - known)
    if extra:
        raise EsaError(f"unknown model setting(s) {extra} in {path}; accepted: {sorted(known)}")
    data.setdefault("name", name)
    data.setdefault("display", name)
    if "ref" not in data:
        raise EsaError(f"{path}: no `ref` (the model to load: embedded name, hub id, folder or .gguf path)")
    return ModelParams(**data)


def load_schedule() -> list[dict[str, Any]]:
    path = params_dir() / "schedule.yaml"
    data = yaml_load(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise EsaError(f"{path}: expected a mapping with a `notebooks:` list, got {type(data).__name__}")
    return list(data.get("notebooks", []))
