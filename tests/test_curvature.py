"""Curvature diagonals against exact per-matrix oracles on tiny models, and the reliability measurement."""

from __future__ import annotations

import json
import math

import pytest
import torch

from esa.errors import EsaError
from esa.models import load
from esa.sensitivity import curvature as C
from esa.sensitivity.metrics import METRICS, MetricConfig


def _ids(n=1, t=8, seed=0):
    return torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def llama():
    return load("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def kproj(llama):
    spec = next(s for s in llama.inventory if s.layer == 1 and s.component == "k")  # 16 x 32 = 512 weights
    ids = _ids(1, 8)
    exact = C.exact_diagonals(llama.model, {spec.name: llama.model.get_parameter(spec.name)}, ids)[spec.name]
    return spec, ids, exact


def test_exact_ggn_oracle_is_the_closed_form_on_the_output_layer(llama):
    # logits = W h: d z_tc / d W_cj = h_tj, so diag(GGN) = (1/N) sum_t p_tc (1 - p_tc) h_tj^2 (and = diag(H) there)
    ids = _ids(1, 5)
    head = llama.model.lm_head.weight
    exact = C.exact_diagonals(llama.model, {"lm_head.weight": head}, ids, hessian=False)["lm_head.weight"]["ggn"]
    seen = {}
    hook = llama.model.lm_head.register_forward_hook(lambda m, i, o: seen.update(h=i[0].detach()))
    with torch.no_grad():
        logits = llama.model(input_ids=ids).logits[0, :-1].float()
    hook.remove()
    p, h = logits.softmax(-1), seen["h"][0, :-1].float()
    closed = (p * (1 - p)).T @ h.square() / p.shape[0]
    torch.testing.assert_close(exact, closed, rtol=1e-4, atol=1e-10)
    assert not head.requires_grad


def test_ggn_mc_metric_converges_to_the_exact_ggn_diagonal(llama, kproj):
    spec, ids, exact = kproj
    before = _weights(llama.model)
    errs = {}
    for samples in (4, 256):
        cfg = MetricConfig(batch_size=1, probes=samples, hutchinson_output="diag", show_progress=False)
        est = METRICS["ggn_mc_diag"](llama.model, [spec], ids, cfg).scores[spec.name]
        assert (est >= 0).all()  # a sum of squares: never negative, unlike Hutchinson
        errs[samples] = float((est - exact["ggn"]).norm() / exact["ggn"].norm())
    # Monte-Carlo: the error falls as 1/sqrt(samples) (x8 from 4 to 256; allow sampling noise)
    assert errs[256] < 0.3 * errs[4] and errs[256] < 0.3, errs
    assert all(torch.equal(p, before[n]) for n, p in llama.model.named_parameters())
    assert all(not p.requires_grad and p.grad is None for p in llama.model.parameters())


def test_ggn_saliency_is_half_diag_times_w2_and_batches_are_token_weighted(llama):
    specs = llama.inventory[:2]
    ids = _ids(2, 12, seed=4)
    cfg = MetricConfig(batch_size=2, probes=3, seed=5, show_progress=False)
    sal = METRICS["ggn_mc_diag"](llama.model, specs, ids, cfg)
    diag = METRICS["ggn_mc_diag"](llama.model, specs, ids, MetricConfig(**{**cfg.__dict__, "hutchinson_output": "diag"}))
    for s in specs:
        w = llama.model.get_parameter(s.name).detach()
        torch.testing.assert_close(sal.scores[s.name], 0.5 * diag.scores[s.name] * w.square())
    assert "not diag(H)" in sal.extras["variant"]


def test_reliability_uses_the_probes_of_hutchinson_diag(llama):
    # one window: the mean of the stream-A products over P probes is hutchinson_diag with the same seed and P
    specs = llama.inventory[:3]
    ids = _ids(1, 10, seed=2)
    params = {s.name: llama.model.get_parameter(s.name) for s in specs}
    cfg = MetricConfig(batch_size=1, probes=3, seed=4, hutchinson_output="diag", show_progress=False)
    ref = METRICS["hutchinson_diag"](llama.model, specs, ids, cfg).scores
    with C._grads_on(params):
        probe = C.CurvatureProbe(llama.model, params, ids)
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in range(3):
            v = C.rademacher(params, torch.device("cpu"), 4, i)
            for n, hv in probe.hvp(v).items():
                acc[n] += hv * v[n] / 3
        probe.close()
    for n in params:
        torch.testing.assert_close(acc[n], ref[n], rtol=1e-4, atol=1e-9)


def test_reliability_reports_noise_and_the_ggn_is_less_noisy_on_tiny_llama(llama):
    before = _weights(llama.model)
    res = C.reliability(llama.model, llama.inventory, _ids(2, 16), probes=8, topk=10)
    curve = {(r["estimator"], r["probes"]): r for r in res["curve"]}
    assert sorted({p for _, p in curve}) == [1, 2, 4, 8]
    for r in res["curve"]:
        assert 0 <= r["jaccard_median"] <= 1 and not r["rel_error"] <= 0 and r["seconds_per_product"] > 0
    # the Monte-Carlo streams disagree by 1/sqrt(P): 8x the products, about sqrt(8) less disagreement
    g1, g8 = curve[("ggn_mc", 1)]["rel_error"], curve[("ggn_mc", 8)]["rel_error"]
    assert math.isfinite(g8) and (math.isnan(g1) or g8 < 0.6 * g1), (g1, g8)
    # at an equal number of products the GGN streams agree better than the Hutchinson streams (measured;
    # NaN: Hutchinson's streams are noise only, no signal norm is left to compare with)
    h8 = curve[("hutchinson", 8)]["rel_error"]
    assert math.isnan(h8) or g8 < h8, (g8, h8)
    for e in C.ESTIMATORS:
        s = res["summary"][e]
        assert s["probes"] == 8 and s["snr_topk_median"] > 0 and s["probes_needed_z2"] > 0
        r = C.resolution_at(s, 2)
        assert r["resolved"] == (r["z"] >= C.RESOLVE_Z)
        assert C.resolution_at(s, 4)["z"] == pytest.approx(r["z"] * math.sqrt(2))  # SE ~ 1/sqrt(P)
    assert all(torch.equal(p, before[n]) for n, p in llama.model.named_parameters())
    assert all(not p.requires_grad and p.grad is None for p in llama.model.parameters())
    # held out, Hutchinson's top-k on this random model does not stand clear of its median; the GGN's does more
    assert res["summary"]["ggn_mc"]["z_topk_vs_median"] > res["summary"]["hutchinson"]["z_topk_vs_median"]


def test_pure_noise_is_not_resolved_however_extreme_its_top_k():
    # streams of independent noise around a zero diagonal: the top-k chosen by A is judged by B, so z ~ 0
    w2 = {"m": torch.ones(50, 40)}
    sets = C._Sets({"m": torch.nn.Parameter(torch.zeros(50, 40))})
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        sets.add(i % 2, {"m": torch.randn(50, 40, generator=g)})
    s = C._snr(sets, w2, 20)
    assert abs(s["z_topk_vs_median"]) < 1.5 and s["matrices_resolved"] == 0.0
    # and a real signal (a planted top-20 of 6 sd) is resolved
    sets = C._Sets({"m": torch.nn.Parameter(torch.zeros(50, 40))})
    signal = torch.zeros(50, 40)
    signal.view(-1)[:20] = 6.0
    for i in range(16):
        sets.add(i % 2, {"m": signal + torch.randn(50, 40, generator=g)})
    s = C._snr(sets, w2, 20)
    assert s["z_topk_vs_median"] > 10 and s["matrices_resolved"] == 1.0 and s["probes_needed_z2"] < 1


def test_extrapolation_recovers_a_logit_log_law_and_refuses_a_flat_one():
    a, b = -3.0, 0.7  # logit(J) = a + b log P
    pts = [(p, 1 / (1 + math.exp(-(a + b * math.log(p))))) for p in (2, 4, 8, 16)]
    out = C.extrapolate(pts)
    want = math.exp((math.log(0.4 / 0.6) - a) / b)
    assert out["method"] == "logit-log fit" and out["probes"] == pytest.approx(want, rel=1e-6)
    assert out["r2"] == pytest.approx(1.0)
    assert C.extrapolate([(2, 0.1), (4, 0.1), (8, 0.09)])["probes"] == math.inf
    # SmolLM2's Hutchinson curve (P = 1..64): it grows, but only a ~1e25-probe fit reaches 0.4
    flat = C.extrapolate([(1, 0.093), (2, 0.099), (4, 0.099), (8, 0.099), (16, 0.105), (32, 0.105), (64, 0.105)])
    assert flat["probes"] == math.inf and flat["fit_probes"] > C.MAX_EXTRAPOLATION * 64
    assert flat["method"].startswith("not estimable") and "64" in flat["method"]
    reached = C.extrapolate([(2, 0.1), (4, 0.45), (8, 0.6)])
    assert reached["probes"] == 4 and reached["method"] == "measured"
    assert "not estimable" in C.extrapolate([(2, 0.0)])["method"]
    two = C.extrapolate([(1, 0.17), (2, 0.27)])  # smoke's two points: a line through them tests nothing
    assert two["probes"] is None and "needs >= 3" in two["method"]


def test_diag_pp_beats_hutchinson_at_equal_products_on_a_low_rank_dominated_matrix():
    g = torch.Generator().manual_seed(0)
    n = 300
    u = torch.randn(n, 4, generator=g, dtype=torch.float64)
    a = u @ torch.diag(torch.tensor([50.0, 30.0, 20.0, 10.0], dtype=torch.float64)) @ u.T \
        + torch.diag(torch.rand(n, generator=g, dtype=torch.float64))
    exact = a.diagonal()
    err = {name: [] for name in ("pp", "hutch")}
    for rep in range(5):
        gen = torch.Generator().manual_seed(rep)
        err["pp"].append(float((C.diag_pp(lambda x: a @ x, n, 30, gen) - exact).norm() / exact.norm()))
        err["hutch"].append(float((C.hutchinson_flat(lambda x: a @ x, n, 30, gen) - exact).norm() / exact.norm()))
    assert max(err["pp"]) < 0.1 * min(err["hutch"]), err


def test_diag_pp_is_exact_for_a_matrix_of_rank_below_its_sketch():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(50, 3, generator=g, dtype=torch.float64)
    a = u @ u.T
    est = C.diag_pp(lambda x: a @ x, 50, 15, torch.Generator().manual_seed(2))
    torch.testing.assert_close(est, a.diagonal(), rtol=1e-8, atol=1e-10)


def test_bad_inputs_say_what_is_accepted(llama):
    with pytest.raises(EsaError, match="accepted: hutchinson, ggn_mc"):
        C.reliability(llama.model, llama.inventory, _ids(), 4, estimators=["fisher"])
    with pytest.raises(EsaError, match="at least 1 probe"):
        C.reliability(llama.model, llama.inventory, _ids(), 0)
    with pytest.raises(EsaError, match="at least 1 sampled"):
        METRICS["ggn_mc_diag"](llama.model, llama.inventory, _ids(), MetricConfig(probes=0))
    with pytest.raises(EsaError, match="at least 3 products"):
        C.diag_pp(lambda x: x, 10, 2, torch.Generator())


def test_adding_ggn_mc_leaves_the_existing_cache_keys_as_they_were():
    cfg = MetricConfig()
    assert METRICS["grad_x_weight"].key(cfg) == {"batch_size": 4, "per_batch": False}
    assert METRICS["grad_squared"].key(cfg) == {"batch_size": 4, "times_w2": False}
    assert METRICS["act_mag"].key(cfg) == {}
    assert METRICS["hutchinson_diag"].key(cfg) == {"probes": 2, "probe_seed": 0, "output": "saliency"}
    assert METRICS["ggn_mc_diag"].fold is None and not METRICS["ggn_mc_diag"].double_backward


def test_two_stream_error_estimates_the_error_against_the_truth_without_an_oracle():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(200, 100, generator=g)
    sets = C._Sets({"m": torch.nn.Parameter(torch.zeros(200, 100))})
    for i in range(8):
        sets.add(i % 2, {"m": d + 0.5 * torch.randn(200, 100, generator=g)})
    out = C._compare(sets, {"m": torch.ones(200, 100)}, 50)
    true = float((sets.sum[0]["m"] / 4 - d).norm() / d.norm())  # one stream of 4 products: 0.5 / sqrt(4)
    assert out["rel_error"] == pytest.approx(true, rel=0.05) and out["rel_error"] == pytest.approx(0.25, rel=0.05)


def test_tables_say_why_a_relative_error_is_missing():
    row = {"estimator": "hutchinson", "probes": 1, "jaccard_median": 0.1, "jaccard_mean": 0.1, "jaccard_q10": 0.05,
           "rel_error": math.nan, "seconds_per_product": 1.0}
    summ = {"probes": 1, "snr_topk_median": 0.6, "snr_median_weight": 0.6, "z_topk_vs_median": 0.0, "z_se": 0.1,
            "probes_needed_z2": math.inf, "matrices_resolved": 0.0,
            "jaccard_target": {"probes": None, "method": "not estimable: < 2 usable points"}, "seconds_per_product": 1.0}
    rel = {"curve": [row, {**row, "probes": 2, "rel_error": 3.0}], "summary": {"hutchinson": summ},
           "windows": 2, "seqlen": 128, "topk": 100}
    curve, summary = C.tables(rel)
    assert curve["note"].tolist() == ["rel_error not estimable: noise exceeds the signal estimate", ""]
    assert summary["z_se"].tolist() == [0.1]
    line = C.summary_lines(rel, None)[0]
    assert "not estimable: < 2 usable points" in line and "not estimable (z within 2" in line


def test_a_recorded_measurement_is_read_with_its_provenance_and_garbage_is_not(tmp_path):
    assert C.read_record(tmp_path, "smollm2-135m") is None
    assert "make curvature-reliability" in C.record_lines(None, "smollm2-135m")[0]
    C.record_path(tmp_path, "bad").write_text("{not json")
    assert C.read_record(tmp_path, "bad") is None
    row = {"estimator": "hutchinson", "probes": 1, "jaccard_median": 0.093, "jaccard_mean": 0.1, "jaccard_q10": 0.05,
           "rel_error": 8.5, "seconds_per_product": 4.4}
    summ = {"probes": 2, "snr_topk_median": 0.6, "snr_median_weight": 0.6, "z_topk_vs_median": 0.02,
            "probes_needed_z2": math.inf, "matrices_resolved": 0.0,
            "jaccard_target": {"probes": math.inf, "method": "not estimable: flat"}, "seconds_per_product": 4.4}
    rec = {"curve": [row, {**row, "probes": 2, "jaccard_median": 0.099}], "summary": {"hutchinson": summ},
           "windows": 2, "seqlen": 128, "topk": 100, "corpus": "shakespeare", "complete": False}
    C.record_path(tmp_path, "m").write_text(json.dumps(rec))
    got = C.read_record(tmp_path, "m")
    lines = C.record_lines(got, "m")
    assert "up to 2 products per stream" in lines[0] and "partial" in lines[0]
    assert "1: 0.093, 2: 0.099" in lines[1] and "z within 2" in lines[2]
