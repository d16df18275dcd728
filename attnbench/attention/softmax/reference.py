"""Exact softmax attention in pure PyTorch, any dtype: the oracle of every exact path.

``O = softmax(Q Kᵀ / sqrt(d)) V`` per head, the scores materialised one block
of queries at a time so memory stays bounded at large N. Masked methods
(CLEAR, SLA's sparse branch) reuse it through ``key_mask``.
"""

from __future__ import annotations

import math

import torch

#: score elements one reference chunk may hold (64 Mi elements = 256 MiB in fp32).
REFERENCE_CHUNK_ELEMENTS = 1 << 26


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are accumulated in float32, as every fast kernel does."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def softmax_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention, chunked over queries.

    ``key_mask`` (bool, broadcastable to ``[B, H, N, M]``, True = attend) lets
    masked methods (CLEAR) reuse this reference; rows with no allowed key are
    an error of the caller. Computation runs in float32 for half inputs.
    """
    b, h, n, d = q.shape
    m = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    rows = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, b * h * m))
    out = torch.empty(b, h, n, v.shape[-1], dtype=acc, device=q.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        scores = torch.matmul(qf[:, :, start:stop], kf.transpose(-1, -2)) * scale
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[..., start:stop, :], float("-inf"))
        out[:, :, start:stop] = torch.matmul(torch.softmax(scores, dim=-1), vf)
    return out.to(q.dtype)


def reference_workspace(batch: int, heads: int, tokens: int) -> float:
    """Bytes beside q, k, v, out: one chunk of float32 scores and probabilities."""
    rows = max(1, min(tokens, REFERENCE_CHUNK_ELEMENTS // max(1, batch * heads * tokens)))
    return 2.0 * batch * heads * rows * tokens * 4
