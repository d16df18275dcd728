"""``python -m attnbench import-benchmark``: pytest-benchmark JSON (tests/bench) as a run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..results import ResultsWriter
from .benchmark_json import rows_from_pytest_benchmark


def import_benchmark(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"no pytest-benchmark JSON at {path} "
                                "(write one with pytest --benchmark-only --benchmark-json FILE)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        kind = "binary data (not UTF-8 text)" if isinstance(err, UnicodeDecodeError) else err
        raise ValueError(f"FILE {path} is not pytest-benchmark JSON ({kind}): write one with "
                         "pytest --benchmark-only --benchmark-json FILE") from None
    rows, meta = rows_from_pytest_benchmark(data)
    out = Path(args.out) if args.out else path.with_suffix("")
    writer = ResultsWriter(out, {**meta, "command": " ".join(["python -m attnbench",
                                                              *args.argv])},
                           force=args.force, command="import-benchmark")
    for row in rows:
        writer.append(row)
    writer.finalize()
    print(f"{len(rows)} benchmark rows imported into {out}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("import-benchmark")
    p.add_argument("file", help="the JSON written by pytest --benchmark-only --benchmark-json")
    p.add_argument("--out", help="run directory to write (default: FILE without .json)")
    p.add_argument("--force", action="store_true",
                   help="overwrite results files in --out that attnbench did not write")
    p.set_defaults(func=import_benchmark)
