"""``python -m attnbench report RUN_DIR...`` and ``python -m attnbench compare RUN_A RUN_B``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import cliutil, runfolder
from ..cliutil import UsageError, check_number
from ..results import QUALITY_LEVEL
from .build import write_report
from .compare import Thresholds, compare_frames, to_markdown
from .tables import load_run

COMPARE_HELP = """\
Compare RUN_B against RUN_A point by point (method, options, level, resolution, batch,
dtype, model) on latency, peak memory and quality, and print a markdown table.

Flagged as regressions: latency B/A > 1 + latency threshold; peak memory B/A > 1 + memory
threshold (unless both are under the memory floor); a quality metric worse by more than
the quality threshold (relative, in the metric's direction); a point measured in A but not
in B. The reverse changes are flagged as improvements. With --fail-if-regression the exit
code is 1 when anything regressed, 0 otherwise; bad input exits 2.
"""

#: exit code of ``compare --fail-if-regression`` when something regressed
EXIT_REGRESSION = 1


def report(args: argparse.Namespace) -> int:
    seen: dict[Path, str] = {}
    for run in args.runs:
        if Path(run).resolve() in seen:
            raise cliutil.UsageError(f"RUN_DIR {run} is given twice ({seen[Path(run).resolve()]}"
                                     f" and {run}): give each run once")
        seen[Path(run).resolve()] = run
    files = write_report(args.runs, args.out, args.baselines or None, args.title,
                         force=args.force)
    print(f"report: {files.markdown}", file=sys.stderr)
    print(f"report: {files.html} (self-contained), {len(files.plots)} plots in "
          f"{files.html.parent / 'plots'}", file=sys.stderr)
    return 0


def _fraction(text: str) -> float:
    """``0.1``, ``10%`` → 0.1: finite and >= 0 (a ``nan`` threshold would pass everything)."""

    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction (0.1) or a percentage "
                                         "(10%)") from None
    try:
        return check_number("threshold", value, low=0, example="0.1 or 10%")
    except UsageError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {str(err).split(': ', 1)[1]}") from None


def compare(args: argparse.Namespace) -> int:
    if args.out is not None:  # before reading: a user's file (or a run's table) is never replaced
        runfolder.claim_output(args.out, force=args.force, kind="compare", flag="--out")
    run_a, run_b = load_run(args.run_a, "A"), load_run(args.run_b, "B")
    run_a.name, run_b.name = _names(Path(args.run_a), Path(args.run_b))
    thresholds = Thresholds(latency=args.latency_threshold, memory=args.memory_threshold,
                            quality=args.quality_threshold,
                            memory_floor_mib=args.memory_floor_mib)
    result = compare_frames(run_a.frame, run_b.frame, thresholds)
    speed = {len(run_a.frame[run_a.frame["level"] != QUALITY_LEVEL]),
             len(run_b.frame[run_b.frame["level"] != QUALITY_LEVEL])}
    common = int((result.points["_merge"] == "both").sum()) if len(result.points) else 0
    if not common and not len(result.quality) and speed != {0}:
        raise ValueError(f"{args.run_a} and {args.run_b} share no point (method, options, "
                         "level, image size, batch, dtype, model): nothing to compare; compare "
                         "runs of the same sweep")
    text = to_markdown(run_a, run_b, result, only_flagged=args.only_flagged)
    if args.out is not None:
        runfolder.write_output(args.out, text, force=args.force, kind="compare", flag="--out")
    print(text)
    if args.fail_if_regression and result.regressions:
        print(f"attnbench compare: {result.regressions} regression(s) beyond the thresholds",
              file=sys.stderr)
        return EXIT_REGRESSION
    return 0


def _names(a: Path, b: Path) -> tuple[str, str]:
    na, nb = a.resolve().name, b.resolve().name
    return (na, nb) if na != nb else (str(a), str(b))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report", description="Write report.md, report.html (figures embedded, opens offline) and "
                    "plots/*.png for the run directories given. Published numbers from "
                    "baselines/published.csv are shown beside the measured ones, labelled.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories written by `attnbench run` (or their results.json)")
    p.add_argument("--out", type=cliutil.non_empty("--out", "a folder"),
                   help="output directory (default: the run directory; required "
                   "for several runs)")
    p.add_argument("--baselines", action="append", default=[], metavar="CSV",
                   help="published-numbers CSV (default baselines/published.csv; repeatable)")
    p.add_argument("--title", help="report title")
    p.add_argument("--force", action="store_true",
                   help="overwrite a report.md / report.html that attnbench did not write")
    p.set_defaults(func=report)

    p = subparsers.add_parser(
        "compare", description=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", metavar="RUN_A", help="the reference run directory")
    p.add_argument("run_b", metavar="RUN_B", help="the run compared against it")
    p.add_argument("--latency-threshold", type=_fraction, default=0.10, metavar="FRAC",
                   help="relative latency change flagged, e.g. 0.1 or 10%% (default 0.10)")
    p.add_argument("--memory-threshold", type=_fraction, default=0.10, metavar="FRAC",
                   help="relative peak-memory change flagged (default 0.10)")
    p.add_argument("--memory-floor-mib", type=cliutil.number("--memory-floor-mib", low=0),
                   default=1.0, metavar="MIB",
                   help="memory changes are ignored when both values are below this "
                        "(default 1 MiB)")
    p.add_argument("--quality-threshold", type=_fraction, default=0.05, metavar="FRAC",
                   help="relative quality-metric change flagged (default 0.05)")
    p.add_argument("--only-flagged", action="store_true", help="list flagged points only")
    p.add_argument("--out", help="also write the markdown to this file")
    p.add_argument("--force", action="store_true",
                   help="overwrite an --out file that attnbench did not write as a comparison")
    p.add_argument("--fail-if-regression", action="store_true",
                   help=f"exit {EXIT_REGRESSION} when any regression is flagged (for CI)")
    p.set_defaults(func=compare)
