"""Corpora, windows, and the evaluation protocol checked against a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from esa import data
from esa.errors import EsaError
from esa.evaluate import evaluate
from esa.models import load, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def textfile(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(400)))
    return str(p)


def test_local_file_windows_are_non_overlapping_and_split_disjoint(tok, textfile):
    ev = data.evaluation(tok, textfile, seqlen=64)
    ca = data.calibration(tok, textfile, seqlen=64, n_samples=5, seed=3)
    assert ev.ids.shape[1] == 64 and ev.n_windows == ev.n_available
    # windows in order tile the stream without overlap
    stream = data.token_stream(tok, data.get_corpus(textfile), "eval")
    assert torch.equal(ev.ids.reshape(-1), torch.from_numpy(stream[: ev.n_windows * 64]))
    # calibration text is the first 80% of the file, evaluation the rest
    corpus = data.get_corpus(textfile)
    assert corpus.calib_text + corpus.eval_text == Path(textfile).read_text()
    assert ca.n_windows == 5 and ca.split == "calib"


def test_seeded_sampling(tok, textfile):
    a = data.calibration(tok, textfile, 32, 4, seed=1)
    b = data.calibration(tok, textfile, 32, 4, seed=1)
    c = data.calibration(tok, textfile, 32, 4, seed=2)
    assert torch.equal(a.ids, b.ids) and a.indices != c.indices
    assert len(set(a.indices)) == 4


def test_window_errors(tok, textfile, tmp_path):
    with pytest.raises(EsaError, match="provides"):
        data.calibration(tok, textfile, 64, 10_000, seed=0)
    with pytest.raises(EsaError, match="larger than the model allows"):
        data.evaluation(tok, textfile, 1024, max_positions=512)
    empty = tmp_path / "empty.txt"
    empty.write_text("   ")
    with pytest.raises(EsaError, match="empty"):
        data.get_corpus(str(empty))
    with pytest.raises(EsaError, match="unknown corpus 'nope'.*shakespeare"):
        data.get_corpus("nope")


def test_perplexity_matches_hand_computation():
    lm = load("tiny-llama")
    ids = torch.randint(3, 200, (3, 17), generator=torch.Generator().manual_seed(0))
    res = evaluate(lm.model, ids, batch_size=2, show_progress=False)
    # by hand: softmax over the vocabulary, one window at a time, one position at a time
    total, correct = 0.0, 0
    with torch.no_grad():
        for w in ids:
            logits = lm.model(w[None]).logits[0].double()
            for t in range(16):
                logp = logits[t] - torch.logsumexp(logits[t], 0)
                total -= float(logp[w[t + 1]])
                correct += int(int(logits[t].argmax()) == int(w[t + 1]))
    assert res.n_tokens == 3 * 16
    assert res.log_ppl == pytest.approx(total / 48, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(total / 48), rel=1e-5)
    assert res.accuracy == correct / 48
    assert res.window_nll[0] != res.window_nll[1]


def test_batch_size_does_not_change_the_result():
    lm = load("tiny-gptneox")
    ids = torch.randint(3, 200, (5, 33), generator=torch.Generator().manual_seed(1))
    a = evaluate(lm.model, ids, batch_size=1, show_progress=False)
    b = evaluate(lm.model, ids, batch_size=4, show_progress=False)
    assert a.log_ppl == pytest.approx(b.log_ppl, rel=1e-5) and a.accuracy == b.accuracy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_window_loss_is_bit_identical_to_the_flattened_batch(dtype):
    # evaluate() scores one window of a batch at a time to avoid copying the (B, T-1, V) logits; the
    # numbers must be exactly those of cross-entropy over the flattened batch, as computed before.
    lm = load("tiny-llama", dtype=dtype)
    ids = torch.randint(3, 200, (6, 21), generator=torch.Generator().manual_seed(2))
    res = evaluate(lm.model, ids, batch_size=4, show_progress=False)
    nll_sum, correct = torch.zeros(6, dtype=torch.float64), 0
    with torch.no_grad():
        for start in range(0, 6, 4):
            batch = ids[start : start + 4]
            logits = lm.model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(targets.shape)
            nll_sum[start : start + 4] = nll.double().sum(dim=1)
            correct += int((logits.argmax(-1) == targets).sum())
    assert res.window_nll == (nll_sum / 20).tolist()
    assert res.log_ppl == float(nll_sum.sum() / 120) and res.accuracy == correct / 120


def test_nonfinite_windows_are_counted_not_dropped():
    lm = load("tiny-llama")
    ids = torch.randint(3, 200, (2, 9))
    w = lm.model.model.layers[0].mlp.down_proj.weight
    w[0, 0] = float("nan")
    res = evaluate(lm.model, ids, show_progress=False)
    assert res.n_nonfinite_windows == 2 and math.isnan(res.ppl)


@pytest.mark.slow
def test_shakespeare_corpus_is_disjoint_and_real():
    corpus = data.get_corpus("shakespeare")
    assert len(corpus.eval_text) > 500_000 and len(corpus.calib_text) > 3_000_000
    assert "HAMLET" in corpus.eval_text.upper() and "To be, or not to be" in corpus.eval_text
    # no eval paragraph of substance appears in the calibration text
    paras = [p for p in corpus.eval_text.split("\n\n") if len(p) > 400][:200]
    assert paras and not any(p in corpus.calib_text for p in paras)


def test_atomic_writes_leave_shareable_files_and_nothing_on_failure(tmp_path):
    import os

    from esa.store import atomic_path, write_json

    out = write_json(tmp_path / "a.json", {"x": 1})
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
