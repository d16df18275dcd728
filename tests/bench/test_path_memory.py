"""The CPU paths' memory models against the peak `attnbench run` measures (VmHWM above the
resident set before the call), at DiT-Ti/2's attention shapes at 1024 px."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnbench import attention
from attnbench.bench.memory import cpu_meter_reason, peak_memory

SHAPE = (1, 3, 64 * 64, 64)  # DiT-Ti/2 at 1024 px: 3 heads × 64, 4,096 tokens
GRID = (64, 64)
ROOT = Path(__file__).resolve().parents[2]
PATHS = [("lit", {}, "chunked"), ("clear", {"radius": 16.0}, "halo"), ("sla", {}, "batched")]

pytestmark = pytest.mark.skipif(cpu_meter_reason() is not None,
                                reason="no /proc peak-RSS reset here")


def _measured(name: str, options: dict, impl: str) -> tuple[int, float]:
    """``(measured peak, output + modelled workspace)`` of one inference call (after a
    warm-up that builds the cached indices, as a benchmark's timed calls find them), on one
    thread (the peak of a path, not of the allocator's per-thread arenas)."""
    torch.set_num_threads(1)
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


def _in_fresh_process(name: str, options: dict, impl: str) -> tuple[int, float]:
    """:func:`_measured` in a new interpreter: the resident-set peak of a process that has
    run hundreds of other tests says more about its allocator's free lists than the path."""
    code = (f"import json; from tests.bench.test_path_memory import _measured; "
            f"print(json.dumps(_measured({name!r}, {options!r}, {impl!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    peak, predicted = json.loads(done.stdout.strip().splitlines()[-1])
    return peak, predicted


@pytest.mark.parametrize("name, options, impl", PATHS, ids=[p[2] for p in PATHS])
def test_memory_model_predicts_the_measured_peak(name, options, impl):
    """The model (output + workspace) is within 2× of the measured peak either way, and
    the peak within 2× softmax SDPA's measured the same way."""
    peak, predicted = _in_fresh_process(name, options, impl)
    softmax, _ = _in_fresh_process("softmax", {}, "sdpa")
    assert predicted / 2 <= peak <= 2 * predicted, (peak, predicted)
    assert peak <= 2 * softmax, (peak, softmax)
