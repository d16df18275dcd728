"""``python -m attnbench convert``: a DiT checkpoint → a student of any registered method.

    python -m attnbench convert --ckpt DiT-XL-2-256x256.pt --method lit --out runs/lit-xl2
    python -m attnbench convert --ckpt ... --method clear --option radius=16 --out ...

Writes ``OUT/model.safetensors``, ``OUT/config.json`` (enough for
``attnbench.models.load_dit(OUT)`` to rebuild the student) and
``OUT/inheritance.json`` (the :class:`~attnbench.models.InheritanceReport`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import runfolder
from ..cliutil import UsageError, non_empty, parse_options, positive_int
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_dit
from .configs import config_names, get_config
from .convert import REPORT_FILE, convert, save_student


def _convert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: pass a directory")
    options = parse_options(args.option)
    if args.config is not None:
        try:
            get_config(args.config)
        except ValueError:
            raise UsageError(f"--config {args.config!r} is not a DiT config: choose one of "
                             f"{', '.join(config_names())}, or leave it out to infer it") from None
    runfolder.lock_folder(out, "convert")
    outputs = (WEIGHTS_FILE, CONFIG_FILE, REPORT_FILE)
    clash = [n for n in outputs if (out / n).exists()]
    if clash and not args.force:
        raise UsageError(
            f"--out {out} already holds a model ({', '.join(clash)}): pass --force to "
            "overwrite it or choose another directory"
        )
    runfolder.claim_files(out, outputs, force=args.force, kind="model")
    overrides = {}
    if args.teacher_heads is not None:
        overrides["num_heads"] = args.teacher_heads
    teacher = load_dit(args.ckpt, config=args.config, entry=args.entry, **overrides)
    student, report = convert(
        teacher,
        args.method,
        recipe=args.recipe,
        num_heads=args.num_heads,
        inherit_projections=args.inherit_projections,
        seed=args.seed,
        **options,
    )
    runfolder.atomic_folder(out, lambda staging: save_student(student, staging, report))
    weights = out / WEIGHTS_FILE
    if args.json:
        print(json.dumps({"weights": str(weights), "report": str(out / REPORT_FILE),
                          **report.to_dict()}, indent=2, default=str))
    else:
        print(report.summary())
        print(f"wrote {weights}, {out / CONFIG_FILE} and {out / REPORT_FILE}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``convert``."""
    p = subparsers.add_parser(
        "convert",
        description=(
            "Replace every block's attention of a DiT checkpoint by METHOD's mixer, inherit "
            "what the method's recipe inherits, and save the student with a report "
            "(inheritance.json) of what was inherited, new, re-initialised and dropped."
        ),
    )
    p.add_argument("--ckpt", required=True, help="DiT checkpoint: .pt, .safetensors or a "
                   "directory saved by attnbench")
    p.add_argument("--method", required=True, help="registered attention method "
                   "(python -m attnbench list)")
    p.add_argument("--out", required=True, type=non_empty("--out", "a folder"),
                   help="directory to write the student to")
    p.add_argument(
        "--option", "--options", dest="option", action="extend", nargs="+", default=[],
        metavar="KEY=VALUE", help="a method option, repeatable (e.g. --option radius=16)",
    )
    p.add_argument("--recipe", default=None,
                   help="conversion recipe (default: the method's own, else 'inherit')")
    p.add_argument("--num-heads", type=positive_int, default=None,
                   help="heads of the student's attention (default: the recipe's)")
    p.add_argument(
        "--inherit-projections", action=argparse.BooleanOptionalAction, default=None,
        help="inherit q/k/v/proj (default: the recipe's; LiT's paper rule: no)",
    )
    p.add_argument("--config", default=None,
                   help="zoo config the checkpoint must match (e.g. DiT-XL/2); inferred if omitted")
    p.add_argument("--teacher-heads", type=positive_int, default=None,
                   help="heads of the checkpoint, when its size is not in the zoo")
    p.add_argument("--entry", default=None,
                   help="state dict entry of a train.py checkpoint (default: ema, else model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the non-inherited init")
    p.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_convert)
