"""PSNR, SSIM and the per-step ε error against closed forms and identities."""

from __future__ import annotations

import math

import pytest
import torch

from attnbench.diffusion import Diffusion
from attnbench.metrics.fidelity import PSNR_CAP_DB, eps_error, psnr, ssim
from tests.helpers import tiny_pixel_dit as tiny_model


def test_psnr_closed_form(gen):
    a = torch.rand(3, 3, 16, 16, generator=gen) * 2 - 1
    assert torch.all(psnr(a, a) == PSNR_CAP_DB)
    b = (a + 0.2).clamp(-1, 1)
    mse = (((a + 1) / 2 - (b + 1) / 2) ** 2).flatten(1).mean(1).double()
    assert torch.allclose(psnr(a, b), 10 * torch.log10(1 / mse))
    u8 = torch.full((1, 8, 8, 3), 100, dtype=torch.uint8)
    v8 = u8 + 10
    assert psnr(u8, v8).item() == pytest.approx(10 * math.log10(255**2 / 100))


def test_ssim_identity_and_luminance_closed_form(gen):
    a = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    # constant images: only the luminance term is left
    x, c = 0.3, 0.2
    ua = torch.full((1, 3, 16, 16), 2 * x - 1)
    ub = torch.full((1, 3, 16, 16), 2 * (x + c) - 1)
    c1 = 0.01**2
    want = (2 * x * (x + c) + c1) / (x**2 + (x + c) ** 2 + c1)
    assert ssim(ua, ub).item() == pytest.approx(want, rel=1e-6)
    noisy = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    assert torch.all(ssim(a, noisy) < 0.95)
    assert torch.allclose(ssim(a, noisy), ssim(noisy, a))


def test_eps_error_zero_for_the_teacher_itself_and_positive_for_another_model():
    teacher, student = tiny_model(0), tiny_model(1)
    diffusion = Diffusion(1000)
    y = torch.tensor([3, 50])
    shape = (2, 3, 16, 16)
    for cfg in (1.0, 1.5):
        same = eps_error(teacher, teacher, diffusion, shape, y, steps=5, cfg_scale=cfg,
                         generator=torch.Generator().manual_seed(0), clip_denoised=True)
        assert len(same["eps_mse"]) == 5 and same["mean"] == 0.0
        assert same["timesteps"] == sorted(same["timesteps"], reverse=True)
        other = eps_error(student, teacher, diffusion, shape, y, steps=5, cfg_scale=cfg,
                          generator=torch.Generator().manual_seed(0), clip_denoised=True)
        assert all(v > 0 for v in other["eps_mse"])
        # the trajectory is the teacher's: same samples as sampling the teacher alone
        alone = diffusion.sample(teacher, shape, y, steps=5, cfg_scale=cfg,
                                 generator=torch.Generator().manual_seed(0), clip_denoised=True)
        assert torch.equal(other["samples"], alone)
