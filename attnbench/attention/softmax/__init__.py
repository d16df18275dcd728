"""Exact softmax attention, the teacher and the baseline every method is measured against.

``O = softmax(Q Kᵀ / sqrt(d)) V`` per head: the float64-capable reference in
``reference.py``, the SDPA fast path in ``sdpa.py``.
"""

from __future__ import annotations

from ..backend import AttentionBackend
from ..costs import Flops, dense_flops
from ..layout import KINDS
from ..registry import register
from .reference import (
    REFERENCE_CHUNK_ELEMENTS,
    accumulation_dtype,
    reference_workspace,
    softmax_reference,
)
from .sdpa import SDPA

#: the name older code used
_accumulation_dtype = accumulation_dtype


@register
class Softmax(AttentionBackend):
    """Exact softmax attention (reference + PyTorch SDPA)."""

    name = "softmax"
    summary = "exact softmax attention; fast path torch SDPA (flash/cuDNN/mem-efficient)"
    paper = "Vaswani et al. 2017"
    options = ()
    fast_paths = (SDPA,)
    layout_kinds = KINDS  # exact attention does not depend on where the tokens sit

    def reference(self, q, k, v, **_geometry):
        return softmax_reference(q, k, v)

    def flop_model(self, batch, heads, tokens, head_dim, layout) -> Flops:
        dense = dense_flops(batch, heads, tokens, head_dim)
        return Flops(actual=dense, dense=dense)

    def reference_workspace(self, batch, heads, tokens, head_dim, layout, *, element_size):
        return reference_workspace(batch, heads, tokens)


__all__ = ["REFERENCE_CHUNK_ELEMENTS", "Softmax", "accumulation_dtype", "softmax_reference"]
