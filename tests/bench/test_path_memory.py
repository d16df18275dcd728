"""The CPU paths' memory models against the peak `attnbench run` measures (VmHWM above the
resident set before the call), at DiT-Ti/2's attention shapes at 1024 px."""

from __future__ import annotations

import pytest
import torch

from attnbench import attention
from attnbench.bench.memory import cpu_meter_reason, peak_memory

SHAPE = (1, 3, 64 * 64, 64)  # DiT-Ti/2 at 1024 px: 3 heads × 64, 4,096 tokens
GRID = (64, 64)
PATHS = [("lit", {}, "chunked"), ("clear", {"radius": 16.0}, "halo"), ("sla", {}, "batched")]

pytestmark = pytest.mark.skipif(cpu_meter_reason() is not None,
                                reason="no /proc peak-RSS reset here")


@pytest.fixture(scope="module")
def one_thread():
    """One thread: the peak of a path, not of the allocator's per-thread arenas."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _measured(name: str, options: dict, impl: str) -> tuple[int, float]:
    """``(measured peak, output + modelled workspace)`` of one inference call (after a
    warm-up that builds the cached indices, as a benchmark's timed calls find them)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    backend = attention.get(name)
    opts = backend.resolve(backend.attend_options(options))
    with torch.inference_mode():
        def call():
            return backend.attend(q, k, v, grid=GRID, impl=impl, **opts)

        call()
        peak = min(peak_memory(call, "cpu").peak_bytes for _ in range(3))
    model = backend.memory(*SHAPE, grid=GRID, element_size=4, impl=impl, **opts)
    return peak, q.numel() * q.element_size() + model.workspace


@pytest.mark.parametrize("name, options, impl", PATHS, ids=[p[2] for p in PATHS])
def test_memory_model_predicts_the_measured_peak(name, options, impl, one_thread):
    """The model (output + workspace) is within 2× of the measured peak either way, and
    the peak within 2× softmax SDPA's measured the same way."""
    peak, predicted = _measured(name, options, impl)
    softmax, _ = _measured("softmax", {}, "sdpa")
    assert predicted / 2 <= peak <= 2 * predicted, (peak, predicted)
    assert peak <= 2 * softmax, (peak, softmax)
