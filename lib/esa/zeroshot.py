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
Scoring (`score_next_line`): the model's summed log-likelihood of each candidate's tokens after the context
(`accuracy`), and the same per character of the candidate (`accuracy_norm`, lm-eval's acc_norm idea). An
item counts as correct only if the true line scores strictly highest, so ties (a broken model) count as
wrong and chance is exactly 1/4 for a model that cannot tell the lines apart.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from esa.data import Corpus, get_corpus, tokenizer_name
from esa.dispatch import input_device
from esa.errors import EsaError
from esa.evaluate import auto_batch_size
from esa.progress import progress
from esa.registry import Registry


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

    def as_dict(self, with_items: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_items:
            d.pop("correct")
            d.pop("correct_norm")
        return d


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] if the tokenizer prepends one by itself (as the evaluation windows do), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and probe and probe[0] == bos else []


def _sequences(tokenizer: Any, task: ZeroShotTask, max_context_tokens: int) -> list[tuple[list[int], list[list[int]]]]:
    """Per item: (BOS + context ids, [candidate ids, ...])."""
    prefix = _bos(tokenizer)
    out = []
    for item in task.items:
        ctx = tokenizer(item.context, add_special_tokens=False)["input_ids"][-max_context_tokens:]
        conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in item.choices]
        for c, ids in zip(item.choices, conts, strict=True):
            if not ids:
                raise EsaError(f"candidate line {c!r} tokenises to nothing")
        out.append((prefix + ctx, conts))
    return out


def _plain(model: torch.nn.Module, seqs: list[tuple[list[int], list[list[int]]]], bs: int, dev: torch.device,
           show_progress: bool) -> torch.Tensor:
    """Every (context + candidate) as its own sequence, right-padded in batches of `bs`."""
    flat = [(ctx + c, len(ctx)) for ctx, conts in seqs for c in conts]
    ll = torch.empty(len(flat), dtype=torch.float64)
    for start in progress(range(0, len(flat), bs), desc="zero-shot", disable=not show_progress):
        chunk = flat[start : start + bs]
        width = max(len(s) for s, _ in chunk)
        # right padding: a causal model's logits at real positions never see the padding after them
        ids = torch.tensor([s + [s[0]] * (width - len(s)) for s, _ in chunk], device=dev)
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        for b, (s, c0) in enumerate(chunk):
            lp = F.log_softmax(logits[b, c0 - 1 : len(s) - 1].float(), dim=-1)  # (n_cont, V)
            ll[start + b] = float(lp.gather(1, torch.tensor(s[c0:], device=lp.device).unsqueeze(1)).sum())
        del logits
    return ll


def _cache_kw(model: torch.nn.Module) -> str:
    # transformers renames past_key_values to cache (5.x); pass whichever the forward takes
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _shared(model: torch.nn.Module, seqs: list[tuple[list[int], list[list[int]]]], dev: torch.device,
            show_progress: bool) -> torch.Tensor:
    """The context once per item (KV cache), then its candidates as one batch continuing from it."""
    kw = _cache_kw(model)
    out_ll = []
    for ctx, conts in progress(seqs, desc="zero-shot", disable=not show_progress):
        out = model(input_ids=torch.tensor([ctx], device=dev), use_cache=True)
        first = F.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,): each candidate's first token
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None:
            raise EsaError("the model returned no KV cache; score the zero-shot task with share_context=False")
        cache.batch_repeat_interleave(len(conts))
        width = max(len(c) for c in conts)
        ids = torch.tensor([c + [c[0]] * (width - len(c)) for c in conts], device=dev)  # (k, width)
        logits = model(input_ids=ids, use_cache=True, **{kw: cache}).logits  # (k, width, V)
        for c, row in zip(conts, logits, strict=True):
            lp = F.log_softmax(row[: len(c) - 1].float(), dim=-1)
            rest = float(lp.gather(1, torch.tensor(c[1:], device=lp.device).unsqueeze(1)).sum()) if len(c) > 1 else 0.0
            out_ll.append(float(first[c[0]]) + rest)
        del out, logits, cache
    return torch.tensor(out_ll, dtype=torch.float64)


@torch.no_grad()
def candidate_loglik(model: torch.nn.Module, tokenizer: Any, task: ZeroShotTask, batch_size: int | None = None,
                     max_context_tokens: int = 160, share_context: bool = True,
                     show_progress: bool = False) -> torch.Tensor:
    """Summed log-likelihood of every candidate's tokens after its context: (n_items, n_choices) float64.

    The context keeps its last `max_context_tokens` tokens, after a BOS where the tokenizer uses one.
    `share_context`: run each context once and continue its KV cache for the candidates (about 2.5x fewer
    tokens); the first item is also scored without the cache and must agree, else EsaError."""
    seqs = _sequences(tokenizer, task, max_context_tokens)
    dev = input_device(model)
    was_training = model.training
    model.eval()
    try:
        if share_context:
            ll = _shared(model, seqs, dev, show_progress)
            check = _plain(model, seqs[:1], len(seqs[0][1]), dev, False)
            if not torch.allclose(ll[: check.numel()], check, rtol=1e-4, atol=1e-3):
                raise EsaError(f"zero-shot scoring with a shared context disagrees with plain scoring on this model "
                               f"({ll[: check.numel()].tolist()} vs {check.tolist()}); use share_context=False")
        else:
            longest = max(len(ctx) + len(c) for ctx, conts in seqs for c in conts)
            vocab = model.get_output_embeddings().weight.shape[0]
            ll = _plain(model, seqs, batch_size or auto_batch_size(longest, vocab, cap=16), dev, show_progress)
    finally:
        model.train(was_training)
    return ll.view(len(task.items), task.n_choices)


def score_next_line(model: torch.nn.Module, tokenizer: Any, task: ZeroShotTask, batch_size: int | None = None,
                    max_context_tokens: int = 160, share_context: bool = True,
                    show_progress: bool = False) -> ZeroShotResult:
    """Accuracy of choosing the true line by log-likelihood (and per character); see the module docstring."""
    scores = candidate_loglik(model, tokenizer, task, batch_size, max_context_tokens, share_context, show_progress)
    chars = torch.tensor([[max(1, len(c)) for c in it.choices] for it in task.items], dtype=torch.float64)
    finite = torch.isfinite(scores).all(1)
    correct, correct_norm = strict_first(scores), strict_first(scores / chars)
    n = len(task.items)
    acc = float(correct.double().mean())
    return ZeroShotResult(task.name, acc, float(correct_norm.double().mean()), n, task.chance,
                          math.sqrt(acc * (1 - acc) / n), int((~finite).sum()), tokenizer_name(tokenizer),
                          correct.tolist(), correct_norm.tolist())


def strict_first(scores: torch.Tensor) -> torch.Tensor:
    """Per item: does choice 0 (the true line) score strictly above every other? NaN counts as -inf."""
    s = torch.nan_to_num(scores, nan=-math.inf)
    return s[:, 0] > s[:, 1:].max(1).values


TASKS: Registry[tuple[Any, Any]] = Registry("zero-shot task")  # name -> (build, score)
TASKS.register((build_next_line, score_next_line), "next_line", "the true next line of a held-out play among "
               "4 candidates, by summed (and per-character) log-likelihood")
