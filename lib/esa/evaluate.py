"""Perplexity and next-token accuracy by the evaluation protocol of README, "Methods".

Perplexity = exp(mean token NLL) over non-overlapping windows; each text token is a prediction target
at most once. With a BOS-prefixed window, the BOS is context only. Next-token accuracy = top-1 match
rate over the same targets. Non-finite window losses (a catastrophically damaged model) are counted
and reported, never dropped silently: `ppl` is then inf/nan, `ppl_finite` covers the finite windows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from esa.data import Windows
from esa.dispatch import input_device
from esa.progress import progress

# Cap on a batch's fp32 logits (batch x seqlen x vocab x 4 bytes): Gemma's 262k vocabulary makes logits,
# not activations, the memory peak of an evaluation.
LOGITS_BUDGET_BYTES = 1 << 30


@dataclass
class EvalResult:
    ppl: float
    log_ppl: float  # mean NLL in nats (what statistics should use: finite unless a window is)
    accuracy: float
    n_tokens: int
    n_windows: int
    n_nonfinite_windows: int
    ppl_finite: float
    window_nll: list[float] = field(default_factory=list)  # mean NLL per window, in window order

    def as_dict(self, with_windows: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_windows:
            d.pop("window_nll")
        return d


def auto_batch_size(seqlen: int, vocab: int, cap: int = 8) -> int:
    return max(1, min(cap, LOGITS_BUDGET_BYTES // max(1, seqlen * vocab * 4)))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    wins: Windows | torch.Tensor,
    batch_size: int | None = None,
    show_progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate `model` on windows (ids of shape (n, seqlen)). Device: the model's input embedding's."""
    ids = wins.ids if isinstance(wins, Windows) else wins
    n, seqlen = ids.shape
    vocab = model.get_output_embeddings().weight.shape[0]
    bs = batch_size or auto_batch_size(seqlen, vocab)
    device = input_device(model)  # the embedding's execution device: right for accelerate-dispatched models too
    nll_sum = torch.zeros(n, dtype=torch.float64)
    correct = 0
    was_training = model.training
    model.eval()
    try:
        for start in progress(range(0, n, bs), desc=desc, disable=not show_progress, unit="batch"):
            batch = ids[start : start + bs].to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
            targets = batch[:, 1:].to(logits.device)  # (B, T-1)
            # With a BOS column every text token of the window is a target; without one the first token
            # is context only. Either way a window scores seqlen-1 targets and no token is scored twice.
            sums = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
            hits = torch.zeros((), dtype=torch.long, device=logits.device)
            for row in range(logits.shape[0]):
                # One window at a time: logits[row, :-1] is contiguous, so no (B, T-1, V) copy is made
                # (a GB per batch for Gemma's vocabulary, and ~3 s of the loss on 2 cores). Each row's
                # log-softmax is computed alone either way, so the losses are bit-identical.
                win = logits[row, :-1].float()
                sums[row] = F.cross_entropy(win, targets[row], reduction="none").double().sum()
                hits += (win.argmax(-1) == targets[row]).sum()
            # one transfer per batch, as before: no per-window device synchronisation on a GPU
            nll_sum[start : start + bs] = sums.cpu()
            correct += int(hits)
            del logits, win
    finally:
        model.train(was_training)
    per_tok = seqlen - 1
    window_nll = (nll_sum / per_tok).tolist()
    finite = torch.isfinite(nll_sum)
    n_tokens = n * per_tok
    mean_nll = float(nll_sum.sum() / n_tokens)
    finite_nll = float(nll_sum[finite].sum() / (int(finite.sum()) * per_tok)) if finite.any() else math.nan
    return EvalResult(
        ppl=_exp(mean_nll),
        log_ppl=mean_nll,
        accuracy=correct / n_tokens,
        n_tokens=n_tokens,
        n_windows=n,
        n_nonfinite_windows=int((~finite).sum()),
        ppl_finite=_exp(finite_nll),
        window_nll=window_nll,
    )


def _exp(x: float) -> float:
    if math.isnan(x):
        return math.nan
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
