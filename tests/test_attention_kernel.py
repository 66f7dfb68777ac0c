"""Each pass picks its own attention kernel: models load with SDPA, and only the double backward runs SDPA's
math kernel. Eager and SDPA agree within fp32 rounding on the first-order passes (grad_x_weight, evaluation),
so loading SDPA changes memory, not results; the kernel a pass ran still enters its cache key."""

from __future__ import annotations

import pytest
import torch

from esa.data import Windows
from esa.evaluate import evaluate
from esa.models import load
from esa.recipes import Recipe
from esa.sensitivity import engine
from esa.sensitivity.metrics import METRICS, MetricConfig

CFG = MetricConfig(batch_size=2, probes=2, seed=3, show_progress=False)


def _windows(n: int = 4, seqlen: int = 48) -> Windows:
    ids = torch.randint(3, 259, (n, seqlen), generator=torch.Generator().manual_seed(5))
    return Windows(ids, "random", "calib", seqlen, False, "byt5", 100, tuple(range(n)))


@pytest.fixture(scope="module")
def pair():
    eager = load("tiny-llama", device="cpu", attn_implementation="eager")
    sdpa = load("tiny-llama", device="cpu", attn_implementation="sdpa")
    assert engine.attention_of(eager.model) == "eager" and engine.attention_of(sdpa.model) == "sdpa"
    return eager, sdpa


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference of two score maps relative to the largest score of its matrix."""
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)


def test_grad_x_weight_and_evaluation_agree_between_eager_and_sdpa(pair):
    eager, sdpa = pair
    w = _windows()
    ge = METRICS["grad_x_weight"](eager.model, eager.inventory, w.ids, CFG).scores
    gs = METRICS["grad_x_weight"](sdpa.model, sdpa.inventory, w.ids, CFG).scores
    rel = _close(ge, gs)
    assert 0 <= rel < 1e-5, rel  # fp32 rounding (the kernels sum in different orders), not a different result
    ee, es = evaluate(eager.model, w, show_progress=False), evaluate(sdpa.model, w, show_progress=False)
    assert abs(ee.log_ppl - es.log_ppl) < 1e-6 and ee.accuracy == es.accuracy


def test_hutchinson_runs_on_an_sdpa_model_through_the_math_kernel(pair):
    """The double backward needs a twice-differentiable kernel: SDPA's math kernel gives eager's estimate."""
    eager, sdpa = pair
    w = _windows(n=2, seqlen=32)
    he = METRICS["hutchinson_diag"](eager.model, eager.inventory, w.ids, CFG).scores
    hs = METRICS["hutchinson_diag"](sdpa.model, sdpa.inventory, w.ids, CFG).scores
    assert _close(he, hs) < 1e-4


def test_the_pass_kernel_enters_the_key_and_recipes_load_sdpa(pair):
    eager, sdpa = pair
    assert engine.pass_attention(sdpa.model, "grad_x_weight") == "sdpa"
    assert engine.pass_attention(sdpa.model, "hutchinson_diag") == "sdpa-math"
    assert engine.pass_attention(eager.model, "hutchinson_diag") == "eager"
    recipe = Recipe(metrics=("grad_x_weight", "hutchinson_diag"))  # a double-backward metric forces nothing
    assert engine.attention_of(recipe.load("tiny-llama").model) == "sdpa"
    assert engine.attention_of(recipe.load("tiny-llama", eager=True).model) == "eager"
