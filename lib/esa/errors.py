"""One exception type for every bad input, so callers (CLI, run_all, notebooks) can show it plainly."""

from __future__ import annotations

import errno
from collections.abc import Iterable

# failures of the machine, not of the code: a full disk or quota, a read-only file system, permissions
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class EsaError(ValueError):
    """A user-facing error: the message names the bad value and what is accepted."""


def unknown(kind: str, value: object, accepted: Iterable[object], hint: str = "") -> EsaError:
    """Build the standard 'unknown X' error listing the accepted values."""
    listed = ", ".join(sorted(str(a) for a in accepted))
    msg = f"unknown {kind} {value!r}; accepted: {listed}"
    return EsaError(f"{msg}. {hint}" if hint else msg)


def machine_failure(e: OSError) -> str | None:
    """One line for an OSError the machine caused (None: a bug, whose traceback must stay)."""
    if e.errno not in MACHINE_ERRNOS:
        return None
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
