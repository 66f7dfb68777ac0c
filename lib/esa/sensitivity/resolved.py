"""When a top-k counts as resolved: the one rule that the window resolution (`esa.sensitivity.resolution`) and the
probe resolution (`esa.sensitivity.curvature.resolution_at`) both apply.

A matrix's z is its top-k's median score above the matrix median, in standard errors of the sample that scored
it; a metric is resolved when the median z over the matrices measured is >= RESOLVE_Z. Kept apart from both
users so that neither imports the other's machinery (esa.sensitivity.metrics imports curvature).
"""

from __future__ import annotations

import math

import torch

RESOLVE_Z = 2.0  # resolved (every metric, curvature's probes too): the top-k's median stands >= 2 SE above the median
SIGN_TAIL = 0.0228  # the one-sided normal tail beyond 2 SE, for the sign test of median_z_and_needed


def median_z_and_needed(z_all: list[float], need_all: list[float]) -> tuple[float, float, float]:
    """(median z over matrices, its standard error, the median sample needed). The sample needed scales the
    measured z by 1/sqrt(sample); when the median z cannot be told from 0 there is no effect to scale (any number
    would come out), so it is inf: "not distinguishable from the median". Told from 0: the median z stands 2 of
    its standard errors above it, or more matrices have a positive z than chance allows (one-sided sign test at
    the 2-SE tail, 0.0228; matrices taken as independent, as the standard error also takes them). The sign test
    is for matrices of different kinds, whose z's differ by far more than their noise: act_mag on six of
    SmolLM2's (smoke) has a median z of 28 that the spread's standard error alone called indistinguishable."""
    z = torch.tensor(z_all, dtype=torch.float64)
    z_med = float(z.median())
    # standard error of a median: sqrt(pi / 2) x sd / sqrt(n), for roughly normal spreads; one matrix's z is
    # in its own standard errors, so its noise is about 1
    z_se = math.sqrt(math.pi / 2) * float(z.std()) / math.sqrt(len(z_all)) if len(z_all) > 1 else 1.0
    need = float(torch.tensor(need_all, dtype=torch.float64).median())
    m, k = len(z_all), int((z > 0).sum())
    sign_p = sum(math.comb(m, i) for i in range(k, m + 1)) / 2**m  # P(>= k of m positive | median 0)
    told = z_med > 2 * z_se or (z_med > 0 and sign_p < SIGN_TAIL)
    return z_med, z_se, (need if told else math.inf)
