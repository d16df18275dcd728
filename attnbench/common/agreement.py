"""Every torchrun rank must run the same command: checked before any work.

torchrun hands every rank the same command line, but a launcher script, an
environment variable or a node's own defaults can make them differ, and ranks that
disagree (one sharding with ``--fsdp``, one not; two sweeps of other sizes) wait on
each other's collectives until a timeout, or measure apart. :func:`check_same_options`
compares the parsed options of every rank and names what differs, on every rank.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def check_same_options(info, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` on every rank unless every rank holds the same ``options``
    (a flag's value by its argparse name); a collective: every rank must call it."""
    if not info.enabled:
        return
    gathered: list[dict[str, Any] | None] = [None] * info.world_size
    dist.all_gather_object(gathered, {k: repr(v) for k, v in options.items()})
    differ = []
    for key in sorted(set().union(*gathered)):
        values = [g.get(key) for g in gathered]
        others = {r: v for r, v in enumerate(values) if v != values[0]}
        if others:
            said = ", ".join(f"rank {r} {v}" for r, v in others.items())
            differ.append(f"--{key.replace('_', '-')}: rank 0 {values[0]}, {said}")
    if differ:
        raise ValueError(f"the torchrun ranks were given other options ({'; '.join(differ)}): "
                         "launch every rank with the same command")
