"""SLA's CPU path: one gather of the kept key blocks for every head and query block of a
chunk, one SDPA over them, the linear branch as two matmuls; O(N·d) memory.

The gather path (``gather.py``) keeps per-block states ``φ(K_j)ᵀV_j`` of every KV
block and gathers ``kk`` of them per query block ("total minus selected" as
element-wise sums): ``nq·kk·d²`` floats, 10-40× softmax's memory on a CPU. Here,
per chunk of query blocks (heads and batch folded into one batch dimension):

* the kept K and V blocks are gathered once (one ``index_select`` each) and one
  batched SDPA attends every query block of the chunk to its own ``kk·bkv`` keys;
* the linear branch reuses those gathered blocks: the critical share of the state is
  ``φ(K_sel)ᵀ V_sel`` (one batched matmul, ``2·nq·kk·bkv·d²`` FLOPs that the FLOP
  model, the gather path's, counts as element-wise sums of states), subtracted from
  the total state ``Σ φ(K)ᵀV`` (summed once, over token chunks), and the readout is
  one matmul of ``φ(Q)`` with ``[S | z]``;
* ``O_s + O_l`` is written into the output chunk by chunk.

So the workspace is a chunk's gathered blocks (bounded by :data:`CHUNK_KEYS`) and the
``d×d`` state, whatever N is. Token order, selection and formula are the other
paths' (``sla_parts``): the path runs on the blocks of SLA's order and is held to the
float64 reference on every layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..softmax.reference import accumulation_dtype
from .blocks import FEATURE_MAPS, _split_blocks, num_blocks, selection_bytes

#: gathered keys (per batch·head) one chunk of query blocks may hold, as a fraction of the
#: tokens: a chunk's gathered K, V and φ(K) are then 3/4 of q's size
CHUNK_FRACTION = 4
#: ... but at least this many (fewer, smaller steps only add per-step overhead)
CHUNK_KEYS = 1024
#: key tokens per step of the total state's sum
STATE_CHUNK_TOKENS = 1024


def chunk_blocks(tokens: int, query_blocks: int, selected: int, block_kv: int) -> int:
    """Query blocks per chunk: as many as keep the gathered ``chunk·kk·bkv`` keys within
    ``max(N / CHUNK_FRACTION, CHUNK_KEYS)``."""
    keys = max(tokens // CHUNK_FRACTION, CHUNK_KEYS)
    return max(1, min(query_blocks, keys // max(1, selected * block_kv)))


def total_state(k: torch.Tensor, v: torch.Tensor, phi, acc: torch.dtype) -> torch.Tensor:
    """``[Σ φ(k_j)ᵀ v_j | Σ φ(k_j)]`` over every token, ``[B, H, d, e + 1]``, summed in token
    chunks (no N-sized φ(K))."""
    n = k.shape[2]
    state = normaliser = 0.0
    for start in range(0, n, STATE_CHUNK_TOKENS):
        rows = slice(start, min(n, start + STATE_CHUNK_TOKENS))
        fk = phi(k[:, :, rows].to(acc))
        state = state + torch.matmul(fk.transpose(-1, -2), v[:, :, rows].to(acc))
        normaliser = normaliser + fk.sum(dim=-2).unsqueeze(-1)
    return torch.cat((state, normaliser), dim=-1)


def _gather(blocks: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Blocks ``[B·H·nk, bkv, d]`` at ``lut [B·H, c, kk]`` → ``[B·H, c, kk·bkv, d]``: one
    copy (sizes named, not ``-1``: a batch of 0 leaves nothing to infer them from)."""
    bh, c, kk = lut.shape
    return blocks.index_select(0, lut.flatten()).view(bh, c, kk * blocks.shape[1],
                                                      blocks.shape[-1])


def sla_batched(
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
    parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``O_s + O_l`` (or ``(O_s, O_l)`` with ``parts``) on the blocks of the given order.

    ``indices [B, H, nq, kk]`` are the critical KV blocks (:func:`block_indices`).
    Padding of a partial last block is masked in the SDPA and zeroed in φ(K_sel);
    when every block is critical and the branch is over the marginal keys, ``O_l`` is
    exactly 0 (as every path).
    """
    b, h, n, _ = q.shape
    e = v.shape[-1]
    nq, nk, kk = num_blocks(n, block_q), num_blocks(n, block_kv), indices.shape[-1]
    bh, acc = b * h, accumulation_dtype(q.dtype)
    q_blocks = _split_blocks(q, block_q).flatten(0, 1)  # [B·H, nq, bq, d]
    k_blocks = _split_blocks(k, block_kv).flatten(0, 2)  # [B·H·nk, bkv, d]
    v_blocks = _split_blocks(v, block_kv).flatten(0, 2)
    # block j of batch·head i sits at row i·nk + j of the flattened blocks
    flat = indices.flatten(0, 1) + (torch.arange(bh, device=q.device) * nk)[:, None, None]
    valid = None
    if n % block_kv:
        valid = (torch.arange(nk * block_kv, device=q.device) < n).view(nk, block_kv)

    linear = linear_over == "all" or kk < nk
    phi = FEATURE_MAPS[feature_map]
    if linear:
        total = total_state(k, v, phi, acc).flatten(0, 1).unsqueeze(1)  # [B·H, 1, d, e+1]

    shape = (*q_blocks.shape[:3], e)
    o_s = q.new_empty(shape)
    o_l = q.new_empty(shape) if parts else None
    chunk = chunk_blocks(n, nq, kk, block_kv)
    for start in range(0, nq, chunk):
        rows = slice(start, min(nq, start + chunk))
        lut = flat[:, rows]  # [B·H, c, kk]
        keys = _gather(k_blocks, lut)
        values = _gather(v_blocks, lut)
        key_valid = None if valid is None else \
            valid[indices.flatten(0, 1)[:, rows]].flatten(-2).unsqueeze(-2)  # [B·H, c, 1, kk·bkv]
        queries = q_blocks[:, rows]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=key_valid)
        if linear:
            state = total
            if linear_over == "marginal":
                fk = phi(keys.to(acc))
                if key_valid is not None:
                    fk = fk * key_valid.transpose(-1, -2)
                critical = torch.cat((torch.matmul(fk.transpose(-1, -2), values.to(acc)),
                                      fk.sum(dim=-2).unsqueeze(-1)), dim=-1)
                state = total - critical
            readout = torch.matmul(phi(queries.to(acc)), state)  # [B·H, c, bq, e+1]
            lin = (readout[..., :e] / (readout[..., e:] + eps)).to(q.dtype)
            if parts:
                o_l[:, rows] = lin
            else:
                out = out + lin
        elif parts:
            o_l[:, rows] = 0
        o_s[:, rows] = out
    unblock = lambda x: x.view(b, h, nq * block_q, e)[:, :, :n]  # noqa: E731
    return (unblock(o_s), unblock(o_l)) if parts else unblock(o_s)


def sla_batched_parts(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_s, O_l)`` by :func:`sla_batched` (the core applies ``proj_l`` to ``O_l``)."""
    return sla_batched(*args, parts=True, **kwargs)


def _workspace(batch, heads, tokens, head_dim, layout, *, element_size, topk, block_q,
               block_kv, **_opts) -> float:
    """The selection, then per chunk the gathered K and V, φ(K_sel) and φ(Q) in the
    accumulation dtype, the chunk's scores-free SDPA output and readout, and the states."""
    bh, d, acc = batch * heads, head_dim, max(element_size, 4)
    block_map, indices, nq, _, kk = selection_bytes(bh, tokens, block_q, block_kv, topk)
    c = chunk_blocks(tokens, nq, kk, block_kv)
    gathered = bh * c * kk * block_kv * d * (2 * element_size + acc)
    per_query = bh * c * block_q * (d + 1) * (acc + 2 * element_size)
    states = bh * (c + 2) * d * (d + 1) * acc + bh * c * kk * 8
    return float(max(block_map, indices + gathered + per_query + states))
