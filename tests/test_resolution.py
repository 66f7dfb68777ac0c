"""One held-out resolution rule for every metric: noise is not resolved, a planted top-k is, and the scorecard
stops judging a metric its own noise does not resolve."""

from __future__ import annotations

import math

import pytest
import torch

from esa.models import load
from esa.phases import criteria
from esa.sensitivity import resolution as R
from esa.sensitivity.metrics import METRICS, Metric, MetricConfig, MetricResult
from esa.stats.verdicts import Criterion


@pytest.fixture(scope="module")
def lm():
    return load("tiny-llama", device="cpu")


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (n, 12), generator=torch.Generator().manual_seed(seed))


def _fake(signal: float):
    """A metric whose score is `signal` on each matrix's first 10 weights plus unit noise drawn per window."""
    def compute(model, specs, ids, cfg):
        g = torch.Generator().manual_seed(int(ids.sum()))
        out = {}
        for s in specs:
            x = torch.randn(s.numel, generator=g).abs()
            x[:10] += signal
            out[s.name] = x.reshape(s.shape)
        return MetricResult(out)
    return Metric("fake", "test", compute, lambda c: {}, "gradient")


@pytest.mark.parametrize("signal,resolved", [(0.0, False), (20.0, True)])
def test_noise_is_not_resolved_and_a_planted_topk_is(lm, signal, resolved):
    with METRICS.patched(_fake(signal)):
        r = R.window_resolution(lm.model, lm.inventory, _ids(8), "fake", MetricConfig(), topk=10)
    assert r["resolved"] is resolved and r["unit"] == "calibration windows" and r["n"] == 8
    if resolved:
        assert r["z"] > 5 and r["needed"] < 8
    else:
        assert abs(r["z"]) < 2


def test_a_real_metric_on_few_windows_and_the_threshold_of_four(lm):
    cfg = MetricConfig(batch_size=2, show_progress=False)
    r = R.window_resolution(lm.model, lm.inventory, _ids(4), "grad_x_weight", cfg, topk=5, n_run=40)
    assert math.isfinite(r["z"]) and r["windows_measured"] == 4 and r["n"] == 40
    small = R.window_resolution(lm.model, lm.inventory, _ids(3), "grad_x_weight", cfg, topk=5)
    assert small["resolved"] is None and "not estimable" in small["note"]


def _row(metric: str, verdict: str = "PASS") -> Criterion:
    passed = {"PASS": True, "FAIL": False}.get(verdict)
    return Criterion(f"P2.heavy_tail.{metric}.m", 2, "t", 3.0, "> 2", passed, "e", verdict=verdict)


def test_unresolved_rows_become_underpowered_with_the_windows_needed():
    res = {"metric": "grad_x_weight", "unit": "calibration windows", "n": 4, "z": 0.7, "resolved": False,
           "needed": 33.0}
    rows = criteria.unresolved([_row("grad_x_weight"), _row("act_mag"), _row("grad_x_weight", "underpowered")],
                               "grad_x_weight", res)
    assert [r.verdict for r in rows] == ["underpowered", "PASS", "underpowered"]
    assert rows[0].passed is None and rows[0].face_value == "PASS"
    assert "not resolved at 4 calibration windows" in rows[0].note and "about 33 calibration windows" in rows[0].note
    # not measured (too few windows): nothing changes
    same = criteria.unresolved([_row("grad_x_weight")], "grad_x_weight", {**res, "resolved": None})
    assert same[0].verdict == "PASS"
    # the probe format of hutchinson_diag keeps working
    probes = {"probes": 2, "z": 0.1, "resolved": False, "probes_needed": 900.0}
    assert "about 900 probes" in criteria.unresolved([_row("hutchinson_diag")], "hutchinson_diag", probes)[0].note


def test_a_metric_without_held_out_signal_fails_whatever_its_number_reads():
    # z within noise of zero: no sample size follows, and the top-k is not above the median held out
    probes = {"probes": 1, "z": -0.003, "resolved": False, "probes_needed": math.inf}
    rows = criteria.unresolved([_row("hutchinson_diag"), _row("hutchinson_diag", "FAIL"), _row("grad_x_weight")],
                               "hutchinson_diag", probes)
    assert [r.verdict for r in rows] == ["FAIL", "FAIL", "PASS"]
    assert rows[0].passed is False and rows[0].face_value == "PASS"
    assert "not distinguishable from the median" in rows[0].note and "reads PASS" in rows[0].note


def test_sample_needed_is_inf_when_the_median_z_is_within_noise_of_zero():
    g = torch.Generator().manual_seed(0)
    noise = (0.02 + torch.randn(210, generator=g, dtype=torch.float64)).tolist()  # SmolLM2's Hutchinson: z 0.02
    z, se, need = R.median_z_and_needed(noise, [9e5] * 210)
    assert abs(z) < 2 * se and need == math.inf
    clear = (1.2 + 0.3 * torch.randn(210, generator=g, dtype=torch.float64)).tolist()
    z, se, need = R.median_z_and_needed(clear, [12.0] * 210)
    assert z > 2 * se and need == 12.0
    assert R.median_z_and_needed([0.5], [4.0])[2] == math.inf  # one matrix: its z's noise is ~1
    assert R.median_z_and_needed([3.0], [4.0])[2] == 4.0


def _two_pass_z(model, sub, ids, metric, cfg, topk):
    """The rule written out plainly: every window's scores kept, then means and the pooled sd per matrix."""
    from dataclasses import replace

    one = replace(cfg, batch_size=1, show_progress=False)
    per_window = [METRICS[metric](model, sub, ids[i : i + 1], one).scores for i in range(ids.shape[0])]
    zs = []
    for s in sub:
        x = torch.stack([w[s.name].reshape(-1).double() for w in per_window])
        a, b = x[0::2], x[1::2]
        sd = (torch.cat([a - a.mean(0), b - b.mean(0)]).square().sum(0) / (len(x) - 2)).sqrt()
        top = torch.topk(a.mean(0), min(topk, a.shape[1])).indices
        zs.append(float(b.mean(0)[top].median() - b.mean(0).median()) / (float(sd[top].median()) / math.sqrt(len(b))))
    # judged at the windows measured: one stream's SE shrunk to all windows'
    return float(torch.tensor(zs, dtype=torch.float64).median()) * math.sqrt(len(x) / (2 * len(b)))


def test_streamed_statistics_match_the_two_pass_rule_and_gradient_metrics_share_a_backward(lm):
    cfg = MetricConfig(batch_size=2, show_progress=False)
    ids, metrics = _ids(7, seed=3), ["grad_x_weight", "grad_squared", "act_mag"]
    forwards = []
    hook = lm.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        got = R.window_resolutions(lm.model, lm.inventory, ids, metrics, cfg, topk=5)
    finally:
        hook.remove()
    # 7 windows: one forward each for the two gradient metrics together, one each for act_mag
    assert len(forwards) == 2 * 7
    sub = R.sample_matrices(lm.inventory, 6)
    for m in metrics:
        ref = _two_pass_z(lm.model, sub, ids, m, cfg, topk=5)
        assert got[m]["z"] == pytest.approx(ref, rel=1e-9, abs=1e-12), m
        assert got[m] == R.window_resolution(lm.model, lm.inventory, ids, m, cfg, topk=5)


def test_sampled_matrices_cover_components_and_depth_when_the_inventory_is_a_multiple_of_them():
    from esa.models.inventory import WeightSpec

    comps = ["q", "k", "v", "o", "gate", "up", "down"]
    specs = [WeightSpec(f"model.layers.{layer}.{c}.weight", layer, c, "mlp" if c in ("gate", "up", "down") else
                        "attention", (4, 4)) for layer in range(30) for c in comps]  # SmolLM2's 30 x 7
    picked = R.sample_matrices(specs, 6)
    assert len({s.component for s in picked}) == 6 and len(set(picked)) == 6
    layers = sorted(s.layer for s in picked)
    assert layers[0] < 5 and layers[-1] > 24  # spread over depth, not bunched
    assert R.sample_matrices(specs[:4], 6) == specs[:4]
    assert len({s.name for s in R.sample_matrices(specs[:14], 10)}) == 10  # more picks than components: no repeats


def test_components_far_above_their_medians_are_told_from_zero_despite_their_spread():
    # six matrices of different kinds, every z far above 0 and a spread of ~74: the
    # median's normal-theory standard error (38) alone would call a median of 21 "within noise"
    z, se, need = R.median_z_and_needed([5.0, 11.0, 21.0, 36.0, 80.0, 200.0], [0.1] * 6)
    assert z < 2 * se and need == 0.1
    # the same spread with signs that chance gives (4 of 6 positive): no effect to scale
    assert R.median_z_and_needed([-50.0, -3.0, 1.0, 2.0, 60.0, 200.0], [0.1] * 6)[2] == math.inf
    # five of five positive is p = 1/32, above the 2-SE tail: a spread this wide stays not estimable
    assert R.median_z_and_needed([5.0, 11.0, 21.0, 80.0, 200.0], [0.1] * 5)[2] == math.inf
