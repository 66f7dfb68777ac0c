"""Token sets the tests read: stopwords (role c) and sink keys (role b, sinks.py), and the default inputs.

Stopwords (Yu et al. 2024 measure the probability the model puts on stopwords): the English function
words and punctuation marks of `STOPWORDS`, each in the spellings "w", " w", "W", " W"; only spellings the
tokenizer encodes as ONE token count (a byte-level tokenizer keeps the punctuation and "a"/"I" only).
Sink keys (Sun et al. 2024: massive activations sit on the first token and on delimiters): "first" =
position 0 of every input; "delimiters" = position 0 plus every token that decodes to punctuation or
whitespace only.
"""

from __future__ import annotations

from typing import Any

import torch

from esa.data import evaluation
from esa.errors import EsaError, unknown

STOPWORDS: tuple[str, ...] = (
    "the", "a", "an", "and", "or", "but", "nor", "of", "to", "in", "on", "at", "for", "with", "by", "from", "as",
    "is", "are", "was", "were", "be", "been", "am", "it", "its", "this", "that", "these", "those", "he", "she",
    "they", "we", "you", "i", "me", "him", "his", "her", "them", "their", "our", "my", "your", "thy", "thou",
    "not", "no", "so", "if", "then", "than", "there", "which", "who", "what", "will", "would", "shall", "can",
    "have", "has", "had", "do", "does", "did",
    ".", ",", ";", ":", "!", "?", "'", '"', "-", "\n",
)
DELIMITER_CHARS = frozenset(".,;:!?-'\"()[]\n\t ")
SINKS = ("first", "delimiters")
MIN_STOPWORD_IDS = 3  # fewer single-token stopwords than this: the stopword mass is not a meaningful quantity


def stopword_ids(tokenizer: Any, words: tuple[str, ...] = STOPWORDS) -> torch.Tensor:
    """Sorted unique ids of every single-token spelling of `words`; EsaError if fewer than 3."""
    ids: set[int] = set()
    for w in words:
        for spelling in {w, " " + w, w.capitalize(), " " + w.capitalize()}:
            enc = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.add(int(enc[0]))
    if len(ids) < MIN_STOPWORD_IDS:
        raise EsaError(f"the tokenizer encodes only {len(ids)} of the stopwords as single tokens "
                       f"(need {MIN_STOPWORD_IDS}); the stopword role cannot be measured with it")
    return torch.tensor(sorted(ids), dtype=torch.long)


def sink_mask(ids: torch.Tensor, tokenizer: Any, sink: str = "first") -> torch.Tensor:
    """(n, T) bool: the sink keys of each input (`sink` in SINKS)."""
    if sink not in SINKS:
        raise unknown("sink definition", sink, SINKS)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, 0] = True
    if sink == "delimiters":
        if tokenizer is None:
            raise EsaError("sink='delimiters' needs the tokenizer to decide which tokens are delimiters")
        delim = [int(i) for i in torch.unique(ids).tolist()
                 if set(tokenizer.decode([int(i)])) <= DELIMITER_CHARS]
        if delim:
            mask |= torch.isin(ids, torch.tensor(delim, dtype=ids.dtype))
    return mask


def default_inputs(tokenizer: Any, n: int = 16, seqlen: int = 32, seed: int = 0, corpus: str = "shakespeare") -> torch.Tensor:
    """`n` held-out windows of `seqlen` tokens (esa.data.evaluation, drawn with `seed`): the role tests' inputs."""
    return evaluation(tokenizer, corpus, seqlen, n_windows=n, seed=seed).ids
