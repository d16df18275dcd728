"""The speed targets of ``baselines/targets.csv``: the one reader, and the one baseline.

A speed-up target is taken over **the fastest exact kernel that ran at the same point**
(same run, level, model and size): whichever of :data:`EXACT_METHODS` (and, where a run
times them, each SDPA backend forced, FlexAttention without a mask, flash-attn and
xformers) was quickest there. ``python -m attnbench.bench.floor targets`` and
``scripts/gpu_run.py`` both judge by it; ``baselines/README.md`` says the columns.

Standard library only: ``scripts/gpu_run.py`` reads the targets from the source tree
without importing torch or an installed attnbench.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..common.paths import REPO_ROOT

#: the speed targets, one copy for the repository
TARGETS_CSV = REPO_ROOT / "baselines" / "targets.csv"
#: the methods that compute softmax attention exactly: the candidates for the baseline
EXACT_METHODS = ("softmax", "flash", "xformers")
#: the ``baseline`` column's value for a speed-up over the fastest exact kernel
FASTEST_EXACT = "fastest-exact"


@dataclass(frozen=True)
class Target:
    """A speed target (a row of ``baselines/targets.csv``)."""

    name: str
    kind: str  # speedup | peer | bandwidth
    stage: str
    level: str
    model: str
    resolution: int
    dtype: str
    spec: str
    baseline: str
    minimum: float
    profile: str
    source: str


def load_targets(path: Path = TARGETS_CSV) -> tuple[Target, ...]:
    """The targets (none when the file is absent: an installed attnbench has no
    ``baselines/``)."""
    if not path.is_file():
        return ()
    with path.open(newline="") as f:
        return tuple(Target(**{**r, "resolution": int(r["resolution"]),
                               "minimum": float(r["minimum"])}) for r in csv.DictReader(f))


def fastest_exact(timed: list[tuple[float, str]]) -> tuple[float, str] | None:
    """The baseline of a speed-up: the quickest ``(seconds, name)`` of the exact kernels
    timed at a point; ``None`` when none ran."""
    return min(timed) if timed else None
