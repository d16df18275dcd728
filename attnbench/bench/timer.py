"""Timing with a stated protocol: warm-up and repetitions by time budget, synchronised.

The protocol of ``triton.testing.do_bench``, for CUDA and CPU alike:

1. one call (compilation, caches, lazy init) -- never timed;
2. an estimate of the cost of a call from a few synchronised calls;
3. warm-up for ``warmup_s``;
4. ``reps`` = ``budget_s`` / estimate, clamped to ``[min_reps, max_reps]``;
   each repetition is timed alone: on CUDA by device events around the call
   with the L2 cache flushed (a buffer larger than L2 is zeroed) before it,
   outside the timed region; on CPU by ``perf_counter`` around the call.
5. median, p20 and p80 over the repetitions.

``min_reps`` is for fast calls. With ``limit_s`` (what the whole measurement may
take), a call too slow for the protocol above to fit in it skips the second
estimate and the warm-up and takes as many repetitions as fit in the limit, down
to one: its first timed call is then the estimate and a repetition, and ``reps``
says how many there were.

Nothing is timed without synchronising the device first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: bytes zeroed before every CUDA repetition: more than the L2 of any current GPU (H100: 50 MB)
L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``reps`` repetitions, and how they were taken."""

    median: float
    p20: float
    p80: float
    mean: float
    min: float
    reps: int
    warmup_s: float
    timer: str  # "cuda_events" or "perf_counter"
    l2_flush: bool


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without numpy."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class _L2Flusher:
    """Evicts the GPU L2 cache between repetitions so each one starts cold."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.buffer = None
        if enabled and device.type == "cuda":
            self.buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def _timed_call(fn: Callable[[], Any], device: torch.device, flush: _L2Flusher) -> float:
    """Seconds of one synchronised call of ``fn`` (flush outside the timed region)."""
    flush()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure(
    fn: Callable[[], Any],
    device: torch.device | str = "cpu",
    *,
    budget_s: float = 1.0,
    warmup_s: float = 0.1,
    min_reps: int = 3,
    max_reps: int = 1000,
    flush_l2: bool = True,
    limit_s: float | None = None,
) -> Timing:
    """Time ``fn()`` by the protocol in the module docstring."""
    device = torch.device(device)
    flush = _L2Flusher(device, flush_l2)
    fn()  # first call: compilation, allocator and cache warm-up
    synchronize(device)

    first = _timed_call(fn, device, flush)
    if limit_s is not None and first * (min_reps + 2) + warmup_s > limit_s:
        return _slow(fn, device, flush, first, min_reps, limit_s)
    estimate = min(first, _timed_call(fn, device, flush))
    warm_until = time.perf_counter() + warmup_s
    while time.perf_counter() < warm_until:
        fn()
    synchronize(device)

    reps = int(budget_s / max(estimate, 1e-9))
    reps = max(min_reps, min(max_reps, reps))
    times = [_timed_call(fn, device, flush) for _ in range(reps)]
    return _timing(times, warmup_s, device, flush)


def _slow(fn: Callable[[], Any], device: torch.device, flush: _L2Flusher, first: float,
          min_reps: int, limit_s: float) -> Timing:
    """Repetitions of a call too slow for ``min_reps`` in ``limit_s``: the first timed call
    and as many more as fit (at most ``min_reps`` in all), without warm-up."""
    times = [first]
    while len(times) < min_reps and sum(times) + max(times) <= limit_s:
        times.append(_timed_call(fn, device, flush))
    return _timing(times, 0.0, device, flush)


def _timing(times: list[float], warmup_s: float, device: torch.device,
            flush: _L2Flusher) -> Timing:
    return Timing(
        median=statistics.median(times),
        p20=quantile(times, 0.2),
        p80=quantile(times, 0.8),
        mean=statistics.fmean(times),
        min=min(times),
        reps=len(times),
        warmup_s=warmup_s,
        timer="cuda_events" if device.type == "cuda" else "perf_counter",
        l2_flush=flush.buffer is not None,
    )
