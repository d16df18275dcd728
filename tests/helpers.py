"""Helpers shared by the tests (importable as ``tests.helpers``)."""

from __future__ import annotations

import torch

from attnbench.models import DiTConfig

#: see tiny_pixel_dit
TINY_PIXEL = DiTConfig(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2,
                       num_heads=4, num_classes=91, learn_sigma=True, name="tiny-pixel")


def qkv(gen: torch.Generator, b: int, h: int, n: int, d: int, dtype=torch.float64, scale=1.0):
    """Random q, k, v ``[B, H, N, d]`` drawn in float64, then cast to ``dtype``."""
    return tuple(
        (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
        for _ in range(3)
    )


def tiny_pixel_dit(seed: int = 0, config=None):
    """A tiny pixel-space shapes-world DiT whose outputs depend on x, t and y.

    16-px RGB, patch 4 (a 4×4 token grid), 2 blocks of width 32, the world's 91 labels
    (a forward takes ~1 ms). DiT zero-initialises adaLN-Zero and the final layer, which
    would make every output 0: those get small random values, seeded.
    """
    from attnbench.models import DiT

    config = config or TINY_PIXEL
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()
