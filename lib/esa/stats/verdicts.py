"""A judged success criterion: the measured value, the threshold, the verdict and why.

Phases build `Criterion` rows from their results (never typed in); the report renders them. A criterion
that cannot be judged from what was run has `passed=None`, a `verdict` from VERDICTS saying which kind of
"not judged" it is, and the reason in `note`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

VERDICTS = ("PASS", "FAIL", "underpowered", "not estimable", "machinery-only")


@dataclass
class Criterion:
    id: str  # stable key, e.g. "P1.ppl_credible"
    phase: int
    text: str  # the guide's wording
    measured: Any  # the number (or short string) it was judged on
    threshold: str  # what passing means, e.g. "> 0.4"
    passed: bool | None  # None: could not be evaluated (see note)
    evidence: str  # where the numbers come from (table / figure / notebook)
    note: str = ""
    # PASS / FAIL follow `passed`; with passed=None give "underpowered" (too few seeds/windows/samples for the
    # threshold), "not estimable" (inf, NaN, a denominator within noise) or "machinery-only" (smoke budgets or
    # untrained models: the code ran, the number is not evidence). Left empty, it is derived from `passed`.
    verdict: str = ""
    face_value: str = ""  # after a demotion (`demote`): the PASS/FAIL the number alone would read

    def __post_init__(self) -> None:
        if not self.verdict:
            self.verdict = {True: "PASS", False: "FAIL", None: "not estimable"}[self.passed]
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r}; accepted: {', '.join(VERDICTS)}")
        if (self.verdict in ("PASS", "FAIL")) != (self.passed is not None):
            raise ValueError(f"verdict {self.verdict} does not match passed={self.passed}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        m = d["measured"]
        if isinstance(m, float) and not math.isfinite(m):
            d["measured"] = str(m)
        elif hasattr(m, "item"):
            d["measured"] = m.item()
        return d


def judge(value: float | None, op: str, threshold: float) -> bool | None:
    """Compare with `op` in {">", ">=", "<", "<="}; None when the value is missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return {">": value > threshold, ">=": value >= threshold, "<": value < threshold,
            "<=": value <= threshold}[op]


NOT_JUDGED = ("underpowered", "not estimable", "machinery-only")


def demote(c: Criterion, verdict: str, reason: str) -> Criterion:
    """`c` set to a not-judged `verdict` (passed=None) with `reason` leading its note; the measured value
    stays. A PASS/FAIL it had is named in the note, so the reader sees what the number alone would say."""
    if verdict not in NOT_JUDGED:
        raise ValueError(f"verdict {verdict!r}; accepted: {', '.join(NOT_JUDGED)}")
    return _relabel(c, verdict, None, reason)


def overrule(c: Criterion, reason: str) -> Criterion:
    """`c` judged FAIL for `reason` whatever its number reads (e.g. a metric whose ranking is noise held out),
    with the reason and the number's own reading leading its note, as `demote` writes them."""
    return _relabel(c, "FAIL", False, reason)


def _relabel(c: Criterion, verdict: str, passed: bool | None, reason: str) -> Criterion:
    was = (f" (the number alone reads {c.verdict})" if c.verdict in ("PASS", "FAIL") else
           f" (also {c.verdict})" if c.verdict != verdict else "")
    c.note = f"{reason}{was}" + (f". {c.note}" if c.note else "")
    if c.verdict in ("PASS", "FAIL"):
        c.face_value = c.verdict
    c.passed, c.verdict = passed, verdict
    return c


def verdict_of(row: dict[str, Any]) -> str:
    """The verdict of a stored row; rows written before verdicts existed derive it from `passed`."""
    v = row.get("verdict")
    if v in VERDICTS:
        return v
    return {True: "PASS", False: "FAIL"}.get(row.get("passed"), "not estimable")
