"""One exception type for every bad input, so callers (CLI, run_all, notebooks) can show it plainly."""

from __future__ import annotations

from collections.abc import Iterable


class EsaError(ValueError):
    """A user-facing error: the message names the bad value and what is accepted."""


def unknown(kind: str, value: object, accepted: Iterable[object], hint: str = "") -> EsaError:
    """Build the standard 'unknown X' error listing the accepted values."""
    listed = ", ".join(sorted(str(a) for a in accepted))
    msg = f"unknown {kind} {value!r}; accepted: {listed}"
    return EsaError(f"{msg}. {hint}" if hint else msg)
