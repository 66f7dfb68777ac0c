"""The offline next-line zero-shot task: built deterministically from the evaluation split only, candidates
well formed, log-likelihoods equal to a direct computation (shared-context and plain paths), chance 1/4."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from esa.data import get_corpus
from esa.errors import EsaError
from esa.models import load
from esa.zeroshot import build_next_line, candidate_loglik, score_next_line, strict_first


@pytest.fixture(scope="module")
def task():
    return build_next_line(n_items=12, seed=0)


@pytest.fixture(scope="module")
def corpus():
    return get_corpus("shakespeare")


def test_built_from_the_evaluation_split_only(task, corpus):
    lines = corpus.eval_text.split("\n")
    for item in task.items:
        true = item.choices[0]
        assert lines[item.line].strip() == true
        assert corpus.eval_text.count(item.context + lines[item.line]) >= 1  # the true line follows the context
        assert item.context.endswith("\n")
        for c in item.choices:
            assert c in corpus.eval_text
        assert item.context not in corpus.calib_text


def test_candidates_are_distinct_far_and_length_matched(task, corpus):
    lines = [ln.strip() for ln in corpus.eval_text.split("\n")]
    for item in task.items:
        true, *others = item.choices
        assert len(set(item.choices)) == 4 and true not in others
        for o in others:
            where = [i for i, ln in enumerate(lines) if ln == o]
            assert min(abs(i - item.line) for i in where) >= 200
            assert 24 <= len(o) <= 72
        assert 24 <= len(true) <= 72
    # length matching: distractors are drawn among the 20 lines closest in length, so the true line's
    # length rank among its 4 candidates is not always extreme
    assert task.chance == 0.25 and task.describe()["chance"] == 0.25


def test_deterministic_in_seed(task):
    again = build_next_line(n_items=12, seed=0)
    other = build_next_line(n_items=12, seed=1)
    assert again.items == task.items
    assert other.items != task.items


def test_loglik_equals_direct_computation(task):
    lm = load("tiny-llama")
    shared = candidate_loglik(lm.model, lm.tokenizer, task, share_context=True)
    plain = candidate_loglik(lm.model, lm.tokenizer, task, share_context=False, batch_size=5)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-3)
    # one candidate by hand: a single unpadded forward of context + candidate
    item = task.items[3]
    ctx = lm.tokenizer(item.context, add_special_tokens=False)["input_ids"][-160:]
    cont = lm.tokenizer(item.choices[2], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = F.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
    direct = sum(float(lp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))
    assert plain[3, 2].item() == pytest.approx(direct, abs=1e-3)


def test_accuracy_is_strict_argmax():
    lm = load("tiny-llama")
    task = build_next_line(n_items=16, seed=3)
    res = score_next_line(lm.model, lm.tokenizer, task)
    ll = candidate_loglik(lm.model, lm.tokenizer, task)
    assert res.correct == strict_first(ll).tolist()
    chars = torch.tensor([[len(c) for c in it.choices] for it in task.items], dtype=torch.float64)
    assert res.correct_norm == strict_first(ll / chars).tolist()
    assert res.accuracy == pytest.approx(sum(res.correct) / 16)
    assert res.n_items == 16 and res.chance == 0.25 and res.n_nonfinite == 0
    assert res.se == pytest.approx(math.sqrt(res.accuracy * (1 - res.accuracy) / 16))
    ties = torch.zeros(5, 4)
    assert not strict_first(ties).any()  # equal scores count as wrong: chance is 1/4 only for real guessing
    assert strict_first(torch.tensor([[0.0, -1.0, float("nan"), -2.0]])).all()


def test_bad_input():
    with pytest.raises(EsaError, match="fewer than n_items"):
        build_next_line(n_items=10**7)
    with pytest.raises(EsaError, match="n_choices"):
        build_next_line(n_items=5, n_choices=1)


@pytest.mark.slow
def test_real_model_above_chance():
    lm = load("smollm2-135m")
    task = build_next_line(n_items=100, seed=0)
    res = score_next_line(lm.model, lm.tokenizer, task)
    assert res.accuracy - 0.25 > 3 * res.se  # SmolLM2 tells the true next line apart
