"""``python -m attnbench <command>``: one subcommand per stage.

Each stage module contributes ``add_parser(subparsers)`` which registers its
subcommands with ``func=handler``; handlers return an exit code. :data:`COMMANDS`
says which module defines each command and its line in ``--help``: only the module of
the command given is imported, so ``--help`` starts without loading the stages (torch,
matplotlib, pandas, diffusers), and so does ``list`` on the CPU, which reads the
built-ins' catalogue (:mod:`attnbench.common.catalogue`). A ``ValueError``
(bad user input, by the project's convention) or a missing file becomes a
one-line message on stderr and exit code 2 -- never a traceback; so does a full
disk or a read-only destination (:func:`attnbench.runfolder.write_error`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from . import cliutil, runfolder
from .common.versions import __version__

EXIT_USAGE = 2


# --------------------------------------------------------------------------- list


def _registry_rows(device: str, dtype_name: str) -> tuple[list[dict], dict[str, str]]:
    """``list``'s rows from the live registry (torch and every method imported, third-party
    ones included), and the plugins that failed to load."""
    from . import attention  # lazy: the registry imports torch; ``--help`` does not need it
    from .common import catalogue

    dtype = cliutil.dtype(dtype_name)
    cliutil.device(device)  # cpu / cuda[:N] of this machine, before any method is asked
    rows = [catalogue.method_row(backend.describe(), backend.available(device, dtype),
                                 backend.path_reasons(device, dtype))
            for backend in map(attention.get, attention.names())]
    return rows, attention.plugin_errors()


def _list(args: argparse.Namespace) -> int:
    """The built-ins from the catalogue where it can answer (no torch), else the registry."""
    from .common import catalogue  # lazy: ``--help`` needs none of it

    cliutil.dtype_name(args.dtype)
    rows, errors = catalogue.rows(args.device, args.dtype), {}
    if rows is None:
        rows, errors = _registry_rows(args.device, args.dtype)
    if args.json:
        print(json.dumps({"device": args.device, "dtype": args.dtype, "methods": rows,
                          "plugin_errors": errors}, indent=2, default=str))
        return 0
    print(f"attention methods on {args.device} ({args.dtype}):")
    for info in rows:
        status = "available" if info["available"] is None else f"unavailable: {info['available']}"
        print(f"\n  {info['name']:<9} {info['summary']}")
        print(f"  {'':<9} {status}")
        paths = ", ".join(
            f"{p}" + ("" if r is None else " (no)") for p, r in info["implementations"].items()
        )
        print(f"  {'':<9} implementations: {paths}")
        for opt in info["options"]:
            scope = " [mixer]" if opt["mixer_only"] else ""
            choices = f" one of {opt['choices']}" if opt["choices"] else ""
            print(f"  {'':<9}   {opt['name']}={opt['default']!r}{scope}: {opt['help']}{choices}")
            if opt.get("source"):
                print(f"  {'':<9}     default from: {opt['source']}")
        for kind in ("conversion_recipe", "distill_recipe"):
            recipe = info.get(kind)
            if recipe:
                print(f"  {'':<9}   {kind.replace('_', ' ')}: {recipe['name']} "
                      f"(source: {recipe['source']})")
        recipe = info.get("distill_recipe")
        if recipe:
            optimisation = recipe["optimisation"]
            print(f"  {'':<9}     {recipe['describe']}")
            print(f"  {'':<9}     optimisation from: {optimisation['source']}")
            if optimisation["substitutes"]:
                print(f"  {'':<9}     attnbench differs: {optimisation['substitutes']}")
        for other in info.get("distill_alternatives", []):
            print(f"  {'':<9}   other recipe: {other}")
        for note in info.get("notes", []):
            print(f"  {'':<9}   note: {note}")
    for name, reason in errors.items():
        print(f"\n  plugin {name!r} failed to load: {reason}")
    return 0


def _add_list(subparsers) -> None:
    p = subparsers.add_parser("list", help="every attention method, its options and availability")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", default="cpu", help="device to check availability on")
    p.add_argument("--dtype", default="float32",
                   help=f"dtype to check availability for: {', '.join(cliutil.DTYPES)}")
    p.set_defaults(func=_list)


# --------------------------------------------------------------------------- main

#: every command after ``list``, in the order of ``--help``: the stage module whose
#: ``add_parser(subparsers)`` defines it, and its line in ``--help``
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("models.cli",
                "convert a DiT checkpoint to any registered attention (weight inheritance)"),
    "run": ("pipeline", "latency, memory and FLOPs of every method across resolutions"),
    "import-benchmark": ("bench.cli",
                         "turn pytest-benchmark JSON (tests/bench) into a results table"),
    "world": ("data.cli", "the shapes world: its label space (GenEval tasks) and sample images"),
    "distill": ("distill.cli",
                "convert a DiT teacher to METHOD and distil the student (LiT/CLEAR/SLA recipes)"),
    "train-teacher": ("distill.cli", "train the small pixel-space DiT teacher on the shapes world"),
    "report": ("report.cli",
               "markdown + self-contained HTML report with plots of one or more runs"),
    "compare": ("report.cli", "differences between two runs per method × resolution, flags "
                              "beyond thresholds (usable in CI)"),
    "sample": ("metrics.cli",
               "draw samples with DiT's protocol into PNGs and an ADM-format .npz"),
    "eval": ("metrics.cli", "quality of a checkpoint (FID family, GenEval proxy, fidelity to the "
                            "teacher) into the results table"),
    "fidelity": ("zero_shot", "zero-shot: each method vs softmax on the model's own q, k, v"),
}


class _Commands:
    """The subparsers handed to a stage's ``add_parser``: each command gets its line in
    ``--help`` from :data:`COMMANDS`."""

    def __init__(self, subparsers) -> None:
        self._subparsers = subparsers

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, help=COMMANDS[name][1], **kwargs)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line naming the flag, exit code 2
    (argparse's own prints the usage block first; the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s stage in full (its module imported) and every other
    command as its ``--help`` line alone; ``None``: every stage in full."""
    parser = Parser(
        prog="python -m attnbench",
        description="Benchmark and evaluate efficient attention inside Diffusion Transformers.",
    )
    parser.add_argument("--version", action="version", version=f"attnbench {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_list(subparsers)
    added: set[str] = set()
    for name, (module, line) in COMMANDS.items():
        if command is None or COMMANDS.get(command, ("",))[0] == module:
            if module not in added:  # a stage defines all its commands at once
                importlib.import_module(f"attnbench.{module}").add_parser(_Commands(subparsers))
                added.add(module)
        else:
            subparsers.add_parser(name, help=line, add_help=False)
    return parser


def _command(argv: Sequence[str]) -> str:
    """The command ``argv`` names (its first word that is not an option), or ``""``."""
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    args.argv = argv  # the command line, recorded with every result
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
        print(f"attnbench {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"attnbench {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a full disk or a read-only --out, wherever the write was
        explained = runfolder.write_error(err)
        if explained is None:
            raise
        print(f"attnbench {args.command}: error: {explained}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        runfolder.release_all()  # the folder locks the command took


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
