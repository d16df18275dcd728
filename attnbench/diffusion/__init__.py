"""Noise schedule, DiT's training loss and samplers (pure PyTorch).

>>> from attnbench.diffusion import Diffusion
>>> diffusion = Diffusion(num_steps=1000)                  # DiT: linear betas 1e-4 → 0.02
>>> terms = diffusion.training_losses(model, x0, t, y)     # doctest: +SKIP
>>> terms["loss"].mean().backward()                        # doctest: +SKIP
>>> images = diffusion.sample(model, (8, 3, 32, 32), y, steps=250, sampler="ddpm",
...                           cfg_scale=1.5, generator=g)  # doctest: +SKIP

``schedule.py`` holds the betas and DiT's timestep respacing, ``gaussian.py``
the process, the loss (ε-MSE + the VB term of the learned variance) and the
DDPM / DDIM samplers with classifier-free guidance.
"""

from .gaussian import (
    SAMPLERS,
    Diffusion,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from .schedule import SCHEDULES, cosine_betas, linear_betas, space_timesteps

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "Diffusion",
    "cosine_betas",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
