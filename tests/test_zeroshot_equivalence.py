"""TEMPORARY (issue 38): lm-eval's next-line numbers equal the hand-written scorer's on the same items.

The old scorer (esa.zeroshot before lm-eval took over, plain path: one unpadded forward per item and
candidate) lives here only; delete this file once the equality has been seen on the models below."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from esa.data import _bos_id
from esa.models import load
from esa.zeroshot import build_next_line, score_next_line

# The old scorer kept a context's last `max_context_tokens` (160) tokens; lm-eval keeps the whole context (up to
# the model's length). Both are compared on the whole context; on SmolLM2 every context is under 160 tokens, so
# there the old default itself is matched.


@torch.no_grad()
def old_loglik(model, tokenizer, task, max_context: int | None = None) -> torch.Tensor:
    """The old definition: BOS (where the tokenizer prepends one) + the context's tokens, then each candidate
    line tokenised on its own; its summed log-likelihood. (n_items, n_choices), float64."""
    bos = _bos_id(tokenizer)
    out = torch.empty(len(task.items), task.n_choices, dtype=torch.float64)
    for i, item in enumerate(task.items):
        ctx = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        if max_context is not None:
            assert len(ctx) <= max_context, "an item the old scorer would have truncated"
        ctx = ([bos] if bos is not None else []) + ctx
        for j, c in enumerate(item.choices):
            cont = tokenizer(c, add_special_tokens=False)["input_ids"]
            assert len(ctx) + len(cont) <= model.config.max_position_embeddings  # lm-eval would truncate it
            lp = F.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
            out[i, j] = sum(float(lp[len(ctx) + k - 1, t]) for k, t in enumerate(cont))
    return out


def strict_first(scores: torch.Tensor) -> torch.Tensor:
    s = torch.nan_to_num(scores, nan=-float("inf"))
    return s[:, 0] > s[:, 1:].max(1).values


def _check(ref: str, n_items: int, seed: int, max_context: int | None = None) -> None:
    lm = load(ref)
    task = build_next_line(n_items=n_items, seed=seed)
    old = old_loglik(lm.model, lm.tokenizer, task, max_context)
    new = score_next_line(lm.model, lm.tokenizer, task)
    torch.testing.assert_close(torch.tensor(new.loglik, dtype=torch.float64), old, rtol=1e-4, atol=2e-3)
    chars = torch.tensor([[len(c) for c in it.choices] for it in task.items], dtype=torch.float64)
    assert new.correct == strict_first(old).tolist()
    assert new.correct_norm == strict_first(old / chars).tolist()
    assert new.accuracy == pytest.approx(float(strict_first(old).double().mean()))
    assert new.accuracy_norm == pytest.approx(float(strict_first(old / chars).double().mean()))


def test_lm_eval_equals_old_scorer_tiny():
    _check("tiny-llama", 12, 0)


@pytest.mark.slow
def test_lm_eval_equals_old_scorer_smollm2():
    _check("smollm2-135m", 24, 1, max_context=160)
