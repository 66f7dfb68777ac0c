"""Progress bars that behave in a terminal, in a notebook and in a headless papermill run."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def progress(it: Iterable[T], desc: str = "", disable: bool = False, **kw: Any) -> Iterable[T]:
    """tqdm over `it`; ESA_PROGRESS=0 switches every bar off (tests, CI logs)."""
    if disable or os.environ.get("ESA_PROGRESS", "1") == "0":
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, mininterval=2.0, **kw)
