"""Fidelity to the teacher: the metrics that need no external weights at all.

From the *same* noise and labels (the seeded chunks of :mod:`.sample`), a student
and its teacher should draw the same images. Three measures:

* :func:`psnr` -- per image, on [0, 1] pixels (``10·log10(1 / MSE)``), averaged
  over images (an identical pair is capped at 100 dB);
* :func:`ssim` -- Wang et al. (2004): 11 × 11 Gaussian window (σ = 1.5),
  ``K1 = 0.01``, ``K2 = 0.03``, data range 1, valid windows only, per channel, averaged
  over pixels, channels and images;
* :func:`eps_error` -- along the teacher's own sampling trajectory, at every step,
  the mean squared difference between the student's and the teacher's (guided)
  ε on the same ``x_t``: where in the denoising the student departs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shapes import to_uint8
from ..diffusion import Diffusion
from ..models import load_dit
from ..models.teacher import default_teacher_path
from .quality import is_shapes_model
from .sample import (
    SampleSettings,
    checkpoint_sha256,
    chunk_ranges,
    chunk_seed,
    decode,
    sample_chunk,
)

PSNR_CAP_DB = 100.0


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float) or uint8 ``[N, H, W, 3]`` → float64 ``[N, C, H, W]`` in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).double() / 255.0
    return ((x.double() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB ``[N]`` of two image batches (both [-1, 1] float or both uint8)."""
    a, b = _unit(torch.as_tensor(a)), _unit(torch.as_tensor(b))
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = ((a - b) ** 2).flatten(1).mean(1)
    out = 10 * torch.log10(1.0 / mse.clamp(min=1e-30))
    return out.clamp(max=PSNR_CAP_DB)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM ``[N]`` (module docstring) of two image batches."""
    a, b = _unit(torch.as_tensor(a)), _unit(torch.as_tensor(b))
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    channels = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    kernel = _gaussian_window(size, sigma).expand(channels, 1, size, size).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    c1, c2 = k1**2, k2**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)


@torch.no_grad()
def eps_error(student, teacher, diffusion, shape: tuple[int, ...], y: torch.Tensor, *,
              steps: int | str = 250, sampler: str = "ddpm", cfg_scale: float = 1.0,
              cfg_channels: int | None = 3, null_label: int | None = None,
              clip_denoised: bool = False, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> dict[str, Any]:
    """Per-step ε MSE of ``student`` against ``teacher`` along the teacher's trajectory.

    Runs ``diffusion.sample`` with the teacher; at every step both models see the
    same ``x_t`` (guided the same way: guidance is applied to the pair of outputs
    by the sampler, so each model's guided ε is compared through the raw
    conditional and unconditional outputs it is built from). Returns
    ``{"samples": teacher images, "timesteps": [...], "eps_mse": [...], "mean": m}``,
    steps in sampling order (noisiest first).
    """
    channels = shape[1]
    records: dict[int, list[float]] = {}
    order: list[int] = []

    def paired(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out_t = teacher(x, t, labels)
        out_s = student(x, t, labels)
        eps_t = _guided_eps(out_t[:, :channels], cfg_scale, cfg_channels, x.shape[0] != len(y))
        eps_s = _guided_eps(out_s[:, :channels], cfg_scale, cfg_channels, x.shape[0] != len(y))
        key = int(t[0])
        if key not in records:
            records[key] = []
            order.append(key)
        records[key].append(float(((eps_s.double() - eps_t.double()) ** 2).mean()))
        return out_t

    if null_label is None and cfg_scale != 1.0:
        null_label = teacher.config.num_classes
    samples = diffusion.sample(paired, shape, y, steps=steps, sampler=sampler,
                               cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                               null_label=null_label, clip_denoised=clip_denoised,
                               generator=generator, device=device)
    per_step = [float(sum(records[k]) / len(records[k])) for k in order]
    return {"samples": samples, "timesteps": order, "eps_mse": per_step,
            "mean": float(sum(per_step) / len(per_step)) if per_step else math.nan}


def _guided_eps(eps: torch.Tensor, scale: float, channels: int | None, doubled: bool
                ) -> torch.Tensor:
    """The guided ε of a ``[cond; uncond]`` batch (as the sampler forms it), or ε itself."""
    if not doubled:
        return eps
    cond, uncond = eps.chunk(2)
    k = eps.shape[1] if channels is None else min(channels, eps.shape[1])
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


# --------------------------------------------------------------------------- the metric group


def check_group(ctx) -> None:
    """``fidelity``'s inputs (:mod:`.groups`): a DiT's ``--teacher`` exists (a pair's
    teacher images were checked with the folders)."""
    if ctx.kind == "dit" and ctx.dit.teacher is not None and not Path(ctx.dit.teacher).exists():
        raise FileNotFoundError(f"--teacher {ctx.dit.teacher}: no such file or folder")


def compute_group(ctx) -> tuple[dict[str, float], dict[str, Any]]:
    """PSNR and SSIM against the teacher: image by image for a pair, from the same noise and
    labels for a DiT (with the per-step ε error)."""
    if ctx.kind == "dit":
        return _dit_fidelity(ctx)
    a, b = torch.from_numpy(ctx.images), torch.from_numpy(ctx.teacher_images)
    p, q = psnr(a, b), ssim(a, b)
    return {"psnr": float(p.mean()), "ssim": float(q.mean())}, {
        "pairs": len(a), "reference": "the teacher's sample for the same prompt and seed",
        "psnr_per_image": [round(float(x), 4) for x in p],
        "ssim_per_image": [round(float(x), 5) for x in q]}


def _dit_fidelity(ctx) -> tuple[dict[str, float], dict[str, Any]]:
    """PSNR / SSIM / per-step ε error of the DiT against the teacher (same noise, labels)."""
    model, teacher_path, config, vae = ctx.dit.model, ctx.dit.teacher, ctx.dit.config, ctx.dit.vae
    device, log, metrics = torch.device(ctx.device), ctx.log, {}

    if teacher_path is None:
        teacher_path = default_teacher_path()
    teacher = load_dit(teacher_path, device=device)
    if checkpoint_sha256(teacher) is not None and checkpoint_sha256(
            teacher) == checkpoint_sha256(model):
        log("eval: the model is the teacher itself: fidelity skipped")
        return {}, {"teacher": str(teacher_path), "skipped": "the model is the teacher"}
    t_cfg, s_cfg = teacher.config, model.config
    if (t_cfg.in_channels, t_cfg.input_size, t_cfg.num_classes) != (
            s_cfg.in_channels, s_cfg.input_size, s_cfg.num_classes):
        raise ValueError(f"the teacher {teacher_path} ({t_cfg.in_channels}×{t_cfg.input_size}², "
                         f"{t_cfg.num_classes} classes) does not match the student")
    base = config.sampling
    settings = SampleSettings(num=min(config.fidelity_num, base.num) if config.samples is None
                              else config.fidelity_num, steps=base.steps,
                              cfg_scale=base.cfg_scale, sampler=base.sampler, eta=base.eta,
                              cfg_channels=base.cfg_channels, batch=base.batch, seed=base.seed,
                              labels="balanced" if is_shapes_model(s_cfg) else "uniform",
                              clip_denoised=base.clip_denoised)
    log(f"eval: fidelity to the teacher on {settings.num} samples (same noise and labels)")
    diffusion = Diffusion(1000)
    pixel = s_cfg.is_pixel
    clip = pixel if settings.clip_denoised is None else settings.clip_denoised
    student_imgs, teacher_imgs, curves, timesteps = [], [], [], None
    for c, rows in enumerate(chunk_ranges(settings.num, settings.batch)):
        imgs, ys = sample_chunk(model, settings, c, device=device, vae=vae, diffusion=diffusion)
        student_imgs.append(imgs)
        g = torch.Generator(device="cpu").manual_seed(chunk_seed(settings.seed, c))
        # the same draws as sample_chunk: labels first (uniform mode), then the noise
        if settings.labels == "uniform":
            torch.randint(0, s_cfg.num_classes, (len(rows),), generator=g)
        shape = (len(rows), s_cfg.in_channels, s_cfg.input_size, s_cfg.input_size)
        err = eps_error(model, teacher, diffusion, shape, torch.as_tensor(ys),
                        steps=settings.steps, sampler=settings.sampler,
                        cfg_scale=settings.cfg_scale, cfg_channels=settings.cfg_channels,
                        clip_denoised=clip, generator=g, device=device)
        x = err["samples"] if pixel else decode(vae, err["samples"])
        teacher_imgs.append(to_uint8(x.cpu()))
        curves.append(np.array(err["eps_mse"]) * len(rows))
        timesteps = err["timesteps"]
    student = torch.from_numpy(np.concatenate(student_imgs))
    reference = torch.from_numpy(np.concatenate(teacher_imgs))
    p, s = psnr(student, reference), ssim(student, reference)
    curve = (np.sum(curves, axis=0) / settings.num).tolist()
    metrics["psnr"] = float(p.mean())
    metrics["ssim"] = float(s.mean())
    metrics["eps_mse_vs_teacher"] = float(np.mean(curve))
    return metrics, {
        "teacher": str(teacher_path), "teacher_sha256": checkpoint_sha256(teacher),
        "num": settings.num, "labels": settings.labels,
        "psnr_std": float(p.std()) if len(p) > 1 else 0.0,
        "ssim_std": float(s.std()) if len(s) > 1 else 0.0,
        "psnr": "per image on [0, 1] pixels (uint8 samples), mean over images; 100 dB cap",
        "ssim": "Gaussian 11×11 σ=1.5, K1=0.01, K2=0.03, valid windows, mean",
        "eps_mse": "mean over ε channels of (ε_student − ε_teacher)² on the teacher's x_t, "
                   "guided as sampled; per step, noisiest first",
        "eps_mse_per_step": [round(v, 8) if math.isfinite(v) else None for v in curve],
        "timesteps": timesteps,
        "identical_samples": bool(torch.equal(student, reference)),
    }
