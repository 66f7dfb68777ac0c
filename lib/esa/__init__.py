"""critical-weights: extreme-sensitivity analysis (ESA) of transformer language models.

The package is importable without Jupyter, papermill or seaborn; notebooks and the `esa-runner`
command line are thin layers over it.
"""

from __future__ import annotations

__version__ = "0.1.0"
