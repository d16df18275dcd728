"""SLA's pure-torch fast path: dense attention over the gathered critical blocks and the
marginal linear branch from per-block states ("total minus selected"), differentiable."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..softmax.reference import accumulation_dtype
from .blocks import FEATURE_MAPS, _split_blocks, num_blocks, selection_bytes

#: gathered key (and state) elements one chunk of the gather path may hold.
GATHER_CHUNK_ELEMENTS = 1 << 26


def _gather_blocks(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Per-block ``x [B, H, nk, *rest]`` at ``indices [B, H, c, kk]`` → ``[B, H, c, kk, *rest]``."""
    b, h, c, kk = indices.shape
    rest = x.shape[3:]
    index = indices.reshape(b, h, c * kk, *(1 for _ in rest)).expand(b, h, c * kk, *rest)
    return x.gather(2, index).view(b, h, c, kk, *rest)


def _sparse_chunk(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    indices: torch.Tensor,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention of query blocks ``[B, H, c, bq, d]`` over their gathered critical blocks.

    One batched SDPA call (its flash/memory-efficient kernels do the online
    softmax); ``key_valid [nk, bkv]`` masks the padding of a partial last block.
    """
    b, h, c, bq, d = q_blocks.shape
    keys = _gather_blocks(k_blocks, indices).flatten(3, 4)  # [B, H, c, kk·bkv, d]
    values = _gather_blocks(v_blocks, indices).flatten(3, 4)
    mask = None
    if key_valid is not None:  # [B, H, c, kk, bkv] → broadcast over the queries of a block
        mask = key_valid[indices].reshape(b, h * c, 1, keys.shape[-2])
    out = F.scaled_dot_product_attention(
        q_blocks.reshape(b, h * c, bq, d),
        keys.reshape(b, h * c, keys.shape[-2], d),  # sizes named: a batch of 0 has no -1
        values.reshape(b, h * c, values.shape[-2], values.shape[-1]),
        attn_mask=mask,
    )
    return out.view(b, h, c, bq, values.shape[-1])


def _linear_readout(
    fq_blocks: torch.Tensor, state: torch.Tensor, normaliser: torch.Tensor, eps: float
) -> torch.Tensor:
    """``φ(q) S / (φ(q) z + eps)``; ``fq [B,H,c,bq,d]``, ``S [B,H,c|1,d,e]``, ``z [B,H,c|1,d]``."""
    denominator = torch.matmul(fq_blocks, normaliser.unsqueeze(-1))
    return torch.matmul(fq_blocks, state) / (denominator + eps)


def gather_chunk_blocks(batch: int, heads: int, selected: int, block_kv: int, head_dim: int):
    """Query blocks per chunk of the gather path (bounds the gathered keys and states)."""
    per_block = batch * heads * selected * max(block_kv, head_dim) * head_dim
    return max(1, GATHER_CHUNK_ELEMENTS // max(1, per_block))


def sla_gather_parts(
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
    """``(O_s, O_l)`` by gathering the critical blocks: pure torch, differentiable.

    Sparse branch: each query block attends densely to its ``kk`` gathered KV
    blocks (:func:`_sparse_chunk`). Linear branch: per-block states
    ``h_j = φ(K_j)ᵀV_j``, ``z_j = Σ φ(K_j)`` (padding tokens contribute 0), and
    per query block ``S_i = Σ_j h_j − Σ_{j critical} h_j`` -- the SLA-1 kernel's
    "total minus selected", O(nq·kk·d²) instead of a pass over every marginal
    block. When every block is critical the marginal set is empty: the branch is
    skipped and ``O_l = 0`` exactly (the kernel's ``denom = inf``), never a
    rounding residue of the subtraction divided by eps. Query blocks are chunked
    to bound the gathered copies.
    """
    b, h, n, d = q.shape
    nq, nk, kk = num_blocks(n, block_q), num_blocks(n, block_kv), indices.shape[-1]
    acc = accumulation_dtype(q.dtype)
    q_blocks, k_blocks, v_blocks = (
        _split_blocks(q, block_q),
        _split_blocks(k, block_kv),
        _split_blocks(v, block_kv),
    )
    key_valid = None
    if n % block_kv:
        key_valid = (torch.arange(nk * block_kv, device=q.device) < n).view(nk, block_kv)

    linear = linear_over == "all" or kk < nk
    if linear:
        phi = FEATURE_MAPS[feature_map]
        fq_blocks = _split_blocks(phi(q.to(acc)), block_q)
        fk_blocks = _split_blocks(phi(k.to(acc)), block_kv)  # φ first: padding stays 0
        states = torch.matmul(fk_blocks.transpose(-1, -2), v_blocks.to(acc))  # [B,H,nk,d,e]
        normalisers = fk_blocks.sum(dim=-2)  # [B, H, nk, d]
        total_state = states.sum(dim=2, keepdim=True)
        total_normaliser = normalisers.sum(dim=2, keepdim=True)

    chunk = gather_chunk_blocks(b, h, kk, block_kv, d)
    sparse_out, linear_out = [], []
    for start in range(0, nq, chunk):
        rows = slice(start, start + chunk)
        lut = indices[:, :, rows]
        sparse_out.append(_sparse_chunk(q_blocks[:, :, rows], k_blocks, v_blocks, lut, key_valid))
        if linear:
            state, normaliser = total_state, total_normaliser
            if linear_over == "marginal":
                state = state - _gather_blocks(states, lut).sum(dim=3)
                normaliser = normaliser - _gather_blocks(normalisers, lut).sum(dim=3)
            linear_out.append(_linear_readout(fq_blocks[:, :, rows], state, normaliser, eps))

    o_s = torch.cat(sparse_out, dim=2).flatten(2, 3)[:, :, :n]
    if not linear:
        return o_s, torch.zeros_like(o_s)
    o_l = torch.cat(linear_out, dim=2).flatten(2, 3)[:, :, :n]
    return o_s, o_l.to(q.dtype)



def _workspace(batch, heads, tokens, head_dim, grid, *, element_size, topk, block_q, block_kv,
               **_opts) -> float:
    """The selection, then the features, padded block copies of q, k, v, the per-block
    states, the second output and per chunk the gathered keys, values and states (SDPA's
    fused kernels keep no score matrix)."""
    bh, n, d, acc = batch * heads, tokens, head_dim, max(element_size, 4)
    block_map, indices, nq, nk, kk = selection_bytes(bh, n, block_q, block_kv, topk)
    output = bh * n * d * element_size
    padded = bh * (nq * block_q + 2 * nk * block_kv) * d * element_size
    features = bh * (nq * block_q + nk * block_kv) * d * acc
    states = bh * nk * (d * d + d) * acc
    c = min(nq, gather_chunk_blocks(batch, heads, kk, block_kv, d))
    gathered = bh * c * kk * (2 * block_kv * d * element_size + (d * d + d) * acc)
    return float(max(block_map, indices + output + padded + features + states + gathered))

