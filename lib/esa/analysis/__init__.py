"""Phase 4 analysis: scaling of sensitivity with model size (`scaling`), architecture comparison (`architecture`)."""

from esa.analysis import architecture, scaling
from esa.analysis.architecture import combine_topk, compare_architectures
from esa.analysis.scaling import PowerLawFit, fit_power_law, scaling_fits, segmented_fit

__all__ = ["PowerLawFit", "architecture", "combine_topk", "compare_architectures", "fit_power_law", "scaling",
           "scaling_fits", "segmented_fit"]
