"""The sequential sweep (esa.perturb.sweep.run_sweep_sequential): stops a decided comparison early, keeps
the model bit-exact, and measures what the fixed sweep measures on the windows it evaluates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import planted_tiny_qwen2
from test_perturb_core import random_selection

from esa.errors import EsaError
from esa.perturb import build_groups, run_sweep, weights_hash
from esa.perturb.ops import PerturbSpec
from esa.perturb.sweep import run_sweep_sequential
from esa.stats.sequential import Design

SEEDS = [1, 2]


def _windows(n: int = 16, seqlen: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, seqlen), generator=g)


def _own_text(model: torch.nn.Module, n: int, seqlen: int = 16) -> torch.Tensor:
    """Windows sampled from the model itself: text it predicts well, so removing its planted weight hurts."""
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(torch.randint(0, 256, (n, 1)), do_sample=True, max_new_tokens=seqlen - 1,
                              min_new_tokens=seqlen - 1, top_k=0, pad_token_id=0)


@pytest.fixture(scope="module")
def planted():
    lm, spec = planted_tiny_qwen2()
    rows = [dict(metric="test", seed=s, param=spec.name, layer=spec.layer, component=spec.component, kind=spec.kind,
                 expert=-1, row=9, col=4, score=1.0, rank=1) for s in SEEDS]  # top_k: the planted weight
    return lm, pd.DataFrame(rows)


def test_a_clear_effect_stops_before_the_cap_with_the_weights_restored(planted, one_thread):
    lm, sel = planted
    ids = _own_text(lm.model, 32)
    groups = build_groups(lm.model, lm.inventory, sel, SEEDS, ["random_k"])
    before = weights_hash(lm.model)
    design = Design(alpha=0.01, n0=4, n_max=len(SEEDS) * ids.shape[0])
    res = run_sweep_sequential(lm.model, ids, groups, [PerturbSpec("sign_flip")],
                               lambda s: [("top_k", "random_k", 1.0), ("top_k", "random_k", 5.0)], design,
                               show_progress=False)
    assert weights_hash(lm.model) == before
    seq = res.sequential.set_index("c")
    assert list(seq["decision"]) == ["PASS", "PASS"] and (seq["n"] < design.n_max).all()
    used = int(res.table["n_windows"].max())
    assert used == seq["n"].max() // len(SEEDS) < ids.shape[0]  # windows per seed at the deciding look
    # what it measured equals the fixed sweep's numbers on the same windows
    fixed = run_sweep(lm.model, ids[:used], groups, [PerturbSpec("sign_flip")], show_progress=False).table
    cols = ["group", "seed", "log_ppl", "delta_log_ppl", "n_changed"]
    got = res.table[cols].sort_values(["group", "seed"]).reset_index(drop=True)
    want = fixed[cols].sort_values(["group", "seed"]).reset_index(drop=True)
    np.testing.assert_allclose(got[["log_ppl", "delta_log_ppl"]], want[["log_ppl", "delta_log_ppl"]], rtol=1e-6)
    assert list(got["n_changed"]) == list(want["n_changed"])


def test_without_an_effect_it_runs_to_the_cap_and_never_passes(planted, one_thread):
    lm, _ = planted
    ids = _windows(8)
    sel = random_selection(lm.inventory, 2, seed=1).assign(seed=1)
    sel = pd.concat([sel, sel.assign(seed=2)])
    groups = build_groups(lm.model, lm.inventory, sel, SEEDS, ["random_k"])
    design = Design(alpha=0.01, n0=4, n_max=len(SEEDS) * ids.shape[0])
    res = run_sweep_sequential(lm.model, ids, groups, [PerturbSpec("gauss_noise", scale=0.01)],
                               lambda s: [("top_k", "random_k", 1.0)], design, show_progress=False)
    row = res.sequential.iloc[0]
    assert row["decision"] != "PASS"
    assert row["decision"] == "FAIL" or row["n"] == design.n_max


def test_looks_must_align_with_the_seeds(planted):
    lm, sel = planted
    groups = build_groups(lm.model, lm.inventory, sel, SEEDS, [])
    with pytest.raises(EsaError, match="multiples of the 2 seeds"):
        run_sweep_sequential(lm.model, _windows(8), groups, [PerturbSpec("zero")], lambda s: [],
                             Design(alpha=0.01, n0=3, n_max=16), show_progress=False)
