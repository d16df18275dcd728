"""Helpers shared by the tests (importable as ``tests.helpers``)."""

from __future__ import annotations

import torch


def qkv(gen: torch.Generator, b: int, h: int, n: int, d: int, dtype=torch.float64, scale=1.0):
    """Random q, k, v ``[B, H, N, d]`` drawn in float64, then cast to ``dtype``."""
    return tuple(
        (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
        for _ in range(3)
    )
