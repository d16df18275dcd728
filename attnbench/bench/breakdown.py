"""Where one call's time goes: the named stages a path marks with ``record_function``.

A path marks its stages with ``torch.profiler.record_function("<path>.<stage>")`` (CLEAR
halo: ``halo.mask``, ``halo.gather``, ``halo.sdpa``, ``halo.scatter``; SLA batched:
``sla.state``, ``sla.gather``, ``sla.sdpa``, ``sla.linear``; LiT chunked:
``lit.state``, ``lit.readout``). Outside a profiler those ranges cost a dispatcher
call each and time nothing; :func:`stage_times` runs a few calls under
``torch.profiler`` and sums each stage's wall time per call. What no stage covers
(the selection, allocating the output, Python between the torch calls) is ``other``.
The profiler slows each call a little, so the shares, not the absolute times, are the
reading.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

#: what separates a path's name from its stage's in a range name
SEPARATOR = "."
#: the profiled calls averaged (after one call outside the profiler)
CALLS = 3


def _stage(name: str) -> bool:
    head, sep, tail = name.partition(SEPARATOR)
    return bool(sep) and head.isidentifier() and tail.isidentifier()


def stage_times(fn: Callable[[], Any], calls: int = CALLS) -> dict[str, float]:
    """Seconds per call of each stage ``fn`` marks, and ``other`` (the call's wall time
    outside them); ``{}`` when ``fn`` marks none."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - start
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU and _stage(event.name):
            span = event.time_range
            totals[event.name] = totals.get(event.name, 0.0) + (span.end - span.start) / 1e6
    if not totals:
        return {}
    stages = {name: total / calls for name, total in sorted(totals.items())}
    stages["other"] = max(0.0, wall / calls - sum(stages.values()))
    return stages
