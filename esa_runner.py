#!/usr/bin/env python
"""The research guide's `python esa_runner.py ...` lines, pasted verbatim: the same command as `esa-runner`."""

from __future__ import annotations

import sys

from esa.cli import main

if __name__ == "__main__":
    sys.exit(main())
