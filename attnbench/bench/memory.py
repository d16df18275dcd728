"""Peak memory of one call, above what was held before it.

* CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated``
  minus the allocation before the call (the caching allocator's view: what
  tensors needed, not what the driver reserved).
* CPU: the process's peak resident set. Writing ``5`` to ``/proc/self/clear_refs``
  resets ``VmHWM`` (the high-water mark) to the current RSS; after the call,
  ``VmHWM`` minus that baseline is the call's peak. Linux only; elsewhere the
  meter says why it cannot measure. For RSS to follow tensors, freed memory
  that glibc parks in its heap is handed back to the kernel (``malloc_trim(0)``,
  which also drops free chunks inside the heap) right before the call, so the
  call's own allocations fault their pages in again and show in ``VmHWM``. The
  allocator is otherwise left alone: timings are unaffected. Resolution: a few
  hundred KiB (the kernel batches RSS counters per thread).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .timer import synchronize


@dataclass(frozen=True)
class PeakMemory:
    """``peak_bytes`` above ``baseline_bytes`` during one call, and the meter that saw it."""

    peak_bytes: int | None
    baseline_bytes: int | None
    meter: str
    reason: str | None = None


@functools.cache
def _libc():
    """glibc through ctypes, or ``None`` elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc has it, other libcs may not
        return libc
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def cpu_meter_reason() -> str | None:
    """``None`` when the CPU meter works here, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        _status_kib("VmHWM")
    except OSError as err:
        return f"no /proc peak-RSS reset on this system ({err})"
    return None


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> PeakMemory:
    """Run ``fn()`` once and return its peak memory above the baseline."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return PeakMemory(peak - baseline, baseline, "cuda_max_memory_allocated")
    if device.type != "cpu":
        return PeakMemory(None, None, "none", f"no memory meter for device {device.type}")
    reason = cpu_meter_reason()
    if reason:
        return PeakMemory(None, None, "none", reason)
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    baseline = _status_kib("VmHWM") * 1024
    fn()
    peak = _status_kib("VmHWM") * 1024
    # RSS counters lag by a few pages per thread: a call below that resolution reads as 0.
    return PeakMemory(max(0, peak - baseline), baseline, "proc_vmhwm")


def free_memory(device: torch.device | str = "cpu") -> int:
    """Bytes a new allocation can count on: free device memory, or MemAvailable on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
