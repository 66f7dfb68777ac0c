"""critical-weights: extreme-sensitivity analysis (ESA) of transformer language models.

The package is importable without Jupyter, papermill or seaborn; notebooks and the `esa-runner`
command line are thin layers over it.
"""

from __future__ import annotations

import os

# MKL's strict conditional numerical reproducibility: on some CPUs (measured on an AVX-512/AMX Xeon) its
# sgemm splits reductions by thread count, so SmolLM2's gradients differed by 1e-5 (relative) between 1 and 2
# threads; the runner changes a kernel's thread count as notebooks start and finish (esa.runner.executors).
# Strict mode makes them bit-identical at no measured cost. Read by MKL at its first call; a user's value wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
