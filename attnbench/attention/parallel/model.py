"""Analytic communication of each strategy: bytes one rank sends in one forward call.

From the shapes alone, in the byte convention of ``comm.py`` (what one rank hands to
the others), the largest over the ranks (edge ranks of a halo send less). Beside the
measured bytes in benchmark rows: CLEAR's halo is ``2·reach`` rows of K and V
(``reach = ⌊√limit⌋`` grid rows of its circle; frames within ``radius_t`` for video),
independent of the sequence length per rank; LiT's is one ``d×(d+1)`` state per head,
independent of the sequence length altogether.

With ``G`` text tokens, ring and halo add the text queries' partial softmax
(``o``, ``l``, ``m``: ``d + 2`` numbers per query in the accumulation dtype) gathered
from every rank; ulysses gathers the text outputs over heads.
"""

from __future__ import annotations

from typing import Any

from ..layout import Layout
from ..registry import get
from .sharding import Sharding
from .strategies import clear_window, window_reach


def halo_rows(per_rank: int, world: int, reach: int, rank: int) -> int:
    """Rows (frames) rank ``rank`` sends: to a rank ``j`` slices away, the
    ``reach − (j − 1)·per_rank`` rows of its own nearest to it (at most all of them)."""
    total = 0
    for peer in range(world):
        j = abs(peer - rank)
        if j:
            total += min(per_rank, max(0, reach - (j - 1) * per_rank))
    return total


def comm_model(method: str, strategy: str, layout: Layout, world: int, batch: int, heads: int,
               head_dim: int, element_size: int, **options: Any) -> float:
    """Bytes one rank sends in one forward ``attend_parallel`` call (the most of any rank)."""
    backend = get(method)
    opts = backend.resolve(options)
    sh = Sharding(layout, world, 0)
    acc = max(element_size, 4)  # partial softmax and LiT's sums: float32 at least
    others = world - 1
    row = batch * heads * head_dim * element_size  # one token's q (or k, v) over the heads
    image = sh.image_tokens * row
    text_partials = (batch * heads * layout.text * (head_dim + 2) * acc * others
                     if layout.text else 0.0)
    if strategy == "allgather":
        return 3.0 * image * others
    if strategy == "ulysses":
        text = batch * (heads // world) * layout.text * head_dim * element_size * others
        return (3.0 + 1.0) * image * others / world + text
    if strategy == "ring":
        return 2.0 * image * others + text_partials
    if strategy == "halo" and method == "lit":
        return 2.0 * others / world * batch * heads * head_dim * (head_dim + 1) * acc
    if strategy == "halo" and method == "clear":
        reach = window_reach(clear_window(layout, opts), layout)
        rows = max(halo_rows(sh.per_rank, world, reach, r) for r in range(world))
        return 2.0 * rows * sh.unit * row + text_partials
    raise ValueError(f"no communication model for {method} with strategy {strategy!r}")
