"""The four ways a rank's slice of the sequence gets its attention output.

Each strategy takes this rank's q, k, v in text-first order (text, then its image
slice; ``[B, H, G + n, d]``) and returns its output in the same order. Every tensor
that crosses ranks goes through :class:`~.comm.Comm` (counted, timed out, differentiable),
so every strategy runs backward.

* ``allgather`` -- the naive baseline: gather q, k, v of the whole sequence on every rank
  and run the method's ``attend`` there (every rank does all the work; any method).
* ``ulysses`` -- all-to-all from "my tokens, all heads" to "all tokens, my heads", the
  method's ``attend`` on the whole sequence with ``H/P`` heads, all-to-all back (any
  method whose heads are independent: every built-in one).
* ``ring`` -- K/V slices passed around the ring; each rank merges the softmax over each
  slice it sees (``partial.py``), masked by CLEAR's window for CLEAR (a slice wholly
  outside the window is passed on without computing, except under autograd).
* ``halo`` -- CLEAR: the K/V rows within the window's reach of a rank's rows come from its
  neighbours, then the method's ``attend`` on that band (queries of the halo rows are
  zeros whose outputs are dropped); LiT: one all-reduce of the ``d×d`` state and the key
  sums, then every rank applies it to its queries.

The text queries (replicated, see ``sharding.py``) need every key: under ``ring`` and
``halo`` each rank computes their softmax over its own image keys, the partial results
are all-gathered and merged in rank order on every rank (``text_queries``); ``ulysses``
all-gathers their outputs over heads; ``allgather`` has them already.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ..backend import AttentionBackend
from ..clear.window import Window, _args, allowed
from ..layout import Layout
from ..lit.reference import feature_map
from ..softmax.reference import accumulation_dtype
from .comm import Comm
from .partial import Partial, merge, merge_all, partial_attention
from .sharding import Sharding


@dataclass(frozen=True)
class Call:
    """One ``attend_parallel`` call on this rank, checked: what every strategy reads."""

    backend: AttentionBackend
    comm: Comm
    sharding: Sharding
    impl: str
    options: dict[str, Any]

    @property
    def text(self) -> int:
        return self.sharding.layout.text

    @property
    def whole(self):
        """The global layout, text first (what the method's ``attend`` runs on)."""
        return self.sharding.layout.text_first_form

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text, image)`` of a text-first local tensor."""
        return x[..., : self.text, :], x[..., self.text:, :]

    def attend(self, q, k, v, layout) -> torch.Tensor:
        return self.backend.attend(q, k, v, layout=layout, impl=self.impl, **self.options)


def allgather(call: Call, q, k, v) -> torch.Tensor:
    comm, sh = call.comm, call.sharding
    text, image = call.split(torch.stack((q, k, v)))
    whole = torch.cat((text, comm.all_gather(image, dim=-2, op="allgather")), dim=-2)
    out = call.attend(*whole.unbind(0), call.whole)
    start = call.text + sh.units().start * sh.unit
    return torch.cat((out[..., : call.text, :], out[..., start: start + sh.image_tokens, :]),
                     dim=-2)


def ulysses(call: Call, q, k, v) -> torch.Tensor:
    comm = call.comm
    heads = q.shape[1] // comm.world
    text, image = call.split(torch.stack((q, k, v)))
    mine = slice(comm.rank * heads, (comm.rank + 1) * heads)
    gathered = comm.all_to_all(list(image.chunk(comm.world, dim=2)), op="ulysses")
    whole = torch.cat((text[:, :, mine], *gathered), dim=-2)  # every token, my heads
    out = call.attend(*whole.unbind(0), call.whole)
    text_out, image_out = call.split(out)
    back = comm.all_to_all(list(image_out.chunk(comm.world, dim=-2)), op="ulysses")
    if call.text:
        text_out = comm.all_gather(text_out, dim=1, op="ulysses")
    else:
        text_out = q[..., :0, :]
    return torch.cat((text_out, torch.cat(back, dim=1)), dim=-2)


def text_queries(call: Call, q, k, v, op: str) -> torch.Tensor:
    """The text queries' outputs over every key: each rank's softmax over its image keys,
    gathered and merged (with the text keys' part) in rank order on every rank."""
    (qt, _), (kt, ki), (vt, vi) = call.split(q), call.split(k), call.split(v)
    if not call.text:
        return qt
    own = partial_attention(qt, ki, vi).packed()
    parts = call.comm.all_gather(own.unsqueeze(0), dim=0, op=op).unbind(0)
    state = merge_all([partial_attention(qt, kt, vt), *map(Partial.unpack, parts)])
    return state.result(q.dtype)


def clear_window(layout: Layout, options: dict[str, Any]) -> Window:
    """CLEAR's window on the whole sequence (text first)."""
    return Window.of(layout.text_first_form, options["radius"], 0, options["down_factor"],
                     options["radius_t"])


def window_reach(window: Window, layout: Layout) -> int:
    """Rows (image) or frames (video) a query of CLEAR's window reaches on either side."""
    return window.limit_t if layout.is_video else window.reach


def ring(call: Call, q, k, v) -> torch.Tensor:
    comm, sh = call.comm, call.sharding
    (_, qi), (kt, ki), (vt, vi) = call.split(q), call.split(k), call.split(v)
    window = clear_window(call.whole, call.options) if call.backend.name == "clear" else None
    mine = sh.image_index(device=q.device)
    state = partial_attention(qi, kt, vt) if call.text else None
    kv = torch.stack((ki, vi))
    # with autograd every received slice is computed on (masked out entirely if outside the
    # window), so every rank's backward runs the same transposed exchanges
    grad = torch.is_grad_enabled() and kv.requires_grad
    after, before = (comm.rank + 1) % comm.world, (comm.rank - 1) % comm.world
    for step in range(comm.world):
        if step:
            kv = comm.exchange({after: kv}, {before: kv.shape}, like=kv, op="ring")[before]
        mask = None
        if window is not None:
            theirs = sh.image_index((comm.rank - step) % comm.world, device=q.device)
            if not (grad or _reaches(sh, window, comm.rank, (comm.rank - step) % comm.world)):
                continue  # outside the window: passed on, not computed
            mask = functools.partial(_window_rows, mine, theirs, _args(window))
        state = merge(state, partial_attention(qi, kv[0], kv[1], mask))
    assert state is not None
    return torch.cat((text_queries(call, q, k, v, "ring"), state.result(q.dtype)), dim=-2)


def _window_rows(queries, keys, args, r0: int, r1: int) -> torch.Tensor:
    """CLEAR's mask of queries ``r0:r1`` of ``queries`` over ``keys`` (global indices)."""
    return allowed(queries[r0:r1, None], keys[None, :], args)


def _reaches(sh: Sharding, window: Window, rank: int, other: int) -> bool:
    """Whether any image query of ``rank`` sees a key of ``other`` through the window."""
    return len(halo_units(sh, window_reach(window, sh.layout), other, rank)) > 0


def halo_units(sh: Sharding, reach: int, sender: int, receiver: int) -> range:
    """The rows (frames) of ``sender`` within ``reach`` of ``receiver``'s: what it sends."""
    own, theirs = sh.units(sender), sh.units(receiver)
    return range(max(own.start, theirs.start - reach), min(own.stop, theirs.stop + reach))


def halo_band(comm: Comm, sh: Sharding, x: torch.Tensor, reach: int, op: str
              ) -> tuple[torch.Tensor, int]:
    """``(band, lead)``: this rank's image tokens ``x [..., n, d]`` with the ``reach`` rows
    (frames) of its neighbours on either side (fewer at the grid's edges), and how many
    tokens precede its own in the band."""
    start = sh.units().start
    peers = [p for p in range(comm.world) if p != comm.rank]
    sends = {}
    for p in peers:
        units = halo_units(sh, reach, comm.rank, p)
        if len(units):
            sends[p] = x[..., (units.start - start) * sh.unit: (units.stop - start) * sh.unit, :]
    shapes = {p: (*x.shape[:-2], len(u) * sh.unit, x.shape[-1]) for p in peers
              if len(u := halo_units(sh, reach, p, comm.rank))}
    got = comm.exchange(sends, shapes, like=x, op=op)
    below = [got[p] for p in sorted(got) if p < comm.rank]
    above = [got[p] for p in sorted(got) if p > comm.rank]
    return torch.cat((*below, x, *above), dim=-2), sum(t.shape[-2] for t in below)


def clear_halo(call: Call, q, k, v) -> torch.Tensor:
    sh = call.sharding
    (qt, qi), (kt, ki), (vt, vi) = call.split(q), call.split(k), call.split(v)
    band_kv, lead = halo_band(call.comm, sh, torch.stack((ki, vi)),
                                window_reach(clear_window(call.whole, call.options), sh.layout),
                                "halo")
    after = band_kv.shape[-2] - lead - qi.shape[-2]
    band_q = torch.cat((qi.new_zeros((*qi.shape[:-2], lead, qi.shape[-1])), qi,
                        qi.new_zeros((*qi.shape[:-2], after, qi.shape[-1]))), dim=-2)
    band = sh.sub_layout(band_kv.shape[-2] // sh.unit, text_first=True)
    out = call.attend(torch.cat((qt, band_q), -2), torch.cat((kt, band_kv[0]), -2),
                      torch.cat((vt, band_kv[1]), -2), band)
    image_out = out[..., call.text + lead: call.text + lead + sh.image_tokens, :]
    return torch.cat((text_queries(call, q, k, v, "halo"), image_out), dim=-2)


def lit_halo(call: Call, q, k, v) -> torch.Tensor:
    comm, o = call.comm, call.options
    acc = accumulation_dtype(q.dtype)
    fk = feature_map(k.to(acc), o["phi_shift"])
    vv = v.to(acc)
    if comm.rank:  # the replicated text joins the sums once, on rank 0
        fk, vv = fk[..., call.text:, :], vv[..., call.text:, :]
    sums = torch.cat((fk.transpose(-1, -2) @ vv, fk.sum(dim=-2).unsqueeze(-1)), dim=-1)
    total = comm.all_reduce(sums, op="halo") / call.sharding.layout.tokens
    state, normaliser = total[..., :-1], total[..., -1:]
    fq = feature_map(q.to(acc), o["phi_shift"])
    return (fq @ state / (fq @ normaliser + o["eps"])).to(q.dtype)


HALO = {"clear": clear_halo, "lit": lit_halo}


def halo(call: Call, q, k, v) -> torch.Tensor:
    return HALO[call.backend.name](call, q, k, v)


STRATEGIES = {"ulysses": ulysses, "ring": ring, "halo": halo, "allgather": allgather}
