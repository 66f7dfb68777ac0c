"""Why a sample is too small to be evidence: one signature for every phase's budget reason.

A phase knows its guide-sized sample (seeds, windows, trials, inputs, tokens) and what a run had; each
comparison of the two is a check `(falls_short, phrase)`. The reason is `lead` followed by the phrases of
the checks that fall short, or None when none does (the run is guide-sized). A PASS or FAIL resting on a
short sample is shown as machinery-only with this reason (esa.stats.verdicts.demote).
"""

from __future__ import annotations

from collections.abc import Iterable


def budget_reason(lead: str, checks: Iterable[tuple[bool, str]], sep: str = ", ") -> str | None:
    """`lead` + the phrases of the checks that fall short, joined by `sep`; None when none falls short."""
    short = [phrase for falls_short, phrase in checks if falls_short]
    return lead + sep.join(short) if short else None
