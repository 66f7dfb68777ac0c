"""Sensitivity analysis: metrics (registry `METRICS`), top-k selection, super weights, the caching engine."""

from esa.sensitivity.metrics import METRICS, MetricConfig, MetricResult, get_metric
from esa.sensitivity.select import MODES, bottom_k, magnitude_scores, select_topk

__all__ = ["METRICS", "MODES", "MetricConfig", "MetricResult", "bottom_k", "get_metric", "magnitude_scores",
           "select_topk"]
