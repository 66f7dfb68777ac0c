"""Progress bars that behave in a terminal, in a notebook and in a headless papermill run."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# A runner-executed kernel has no one watching it: every library's own progress switch off (ours, tqdm's
# environment default, huggingface_hub's and with it transformers' "Loading weights" bars), and its logs
# and warnings go to the file named by LOG_ENV (esa.nb.headless_kernel, esa.runner.notebook).
QUIET_ENV = {"ESA_PROGRESS": "0", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
LOG_ENV = "ESA_NOTEBOOK_LOG"
# run_all --jobs N on a CPU machine names a file holding how many threads each running notebook may use now
# (the cores over the notebooks running); kernels follow it from their loops, so the last notebook still
# running gets every core. Thread counts change wall time only (tests/test_models.py checks bit-identity).
CPU_SHARE_ENV = "ESA_CPU_SHARE"
_share_read_at = [0.0]


def quiet() -> None:
    """Every progress bar off in this process, including transformers' "Loading weights" bar when
    transformers was imported before the environment switches were set (the CLI's --quiet)."""
    os.environ.update(QUIET_ENV)
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        return
    tlog.disable_progress_bar()


def follow_cpu_share(interval_s: float = 1.0) -> None:
    """Set torch's intra-op threads to the runner's current share (read at most once per `interval_s`)."""
    path = os.environ.get(CPU_SHARE_ENV)
    now = time.monotonic()
    if not path or now - _share_read_at[0] < interval_s:
        return
    _share_read_at[0] = now
    try:
        threads = int(Path(path).read_text().strip())
    except (OSError, ValueError):  # not written yet, or the run is over
        return
    torch = sys.modules.get("torch")  # never import torch for this
    if torch is not None and threads >= 1 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _following_share(it: Iterable[T]) -> Iterator[T]:
    for item in it:
        follow_cpu_share()
        yield item


def progress(it: Iterable[T], desc: str = "", disable: bool = False, **kw: Any) -> Iterable[T]:
    """tqdm over `it`; ESA_PROGRESS=0 switches every bar off (tests, CI logs, runner kernels)."""
    if not (disable or os.environ.get("ESA_PROGRESS", "1") == "0"):
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, leave=False, mininterval=2.0, **kw)
    return _following_share(it) if os.environ.get(CPU_SHARE_ENV) else it
