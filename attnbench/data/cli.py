"""``python -m attnbench world``: describe the shapes world, or render some of it.

    python -m attnbench world --describe            # the 91 labels by GenEval task
    python -m attnbench world --describe --json
    python -m attnbench world --render grid.png --count 64 --size 64 --seed 1
    python -m attnbench world --scene 5             # the ground truth of image 5
    python -m attnbench world --train-pipeline runs/world-t2i        # the world-t2i pipeline
    python -m attnbench world --train-pipeline runs/world-t2i --resume
    python -m attnbench world --train-pipeline /tmp/t --quick         # a few steps (tests)
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .. import runfolder
from ..cliutil import integer, non_empty, number, positive_int, requires
from .images import encode_png, make_grid, upscale
from .shapes import ShapesWorld, describe_labels, task_labels

#: the largest grid ``--render`` draws: a PNG of this many pixels (about 200 MB in memory)
MAX_RENDER_PIXELS = 64 * 1024 * 1024


#: the flags that only ``--train-pipeline`` takes, with their ``WorldTrainSettings`` field
TRAIN_FLAGS = {"resume": None, "quick": None, "steps": "steps", "vae_steps": "vae_steps",
               "batch": "batch", "lr": "lr", "ckpt_every": "ckpt_every",
               "ckpt_minutes": "ckpt_minutes"}


def _train_pipeline(args: argparse.Namespace) -> int:
    from ..distill.world_t2i import WorldTrainer, settings_from

    for flag in ("render", "scene"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag} and --train-pipeline are separate jobs: run them "
                             "one at a time")
    if args.size is not None:
        raise ValueError("--size: the world-t2i pipeline's image size is fixed by its "
                         "configuration (64 px; --quick 32 px); drop --size")
    if args.task:
        raise ValueError("--task: the world-t2i pipeline trains on every label; drop --task")
    overrides = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if field}
    settings = settings_from(args.quick, seed=args.seed, world_seed=args.seed,
                             sample_steps=args.sample_steps, **overrides)
    settings.validate()  # every flag checked before the folder is touched
    trainer = WorldTrainer(args.train_pipeline, settings, progress=not args.no_progress)
    summary = trainer.run(resume=args.resume, force=args.force)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _eval_pipeline(args: argparse.Namespace) -> int:
    """The GenEval proxy of a world-t2i pipeline folder (a checkpoint's ``OUT/pipeline``)."""
    from ..distill.world_t2i import evaluate_pipeline, write_grid
    from ..integrations.diffusers.world_t2i import load_world_pipeline

    if args.render is not None:
        runfolder.claim_output(args.render, force=args.force, kind="world", flag="--render")
    pipe = load_world_pipeline(args.eval_pipeline, flag="--eval-pipeline")
    result, images, _ = evaluate_pipeline(pipe, count=args.count,
                                          steps=args.sample_steps or 28, seed=args.seed)
    if args.render is not None:
        write_grid(args.render, images[:64], nrow=args.nrow)
    print(json.dumps(result, indent=2))
    return 0


def _world(args: argparse.Namespace) -> int:
    if args.train_pipeline is not None and args.eval_pipeline is not None:
        raise ValueError("--train-pipeline and --eval-pipeline are separate jobs: run them "
                         "one at a time")
    if args.train_pipeline is not None:
        return _train_pipeline(args)
    if args.eval_pipeline is not None:
        return _eval_pipeline(args)
    requires("--train-pipeline OUT", False,
             {f"--{k.replace('_', '-')}": getattr(args, k) for k in TRAIN_FLAGS})
    args.size = args.size or 32

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
    p.add_argument("--size", type=integer("--size", low=16, high=1024), default=None,
                   help="image side, px: 16 to 1024 (default 32)")
    p.add_argument("--seed", type=int, default=0,
                   help="world seed (default 0); with --train-pipeline also every training "
                        "draw, with --eval-pipeline the samples' noise")
    p.add_argument("--task", default=None, help="only labels of this GenEval task")
    p.add_argument("--scale", type=integer("--scale", low=1, high=64), default=4,
                   help="upscaling of the grid: 1 to 64 (default 4)")
    t = p.add_argument_group("training the world-t2i pipeline (a FLUX text-to-image model)")
    t.add_argument("--train-pipeline", metavar="OUT", default=None,
                   type=non_empty("--train-pipeline", "a folder"),
                   help="train it into OUT (OUT/pipeline: the diffusers folder); seeded by "
                        "--seed, checkpointed, SIGINT saves")
    t.add_argument("--resume", action="store_true", help="continue the run in OUT")
    t.add_argument("--quick", action="store_true",
                   help="a tiny model for a few steps (tests)")
    t.add_argument("--steps", type=integer("--steps", low=1), default=None,
                   help="transformer steps (default 12000)")
    t.add_argument("--vae-steps", type=integer("--vae-steps", low=0), default=None,
                   help="VAE steps before them (default 1500)")
    t.add_argument("--batch", type=integer("--batch", low=1), default=None,
                   help="batch size of the transformer stage (default 32)")
    t.add_argument("--lr", type=number("--lr", low=0, low_open=True), default=None,
                   help="peak learning rate of the transformer (default 1e-3)")
    t.add_argument("--ckpt-every", type=integer("--ckpt-every", low=1), default=None,
                   help="steps between checkpoints (default 200)")
    t.add_argument("--ckpt-minutes", type=number("--ckpt-minutes", low=0, low_open=True),
                   default=None, help="also checkpoint when this many minutes have passed "
                                      "since the last checkpoint (default 5)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--eval-pipeline", metavar="DIR", default=None,
                   type=non_empty("--eval-pipeline", "a folder"),
                   help="the GenEval proxy (exact detector) of a world-t2i pipeline folder on "
                        "--count samples (the six tasks in turn; --seed); --render PNG: their "
                        "grid")
    t.add_argument("--sample-steps", type=integer("--sample-steps", low=1), default=None,
                   help="Euler steps of the samples of --eval-pipeline and of the end of "
                        "--train-pipeline (default 28)")
    p.set_defaults(func=_world)
