"""``python -m attnbench world``: describe the shapes world, or render some of it.

    python -m attnbench world --describe            # the 91 labels by GenEval task
    python -m attnbench world --describe --json
    python -m attnbench world --render grid.png --count 64 --size 64 --seed 1
    python -m attnbench world --scene 5             # the ground truth of image 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _world(args: argparse.Namespace) -> int:
    import numpy as np

    from .images import make_grid, save_png, upscale
    from .shapes import ShapesWorld, describe_labels, task_labels

    if not (args.describe or args.render or args.scene is not None):
        args.describe = True
    if args.describe:
        print(describe_labels(as_json=args.json))
    labels = task_labels(args.task) if args.task else None
    world = ShapesWorld(args.size, seed=args.seed, labels=labels)
    if args.scene is not None:
        if args.scene < 0:
            raise ValueError(f"--scene {args.scene}: image indices are integers >= 0")
        scene = world.scene(args.scene)
        print(json.dumps(scene.to_dict(), indent=2) if args.json else
              f"image {scene.index}: {scene.prompt.text!r} ({scene.prompt.task})\n"
              + "\n".join(f"  {o.color} {o.shape} box={o.box} pixels={o.pixels}"
                          for o in scene.objects))
    if args.render:
        if args.count <= 0:
            raise ValueError("--count must be > 0")
        images = np.stack([world.image(i) for i in range(args.count)])
        blocking = [p for p in Path(args.render).parents if p.exists() and not p.is_dir()]
        if blocking:
            raise ValueError(f"--render {args.render}: {blocking[0]} is a file, not a folder")
        path = save_png(args.render, upscale(make_grid(images, nrow=args.nrow), args.scale))
        print(f"wrote {path} ({args.count} images, {args.size}px, seed {args.seed})")
    return 0


def add_parser(subparsers) -> None:
    """Register ``world``."""
    p = subparsers.add_parser(
        "world", help="the shapes world: its label space (GenEval tasks) and sample images",
        description="The procedural shapes world the shipped teacher was trained on.",
    )
    p.add_argument("--describe", action="store_true", help="print the label space")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument("--render", metavar="PNG", default=None, help="write a grid of images")
    p.add_argument("--scene", type=int, default=None, metavar="INDEX",
                   help="print the ground truth of one image")
    p.add_argument("--count", type=int, default=64, help="images in the grid (default 64)")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row (default 8)")
    p.add_argument("--size", type=int, default=32, help="image side, px (default 32)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--task", default=None, help="only labels of this GenEval task")
    p.add_argument("--scale", type=int, default=4, help="upscaling of the grid (default 4)")
    p.set_defaults(func=_world)
