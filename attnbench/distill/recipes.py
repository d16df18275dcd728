"""Distillation recipes: which loss terms, with which weights, train which parameters.

A method declares its recipe as data on its backend (``backend.distill_recipe``,
an :class:`attnbench.attention.recipes.DistillRecipe`, with its source, and
``backend.distill_alternatives``); this module collects them and adds the two
that belong to no method. It holds no per-method rule.

The loss terms (every one a batch mean; see ``losses.py``): ``diffusion`` (DiT's
own loss on the data, ``MSE(ε) + VB``), ``kd_eps`` and ``kd_sigma`` (the ε and
learned-variance channels against the teacher's: LiT's λ1, λ2 terms),
``kd_out`` (the whole model output against the teacher's) and ``kd_attn`` (the
mean over the tapped blocks of a block's attention output against the
teacher's; where it is tapped and which blocks, the recipe says:
``attn_tap``, ``attn_every``).

* ``default`` -- any method without its own recipe: ``diffusion + kd_out``,
  everything trains (attnbench's choice);
* ``teacher`` -- plain DiT training (``train-teacher``): ``diffusion`` only.

Every weight is overridable (``--weight kd_eps=0.3``), as is what trains
(``--trainable all|attention``) and how (``--optimizer``, ``--lr``, ...: the
recipe's ``optimisation`` otherwise; ``optim.py``); the recipe used is written
with the checkpoint.
"""

from __future__ import annotations

from dataclasses import replace

from .. import attention
from ..attention.recipes import (
    ATTN_TAPS,
    OWN_CHOICE,
    TERMS,
    TRAINABLE,
    DistillRecipe,
    Optimisation,
)
from ..common.names import closest

DEFAULT = DistillRecipe(
    "default", {"diffusion": 1.0, "kd_out": 1.0}, "all",
    "any other method: diffusion + teacher-output MSE", OWN_CHOICE,
)
TEACHER = DistillRecipe(
    "teacher", {"diffusion": 1.0}, "all",
    "DiT training: MSE(ε) + VB with learned variance", "DiT, arXiv 2212.09748",
    optimisation=Optimisation(lr=1e-4, ema_decay=0.9999,
                              source="DiT, arXiv 2212.09748: AdamW 1e-4, no weight decay, "
                              "EMA 0.9999 (train-teacher's flags choose the shipped teacher's)"),
)


def _collect() -> dict[str, DistillRecipe]:
    recipes: dict[str, DistillRecipe] = {}
    for name in attention.names():
        backend = attention.get(name)
        for recipe in (backend.distill_recipe, *backend.distill_alternatives):
            if recipe is not None:
                recipes.setdefault(recipe.name, recipe)
    return {**recipes, DEFAULT.name: DEFAULT, TEACHER.name: TEACHER}


#: every recipe by name: the registered methods' (at import), ``default`` and ``teacher``
RECIPES: dict[str, DistillRecipe] = _collect()


def recipe_for(method: str) -> DistillRecipe:
    """The distillation recipe of ``method`` (its own, else ``default``)."""
    return attention.get(method).distill_recipe or DEFAULT


def for_objective(recipe: DistillRecipe, objective: str) -> DistillRecipe:
    """``recipe`` on a model trained with ``objective`` (a diffusers family's).

    A flow-matching model (FLUX, SD3, SANA, Wan) predicts one velocity: there are no ε
    and learned-variance channels for LiT's λ1 and λ2 terms. Its λ1 term becomes output
    KD at the same weight and λ2 drops (``<name>-flow``: attnbench's choice -- LiT
    publishes its recipe for ε-prediction models with learned variance, PixArt-Σ and DiT,
    only). Every other recipe is returned as it is.
    """
    if objective != "flow" or not {"kd_eps", "kd_sigma"} & set(recipe.active()):
        return recipe
    weights = {k: v for k, v in recipe.weights.items() if k not in ("kd_eps", "kd_sigma")}
    weights["kd_out"] = weights.get("kd_out", 0.0) + recipe.weights.get("kd_eps", 0.0)
    return replace(recipe, name=f"{recipe.name}-flow", weights=weights,
                   summary=recipe.summary + "; on a flow-matching model: λ1 on the whole "
                   "(velocity) output, no variance term",
                   source=f"{OWN_CHOICE}: {recipe.source} has ε and variance channels, a "
                   "flow-matching model one velocity")


def get_recipe(name: str) -> DistillRecipe:
    """The recipe called ``name`` (methods registered after import included)."""
    recipes = _collect()
    if name not in recipes:
        raise ValueError(f"unknown distillation recipe {name!r}" + closest(name, list(recipes)))
    return recipes[name]


__all__ = ["ATTN_TAPS", "DEFAULT", "RECIPES", "TEACHER", "TERMS", "TRAINABLE", "DistillRecipe",
           "for_objective", "get_recipe", "recipe_for"]
