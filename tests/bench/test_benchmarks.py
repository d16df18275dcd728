"""Benchmarks (not tests of timing): every method at every level and resolution.

Timed in pedantic mode around a synchronised call; FLOPs (analytic, the
convention of the registry), peak memory and the shapes go to ``extra_info``
so ``attnbench import-benchmark`` can rebuild the results table.
"""

from __future__ import annotations

import torch

from attnbench.bench.memory import peak_memory
from attnbench.bench.timer import synchronize
from attnbench.bench.workloads import Point, build_workload
from attnbench.models.configs import get_config


def test_benchmark(benchmark, bench_point):
    model, resolution, level, method, device, dtype = bench_point
    point = Point(get_config(model), resolution, batch=1)
    work = build_workload(level, method, {}, point, dtype, device)

    def call():
        work.fn()
        synchronize(device)

    with torch.inference_mode():
        benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
        memory = peak_memory(call, device)
    benchmark.extra_info.update(
        method=method, options="{}", level=level, resolution=resolution, tokens=point.tokens,
        batch=point.batch, dtype=str(dtype).replace("torch.", ""), device=str(device),
        model=model, heads=point.heads, head_dim=point.head_dim, impl=work.impl,
        flops_actual=work.flops.actual, flops_dense=work.flops.dense,
        peak_memory_bytes=memory.peak_bytes, memory_meter=memory.meter,
    )
