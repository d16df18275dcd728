"""A tiny pixel-space teacher (random but non-degenerate weights) saved like a real one."""

from __future__ import annotations

import pytest
import torch

from attnbench.models import DiT, DiTConfig, save_dit

#: 16-px RGB, patch 4 (a 4×4 token grid), 2 blocks of width 32: a forward takes ~1 ms
TINY_TEACHER = DiTConfig(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2,
                         num_heads=4, num_classes=91, learn_sigma=True, name="tiny-pixel")


def tiny_teacher(seed: int = 0) -> DiT:
    """A DiT whose adaLN-Zero and final layers are not zero (its outputs depend on x, t, y)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiT(TINY_TEACHER)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    save_dit(tiny_teacher(), path)
    return path
