"""An offline zero-shot task from held-out text: choose the true next line of a play among 4 candidates.

How it is built (`build_next_line`, deterministic in `seed`, from the *evaluation* split of a corpus, which
no calibration sample ever overlaps -- esa.data):
- the text is split into paragraphs (speeches) and lines; a *target* is a line of verse or prose inside a
  speech: not the speaker tag (a paragraph's short first line ending in '.'), not a stage direction ('['),
  not a heading or a list of persons (first word in capitals), with at least one line of the same speech
  before it, and between `min_chars` and `max_chars` characters long;
- its context is the `context_lines` raw lines before it (speaker tags and blank lines included), ending
  with a newline;
- the 3 distractors are other target-like lines of the same text at least `min_distance` lines away, with
  a different text, drawn among the `pool` lines closest to the true line in length (so length alone
  gives the answer away as little as possible);
- `n_items` targets are drawn without replacement over the whole split.
Scoring (`score_next_line`) is lm-evaluation-harness's (the `zeroshot` extra): `write_lm_eval_task` writes
the items as an lm-eval task folder (YAML + JSON lines + a two-function utils.py) and `run_lm_eval` runs it
through `HFLM` on the in-memory model, with any hub tasks (hellaswag, arc_easy, ...) in the same call. Each
candidate's score is its summed log-likelihood after the context (`accuracy`), and the same per character of
the candidate (`accuracy_norm`, lm-eval's acc_norm). The context's trailing newline leads every candidate
(lm-eval would move it there anyway), so a line's score is the log-likelihood of the newline and the line
after the context; the newline's term is the same for the 4 candidates, so `accuracy` is that of the line
given the context and its newline. (The newline is not scored alone and subtracted: a BPE that merges it with
the context's last characters, as Qwen2's does with ',\n', leaves it no token of its own, which lm-eval refuses.)
An item counts as correct only if the true line
scores strictly highest, so ties (a broken model) count as wrong and chance is exactly 1/4 for a model that
cannot tell the lines apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esa.data import Corpus, _bos_id, get_corpus, tokenizer_name
from esa.errors import EsaError
from esa.registry import Registry
from esa.store import cache_dir


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]  # choices[0] is the true next line
    line: int  # line number of the true line in the split's text


@dataclass(frozen=True)
class ZeroShotTask:
    name: str
    corpus: str
    items: tuple[Item, ...]
    n_choices: int
    settings: dict[str, Any]

    @property
    def chance(self) -> float:
        return 1.0 / self.n_choices

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "corpus": self.corpus, "split": "eval", "n_items": len(self.items),
                "n_choices": self.n_choices, "chance": self.chance, **self.settings}


def _is_tag(line: str) -> bool:
    s = line.strip()
    return len(s) <= 40 and s.endswith(".")


def _capital_first_word(line: str) -> bool:
    word = line.strip().split(" ")[0].strip(",.;:")
    letters = [c for c in word if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def _targets(lines: list[str], min_chars: int, max_chars: int) -> list[int]:
    """Indices of lines that continue a speech (see the module docstring)."""
    out, pos_in_par = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            pos_in_par = 0
            continue
        s = line.strip()
        ok = (pos_in_par >= 2 and not s.startswith("[") and min_chars <= len(s) <= max_chars
              and not _capital_first_word(s) and any(c.isalpha() for c in s))
        if pos_in_par == 0 and not _is_tag(s):
            pos_in_par = 1  # a paragraph without a speaker tag: its second line may already be a target
        if ok:
            out.append(i)
        pos_in_par += 1
    return out


def build_next_line(
    corpus: str | Corpus = "shakespeare",
    n_items: int = 200,
    n_choices: int = 4,
    context_lines: int = 6,
    seed: int = 0,
    min_chars: int = 24,
    max_chars: int = 72,
    min_distance: int = 200,
    pool: int = 20,
) -> ZeroShotTask:
    """The next-line task over the evaluation split of `corpus` (module docstring)."""
    if n_choices < 2 or pool < n_choices - 1:
        raise EsaError(f"next-line task: need n_choices >= 2 and pool >= n_choices - 1, got {n_choices}, {pool}")
    c = get_corpus(corpus) if isinstance(corpus, str) else corpus
    lines = c.eval_text.split("\n")
    targets = _targets(lines, min_chars, max_chars)
    if len(targets) < n_items:
        raise EsaError(f"corpus {c.name!r} has {len(targets)} usable lines in its evaluation split, fewer than "
                       f"n_items={n_items}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(targets), size=n_items, replace=False))
    pos = np.asarray(targets)
    texts = np.asarray([lines[i].strip() for i in targets], dtype=object)
    lengths = np.asarray([len(t) for t in texts])
    items = []
    for t in chosen:
        i = int(pos[t])
        true = lines[i].strip()
        far = (np.abs(pos - i) >= min_distance) & (texts != true)
        cand = np.nonzero(far)[0]
        if len(cand) < pool:
            raise EsaError(f"next-line task: too few distractor lines far from line {i}; lower min_distance")
        closest = cand[np.argsort(np.abs(lengths[cand] - len(true)), kind="stable")[:pool]]
        picks = rng.choice(closest, size=n_choices - 1, replace=False)
        context = "\n".join(lines[max(0, i - context_lines) : i]) + "\n"
        items.append(Item(context, (true, *(str(texts[p]) for p in picks)), i))
    settings = dict(context_lines=context_lines, seed=seed, min_chars=min_chars, max_chars=max_chars,
                    min_distance=min_distance, pool=pool, n_candidate_lines=len(targets))
    return ZeroShotTask("next_line", c.name, tuple(items), n_choices, settings)


@dataclass
class ZeroShotResult:
    task: str
    accuracy: float  # true line has the highest summed log-likelihood (strictly)
    accuracy_norm: float  # ... the highest log-likelihood per character
    n_items: int
    chance: float
    se: float  # binomial standard error of `accuracy`
    n_nonfinite: int  # items where some candidate's log-likelihood is not finite
    tokenizer: str
    correct: list[bool] = field(default_factory=list)
    correct_norm: list[bool] = field(default_factory=list)
    loglik: list[list[float]] = field(default_factory=list)  # per item, per candidate (true line first)

    def as_dict(self, with_items: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_items:
            for k in ("correct", "correct_norm", "loglik"):
                d.pop(k)
        return d


# ---------------------------------------------------------------- the task as lm-eval reads it
def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The 4 lines, each led by the context's newline (module docstring)."""
    return ["\n" + c for c in doc["choices"]]


def line_loglik(results: Sequence[tuple[float, bool]]) -> np.ndarray:
    """Each candidate's log-likelihood (its leading newline and the line) after the context, from lm-eval's
    results of an item."""
    return np.asarray([r[0] for r in results], dtype=np.float64)


def _strict_first(scores: np.ndarray) -> bool:
    s = np.nan_to_num(scores, nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    return bool(s[0] > s[1:].max())


def process_results(doc: dict[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's per-item metrics: strict accuracy, per character, and whether every score is finite."""
    ll = line_loglik(results)
    chars = np.asarray([len(c) + 1 for c in doc["choices"]], dtype=np.float64)  # the newline is scored too
    return {"acc": float(_strict_first(ll)), "acc_norm": float(_strict_first(ll / chars)),
            "finite": float(np.isfinite(ll).all())}


_METRICS = "".join(f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}\n"
                   for m in ("acc", "acc_norm", "finite"))


def write_lm_eval_task(task: ZeroShotTask, root: Path | None = None) -> tuple[str, Path]:
    """`task` as an lm-eval task folder (YAML + JSON lines + utils.py); returns (lm-eval task name, folder).

    The folder is keyed by the items, under the cache (or `root`), so equal tasks share it; `lm_eval --include_path
    FOLDER --tasks NAME` runs it from the command line in this environment."""
    data = [{"context": it.context[:-1], "choices": list(it.choices), "line": it.line} for it in task.items]
    blob = json.dumps({"describe": task.describe(), "items": data}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    name = f"esa_{task.name}_{key}"
    folder = (root or cache_dir("zeroshot")) / name
    if not (folder / f"{name}.yaml").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "items.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
        (tmp / "utils.py").write_text("# lm-eval imports this file by path; the functions live in the library\n"
                                      "from esa.zeroshot import doc_to_choice, process_results  # noqa: F401\n")
        (tmp / f"{name}.yaml").write_text(
            f"# {json.dumps(task.describe())}\n"
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(folder / 'items.jsonl'))}}}, "
            f"cache_dir: {json.dumps(str(folder / 'hf_datasets'))}}}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            "doc_to_text: context\n"
            "doc_to_choice: !function utils.doc_to_choice\n"
            "doc_to_target: 0\n"
            'target_delimiter: ""\n'
            "process_results: !function utils.process_results\n"
            f"metric_list:\n{_METRICS}"
            "metadata: {version: 1.0}\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote the same task first
            if not (folder / f"{name}.yaml").exists():
                raise
    return name, folder


# ---------------------------------------------------------------- running lm-eval on the in-memory model
def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise EsaError("zero-shot scoring runs lm-evaluation-harness, which is not installed: "
                       "pip install -e '.[zeroshot]' (or make env)") from None
    return lm_eval


def engine() -> str:
    """The zero-shot engine and its version, for the records."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lm-eval {version('lm-eval')}"
    except PackageNotFoundError:
        return "lm-eval (not installed)"


def hub_offline() -> bool:
    return "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))


def check_hub_tasks(names: Sequence[str], who: str = "--zeroshot-tasks") -> None:
    """Refuse, before any work, an lm-eval task this machine cannot run: unknown to lm-eval, or from the hub
    while the hub is off (HF_HUB_OFFLINE=1)."""
    if not names:
        return
    if hub_offline():
        raise EsaError(f"{who}: lm-eval task {names[0]!r} needs its data set from the Hugging Face hub, which is "
                       "off here (HF_HUB_OFFLINE=1); the offline zero-shot task is the built-in next_line")
    _lm_eval()
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    for n in names:
        if n not in known:
            raise EsaError(f"{who}: {n!r} is not an lm-eval task (e.g. hellaswag, arc_easy, winogrande, piqa)")


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, task: ZeroShotTask | None, hub_tasks: Sequence[str] = (),
                batch_size: int | None = None, root: Path | None = None, show_progress: bool = False) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of the local task and `hub_tasks` on the in-memory model, in one call:
    {"results": {name: metrics}, "samples": {name: [...]}, "local": the local task's name}. The model's
    training mode is restored afterwards and the global random states are left alone (lm-eval's seeds are
    not set); without `show_progress`, lm-eval's and datasets' progress bars (stderr) are swallowed."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_hub_tasks(hub_tasks)
    name, folder = write_lm_eval_task(task, root) if task is not None else (None, None)
    names = [n for n in (name, *hub_tasks) if n is not None]
    if not names:
        return {"results": {}, "samples": {}, "local": None}
    was_training = model.training
    quiet = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    bars = contextlib.redirect_stderr(io.StringIO()) if not show_progress else contextlib.nullcontext()
    try:
        with bars:
            # add_bos_token: the tokenizer's own special tokens only where it prepends a BOS (a byte-level
            # tokenizer that appends EOS would otherwise split contexts from continuations wrongly)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or 8,
                      add_bos_token=_bos_id(tokenizer) is not None)
            manager = TaskManager(include_path=str(folder) if folder else None, include_defaults=bool(hub_tasks))
            out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=0, log_samples=True,
                                          bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                                          torch_random_seed=None, fewshot_random_seed=None)
    finally:
        model.train(was_training)
        for lg, lv in zip(quiet, levels, strict=True):
            lg.setLevel(lv)
    return {"results": out["results"], "samples": out["samples"], "local": name}


def score_next_line(model: torch.nn.Module, tokenizer: Any, task: ZeroShotTask, batch_size: int | None = None,
                    root: Path | None = None, show_progress: bool = False) -> ZeroShotResult:
    """Accuracy of choosing the true line by log-likelihood (and per character), computed by lm-eval."""
    return _result(run_lm_eval(model, tokenizer, task, (), batch_size, root, show_progress), task, tokenizer)


def _result(out: dict[str, Any], task: ZeroShotTask, tokenizer: Any) -> ZeroShotResult:
    samples = sorted(out["samples"][out["local"]], key=lambda s: s["doc_id"])
    if len(samples) != len(task.items):
        raise EsaError(f"lm-eval scored {len(samples)} of the {len(task.items)} next-line items")
    ll = [line_loglik([(r[0], False) for r in s["filtered_resps"]]) for s in samples]
    correct = [bool(s["acc"]) for s in samples]
    correct_norm = [bool(s["acc_norm"]) for s in samples]
    n = len(samples)
    acc = sum(correct) / n
    return ZeroShotResult(task.name, acc, sum(correct_norm) / n, n, task.chance, math.sqrt(acc * (1 - acc) / n),
                          sum(not s["finite"] for s in samples), tokenizer_name(tokenizer), correct, correct_norm,
                          [x.tolist() for x in ll])


def zero_shot_columns(model: torch.nn.Module, tokenizer: Any, task: ZeroShotTask | None,
                      hub_tasks: Sequence[str] = (), batch_size: int | None = None,
                      show_progress: bool = False) -> dict[str, Any]:
    """A results table's zero-shot columns: zs_* for the local task, zs_<task>_acc(_norm) for each hub task."""
    if task is None and not hub_tasks:
        return {}
    out, row = run_lm_eval(model, tokenizer, task, hub_tasks, batch_size, show_progress=show_progress), {}
    if task is not None:
        zs = _result(out, task, tokenizer)
        row.update({"zs_task": zs.task, "zs_accuracy": zs.accuracy, "zs_accuracy_norm": zs.accuracy_norm,
                    "zs_se": zs.se, "zs_items": zs.n_items, "zs_chance": zs.chance, "zs_nonfinite": zs.n_nonfinite})
    for t in hub_tasks:
        metrics = out["results"].get(t, {})
        row.update({f"zs_{t}_{m}": metrics[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in metrics})
    return row


TASKS: Registry[tuple[Any, Any]] = Registry("zero-shot task")  # name -> (build, score)
TASKS.register((build_next_line, score_next_line), "next_line", "the true next line of a held-out play among "
               "4 candidates, by summed (and per-character) log-likelihood, scored by lm-eval")
