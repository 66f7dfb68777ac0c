"""A run's processes live and die together.

- `sigterm_as_interrupt()`: the runner treats SIGTERM (scheduler pre-emption, `timeout`, `kill`) like
  Ctrl-C: it raises `Terminated` (a KeyboardInterrupt) in the main thread, so the same clean-up runs:
  workers are stopped, their kernels follow, the run is marked interrupted and stays resumable.
- `die_with_parent(pid)`: a worker process asks the kernel to SIGKILL it when its parent dies (Linux
  `prctl(PR_SET_PDEATHSIG)`; elsewhere a watchdog thread polls the parent PID). A runner killed by
  SIGKILL, which no handler can catch, thus still takes its workers with it; each notebook kernel exits
  when its worker is gone (ipykernel polls its parent), so nothing keeps running in the run folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled like Ctrl-C (KeyboardInterrupt), reported as a termination."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While in the block, the first SIGTERM raises Terminated in the main thread; a second one kills.

    Outside the main thread (where Python cannot install handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # The clean-up that follows may itself hang (a stuck worker); a second SIGTERM then ends the
        # process at once, as a second Ctrl-C would. Workers die with it (die_with_parent).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def die_with_parent(parent_pid: int) -> str:
    """Make this process end when `parent_pid` (its parent) ends; returns the mechanism used."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            # The parent may have died before prctl took effect: then nobody would signal us.
            if os.getppid() != parent_pid:
                os._exit(1)
            return "prctl"
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="esa-parent-watch").start()
    return "watchdog"


def _watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGKILL)
