"""Tiny pixel-space shapes-world models saved like real checkpoints, and world images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnbench.data import ShapesWorld
from attnbench.models import DiT, DiTConfig, save_dit

#: 16-px RGB, patch 4 (a 4×4 token grid), 2 blocks of width 32, the world's 91 labels
TINY = DiTConfig(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2,
                 num_heads=4, num_classes=91, learn_sigma=True, name="tiny-shapes")


def tiny_model(seed: int = 0, config: DiTConfig = TINY) -> DiT:
    """A DiT whose adaLN-Zero and final layers are not zero (its outputs depend on x, t, y)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("metrics-teacher") / "teacher"
    save_dit(tiny_model(0), path)
    return path


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory):
    """The teacher's architecture with other weights (a stand-in for a distilled student)."""
    path = tmp_path_factory.mktemp("metrics-student") / "student"
    save_dit(tiny_model(1), path)
    return path


@pytest.fixture(scope="session")
def world_images() -> dict[int, np.ndarray]:
    """Two disjoint sets of 200 real 32-px world images (seeds 1 and 2)."""
    return {seed: np.stack([ShapesWorld(32, seed=seed).image(i) for i in range(200)])
            for seed in (1, 2)}
