"""Sensitivity metrics on tiny models where the right answer is known."""

from __future__ import annotations

import pytest
import torch

from esa.errors import EsaError
from esa.models import load
from esa.sensitivity.metrics import METRICS, MetricConfig, batch_loss, get_metric
from esa.sensitivity.select import select_topk

CFG = MetricConfig(batch_size=2, show_progress=False)


def _ids(n=4, t=24, seed=0):
    return torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return load("tiny-llama", device="cpu")


def _full_grad(model, name, ids):
    p = model.get_parameter(name)
    p.requires_grad_(True)
    try:
        loss = batch_loss(model, ids)
        (g,) = torch.autograd.grad(loss, [p])
    finally:
        p.requires_grad_(False)
    return g


def test_grad_x_weight_is_weight_times_gradient_of_mean_loss(llama):
    ids = _ids(4)
    res = METRICS["grad_x_weight"](llama.model, llama.inventory, ids, CFG)  # two micro-batches of 2
    for spec in llama.inventory[:3]:
        g = _full_grad(llama.model, spec.name, ids)  # one batch of 4 = mean loss over all tokens
        expect = (llama.model.get_parameter(spec.name) * g).abs()
        torch.testing.assert_close(res.scores[spec.name], expect, rtol=1e-4, atol=1e-9)
    assert all(not p.requires_grad and p.grad is None for p in llama.model.parameters())


def test_grad_squared_is_mean_of_batch_gradients_squared(llama):
    ids = _ids(4)
    res = METRICS["grad_squared"](llama.model, llama.inventory, ids, CFG)
    spec = llama.inventory[0]
    g1, g2 = _full_grad(llama.model, spec.name, ids[:2]), _full_grad(llama.model, spec.name, ids[2:])
    torch.testing.assert_close(res.scores[spec.name], 0.5 * (g1**2 + g2**2), rtol=1e-4, atol=1e-12)


def test_hutchinson_converges_to_exact_hessian_diagonal(llama):
    # one small matrix (layer-1 k_proj, 16 x 32 = 512 weights) and one short window: exact diag is cheap
    spec = next(s for s in llama.inventory if s.layer == 1 and s.component == "k")
    ids = _ids(1, 8)
    p = llama.model.get_parameter(spec.name)
    p.requires_grad_(True)
    try:  # exact Hessian: row i is the gradient of g_i
        (g,) = torch.autograd.grad(batch_loss(llama.model, ids), [p], create_graph=True)
        flat_g = g.reshape(-1)
        hess = torch.stack([torch.autograd.grad(flat_g[i], p, retain_graph=True)[0].reshape(-1)
                            for i in range(p.numel())])  # (512, 512)
    finally:
        p.requires_grad_(False)
    exact = hess.diagonal()
    # Rademacher Hutchinson is unbiased; its squared error is sum_{i != j} H_ij^2 / probes in expectation
    off_sq = float(hess.square().sum() - exact.square().sum())
    errs, predicted, corr = {}, {}, {}
    for probes in (4, 64):
        cfg = MetricConfig(batch_size=1, probes=probes, hutchinson_output="diag", show_progress=False)
        res = METRICS["hutchinson_diag"](llama.model, [spec], ids, cfg)
        est = res.scores[spec.name].reshape(-1)
        errs[probes] = float((est - exact).norm() / exact.norm())
        predicted[probes] = (off_sq / probes) ** 0.5 / float(exact.norm())
        corr[probes] = float(torch.corrcoef(torch.stack([est, exact]))[0, 1])
    for probes in errs:  # the error is what the theory predicts (within sampling noise), so it converges
        assert 0.6 * predicted[probes] < errs[probes] < 1.5 * predicted[probes], (errs, predicted)
    assert errs[64] < 0.4 * errs[4], errs
    assert corr[64] > 0.6 and corr[64] > corr[4], corr
    assert res.extras["spread"]["probes"] == 64 and res.extras["spread"]["weight_rel_se_median"] > 0


def test_planted_critical_weight_ranks_first():
    # A random model predicts near-uniformly whatever its weights, so the loss barely reacts to anything;
    # a larger LM head (x5) makes the output sensitive, and one huge layer-0 up_proj weight then dominates it.
    lm = load("tiny-llama", device="cpu")
    spec = next(s for s in lm.inventory if s.layer == 0 and s.component == "up")
    w = lm.model.get_parameter(spec.name)
    ids = _ids(4, 32, seed=3)

    def logits_change(row: int, col: int) -> float:
        with torch.no_grad():
            before = lm.model(input_ids=ids).logits
            saved = w[row, col].clone()
            w[row, col] = 0.0
            after = lm.model(input_ids=ids).logits
            w[row, col] = saved
        return float((after - before).norm() / before.norm())

    with torch.no_grad():
        lm.model.lm_head.weight.mul_(5.0)
        w[5, 7] = 200.0 * w.abs().max()
    # removing the planted weight changes the output far more than removing other weights of its matrix
    others = [logits_change(r, c) for r, c in [(0, 0), (3, 9), (17, 20), (31, 31), (5, 8), (6, 7)]]
    assert logits_change(5, 7) > 0.3 and logits_change(5, 7) > 10 * max(others)
    for metric in ("grad_x_weight", "act_mag", "hutchinson_diag"):
        cfg = MetricConfig(batch_size=2, probes=4, show_progress=False)
        scores = get_metric(metric)(lm.model, lm.inventory, ids, cfg).scores
        top = select_topk(scores, lm.inventory, 1, "global")
        assert (top.loc[0, "param"], top.loc[0, "row"], top.loc[0, "col"]) == (spec.name, 5, 7), metric


def test_act_mag_experts_use_routed_tokens():
    lm = load("tiny-mixtral", device="cpu")
    specs = [s for s in lm.inventory if s.n_experts and s.layer == 0]
    experts = lm.model.get_submodule(specs[0].name.rpartition(".")[0])
    seen = {}
    h = experts.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].detach().reshape(-1, a[0].shape[-1])))
    ids = _ids(2, 16)
    res = METRICS["act_mag"](lm.model, specs, ids, MetricConfig(batch_size=2, show_progress=False))
    h.remove()
    gate_up = next(s for s in specs if s.component == "gate_up")
    w = lm.model.get_parameter(gate_up.name).detach()
    norm_sq = (res.scores[gate_up.name][:, 0, :] / w[:, 0, :].abs()) ** 2  # (E, H)
    total = (seen["x"] ** 2).sum(0)  # every token goes to exactly k=2 experts
    torch.testing.assert_close(norm_sq.sum(0), 2 * total, rtol=1e-3, atol=1e-5)
    down = next(s for s in specs if s.component == "down")
    assert torch.isfinite(res.scores[down.name]).all() and res.scores[down.name].sum() > 0


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gptneox", "tiny-qwen2"])
def test_act_mag_runs_the_lm_head_on_one_position_with_the_scores_of_a_full_forward(ref):
    lm = load(ref, device="cpu")
    ids = _ids(2, 16)
    head = lm.model.get_output_embeddings()
    positions = []
    h = head.register_forward_hook(lambda m, a, o: positions.append(a[0].shape[1]))
    try:
        res = METRICS["act_mag"](lm.model, lm.inventory, ids, MetricConfig(batch_size=2, show_progress=False))
    finally:
        h.remove()
    assert positions == [1]  # the last position only: act_mag needs no logits
    seen: dict[str, torch.Tensor] = {}  # reference: every studied weight's input over a full forward
    hooks = [lm.model.get_submodule(s.name.rpartition(".")[0]).register_forward_hook(
        lambda m, a, o, n=s.name: seen.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1])))
        for s in lm.inventory]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    for s in lm.inventory:
        ref_score = lm.model.get_parameter(s.name).detach().abs() * (seen[s.name] ** 2).sum(0).sqrt()
        torch.testing.assert_close(res.scores[s.name], ref_score, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ref", ["tiny-mixtral", "tiny-gptneox", "tiny-phi3"])
def test_every_metric_runs_on_every_architecture(ref):
    lm = load(ref, device="cpu")
    for name, fn in METRICS.items():
        res = fn(lm.model, lm.inventory, _ids(2, 16), MetricConfig(batch_size=1, probes=1, show_progress=False))
        assert set(res.scores) == {s.name for s in lm.inventory}
        for s in lm.inventory:
            assert res.scores[s.name].dtype == torch.float32 and res.scores[s.name].shape == s.shape, name


def test_bf16_model_accumulates_in_fp32():
    lm = load("tiny-llama", dtype="bfloat16", device="cpu")
    res = METRICS["grad_squared"](lm.model, lm.inventory, _ids(2, 16), CFG)
    assert all(t.dtype == torch.float32 for t in res.scores.values())
    assert all(torch.isfinite(t).all() for t in res.scores.values())


def test_unknown_metric_and_bad_probe_count(llama):
    with pytest.raises(EsaError, match="grad_x_weight"):
        get_metric("fisher")
    with pytest.raises(EsaError, match="probe"):
        METRICS["hutchinson_diag"](llama.model, llama.inventory, _ids(2), MetricConfig(probes=0))
    with pytest.raises(EsaError, match="no weights"):
        METRICS["grad_x_weight"](llama.model, [], _ids(2), CFG)


def test_hutchinson_in_parameter_groups_probes_each_group_on_its_own(llama):
    # Probing a subset of weights estimates those entries of diag(H) (the convergence test above probes one
    # matrix of the model and reaches the exact diagonal); groups are exactly such independent subsets.
    specs = [s for s in llama.inventory if s.layer == 1 and s.component in ("k", "v", "o")]
    ids = _ids(1, 12)
    cfg = MetricConfig(batch_size=1, probes=3, show_progress=False)
    grouped = METRICS["hutchinson_diag"](llama.model, specs, ids, MetricConfig(**{**cfg.__dict__, "hutchinson_groups": 2}))
    for chunk in (specs[0::2], specs[1::2]):
        alone = METRICS["hutchinson_diag"](llama.model, chunk, ids, cfg).scores
        for s in chunk:
            assert torch.equal(grouped.scores[s.name], alone[s.name])
    assert "2 parameter groups" in grouped.extras["variant"]


@pytest.mark.parametrize("n,bs,per_batch", [(4, 4, False), (5, 2, False), (5, 2, True)])
def test_grad_x_weight_is_bit_identical_to_zero_filled_accumulation(llama, n, bs, per_batch):
    # the accumulator is taken over from the first micro-batch's gradient (no zero-filled buffer): the scores
    # must equal, bit for bit, summing token-weighted batch gradients into zeros, and keep the weights' order
    from esa.sensitivity.metrics import fused_gradients

    ids = _ids(n, 16, seed=3)
    cfg = MetricConfig(batch_size=bs, per_batch=per_batch, show_progress=False)
    got = METRICS["grad_x_weight"](llama.model, llama.inventory, ids, cfg).scores
    both = fused_gradients(llama.model, llama.inventory, ids, {"grad_x_weight": cfg, "grad_squared": cfg})
    assert list(got) == [s.name for s in llama.inventory] == list(both["grad_x_weight"].scores)
    for s in llama.inventory:
        p = llama.model.get_parameter(s.name)
        ref = torch.zeros(p.shape)
        for start in range(0, n, bs):
            batch = ids[start : start + bs]
            g = _full_grad(llama.model, s.name, batch)
            w = batch.shape[0] / n
            ref.add_((p.detach() * g).abs_() if per_batch else g, alpha=w)
        if not per_batch:
            ref.mul_(p.detach()).abs_()
        assert torch.equal(got[s.name], ref), s.name
        assert torch.equal(both["grad_x_weight"].scores[s.name], ref), s.name
