"""The loss terms of a recipe on a diffusers transformer, with its family's own objective.

The same terms as ``losses.py`` (``recipes.py`` names them), computed the
family's way (:mod:`attnbench.integrations.diffusers.families`):

* ``diffusion`` -- flow matching for FLUX, SD3, SANA and Wan (MSE of the
  predicted velocity against ``ε − x0`` at ``x_σ = (1 − σ)·x0 + σ·ε``; ``mse``
  is the same number), DiT's MSE(ε) + VB with learned variance for PixArt;
* ``kd_out`` -- the whole output against the teacher's; ``kd_eps`` /
  ``kd_sigma`` -- PixArt's ε and variance channels against the teacher's (LiT);
* ``kd_attn`` -- the mean over the tapped attention modules of the MSE between
  the student's and the teacher's attention outputs. Which modules: the recipe's
  rule over the model's layers in order and their kinds
  (:func:`~attnbench.integrations.diffusers.swap.kd_attn_modules`; CLEAR on FLUX:
  all 57 counted, single-stream at a position ≡ 0 mod 4: single blocks 1, 5,
  ..., 37). ``pre_proj``
  taps the core's output (the heads before the output projection, as CLEAR's
  code does); the teacher runs attnbench's softmax processors (they give the
  stock output exactly) so its core output is there to tap.

Trainable sets: ``all`` -- every transformer parameter; ``attention`` -- the
swapped modules' q/k/v/out projections (both streams of FLUX's double blocks)
and the method's own parameters (CLEAR's pooling weights), the QK norms frozen
as in CLEAR's code.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..integrations.diffusers.families import Family
from ..integrations.diffusers.swap import PROJECTIONS, attention_modules
from .losses import diffusion_terms, flat_mse, kd_terms
from .recipes import DistillRecipe


def trainable_names(transformer: nn.Module, family: Family, trainable: str) -> list[str]:
    """The parameter names that train under ``trainable`` (module docstring)."""
    names = [n for n, _ in transformer.named_parameters()]
    if trainable == "all":
        return names
    prefixes = [name for name, _ in attention_modules(transformer, family)]
    parts = (*(f".{p}." for p in PROJECTIONS), ".processor.core.")
    return [n for n in names
            if any(n.startswith(pre + ".") and any(part in n[len(pre):] for part in parts)
                   for pre in prefixes)]


class _Tap:
    """Records the outputs of the named modules' cores (``pre_proj``) or modules."""

    def __init__(self, model: nn.Module, names: list[str], where: str) -> None:
        inner = getattr(model, "module", model)
        self.modules = [inner.get_submodule(n + (".processor.core" if where == "pre_proj"
                                                 else "")) for n in names]
        self.outputs: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _Tap:
        self.outputs = []
        for module in self.modules:
            self._handles.append(module.register_forward_hook(
                lambda m, i, o: self.outputs.append(o[0] if isinstance(o, tuple) else o)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class DiffusersBatch:
    """One rank's rows: clean latents in the transformer's input layout, its text inputs,
    the noise, and the noise level (σ for flow families, a step index for PixArt)."""

    x0: torch.Tensor
    text: dict[str, torch.Tensor]
    noise: torch.Tensor
    level: torch.Tensor
    grid: tuple[int, ...]


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def diffusers_losses(recipe: DistillRecipe, family: Family, student: nn.Module,
                     teacher: nn.Module | None, batch: DiffusersBatch, *, guidance: float,
                     tapped: list[str], diffusion=None) -> dict[str, torch.Tensor]:
    """``{"loss": weighted sum, term: batch mean, ...}`` of ``recipe`` on ``batch``."""
    weights = recipe.active()
    inner = getattr(student, "module", student)
    config = dict(inner.config)
    x0, noise = batch.x0, batch.noise
    out: dict[str, torch.Tensor] = {}
    if family.objective == "flow":
        sigma = batch.level
        xt = (1 - _expand(sigma, x0)) * x0 + _expand(sigma, x0) * noise
        t_in = (sigma * family.timestep_scale).to(x0.dtype)
    else:
        xt = diffusion.q_sample(x0, batch.level, noise)
        t_in = batch.level
    inputs = family.inputs(config, xt, batch.text, t_in, batch.grid, guidance)
    want_attn = "kd_attn" in weights
    with ExitStack() as stack:
        s_tap = stack.enter_context(_Tap(student, tapped, recipe.attn_tap)) if want_attn else None
        s_out = student(**inputs, return_dict=False)[0]
    if family.objective == "flow":
        out["mse"] = flat_mse(s_out, noise - x0).mean()
        out["diffusion"] = out["mse"]
    else:
        out.update(diffusion_terms(diffusion.losses_from_output(s_out, x0, xt, batch.level,
                                                                noise)))
    if recipe.needs_teacher:
        if teacher is None:
            raise ValueError(f"recipe {recipe.name!r} needs a teacher")
        with torch.no_grad(), ExitStack() as stack:
            t_tap = stack.enter_context(_Tap(teacher, tapped, recipe.attn_tap)) \
                if want_attn else None
            t_out = teacher(**inputs, return_dict=False)[0]
        out.update(kd_terms(weights, s_out, t_out, x0.shape[1],
                            s_tap.outputs if want_attn else (),
                            t_tap.outputs if want_attn else ()))
    out["loss"] = sum(w * out[k] for k, w in weights.items())
    return out
