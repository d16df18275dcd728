"""The loss terms of the recipes (``recipes.py``), computed from one forward of each model."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..diffusion import Diffusion
from .recipes import DistillRecipe


class AttentionTap:
    """Records the attention output of the tapped blocks during a forward pass.

    ``with AttentionTap(model, recipe) as tap: model(x, t, y)`` leaves
    ``tap.outputs``, one tensor per tapped block (CLEAR's per-layer term
    compares them). ``recipe.attn_tap`` says where: ``"pre_proj"`` -- the
    output of the mixer's ``core`` (``[B, H, N, d]``: the heads before the output
    projection, where the official CLEAR code takes it) -- or ``"post_proj"``,
    the mixer's output ``[B, N, C]``; the blocks of ``recipe.tapped_layers`` are
    tapped (CLEAR: every DiT block is single-stream, so blocks 0, 4, 8, ...; on
    FLUX the same rule gives single blocks 1, 5, ..., 37). An MSE
    over the elements does not depend on the heads' layout, so ``pre_proj`` needs
    no reshaping.
    """

    def __init__(self, model: nn.Module, recipe: DistillRecipe | None = None) -> None:
        self.model = model
        self.tap = recipe.attn_tap if recipe is not None else "post_proj"
        self.recipe = recipe
        self.outputs: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> AttentionTap:
        self.outputs = []
        blocks = list(_blocks(self.model))
        tapped = set(self.recipe.tapped_layers(["single"] * len(blocks)) if self.recipe
                     else range(len(blocks)))  # DiT's blocks are all single-stream
        for i, block in enumerate(blocks):
            if i not in tapped:
                continue
            module = block.attn.core if self.tap == "pre_proj" else block.attn
            self._handles.append(module.register_forward_hook(self._hook))
        return self

    def _hook(self, module, inputs, output) -> None:
        self.outputs.append(output)

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _blocks(model: nn.Module):
    inner = getattr(model, "module", model)  # DistributedDataParallel
    return inner.blocks


@contextmanager
def _nothing():
    yield None


def flat_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference, in float32."""
    d = (a.float() - b.float()) ** 2
    return d.mean(dim=tuple(range(1, d.dim())))


def recipe_losses(
    recipe: DistillRecipe,
    diffusion: Diffusion,
    student: nn.Module,
    teacher: nn.Module | None,
    x0: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``{"loss": weighted sum, term: batch mean, ...}`` of ``recipe`` on one batch.

    ``t`` are step indices of ``diffusion``; the student is called once (under
    whatever autocast the caller set), the teacher once without gradients.
    Terms with weight 0 are not computed (``mse``/``vb``, the two parts of
    ``diffusion``, are always reported).
    """
    weights = recipe.active()
    xt = diffusion.q_sample(x0, t, noise)
    tm = diffusion.model_timesteps(t)
    want_attn = recipe.needs_attention
    with AttentionTap(student, recipe) if want_attn else _nothing() as s_tap:
        s_out = student(xt, tm, y)
    out = diffusion_terms(diffusion.losses_from_output(s_out, x0, xt, t, noise))
    if recipe.needs_teacher:
        if teacher is None:
            raise ValueError(f"recipe {recipe.name!r} needs a teacher")
        with torch.no_grad(), AttentionTap(teacher, recipe) if want_attn else _nothing() as t_tap:
            t_out = teacher(xt, tm, y)
        out.update(kd_terms(weights, s_out, t_out, x0.shape[1],
                            s_tap.outputs if want_attn else (),
                            t_tap.outputs if want_attn else ()))
    out["loss"] = sum(w * out[k] for k, w in weights.items())
    return out


def diffusion_terms(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiT's loss terms (per sample) as batch means: ``mse``, ``vb`` (if any), ``diffusion``."""
    out = {"mse": terms["mse"].mean()}
    if "vb" in terms:
        out["vb"] = terms["vb"].mean()
    out["diffusion"] = terms["loss"].mean()
    return out


def kd_terms(weights: dict[str, float], s_out: torch.Tensor, t_out: torch.Tensor,
             channels: int, s_attn=(), t_attn=()) -> dict[str, torch.Tensor]:
    """The teacher terms of ``weights``: ε and variance channels (``channels`` each), the
    whole output, and the mean over tapped layers of the attention outputs."""
    c, out = channels, {}
    if "kd_eps" in weights:
        out["kd_eps"] = flat_mse(s_out[:, :c], t_out[:, :c]).mean()
    if "kd_sigma" in weights:
        if s_out.shape[1] != 2 * c or t_out.shape[1] != 2 * c:
            raise ValueError("kd_sigma needs a learned-variance model (learn_sigma=True; "
                             "flow-matching models have none: --weight kd_sigma=0)")
        out["kd_sigma"] = flat_mse(s_out[:, c:], t_out[:, c:]).mean()
    if "kd_out" in weights:
        out["kd_out"] = flat_mse(s_out, t_out).mean()
    if "kd_attn" in weights:
        pairs = list(zip(s_attn, t_attn, strict=True))
        out["kd_attn"] = torch.stack([flat_mse(a, b).mean() for a, b in pairs]).mean()
    return out
