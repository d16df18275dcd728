"""Tiny pixel-space shapes-world models saved like real checkpoints, and world images."""

from __future__ import annotations

import numpy as np
import pytest

from attnbench.data import ShapesWorld
from attnbench.models import save_dit
from tests.helpers import tiny_pixel_dit as tiny_model


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
