"""Fixtures of the model tests: official-layout checkpoints with random values."""

from __future__ import annotations

import pytest
import torch

from .spec import random_state, tiny_shapes


@pytest.fixture
def tiny_state(gen) -> dict[str, torch.Tensor]:
    """A DiT-T/2 state dict with the official key names and random values."""
    return random_state(tiny_shapes(), gen)


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_state):
    """``tiny_state`` saved as a raw state dict ``.pt``, like the released checkpoints."""
    path = tmp_path / "DiT-T-2-64x64.pt"
    torch.save(tiny_state, path)
    return path


def make_inputs(gen: torch.Generator, batch: int = 2, side: int = 8, width: int | None = None,
                num_classes: int = 10):
    """Latents, timesteps and labels (the last label the CFG null class)."""
    x = torch.randn(batch, 4, side, width or side, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    y[-1] = num_classes
    return x, t, y
