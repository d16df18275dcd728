"""Tests of attnbench.bench, and its pytest-benchmark suite (method × resolution × level).

The benchmarks (tests that use the ``benchmark`` fixture) are parametrised from the
registry; plain ``pytest`` skips them and runs the unit tests beside them;
``pytest --benchmark-only`` runs them (CPU: small resolutions of a small DiT; extend
with ``--bench-res``, ``--bench-model``).
``python -m attnbench import-benchmark FILE.json`` turns the JSON that
``--benchmark-json`` writes into the results table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnbench import attention
from attnbench.models.configs import CPU_DEFAULT

HERE = Path(__file__).parent


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="a benchmark: run it with pytest --benchmark-only")
    for item in items:
        if HERE in Path(item.fspath).parents and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def pytest_generate_tests(metafunc) -> None:
    if "bench_point" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    device = bench_device()
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    res = opt("bench_res") or ("256,512,1024,2048" if gpu else "64,128,256")
    model = opt("bench_model") or ("DiT-XL/2" if gpu else CPU_DEFAULT)
    levels = [lvl.strip() for lvl in opt("bench_levels").split(",") if lvl.strip()]
    methods = opt("bench_methods")
    names = (
        [m.strip() for m in methods.split(",")]
        if methods
        else [n for n, why in attention.available(device, dtype).items() if why is None]
    )
    points = [
        pytest.param((model, int(r), lvl, name, device, dtype), id=f"{lvl}-{r}px-{name}")
        for r in res.split(",")
        for lvl in levels
        for name in names
    ]
    metafunc.parametrize("bench_point", points)
