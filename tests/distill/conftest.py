"""The tiny pixel-space teacher of tests/helpers.py, saved like a real one."""

from __future__ import annotations

import pytest

from attnbench.models import save_dit
from tests.helpers import tiny_pixel_dit as tiny_teacher


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    save_dit(tiny_teacher(), path)
    return path
