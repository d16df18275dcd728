"""``torchrun --nproc_per_node N -m attnbench run ...``: the sweep's points dealt over ranks.

Each rank (one device each) measures a share of the points, every point exactly once.
Points are dealt by (size, level) group, round-robin over the ranks, so a group's
softmax baseline runs on the rank that ran the methods compared with it (the sweep's
baseline rule holds as in one process). Rank 0 holds the run folder's lock and is its
one writer; the other ranks hand their rows over through ``rows.rank<R>.jsonl`` in the
folder (appended one row at a time, as ``results.jsonl`` is), which rank 0 merges into
the results -- at the end, and at the start of a resumed run, so the rows a killed
rank measured are kept. Rank 0 decides what is left to run and tells the others.

A rank that dies takes none of this down: every row is on disk the moment it is
measured, and :func:`stop_cleanly` makes the surviving ranks exit with one line naming
the cause -- torchrun's SIGTERM (it stops every rank when one fails) or a collective
that failed because a peer is gone -- instead of a traceback or a wait. Rerunning the
same command measures what is left, every point once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from .. import runfolder
from ..results import Result, ResultsWriter, load_rows
from .sweep import SweepPlan, _base_row, baseline_compared, baseline_last, calibrate, run_point

HANDOVER = "rows.rank{rank}.jsonl"


class RankLost(RuntimeError):
    """A collective of the sweep failed: another rank died, stopped or timed out."""


@contextlib.contextmanager
def stop_cleanly(out: Path, rank: int, world: int):
    """Exit this rank with one line naming the cause when the sweep is cut short.

    SIGTERM (torchrun's way of stopping every rank when one fails) and a lost peer
    (:class:`RankLost`) end the process with ``SystemExit`` -- which a point's own
    error handling does not catch -- after saying where the rows are and how to finish.
    """
    where = f"rank {rank} of {world}"
    finish = (f"the rows measured so far are kept in {out}; rerun the same command to "
              "measure the rest (each point once)")

    def on_term(signum, frame):
        print(f"attnbench run: error: {where} stopped by {signal.Signals(signum).name}: "
              "torchrun stops every rank when one fails (its report names the failed rank "
              f"and its exit code); {finish}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield
    except RankLost as err:
        print(f"attnbench run: error: {where}: {err}; {finish}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _collective(what: str, fn, *args, **kwargs):
    """``fn(*args)``, a collective, with its failure said as :class:`RankLost`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:  # gloo and NCCL errors (DistError among them)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RankLost(f"{what} failed: another rank died or stopped ({first})") from None


def handover_files(out: Path) -> list[Path]:
    return sorted(Path(out).glob(HANDOVER.format(rank="*")))


def merge_handovers(writer: ResultsWriter) -> int:
    """Append every handed-over row to ``writer`` and remove the hand-over files (a row
    merged twice after a kill replaces itself: rows are keyed by point)."""
    merged = 0
    for path in handover_files(writer.run_dir):
        runfolder.repair_tail(path)
        for row in load_rows(path):
            writer.append(row)
            merged += 1
        path.unlink()
    return merged


def deal(points: list, world: int) -> list[list]:
    """``points`` (baseline last in each group) dealt over ``world`` ranks by (size, level)."""
    groups: dict[tuple, list] = {}
    for point in points:
        groups.setdefault((point[0], point[1]), []).append(point)
    shares: list[list] = [[] for _ in range(world)]
    for i, group in enumerate(groups.values()):
        shares[i % world].extend(group)
    return shares


def run_sweep(plan: SweepPlan, writer: ResultsWriter | None, out: Path, *,
              progress: bool = True) -> list[Result]:
    """This rank's share of ``plan``; rank 0 (the one with ``writer``) returns every row."""

    rank, world = dist.get_rank(), dist.get_world_size()
    box: list = [None]
    if writer is not None:
        merge_handovers(writer)
        done = writer.done()
        box = [[p for p in baseline_last(plan.points())
                if _base_row(plan, *p).key() not in done]]
    _collective("sharing out the points", dist.broadcast_object_list, box, 0)
    mine = deal(box[0], world)[rank]
    calib = calibrate(plan.device, plan.dtype)
    handover = Path(out) / HANDOVER.format(rank=rank)
    seen: list[Result] = []
    bar = tqdm(mine, disable=not progress, unit="point", dynamic_ncols=True,
               desc=f"rank {rank}", position=rank)
    for res, level, spec in bar:
        started = time.perf_counter()
        row = run_point(plan, res, level, spec, calib,
                        keep_baseline=baseline_compared(spec, res, level, seen))
        row.extra["wall_s"] = round(time.perf_counter() - started, 3)
        row.extra["rank"] = rank
        seen.append(row)
        if writer is not None:
            writer.append(row)
        else:
            runfolder.append_jsonl(handover, row.as_row())
    bar.close()
    _collective("waiting for every rank's share", dist.barrier)
    if writer is None:
        return []
    merge_handovers(writer)
    return writer.finalize()
