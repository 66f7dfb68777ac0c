"""Reference points that make a perplexity credible or expose a broken harness.

- `unigram_ppl` (`unigram_nll`): a unigram model fitted on the calibration split and scored on the
  same evaluation targets; any real LM must beat it by a wide margin.
- `reference_text_ppl`: perplexity on the first 1,000 tokens of the GPL-3 text Debian ships, where
  independent measurements exist (SmolLM2-135M about 19, Gemma-3-270M about 14; params/models/*.yaml).
- `copy_probe`: a window followed by an exact copy of itself; the copy's perplexity is near 1.0 in any
  working model. That is what leaked or repeated evaluation text looks like, and why a Phase 1 table
  showing PPL near 1.0 with 99% accuracy on real text is a harness bug, not a good model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from esa.data import Windows, get_corpus, token_stream

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def unigram_nll(train_ids: np.ndarray, target_ids: np.ndarray, vocab: int, smoothing: float = 1.0) -> np.float64:
    """Mean NLL (nats/token) of the add-`smoothing` unigram model of `train_ids` on `target_ids`: it knows
    token frequencies and nothing else, so any real LM must beat it by a wide margin."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + smoothing
    logp = np.log(counts / counts.sum())
    return -logp[target_ids].mean()


def unigram_ppl(tokenizer: Any, corpus: str, wins: Windows, smoothing: float = 1.0) -> float:
    """Unigram perplexity fitted on the corpus's calib split, over the same target tokens `evaluate` scores."""
    calib = token_stream(tokenizer, get_corpus(corpus), "calib")
    vocab = max(len(tokenizer), int(calib.max()) + 1, int(wins.ids.max()) + 1)
    return float(math.exp(unigram_nll(calib, wins.ids[:, 1:].numpy().ravel(), vocab, smoothing)))


@torch.no_grad()
def reference_text_ppl(model: torch.nn.Module, tokenizer: Any, n_tokens: int = 1000) -> float | None:
    """PPL on the first `n_tokens` tokens of Debian's GPL-3 text as one window; None if it is absent."""
    if not GPL3.is_file():
        return None
    ids = tokenizer(GPL3.read_text())["input_ids"][:n_tokens]
    x = torch.tensor([ids], device=model.get_input_embeddings().weight.device)
    logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
    return float(torch.exp(F.cross_entropy(logits, x[0, 1:])))


@torch.no_grad()
def copy_probe(model: torch.nn.Module, wins: Windows, n: int = 2) -> dict[str, float]:
    """PPL of the first half of a window vs. the same half repeated right after it."""
    half = wins.seqlen // 2
    device = model.get_input_embeddings().weight.device
    first, copy = [], []
    for row in wins.ids[:n]:
        seq = torch.cat([row[:half], row[1:half] if wins.bos else row[:half]]).unsqueeze(0).to(device)
        logits = model(input_ids=seq, use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, seq[0, 1:], reduction="none")
        first.append(nll[: half - 1].mean())
        copy.append(nll[half:].mean())
    return {"ppl_original": float(torch.exp(torch.stack(first).mean())),
            "ppl_repeated": float(torch.exp(torch.stack(copy).mean()))}
