"""Sequence (context) parallel attention on ``torch.distributed``: ``attend_parallel``.

>>> sh = Sharding(layout, world, rank)                         # doctest: +SKIP
>>> out = attend_parallel("clear", sh.shard(q), sh.shard(k), sh.shard(v),
...                       layout=layout, strategy="halo", radius=8)  # doctest: +SKIP

Each rank holds a slice of the sequence -- rows of an image grid, frames of a video,
plus every text token (replicated: ``sharding.py`` says why) -- and gets back the
output of exactly those tokens, equal to its slice of the one-process
``backend.attend`` on the whole sequence. ``layout`` is the *global* layout.

Which method takes which strategy (``STRATEGY_METHODS``; every one runs backward):

========= ========================================================================
ulysses   every method (all-to-all over heads; heads must divide by the world size)
ring      softmax, CLEAR without pooled keys (K/V slices around the ring, merged by
          log-sum-exp; CLEAR skips the slices outside its window)
halo      CLEAR without pooled keys (only the K/V rows within the radius),
          LiT (one all-reduce of the d×d state and key sums)
allgather every method (the naive baseline: the whole sequence on every rank)
========= ========================================================================

Not here, and why: SLA has no ring -- its selection ranks every KV block of the whole
sequence per query block (from pooled scores) and its blocks follow tile order, not
rows, so a ring over row slices would first need that global selection; use
``ulysses``. Softmax has no halo: every query needs every key (that is ``allgather`` or
``ring``). CLEAR's pooled keys (``down_factor`` > 1) are pooled over the whole grid:
``ulysses`` or ``allgather``. LiT's depth-wise conv is the mixer's, not ``attend``'s:
:func:`conv_halo` runs it on a sharded ``v`` with halo rows.

Every collective waits at most ``timeout_s`` (then :class:`CollectiveTimeout`), and
``check=True`` (the default) first compares a fingerprint of the arguments across
ranks, so mismatched options fail on every rank with one message instead of hanging
in mismatched collectives; benchmarks check once, then pass ``check=False``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..backend import AttentionBackend
from ..inputs import check_qkv
from ..layout import Layout
from ..registry import get
from .comm import DEFAULT_TIMEOUT_S, CollectiveTimeout, Comm
from .model import comm_model
from .partial import Partial, merge, partial_attention
from .sharding import Sharding
from .strategies import STRATEGIES, Call, halo_band

ANY = "*"
#: the methods each strategy takes (``*``: every method)
STRATEGY_METHODS: dict[str, tuple[str, ...]] = {
    "ulysses": (ANY,),
    "ring": ("softmax", "clear"),
    "halo": ("clear", "lit"),
    "allgather": (ANY,),
}
#: why a method cannot take a strategy (the error's advice)
_WHY_NOT = {
    ("ring", "sla"): "SLA selects KV blocks of the whole sequence per query block and its "
                     "blocks follow tile order, not rows",
    ("halo", "softmax"): "every softmax query needs every key: no halo is smaller than the "
                         "whole sequence",
    ("halo", "sla"): "SLA's selected blocks can lie anywhere in the sequence",
    ("ring", "lit"): "LiT's state is one d×d sum: halo all-reduces it in one step",
}


#: strategies that compute with attnbench's own PyTorch code instead of the method's paths
_OWN_COMPUTE = {("ring", ANY): "PyTorch partial softmax",
                ("halo", "lit"): "PyTorch linear attention on the all-reduced state"}


def compute_path(backend: AttentionBackend, strategy: str, selected: str) -> str:
    """What computes a rank's attention under ``strategy``, for a row's ``impl``:
    ``ulysses/flex`` (the method's path ``selected``) or ``ring/PyTorch partial softmax``."""
    own = _OWN_COMPUTE.get((strategy, backend.name)) or _OWN_COMPUTE.get((strategy, ANY))
    return f"{strategy}/{own or selected}"


def strategies_for(method: str) -> list[str]:
    """The strategies ``method`` takes, in :data:`STRATEGIES` order."""
    return [s for s, names in STRATEGY_METHODS.items() if ANY in names or method in names]


def check_strategy(backend: AttentionBackend, strategy: str, layout: Layout, heads: int,
                   world: int, options: dict[str, Any]) -> None:
    """Raise ValueError, before any communication, for a call that cannot run."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context-parallel strategy {strategy!r}; valid: "
                         f"{', '.join(STRATEGIES)}")
    takes = strategies_for(backend.name)
    if strategy not in takes:
        why = _WHY_NOT.get((strategy, backend.name), f"{strategy} is defined for "
                           f"{', '.join(STRATEGY_METHODS[strategy])} only")
        raise ValueError(f"{backend.name} cannot run context-parallel strategy {strategy!r} "
                         f"({why}); use {' or '.join(takes)}")
    if strategy == "ulysses" and heads % world:
        raise ValueError(f"ulysses splits the {heads} heads over {world} ranks: the world size "
                         f"must divide the heads (use a world size dividing {heads}, or ring/"
                         "halo/allgather)")
    if backend.name == "clear" and strategy in ("ring", "halo") and options["down_factor"] > 1:
        raise ValueError(f"clear: down_factor={options['down_factor']} pools keys over the whole "
                         f"grid, which {strategy} does not split; use ulysses or allgather")
    Sharding(layout, world, 0)  # rows (frames) must divide over the ranks


def attend_parallel(
    method: str | AttentionBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: Layout,
    strategy: str,
    group: dist.ProcessGroup | None = None,
    impl: str = "auto",
    comm: Comm | None = None,
    check: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **options: Any,
) -> torch.Tensor:
    """This rank's slice of ``method``'s attention over the sequence shared by ``group``.

    ``q, k, v`` are ``[B, H, n, d]``: this rank's tokens in ``layout``'s order (its rows or
    frames and every text token: :meth:`Sharding.shard`); ``layout`` is the whole
    sequence's. Returns this rank's output in the same order. ``comm`` (a :class:`Comm`
    on ``group``) collects the bytes sent; ``impl`` and ``options`` are the method's,
    as for ``attend`` (every rank must pass the same).
    """
    backend = method if isinstance(method, AttentionBackend) else get(method)
    comm = comm if comm is not None else Comm(group, timeout_s=timeout_s)
    check_qkv(q, k, v, backend.name)
    opts = backend.resolve(options)
    layout, opts = backend.geometry(layout, None, opts, tokens=layout.tokens)
    check_strategy(backend, strategy, layout, q.shape[1], comm.world, opts)
    sharding = Sharding(layout, comm.world, comm.rank)
    if q.shape[2] != sharding.local.tokens or k.shape[2] != q.shape[2]:
        raise ValueError(f"{backend.name}: rank {comm.rank} holds {q.shape[2]} tokens, but its "
                         f"share of {layout.describe()} is {sharding.local.tokens} "
                         f"({sharding.local.describe()}): pass Sharding.shard(x)")
    if check:
        comm.check_same(f"{backend.name}|{strategy}|{impl}|{sorted(opts.items())}|"
                        f"{layout}|{tuple(q.shape)}|{q.dtype}", "attend_parallel")
    call = Call(backend, comm, sharding, impl, opts)
    local = sharding.local
    q, k, v = (local.to_text_first(t) for t in (q, k, v))
    return local.from_text_first(STRATEGIES[strategy](call, q, k, v))


def conv_halo(conv, image: torch.Tensor, layout: Layout, comm: Comm, *, depth: int
              ) -> torch.Tensor:
    """A 'same'-padded local operator ``conv`` (e.g. ``LiTCore.local`` with its layout) on
    this rank's image tokens ``[B, H, n, d]``, exactly as on the whole grid: the ``depth``
    rows (frames) next to the slice come from the neighbours, ``conv`` runs on the band
    and the band's extra rows are dropped. ``conv(x, band_layout)``."""
    sh = Sharding(Layout(layout.grid), comm.world, comm.rank)
    band, lead = halo_band(comm, sh, image, depth, "conv_halo")
    out = conv(band, sh.sub_layout(band.shape[-2] // sh.unit))
    return out[..., lead: lead + image.shape[-2], :]


__all__ = ["STRATEGIES", "STRATEGY_METHODS", "CollectiveTimeout", "Comm", "Partial",
           "Sharding", "attend_parallel", "check_strategy", "comm_model", "compute_path",
           "conv_halo", "merge", "partial_attention", "strategies_for"]
