"""The offline quality world and the data sources of training and distillation.

>>> from attnbench.data import ShapesWorld, describe_labels
>>> world = ShapesWorld(32, seed=0)
>>> x, y = world.get(range(8))            # [8, 3, 32, 32] in [-1, 1], labels [8]
>>> world.scene(0).objects                 # doctest: +SKIP  (exact ground truth)

``shapes.py`` is the world (label space, scenes, rendering, ground truth),
``sources.py`` the sources (shapes, tensors, .npz, folders of latents),
``images.py`` grids and PNG writing, ``cli.py`` the ``world`` subcommand.
"""

from .images import encode_png, make_grid, save_png, upscale
from .shapes import (
    NUM_CLASSES,
    PALETTE,
    PROMPTS,
    RELATIONS,
    SHAPES,
    TASKS,
    Prompt,
    Scene,
    ShapeObject,
    ShapesWorld,
    check_scene,
    describe_labels,
    render,
    shape_mask,
    task_labels,
    to_tensor,
    to_uint8,
)
from .sources import (
    DataSource,
    NpyFolderSource,
    TensorSource,
    check_compatible,
    load_folder,
    load_npz,
    open_source,
)

__all__ = [
    "NUM_CLASSES",
    "PALETTE",
    "PROMPTS",
    "RELATIONS",
    "SHAPES",
    "TASKS",
    "DataSource",
    "NpyFolderSource",
    "Prompt",
    "Scene",
    "ShapeObject",
    "ShapesWorld",
    "TensorSource",
    "check_compatible",
    "check_scene",
    "describe_labels",
    "encode_png",
    "load_folder",
    "load_npz",
    "make_grid",
    "open_source",
    "render",
    "save_png",
    "shape_mask",
    "task_labels",
    "to_tensor",
    "to_uint8",
    "upscale",
]
