"""The timer's protocol, the memory meter, FLOP models at block and model level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnbench import attention
from attnbench.bench import timer
from attnbench.bench.flops import count_flops
from attnbench.bench.memory import cpu_meter_reason, peak_memory
from attnbench.bench.workloads import Point, build_workload, check_resolution
from attnbench.models.configs import get_config


def test_quantile_matches_numpy():
    values = list(np.random.default_rng(0).random(17))
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert timer.quantile(values, q) == pytest.approx(np.quantile(values, q))


def test_measure_follows_its_protocol(monkeypatch):
    """First call, two estimates, then repetitions clamped to [min_reps, max_reps]."""
    calls = []
    clock = iter(range(0, 10**6))  # each perf_counter() reading advances 1 s
    monkeypatch.setattr(timer.time, "perf_counter", lambda: float(next(clock)))
    result = timer.measure(lambda: calls.append(1), "cpu", budget_s=100.0, warmup_s=0.0,
                           min_reps=3, max_reps=5)
    assert result.reps == 5 and result.timer == "perf_counter" and not result.l2_flush
    assert len(calls) == 1 + 2 + 5  # no warm-up loop with warmup_s=0 (clock moves on)
    assert result.p20 <= result.median <= result.p80


def test_measure_clamps_to_min_reps():
    result = timer.measure(lambda: sum(range(10_000)), "cpu", budget_s=0.0, warmup_s=0.0,
                           min_reps=4)
    assert result.reps == 4 and result.min <= result.median


@pytest.mark.skipif(cpu_meter_reason() is not None, reason="no /proc peak-RSS reset here")
def test_cpu_memory_meter_sees_a_transient_allocation():
    def allocate():
        return torch.ones(48 * 2**20 // 4).sum()  # a 48 MiB temporary

    for _ in range(2):  # the second call reuses nothing: glibc gave the block back
        measured = peak_memory(allocate, "cpu")
        assert measured.meter == "proc_vmhwm"
        assert 46 * 2**20 <= measured.peak_bytes <= 64 * 2**20


def test_resolution_must_be_a_multiple_of_8_times_patch():
    check_resolution(2048, 2)
    with pytest.raises(ValueError, match="1000 px is not a multiple of 16.*992 or 1008"):
        check_resolution(1000, 2)


@pytest.mark.parametrize("method", ["softmax", "lit", "sla"])
@pytest.mark.parametrize("level", ["block", "model"])
def test_analytic_flops_match_the_counter_at_block_and_model_level(method, level):
    point = Point(get_config("DiT-T/2"), resolution=128, batch=2)  # 8×8 token grid
    work = build_workload(level, method, {}, point, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        counted = count_flops(work.fn)
    # counted also holds LiT's depth-wise conv, which the attention model leaves out
    assert counted == pytest.approx(work.flops.actual, rel=0.01)


def test_point_shapes_follow_the_model():
    point = Point(get_config("DiT-XL/2"), resolution=8192, batch=1)
    assert point.grid == (512, 512) and point.tokens == 262_144
    assert point.heads == 16 and point.head_dim == 72


@pytest.mark.parametrize("method", ["lit", "sla", "clear"])
def test_predicted_bytes_are_those_of_the_path_that_runs(method):
    point = Point(get_config("DiT-T/2"), resolution=128, batch=2)
    work = build_workload("attention", method, {}, point, torch.float32, torch.device("cpu"))
    backend = attention.get(method)
    expected = backend.memory(2, point.heads, point.tokens, point.head_dim, point.grid,
                              element_size=4, impl=work.impl)
    assert work.predicted_bytes == expected.actual


class _FakeClock:
    """``perf_counter`` that advances only when the timed function runs."""

    def __init__(self, seconds_per_call: float) -> None:
        self.now, self.step, self.calls = 0.0, seconds_per_call, 0

    def __call__(self) -> float:
        return self.now

    def fn(self) -> None:
        self.calls += 1
        self.now += self.step


@pytest.mark.parametrize("seconds, limit, reps", [(2.0, 9.0, 3), (2.0, 5.0, 2), (2.0, 1.0, 1)])
def test_a_slow_call_takes_fewer_repetitions_within_the_limit(monkeypatch, seconds, limit, reps):
    clock = _FakeClock(seconds)
    monkeypatch.setattr(timer.time, "perf_counter", clock)
    timing = timer.measure(clock.fn, "cpu", budget_s=0.5, warmup_s=0.2, min_reps=3, limit_s=limit)
    assert timing.reps == reps and timing.warmup_s == 0.0
    assert clock.calls == 1 + reps  # the untimed first call, then only timed ones
    assert timing.median == pytest.approx(seconds)


def test_a_fast_call_keeps_the_minimum_repetitions(monkeypatch):
    clock = _FakeClock(1e-3)
    monkeypatch.setattr(timer.time, "perf_counter", clock)
    timing = timer.measure(clock.fn, "cpu", budget_s=1e-3, warmup_s=0.0, min_reps=3,
                           limit_s=30.0)
    assert timing.reps == 3 and clock.calls == 1 + 2 + 3
