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


def qkv(gen, b, h, n, d, dtype=torch.float64, scale=1.0):
    """Random q, k, v ``[B, H, N, d]`` (float64 by default, the reference dtype)."""
    return tuple(
        (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
        for _ in range(3)
    )
