"""Pruning scorers: one registered object per scorer, lower score = pruned first.

A `Scorer` holds its scoring function, a one-line definition (printed in every table), what it reads
(`needs`), its default comparison group and calibration mode. `decide(job)` turns its scores into masks
with `sparsity_patterns.select`; adding a scorer is one `register(Scorer(...))` line.

- magnitude: |W_ij|; per matrix by default, as the magnitude baseline of the Wanda code.
- wanda: |W_ij| * ||X_j||_2 over calibration tokens (act_mag), compared within each output row as Wanda does.
- grad_x_weight: |w * g|, g the gradient of the mean calibration loss (esa.sensitivity.metrics).
- obd: mean_b g_b^2 * w^2, the optimal-brain-damage saliency from the empirical Fisher diagonal (grad_squared
  with times_w2: the quantity esa.sensitivity.metrics derives as `obd` from grad_squared, see metrics.OBD).
- hutchinson_diag: 0.5 * diag(H) * w^2 with diag(H) from Rademacher probes (signed: negative curvature
  and noise are pruned first).
- random: uniform scores drawn from (calibration seed, parameter name): the control.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from esa.apps.pruning.core import Decision, Job
from esa.apps.pruning.sparsity_patterns import GROUPS, select, select_global
from esa.errors import EsaError
from esa.models.inventory import WeightSpec
from esa.registry import Registry
from esa.sensitivity.metrics import MetricConfig, get_metric

ScoreFn = Callable[[Job], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Scorer:
    name: str
    definition: str
    fn: ScoreFn  # job -> {param: fp32 scores of the parameter's shape}
    needs: str  # "weights" | "inputs" | "gradients" (core.NEEDS)
    default_group: str = "row"
    groups: tuple[str, ...] = GROUPS
    # gradient scorers default to one dense pass: layer-sequential costs one forward+backward per block
    default_calibration: str = "sequential"
    metric: str = ""  # a gradient scorer's esa.sensitivity metric (its memory pass is what pruning plans)

    @property
    def scoring_pass(self) -> str:
        """esa.memory's pass of a gradient scorer's metric (gradient, hutchinson); '' for the others."""
        return get_metric(self.metric).memory_pass if self.metric else ""

    def score(self, job: Job) -> dict[str, torch.Tensor]:
        return job.scores if job.scores is not None else self.fn(job)

    def decide(self, job: Job) -> dict[str, Decision]:
        scores = self.score(job)
        if job.group == "global":
            order = [s.name for s in job.specs]
            masks = select_global(scores, order, job.sparsity[order[0]], job.protected)
            return {n: Decision(masks[n]) for n in order}
        # the scores were made for this decision (fresh tensors, or popped from a one-shot pass): spend them
        return {s.name: Decision(select(scores[s.name].view(s.rows, s.cols), job.pattern, job.group,
                                        job.sparsity[s.name], job.protected.get(s.name), inplace=True))
                for s in job.specs}


SCORERS: Registry[Scorer] = Registry("pruning scorer", base=Scorer)


def register(scorer: Scorer) -> Scorer:
    """Add a scorer (a name already taken is a registry.DuplicateEntry)."""
    return SCORERS.register(scorer)


# ---------------------------------------------------------------- scoring functions
def _magnitude(job: Job) -> dict[str, torch.Tensor]:
    return {s.name: job.params[s.name].detach().float().abs() for s in job.specs}


def _wanda(job: Job) -> dict[str, torch.Tensor]:
    out = {}
    for s in job.specs:
        st = job.stats.get(s.name)
        if st is None or st.sq is None:
            raise EsaError(f"wanda: no calibration input statistics for {s.name}")
        # (out, in) * (1, in): the act_mag definition of esa.sensitivity.metrics, exactly
        out[s.name] = job.params[s.name].detach().float().abs().mul_(st.sq.sqrt().unsqueeze(0))
    return out


def _random(job: Job) -> dict[str, torch.Tensor]:
    out = {}
    for s in job.specs:
        g = torch.Generator().manual_seed((job.spec.calib_seed * 1_000_003 + zlib.crc32(s.name.encode())) % (2**63))
        out[s.name] = torch.rand(s.shape, generator=g).to(job.params[s.name].device)
    return out


def metric_scores(model: torch.nn.Module, specs: list[WeightSpec], ids: torch.Tensor, metric: str,
                  cfg: MetricConfig) -> dict[str, torch.Tensor]:
    """The one call into esa.sensitivity.metrics (kept here alone so a change of that API is one edit)."""
    return get_metric(metric)(model, specs, ids, cfg).scores


def _gradient(metric: str, **cfg_fields: object) -> ScoreFn:
    def fn(job: Job) -> dict[str, torch.Tensor]:
        if job.model is None or job.ids is None:
            raise EsaError(f"{metric}: needs the model and calibration windows")
        fields = dict(cfg_fields)
        if metric == "hutchinson_diag":
            fields.update(probes=job.spec.probes, seed=job.spec.calib_seed)
        cfg = MetricConfig(batch_size=job.spec.batch_size, show_progress=False, **fields)  # type: ignore[arg-type]
        return metric_scores(job.model, job.specs, job.ids, metric, cfg)

    return fn


register(Scorer("magnitude", "|W_ij|", _magnitude, "weights", default_group="matrix"))
register(Scorer("wanda", "|W_ij| * ||X_j||_2 over calibration tokens (act_mag), per output row", _wanda, "inputs"))
def _gradient_scorer(name: str, definition: str, metric: str, **cfg_fields: object) -> Scorer:
    return Scorer(name, definition, _gradient(metric, **cfg_fields), "gradients", default_calibration="one-shot",
                  metric=metric)


register(_gradient_scorer("grad_x_weight", "|w * g|, g = gradient of the mean calibration loss", "grad_x_weight"))
register(_gradient_scorer("obd", "mean_b g_b^2 * w^2 (empirical Fisher diagonal x w^2, OBD saliency)",
                          "grad_squared", times_w2=True))
register(_gradient_scorer("hutchinson_diag", "0.5 * diag(H) * w^2, diag(H) from Rademacher probes (signed)",
                          "hutchinson_diag"))
register(Scorer("random", "uniform scores seeded by (calibration seed, parameter)", _random, "weights",
                default_group="matrix"))
