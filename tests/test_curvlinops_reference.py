"""Our curvature diagonals against curvlinops-for-pytorch, an independent implementation (test-only dependency,
installed by `make env` without its dependencies so that it cannot change the torch build).

On one 2048-weight matrix of tiny-llama: the exact diag(H) and diag(GGN) of our oracle equal curvlinops'
Hessian and GGN operators applied to the identity, and our Hutchinson estimate with P probes is as far from the
exact diagonal as curvlinops' own Hutchinson estimate with the same P (both are unbiased with the same variance).
"""

from __future__ import annotations

import os

import pytest
import torch

from esa.models import load
from esa.sensitivity import curvature as C
from esa.sensitivity.metrics import METRICS, MetricConfig

if os.environ.get("CI"):  # CI installs it with `make env`: missing there is a failure, not a skip
    import curvlinops
else:
    curvlinops = pytest.importorskip("curvlinops", reason="make env installs curvlinops-for-pytorch (test only)")


@pytest.fixture(scope="module")
def setup():
    lm = load("tiny-llama", device="cpu")
    # the last block's down_proj (32 x 64): curvlinops' Hessian products run forward-mode AD over the backward
    # pass, which torch lacks for SiLU's backward, and no SiLU lies downstream of this matrix
    spec = next(s for s in lm.inventory if s.layer == 1 and s.component == "down")
    ids = torch.randint(3, 259, (1, 8), generator=torch.Generator().manual_seed(0))
    param = lm.model.get_parameter(spec.name)
    ours = C.exact_diagonals(lm.model, {spec.name: param}, ids)[spec.name]
    return lm, spec, ids, param, ours


class _NextTokenLogits(torch.nn.Module):
    """The causal LM as curvlinops wants it: a module from token ids to one row of logits per predicted token."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(input_ids=x, use_cache=False).logits[:, :-1].float()
        return logits.reshape(-1, logits.shape[-1])


def _operator(kind, lm, param, ids):
    model_func = _NextTokenLogits(lm.model)
    data = [(ids, ids[:, 1:].reshape(-1))]
    op = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator}[kind]
    return op(model_func, torch.nn.CrossEntropyLoss(), [param], data, check_deterministic=False,
              batch_size_fn=lambda x: x.shape[0] * (x.shape[1] - 1))


def _with_grad(param, fn):
    before = param.requires_grad
    param.requires_grad_(True)
    try:
        return fn()
    finally:
        param.requires_grad_(before)
        param.grad = None


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_exact_diagonal_equals_curvlinops_operator(setup, kind):
    lm, spec, ids, param, ours = setup
    n = param.numel()
    dense = _with_grad(param, lambda: _operator(kind, lm, param, ids) @ torch.eye(n))
    theirs = torch.diagonal(dense).reshape(param.shape)
    torch.testing.assert_close(ours[kind], theirs, rtol=1e-4, atol=1e-7)
    assert float(ours[kind].abs().max()) > 0


def test_hutchinson_error_matches_curvlinops_at_equal_probes(setup):
    lm, spec, ids, param, ours = setup
    exact = ours["hessian"].reshape(-1)
    rel = {"ours": [], "curvlinops": []}
    probes = 16
    for seed in range(6):  # the error of one estimate is itself noisy: compare medians over repeats
        cfg = MetricConfig(batch_size=1, probes=probes, seed=seed, hutchinson_output="diag", show_progress=False)
        est = METRICS["hutchinson_diag"](lm.model, [spec], ids, cfg).scores[spec.name].reshape(-1)
        rel["ours"].append(float((est - exact).norm() / exact.norm()))
        torch.manual_seed(seed)
        theirs = _with_grad(param, lambda: curvlinops.hutchinson_diag(_operator("hessian", lm, param, ids), probes))
        rel["curvlinops"].append(float((theirs.reshape(-1) - exact).norm() / exact.norm()))
    med = {k: float(torch.tensor(v).median()) for k, v in rel.items()}
    print("median relative L2 error at", probes, "probes:", med)
    assert 0.6 < med["ours"] / med["curvlinops"] < 1.6, med
    assert param.grad is None
