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


def _seq_row(perturbation: str, b: str, c: float, decision: str, n: int = 8, zero: bool = False) -> dict:
    return dict(perturbation=perturbation, scale=1.0, prob=0.5, dose=1.0, a="top_k", b=b, c=c, alpha=0.001,
                decision=decision, reason="p 1e-05 ≤ α_k at look 1" if decision in ("PASS", "FAIL") else "reached the cap",
                look=1 if decision in ("PASS", "FAIL") else None, n=n, n_max=32, estimate=3.0, lower=1.0, upper=5.0,
                p=1e-5, p_opposite=0.9, alpha_look=1e-4, threshold=0.0, unit="(seed, window) pairs",
                design="group-sequential paired t", zero_differences=zero)


def test_phase3_criteria_read_the_sequential_decisions():
    from esa.phases import criteria

    rows = [_seq_row("sign_flip", "random_k", 1.0, "PASS"), _seq_row("sign_flip", "random_k", 5.0, "PASS"),
            _seq_row("zero", "random_k", 1.0, "PASS"), _seq_row("bit_flip", "random_k", 1.0, "undecided", zero=True),
            _seq_row("bit_flip[lsb-exponent]", "random_k", 1.0, "PASS")]
    st = {"sequential": rows, "comparisons": []}
    assert criteria.p3_sign_flip_ratio(st, "x")[0].verdict == "PASS"
    sig = criteria.p3_significance(st, "x", expected=["sign_flip", "zero"])[0]
    assert sig.verdict == "PASS" and "identical damage" in sig.note  # the saturated one is named, left out
    assert criteria.holds(st) is True
    st["sequential"][2] = _seq_row("zero", "random_k", 1.0, "undecided", n=32)
    sig = criteria.p3_significance(st, "x")[0]
    assert sig.verdict == "underpowered" and "undecided at the cap" in sig.note and criteria.holds(st) is None
    st["sequential"][2] = _seq_row("zero", "random_k", 1.0, "FAIL")
    assert criteria.p3_significance(st, "x")[0].verdict == "FAIL" and criteria.holds(st) is False
    st["sequential"][1] = _seq_row("sign_flip", "random_k", 5.0, "FAIL")
    assert criteria.p3_sign_flip_ratio(st, "x")[0].verdict == "FAIL"
    missing = criteria.p3_significance({"sequential": rows[:2]}, "x", expected=["sign_flip", "zero"])[0]
    assert missing.verdict == "not estimable" and "zero" in missing.note


def test_a_sweeps_first_look_holds_the_windows_an_analysis_needs():
    """Week 8's ranking stability reads the sweep's windows: its first look must hold ≥ 7 per seed even when
    every comparison is decided at the profile's 2."""
    from esa.params import load_profile
    from esa.phases import criteria, phase3

    P = load_profile("powered")
    specs, controls = [PerturbSpec("sign_flip", scale=1.0), PerturbSpec("zero")], ["random_k", "bottom_k"]
    plain = phase3.sweep_design(P, specs, controls, 16)
    held = phase3.sweep_design(P, specs, controls, 16, min_windows=criteria.stability_windows())
    assert criteria.stability_windows() == 7
    assert plain.n0 == 2 * len(P.seeds) and held.n0 == 7 * len(P.seeds) and held.n_max == plain.n_max
    assert phase3.sweep_design(P, specs, controls, 4, min_windows=7).n0 == 4 * len(P.seeds)  # capped by the windows
