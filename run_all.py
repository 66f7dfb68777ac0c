#!/usr/bin/env python
"""Run the research schedule headlessly: `python run_all.py --profile smoke` (see --help).

A thin driver: all logic lives in esa.runner (schedule, up-to-date checks, papermill, executors) and
esa.runner.index (reports/<run>/index.html).
"""

from __future__ import annotations

import sys

from esa.runner.cli import main

if __name__ == "__main__":
    sys.exit(main())
