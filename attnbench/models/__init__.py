"""DiT model zoo, safe checkpoint loading, and conversion to any registered attention.

>>> from attnbench import models
>>> model = models.build_dit("DiT-T/2")                        # random init, tiny
>>> teacher = models.load_dit("DiT-XL-2-256x256.pt")            # doctest: +SKIP
>>> student, report = attnbench.convert(teacher, "lit")         # doctest: +SKIP
>>> models.save_student(student, "runs/lit-xl2")                # doctest: +SKIP

``dit.py`` is the model (state-dict compatible with facebookresearch/DiT),
``configs.py`` the configs and zoo, ``checkpoint.py`` loading and saving,
``convert.py`` weight inheritance, ``cli.py`` the ``convert`` subcommand.
"""

from .checkpoint import (
    CheckpointInfo,
    check_state_dict,
    infer_config,
    load_dit,
    model_from_state_dict,
    read_checkpoint,
    save_dit,
)
from .configs import CPU_DEFAULT, DIT_CONFIGS, TEST_MODEL, DiTConfig, config_names, get_config
from .convert import (
    REPORT_FILE,
    InheritanceReport,
    Recipe,
    get_recipe,
    recipe_for,
    recipe_names,
    save_student,
)
from .dit import DiT, DiTBlock, build_dit, sincos_pos_embed

__all__ = [
    "CPU_DEFAULT",
    "DIT_CONFIGS",
    "REPORT_FILE",
    "TEST_MODEL",
    "CheckpointInfo",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "InheritanceReport",
    "Recipe",
    "build_dit",
    "check_state_dict",
    "config_names",
    "get_config",
    "get_recipe",
    "infer_config",
    "load_dit",
    "model_from_state_dict",
    "read_checkpoint",
    "recipe_for",
    "recipe_names",
    "save_dit",
    "save_student",
    "sincos_pos_embed",
]
