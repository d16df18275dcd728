"""SLA's naive ``(O_s, O_l)``: masked token-level score matrices, any dtype (float64 too)."""

from __future__ import annotations

import torch

from ..softmax.reference import accumulation_dtype, softmax_reference
from .blocks import FEATURE_MAPS, _expand_map, indices_to_map, num_blocks, selection_bytes

#: score elements one reference chunk may hold (64 Mi elements = 256 MiB in fp32).
REFERENCE_CHUNK_ELEMENTS = 1 << 26


def sla_reference_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    feature_map: str,
    linear_over: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_s, O_l)`` from masked token-level score matrices, chunked over query blocks.

    Naive on purpose: ``O_s`` is :func:`softmax_reference` with the critical
    blocks expanded to a token mask, and ``O_l`` the linear branch in its
    quadratic form ``Σ_j w_ij v_j / (Σ_j w_ij + eps)``, ``w_ij = φ(q_i)·φ(k_j)``
    over the marginal (or all) keys -- no block states, no "total minus
    selected", so it checks the fast path rather than mirroring it.
    """
    b, h, n, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    phi = FEATURE_MAPS[feature_map]
    selected = indices_to_map(indices, num_blocks(n, block_kv))
    fk, vf = phi(k.to(acc)), v.to(acc)
    blocks_per_chunk = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, b * h * n * block_q))
    rows = blocks_per_chunk * block_q
    o_s, o_l = torch.empty_like(v), torch.empty(b, h, n, v.shape[-1], dtype=acc, device=q.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        first = start // block_q
        mask = _expand_map(
            selected[:, :, first : first + blocks_per_chunk], block_q, block_kv, stop - start, n
        )
        o_s[:, :, start:stop] = softmax_reference(q[:, :, start:stop], k, v, key_mask=mask)
        weights = torch.matmul(phi(q[:, :, start:stop].to(acc)), fk.transpose(-1, -2))
        if linear_over == "marginal":
            weights = weights.masked_fill(mask, 0.0)
        o_l[:, :, start:stop] = torch.matmul(weights, vf) / (weights.sum(-1, keepdim=True) + eps)
    return o_s, o_l.to(q.dtype)



def reference_workspace(batch, heads, tokens, head_dim, grid, *, element_size, topk, block_q,
                        block_kv, **_opts) -> float:
    """The selection, then φ(k) (and φ(q)) in the accumulation dtype, the second output and,
    per chunk of query rows, the token mask and three score-sized matrices."""
    bh, n, d, acc = batch * heads, tokens, head_dim, max(element_size, 4)
    block_map, indices, *_ = selection_bytes(bh, n, block_q, block_kv, topk)
    blocks = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, bh * n * block_q))
    rows = min(n, blocks * block_q)
    chunk = bh * rows * n * (3 * acc + 1)
    output = bh * n * d * element_size
    return float(max(block_map, indices + output + bh * n * d * acc + chunk))
