"""Progress bars that behave in a terminal, in a notebook and in a headless papermill run."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

# A runner-executed kernel has no one watching it: every library's own progress switch off (ours, tqdm's
# environment default, huggingface_hub's and with it transformers' "Loading weights" bars), and its logs
# and warnings go to the file named by LOG_ENV (esa.nb.headless_kernel, esa.runner.notebook).
QUIET_ENV = {"ESA_PROGRESS": "0", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
LOG_ENV = "ESA_NOTEBOOK_LOG"


def progress(it: Iterable[T], desc: str = "", disable: bool = False, **kw: Any) -> Iterable[T]:
    """tqdm over `it`; ESA_PROGRESS=0 switches every bar off (tests, CI logs, runner kernels)."""
    if disable or os.environ.get("ESA_PROGRESS", "1") == "0":
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, mininterval=2.0, **kw)
