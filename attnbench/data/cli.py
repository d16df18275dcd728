"""``python -m attnbench world``: describe the shapes world, or render some of it.

    python -m attnbench world --describe            # the 91 labels by GenEval task
    python -m attnbench world --describe --json
    python -m attnbench world --render grid.png --count 64 --size 64 --seed 1
    python -m attnbench world --scene 5             # the ground truth of image 5
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .. import runfolder
from ..cliutil import integer, positive_int
from .images import encode_png, make_grid, upscale
from .shapes import ShapesWorld, describe_labels, task_labels

#: the largest grid ``--render`` draws: a PNG of this many pixels (about 200 MB in memory)
MAX_RENDER_PIXELS = 64 * 1024 * 1024


def _world(args: argparse.Namespace) -> int:
    if not (args.describe or args.render is not None or args.scene is not None):
        args.describe = True
    if args.render is not None:  # before any image is drawn: the path, then the size
        runfolder.claim_output(args.render, force=args.force, kind="world", flag="--render")
        nrow = min(args.nrow, args.count)
        side = (args.size + 2) * args.scale
        pixels = side * nrow * side * -(-args.count // nrow)
        if pixels > MAX_RENDER_PIXELS:
            raise ValueError(f"--render: {args.count} images of {args.size}px ×{args.scale} make "
                             f"a {pixels / 2**20:.0f} Mpixel grid (at most "
                             f"{MAX_RENDER_PIXELS // 2**20}); lower --count, --size or --scale")
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
    if args.render is not None:
        images = np.stack([world.image(i) for i in range(args.count)])
        grid = upscale(make_grid(images, nrow=args.nrow), args.scale)
        path = runfolder.write_output(args.render, encode_png(grid), force=args.force,
                                      kind="world", flag="--render")
        print(f"wrote {path} ({args.count} images, {args.size}px, seed {args.seed})")
    return 0


def add_parser(subparsers) -> None:
    """Register ``world``."""
    p = subparsers.add_parser(
        "world",
        description="The procedural shapes world the shipped teacher was trained on.",
    )
    p.add_argument("--describe", action="store_true", help="print the label space")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument("--render", metavar="PNG", default=None, help="write a grid of images")
    p.add_argument("--force", action="store_true",
                   help="overwrite a --render file that attnbench did not write")
    p.add_argument("--scene", type=int, default=None, metavar="INDEX",
                   help="print the ground truth of one image")
    p.add_argument("--count", type=positive_int, default=64, help="images in the grid (default 64)")
    p.add_argument("--nrow", type=positive_int, default=8, help="images per grid row (default 8)")
    p.add_argument("--size", type=integer("--size", low=16, high=1024), default=32,
                   help="image side, px: 16 to 1024 (default 32)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--task", default=None, help="only labels of this GenEval task")
    p.add_argument("--scale", type=integer("--scale", low=1, high=64), default=4,
                   help="upscaling of the grid: 1 to 64 (default 4)")
    p.set_defaults(func=_world)
