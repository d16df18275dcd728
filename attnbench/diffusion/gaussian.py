"""Gaussian diffusion as DiT trains and samples it, in pure PyTorch.

The process, loss and samplers of facebookresearch/DiT (``diffusion/``, itself
from OpenAI's IDDPM/ADM), re-written around one class:

* schedule -- 1000 steps, linear betas 1e-4 → 0.02, computed in float64;
* ``q_sample`` -- ``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε``;
* the model predicts ε and, with learned sigma, a second set of channels ``v``
  that interpolates the log-variance between ``log β_t`` and ``log β̃_t``
  (the posterior variance): ``log σ² = f·log β + (1 − f)·log β̃``, ``f = (v + 1)/2``
  ("learned range"); without it the variance is fixed ("fixed large", as DiT);
* ``training_losses`` -- ``MSE(ε)`` + the variational bound term ``vb`` (KL of
  the true posterior to the model's, in bits per dimension; the decoder NLL at
  ``t = 0``) computed with the ε prediction detached, so ``vb`` trains only the
  variance (IDDPM's hybrid loss, DiT's ``loss = mse + vb``);
* samplers -- ancestral DDPM and DDIM (``eta``) on a respaced subset of the
  steps (``steps=250`` as DiT's evaluation), with classifier-free guidance.

Why not a library: diffusers' schedulers implement the same DDPM/DDIM updates,
but diffusers imports torchvision, whose wheel is broken on the CPU-only
machines this project is developed on, and no scheduler there computes IDDPM's
``vb`` term that DiT trains with; this module is ~400 lines of tensor algebra
held to closed-form checks in ``tests/diffusion``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedule import SCHEDULES, space_timesteps

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("ddpm", "ddim")


# --------------------------------------------------------------------------- densities


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) element-wise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Φ used by ADM's decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, e^{2·log_scales})."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


# --------------------------------------------------------------------------- the process


class Diffusion:
    """A Gaussian diffusion process: schedule, loss and samplers (module docstring).

    ``Diffusion(num_steps=1000)`` is DiT's training process. ``respace(250)``
    (or ``sample(..., steps=250)``) gives the sampling process over 250 of those
    steps; its ``timestep_map`` turns its step indices into the original ones
    the model was trained on. Every tensor method takes step indices of *this*
    process, ``[B]`` int64.
    """

    def __init__(
        self,
        num_steps: int = 1000,
        *,
        schedule: str = "linear",
        betas: np.ndarray | None = None,
        timestep_map: list[int] | None = None,
        **schedule_options: float,
    ) -> None:
        if betas is None:
            if schedule not in SCHEDULES:
                raise ValueError(f"unknown noise schedule {schedule!r}; valid: {list(SCHEDULES)}")
            betas = SCHEDULES[schedule](num_steps, **schedule_options)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.schedule = schedule
        self.num_steps = len(betas)
        self.timestep_map = list(range(self.num_steps)) if timestep_map is None else timestep_map
        if len(self.timestep_map) != self.num_steps:
            raise ValueError("timestep_map must have one entry per step")

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            # the posterior variance is 0 at t = 0: clip the log to the next value
            "posterior_log_variance_clipped": np.log(
                np.append(post_var[1], post_var[1:]) if len(post_var) > 1 else post_var
            ),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
            # DiT's "fixed large" variance (learn_sigma=False)
            "fixed_large_variance": np.append(post_var[1], betas[1:]) if len(betas) > 1
            else betas,
        }
        self._tables = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tables.items()}
        self._map = torch.tensor(self.timestep_map, dtype=torch.long)

    # ----- structure ----------------------------------------------------------------------
    def __repr__(self) -> str:
        kept = "" if self.timestep_map == list(range(self.num_steps)) else (
            f", respaced from {self.timestep_map[-1] + 1}")
        return f"Diffusion({self.num_steps} steps, {self.schedule}{kept})"

    def table(self, name: str) -> torch.Tensor:
        """A float64 schedule table (``alphas_cumprod``, ``betas``, ...) over this process."""
        return self._tables[name]

    def respace(self, spacing: int | str) -> Diffusion:
        """The process over ``space_timesteps(num_steps, spacing)`` (see schedule.py).

        Keeps ``ᾱ`` of the kept steps (so their marginals are unchanged) and
        recomputes the betas from them, as IDDPM's ``SpacedDiffusion``.
        """
        kept = space_timesteps(self.num_steps, spacing)
        ac = self._tables["alphas_cumprod"].numpy()
        last, betas = 1.0, []
        for i in kept:
            betas.append(1.0 - ac[i] / last)
            last = ac[i]
        mapping = [self.timestep_map[i] for i in kept]
        return Diffusion(schedule=self.schedule, betas=np.array(betas), timestep_map=mapping)

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` shaped ``[B, 1, 1, ...]`` in ``like``'s dtype and device."""
        values = self._tables[name].to(t.device)[t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps the model is called with for this process's steps ``t``."""
        return self._map.to(t.device)[t]

    # ----- the forward process -------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_t ~ q(x_t | x_0)``: ``sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·noise``."""
        if noise is None:
            noise = _randn(x0.shape, generator, x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not match x0 {tuple(x0.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = (self._extract("posterior_mean_coef1", t, xt) * x0
                + self._extract("posterior_mean_coef2", t, xt) * xt)
        return (mean, self._extract("posterior_variance", t, xt),
                self._extract("posterior_log_variance_clipped", t, xt))

    # ----- the reverse process -------------------------------------------------------------
    @staticmethod
    def split_output(output: torch.Tensor, channels: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(ε, v)`` of a model output with ``channels`` data channels (``v`` None if fixed)."""
        if output.shape[1] == 2 * channels:
            return output[:, :channels], output[:, channels:]
        if output.shape[1] == channels:
            return output, None
        raise ValueError(
            f"model output has {output.shape[1]} channels; expected {channels} (ε) or "
            f"{2 * channels} (ε and the learned variance) for {channels}-channel data"
        )

    def predict_xstart(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
                       ) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt
                - self._extract("sqrt_recipm1_alphas_cumprod", t, xt) * eps)

    def eps_from_xstart(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
                        ) -> torch.Tensor:
        return ((self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt - x0)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, xt))

    def model_log_variance(self, v: torch.Tensor | None, t: torch.Tensor,
                           like: torch.Tensor) -> torch.Tensor:
        """``log σ²_t``: learned range from ``v`` (``f = (v+1)/2``), or DiT's fixed large."""
        if v is None:
            return torch.log(self._extract("fixed_large_variance", t, like)).expand_as(like)
        min_log = self._extract("posterior_log_variance_clipped", t, like)
        max_log = self._extract("log_betas", t, like)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, *,
                        clip_denoised: bool = False,
                        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
        """``p(x_{t-1} | x_t)`` from a model ``output`` at ``x_t``: mean, log-variance, x̂_0, ε."""
        output = output.to(xt.dtype)
        eps, v = self.split_output(output, xt.shape[1])
        log_variance = self.model_log_variance(v, t, xt)
        pred_xstart = self.predict_xstart(xt, t, eps)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_xstart, xt, t)
        return {"mean": mean, "log_variance": log_variance, "variance": torch.exp(log_variance),
                "pred_xstart": pred_xstart, "eps": eps}

    # ----- the loss -----------------------------------------------------------------------
    def vb_terms(self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                 t: torch.Tensor, *, clip_denoised: bool = False) -> torch.Tensor:
        """Per-sample variational-bound term in bits/dim (decoder NLL where ``t == 0``)."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(output, xt, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]))
        kl = kl / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"],
                                                   log_scales=0.5 * p["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def losses_from_output(self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                           t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """DiT's per-sample loss terms for a model ``output`` already computed at ``x_t``.

        ``mse`` = mean‖ε − ε̂‖²; with learned sigma, ``vb`` is the bound term with
        ε̂ detached (it trains only the variance) and ``loss = mse + vb``.
        Distillation computes the student's output once and adds its own terms.
        """
        output = output.float()
        eps, v = self.split_output(output, x0.shape[1])
        terms = {"mse": mean_flat((noise.float() - eps) ** 2)}
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0.float(), xt.float(), t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def training_losses(self, model: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                        y: torch.Tensor | None = None, noise: torch.Tensor | None = None, *,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample ``{"loss", "mse", "vb", "output", "x_t", "noise"}`` of ``model`` (DiT's).

        ``t`` are step indices of this process; the model sees ``model_timesteps(t)``.
        """
        if noise is None:
            noise = _randn(x0.shape, generator, x0)
        xt = self.q_sample(x0, t, noise)
        output = model(xt, self.model_timesteps(t), y)
        terms = self.losses_from_output(output, x0, xt, t, noise)
        terms.update(output=output, x_t=xt, noise=noise)
        return terms

    # ----- sampling -----------------------------------------------------------------------
    def guided(self, model: ModelFn, cfg_scale: float, null_label: int | None,
               cfg_channels: int | None) -> ModelFn:
        """``model`` with classifier-free guidance folded in (identity for scale 1).

        One batched call on ``[x; x]`` with labels ``[y; null]``; the guided ε is
        ``ε_u + s·(ε_c − ε_u)`` on the first ``cfg_channels`` channels (3 by
        default: DiT's quirk, kept for its published numbers; ``None`` = all data
        channels); the remaining channels (and the variance) are the conditional ones.
        """
        if cfg_scale == 1.0:
            return model
        if null_label is None:
            config = getattr(model, "config", None)
            if config is None or getattr(config, "class_dropout_prob", 0) <= 0:
                raise ValueError(
                    "classifier-free guidance needs a model trained with label dropout (a null "
                    "class); pass null_label= or use cfg_scale=1"
                )
            null_label = config.num_classes

        def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = model(torch.cat([x, x]), torch.cat([t, t]),
                        torch.cat([y, torch.full_like(y, null_label)]))
            cond, uncond = out.chunk(2)
            k = x.shape[1] if cfg_channels is None else min(cfg_channels, x.shape[1])
            guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
            return torch.cat([guided, cond[:, k:]], dim=1)

        return fn

    @torch.no_grad()
    def sample(
        self,
        model: ModelFn,
        shape: tuple[int, ...],
        y: torch.Tensor | None = None,
        *,
        steps: int | str | None = 250,
        sampler: str = "ddpm",
        cfg_scale: float = 1.0,
        cfg_channels: int | None = 3,
        null_label: int | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        return_trajectory: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Draw ``shape`` samples from ``model`` with labels ``y`` (DDPM or DDIM).

        ``steps`` respaces the process (``250`` = DiT's evaluation, ``"ddim50"``,
        ``None`` = every step). ``clip_denoised`` clamps x̂_0 to [-1, 1] (right for
        pixels; DiT samples latents unclipped). Noise comes from ``generator``
        (drawn on its device), so a seeded generator reproduces a batch.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if sampler == "ddim" and eta < 0:
            raise ValueError(f"DDIM eta must be >= 0, got {eta}")
        process = self if steps is None or steps == self.num_steps else self.respace(steps)
        param = next(iter(getattr(model, "parameters", lambda: iter(()))()), None)
        if device is None:
            device = param.device if param is not None else torch.device("cpu")
        device = torch.device(device)
        # the chain runs in float32; the model sees its own dtype (e.g. a bf16 DiT)
        model_dtype = param.dtype if param is not None and param.is_floating_point() \
            else torch.float32
        if noise is None:
            noise = _randn(shape, generator, torch.empty(0, device=device))
        x = noise.to(device=device, dtype=torch.float32)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise {tuple(x.shape)} does not match shape {tuple(shape)}")
        if y is None:
            config = getattr(model, "config", None)
            null = getattr(config, "num_classes", 0) if config is not None else 0
            y = torch.full((shape[0],), null, dtype=torch.long)
        y = torch.as_tensor(y, device=device).long()
        fn = self.guided(model, cfg_scale, null_label, cfg_channels)
        trajectory = [x] if return_trajectory else []
        indices = list(range(process.num_steps))[::-1]
        if progress:
            indices = tqdm(indices, desc=f"{sampler} {process.num_steps} steps", leave=False)
        for i in indices:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            output = fn(x.to(model_dtype), process.model_timesteps(t), y).float()
            p = process.p_mean_variance(output, x, t, clip_denoised=clip_denoised)
            step_noise = _randn(x.shape, generator, x)
            if sampler == "ddpm":
                x = process.ddpm_update(p, x, t, step_noise)
            else:
                x = process.ddim_update(p, x, t, step_noise, eta=eta)
            if return_trajectory:
                trajectory.append(x)
        return (x, trajectory) if return_trajectory else x

    def ddpm_update(self, p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step: ``mean + σ·z`` (no noise at ``t = 0``)."""
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise

    def ddim_update(self, p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, *, eta: float = 0.0) -> torch.Tensor:
        """One DDIM step (Song et al.); ``eta = 0`` is deterministic, 1 is DDPM-like."""
        eps = self.eps_from_xstart(x, t, p["pred_xstart"])
        ab = self._extract("alphas_cumprod", t, x)
        ab_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = p["pred_xstart"] * torch.sqrt(ab_prev) + torch.sqrt(
            (1 - ab_prev - sigma**2).clamp(min=0)) * eps
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return mean + nonzero * sigma * noise


def _randn(shape: Any, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise from ``generator`` (on its device), then moved to ``like``'s."""
    device = generator.device if generator is not None else like.device
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    return torch.randn(tuple(shape), generator=generator, device=device,
                       dtype=dtype).to(like.device)
