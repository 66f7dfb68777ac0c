"""Measure the peak memory a pass allocates on the CPU, at the allocator (not the process's resident memory).

torch's profiler with `profile_memory=True` records every allocation and free of the CPU allocator, each with
the allocator's running total (`total_allocated`); the peak of that total over the pass, less the total before
its first event, is what the pass added at its worst moment: the number `esa.memory.estimate(...).need(...)`
predicts for a loaded model. Resident memory would count freed pages the allocator keeps, the interpreter and
every library, so it cannot check a formula. GPU runs read the same quantity from
`torch.cuda.max_memory_allocated` (tests/bench/gpu_check.py).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


@dataclass
class Peak:
    peak: int  # bytes above the start, at the pass's worst moment
    end: int  # bytes still held above the start when it returned (its results)
    events: int  # allocations and frees recorded

    def as_dict(self) -> dict[str, int]:
        return {"peak": self.peak, "end": self.end, "events": self.events}


def measure(fn: Callable[[], Any]) -> tuple[Peak, Any]:
    """(the peak of CPU allocator memory `fn` adds, fn's return value). The return value is kept alive until
    the measurement ends, so what it holds counts, as it does for the caller."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    if not events:
        return Peak(0, 0, 0), out
    events.sort(key=lambda e: e[0])
    base = events[0][2] - events[0][1]  # the allocator's total just before the first event
    return Peak(max(e[2] for e in events) - base, events[-1][2] - base, len(events)), out
