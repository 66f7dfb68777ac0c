"""The offline next-line zero-shot task: built deterministically from the evaluation split only, candidates
well formed; written as an lm-eval task and scored by lm-eval offline, log-likelihoods equal to a direct
computation, strict accuracy (chance 1/4); hub tasks refused offline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esa.data import get_corpus
from esa.errors import EsaError
from esa.models import load
from esa.zeroshot import (
    ZeroShotTask,
    build_next_line,
    check_hub_tasks,
    doc_to_choice,
    process_results,
    score_next_line,
    write_lm_eval_task,
)


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


def test_lm_eval_task_folder(task, tmp_path):
    name, folder = write_lm_eval_task(task, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{name}.yaml", "items.jsonl", "utils.py"])
    docs = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    assert [d["context"] + "\n" for d in docs] == [it.context for it in task.items]
    assert [tuple(d["choices"]) for d in docs] == [it.choices for it in task.items]
    assert doc_to_choice(docs[0]) == ["\n" + c for c in docs[0]["choices"]]
    assert write_lm_eval_task(task, tmp_path) == (name, folder)  # keyed by the items: written once
    assert write_lm_eval_task(build_next_line(n_items=12, seed=1), tmp_path)[0] != name


def test_process_results_is_strict_and_normalises_by_the_scored_characters():
    doc = {"choices": ["a", "bbbbbbbbbb", "cc", "dd"]}
    # lm-eval's 4 results: each line with its leading newline
    got = process_results(doc, [(-4.0, False), (-5.0, False), (-6.0, False), (-7.0, False)])
    assert got == {"acc": 1.0, "acc_norm": 0.0, "finite": 1.0}  # per character (newline too): -2 against -0.45
    tie = process_results(doc, [(-5.0, False)] * 4)
    assert tie["acc"] == 0.0  # equal scores count as wrong: chance is 1/4 only for real guessing
    nan = process_results(doc, [(-4.0, False), (float("nan"), False), (-6.0, False), (-7.0, False)])
    assert nan == {"acc": 1.0, "acc_norm": 0.0, "finite": 0.0}  # NaN counts as -inf


def _merging_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer rule (punctuation keeps its trailing newlines) and one merge per
    punctuation mark + newline: ',\n' is one token, as in Qwen2's vocabulary. 256 byte tokens + 8 merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [(p, "Ċ") for p in ",.;:!?-'"]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    rule = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+| ?\p{L}+| ?\p{N}"
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rule), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="!")


def test_a_newline_merged_into_the_context_by_the_tokenizer_is_scored(tmp_path, monkeypatch):
    # Qwen2's BPE encodes ',\n' as one token; the newline alone then had no token and lm-eval stopped on it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm, tok = load("tiny-llama"), _merging_tokenizer()
    assert len(tok) <= lm.model.config.vocab_size and tok(",\n")["input_ids"] == [vocab_id := tok.convert_tokens_to_ids(",Ċ")]
    assert vocab_id >= 256
    merged = [it for it in build_next_line(n_items=60, seed=0).items
              if len(tok(it.context)["input_ids"]) == len(tok(it.context[:-1])["input_ids"])]
    assert merged, "no context's newline merges with its last character: this test would check nothing"
    task = ZeroShotTask("next_line", "shakespeare", tuple(merged[:4]), 4, {})
    res = score_next_line(lm.model, tok, task, root=tmp_path)
    assert res.n_items == len(task.items) and np.isfinite(np.asarray(res.loglik)).all()


def test_lm_eval_scores_the_local_task_offline(task, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load("tiny-llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    lm.model.train()
    res = score_next_line(lm.model, lm.tokenizer, task, root=tmp_path)
    assert lm.model.training  # the caller's mode is restored
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    ll = np.asarray(res.loglik)
    assert ll.shape == (12, 4) and np.isfinite(ll).all() and (ll < 0).all()
    assert res.correct == [bool(r[0] > r[1:].max()) for r in ll]
    chars = np.asarray([[len(c) + 1 for c in it.choices] for it in task.items])
    assert res.correct_norm == [bool(r[0] > r[1:].max()) for r in ll / chars]
    assert res.accuracy == pytest.approx(sum(res.correct) / 12)
    assert res.n_items == 12 and res.chance == 0.25 and res.n_nonfinite == 0
    assert res.se == pytest.approx(math.sqrt(res.accuracy * (1 - res.accuracy) / 12))
    # one candidate by hand: a single forward of the context, then the newline-led line's terms
    item = task.items[3]
    ids = lm.tokenizer(item.context + item.choices[2], add_special_tokens=False)["input_ids"]
    n_ctx = len(lm.tokenizer(item.context[:-1], add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lp = F.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    direct = sum(float(lp[i - 1, ids[i]]) for i in range(n_ctx, len(ids)))
    assert ll[3, 2] == pytest.approx(direct, abs=2e-3)


def test_hub_tasks_refused_offline_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EsaError, match="'hellaswag' needs its data set from the Hugging Face hub") as e:
        check_hub_tasks(["hellaswag", "arc_easy"])
    assert "\n" not in str(e.value)
    check_hub_tasks([])  # none asked: nothing to refuse


def test_bad_input():
    with pytest.raises(EsaError, match="fewer than n_items"):
        build_next_line(n_items=10**7)
    with pytest.raises(EsaError, match="n_choices"):
        build_next_line(n_items=5, n_choices=1)


@pytest.mark.slow
def test_real_model_above_chance():
    lm = load("smollm2-135m")
    task = build_next_line(n_items=100, seed=0)
    res = score_next_line(lm.model, lm.tokenizer, task)  # through lm-eval, offline
    assert res.accuracy - 0.25 > 3 * res.se  # SmolLM2 tells the true next line apart
