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

