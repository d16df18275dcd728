"""Softmax attention over a part of the keys, and the merge of such parts.

Ring attention and the text queries of every sharded strategy compute softmax
attention over one block of keys at a time and merge the blocks afterwards. A block's
result is kept unnormalised, as FlashAttention's running state: the row maximum ``m``
of the scores, the sum ``l`` of ``exp(s − m)`` and ``o = Σ exp(s − m)·v``; two blocks
merge by rescaling both to the larger maximum. Normalising once at the end gives the
softmax over every block exactly (up to float rounding); ``log(l) + m`` is the
log-sum-exp that sparse and linear kernels often do not return. ``m`` carries no
gradient: the result does not depend on it.

Rows with no allowed key in a block (a masked CLEAR block) have ``l = 0`` and ``o = 0``
and drop out of the merge; a row must have an allowed key in some block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..softmax.reference import REFERENCE_CHUNK_ELEMENTS, accumulation_dtype


class Partial(NamedTuple):
    """Unnormalised softmax attention over some keys: ``o [B,H,n,e]``, ``l, m [B,H,n,1]``."""

    o: torch.Tensor
    l: torch.Tensor  # noqa: E741 - the sum of exponentials, as in FlashAttention's papers
    m: torch.Tensor

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """The softmax attention over every key merged so far."""
        return (self.o / self.l).to(dtype)

    def packed(self) -> torch.Tensor:
        """``[o | l | m]`` along the last axis: one tensor for one collective."""
        return torch.cat((self.o, self.l, self.m), dim=-1)

    @classmethod
    def unpack(cls, x: torch.Tensor) -> Partial:
        return cls(x[..., :-2], x[..., -2:-1], x[..., -1:].detach())


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: Callable[[int, int], torch.Tensor] | None = None) -> Partial:
    """Softmax attention of ``q`` over the keys ``k, v``, scale ``1/√d``, in float32 for
    half inputs; ``mask(r0, r1)``: bool ``[.., r1 - r0, m]`` of queries ``r0:r1``, True =
    attend. Queries go in chunks of at most ``REFERENCE_CHUNK_ELEMENTS`` scores, so memory
    stays bounded at long sequences (as the softmax reference's)."""
    acc = accumulation_dtype(q.dtype)
    b, h, n, d = q.shape
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    rows = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, b * h * k.shape[-2]))
    parts = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        scores = torch.matmul(qf[:, :, r0:r1], kf.transpose(-1, -2)) / math.sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(~mask(r0, r1), float("-inf"))
        m = scores.amax(dim=-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(scores - m)
        parts.append(Partial(torch.matmul(p, vf), p.sum(dim=-1, keepdim=True), m))
    if len(parts) == 1:
        return parts[0]
    return Partial(*(torch.cat(t, dim=-2) for t in zip(*parts, strict=True)))


def merge(a: Partial | None, b: Partial) -> Partial:
    """The softmax state over the keys of ``a`` and of ``b`` (``a`` None: just ``b``)."""
    if a is None:
        return b
    m = torch.maximum(a.m, b.m)
    wa, wb = torch.exp(a.m - m), torch.exp(b.m - m)
    return Partial(a.o * wa + b.o * wb, a.l * wa + b.l * wb, m)


def merge_all(parts: list[Partial]) -> Partial:
    out = None
    for part in parts:
        out = merge(out, part)
    assert out is not None
    return out
