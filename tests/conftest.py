"""Shared fixtures: fresh random inputs (seeded per test, different per test)."""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible runs."""
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g



def pytest_addoption(parser) -> None:
    """Options of the pytest-benchmark suite in tests/bench/ (``pytest --benchmark-only``)."""
    group = parser.getgroup("attnbench benchmarks")
    group.addoption("--bench-res", default=None,
                    help="resolutions in px for tests/bench (default: CPU 64,128,256; "
                         "GPU 256,512,1024,2048)")
    group.addoption("--bench-model", default=None,
                    help="DiT config whose shapes tests/bench measures (default: CPU DiT-Ti/2, "
                         "GPU DiT-XL/2)")
    group.addoption("--bench-levels", default="attention,block,model",
                    help="levels for tests/bench (default attention,block,model)")
    group.addoption("--bench-methods", default=None,
                    help="methods for tests/bench (default: every method available here)")
