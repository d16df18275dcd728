"""Distillation of converted students, and training of the shipped teacher.

>>> from attnbench.distill import TrainConfig, distill, default_teacher_path
>>> summary = distill("runs/lit", "lit", TrainConfig(steps=200))   # doctest: +SKIP
>>> summary["eval"]["final_ema"]["eps_mse_vs_teacher"]             # doctest: +SKIP

``recipes.py`` the recipes (loss weights, what trains), ``losses.py`` the
terms, ``trainer.py`` the loop (DDP, EMA, checkpoints, metrics, evaluation),
``pipeline.py`` the ``distill`` / ``train_teacher`` jobs, ``io.py`` atomic writes,
``cli.py`` the subcommands. The shipped teacher is :mod:`attnbench.models.teacher`
(every stage loads it); torchrun support is :mod:`attnbench.common.dist`.
"""

from ..models.teacher import TEACHER_CONFIG, default_teacher_path, verify_teacher
from .pipeline import distill, train_teacher
from .recipes import RECIPES, TERMS, DistillRecipe, get_recipe, recipe_for
from .trainer import TrainConfig, Trainer, evaluate, plan_batch

__all__ = [
    "RECIPES",
    "TEACHER_CONFIG",
    "TERMS",
    "DistillRecipe",
    "TrainConfig",
    "Trainer",
    "default_teacher_path",
    "distill",
    "evaluate",
    "get_recipe",
    "plan_batch",
    "recipe_for",
    "train_teacher",
    "verify_teacher",
]
