"""The one way a DiT is sampled for labels: batches through :meth:`Diffusion.sample`.

Every caller (evaluation sampling, sample grids, teacher self-samples for
distillation) draws images here, so the pixel-model clipping default and the
classifier-free-guidance settings mean the same everywhere. Seeding stays with the
caller: pass a generator, or the initial noise itself.
"""

from __future__ import annotations

import torch

from .gaussian import Diffusion


@torch.no_grad()
def sample_images(model, labels: torch.Tensor, *, steps: int | str = 250,
                  sampler: str = "ddpm", cfg_scale: float = 1.0, cfg_channels: int | None = None,
                  eta: float = 0.0, clip_denoised: bool | None = None,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                  batch: int | None = None, diffusion: Diffusion | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Samples ``[N, C, H, W]`` of ``model`` (its ``config`` gives the shape) for ``labels``.

    ``batch`` splits the labels (and ``noise``) into model calls of that many rows,
    drawing from ``generator`` in order; ``clip_denoised=None`` clips x̂_0 for pixel
    models (``config.is_pixel``). The result is on the sampling device.
    """
    config = model.config
    diffusion = diffusion or Diffusion(1000)
    device = device if device is not None else next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long)
    clip = config.is_pixel if clip_denoised is None else clip_denoised
    step = batch or max(len(labels), 1)
    out = []
    for start in range(0, len(labels), step):
        y = labels[start:start + step].to(device)
        part = None if noise is None else noise[start:start + step].to(device)
        shape = (len(y), config.in_channels, config.input_size, config.input_size)
        out.append(diffusion.sample(model, shape, y, steps=steps, sampler=sampler,
                                    cfg_scale=cfg_scale, cfg_channels=cfg_channels, eta=eta,
                                    clip_denoised=clip, generator=generator, noise=part,
                                    device=device))
    if not out:
        return torch.empty((0, config.in_channels, config.input_size, config.input_size),
                           device=device)
    return torch.cat(out)
