"""Phase 1 prose and criteria for a model with and without an independent GPL-3 reference."""

from __future__ import annotations

import math

import pandas as pd

from esa.phases import phase1
from esa.report import scorecard


def _summary() -> pd.DataFrame:
    common = dict(params=1e8, family="llama", instruct=False, ppl=40.0, ppl_std=2.0, accuracy=0.3, n_seeds=2,
                  windows_per_seed=8, seqlen=256, tokens_per_seed=2040, tokenizer="tok", unigram_ppl=800.0,
                  gpl3_ppl=19.1, copy_ppl_original=80.0, copy_ppl_repeated=1.3, nonfinite=0)
    return pd.DataFrame([dict(common, model="a", display="A", gpl3_expected=19.0),
                         dict(common, model="b", display="B", gpl3_expected=math.nan, gpl3_ppl=5.5)])


def test_a_model_without_a_reference_gets_no_check_and_no_nan_in_the_prose():
    s = _summary()
    ids = [c.id for c in phase1.phase1_criteria(s)]
    assert "P1.reference.a" in ids and "P1.reference.b" not in ids
    card = scorecard.as_frame(phase1.phase1_criteria(s))
    lines = phase1.summary_lines(s, card, "a corpus")
    assert "independent reference 19" in lines[0]
    assert "no independent reference is recorded" in lines[1] and "nan" not in lines[1].lower()
    assert lines[-1].startswith("\nCorpus: a corpus.")
