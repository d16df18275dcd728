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

So the workspace is a chunk's working set (its gathered blocks and the per-query
temporaries, within :data:`WORKSPACE_FRACTION` of q's bytes: :func:`chunk_blocks`)
and the ``d×d`` state, whatever N is; without autograd the chunks gather into one
reused pair of buffers. Token order, selection and formula are the other
paths' (``sla_parts``): the path runs on the blocks of SLA's order and is held to the
float64 reference on every layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..softmax.reference import accumulation_dtype
from .blocks import FEATURE_MAPS, _split_blocks, num_blocks, selection_bytes

#: a chunk's working set (gathered K, V and φ(K_sel), the per-query temporaries) as a
#: fraction of q's bytes: the path's peak is then the output plus this, within 2× softmax's
WORKSPACE_FRACTION = 0.25
#: ... but at least this many bytes (a small input runs in a few steps)
WORKSPACE_MIN_BYTES = 2 << 20
#: copies of a state step's keys alive at once: φ(K), the values, and the matmul's
#: packed operands
STATE_COPIES = 8
#: copies of a readout step's queries alive at once: q's slice made contiguous, φ(Q),
#: the readout, the quotient, and the matmul's packed operands
READOUT_COPIES = 8


def _budget(batch_heads: int, tokens: int, head_dim: int, element_size: int) -> float:
    return max(WORKSPACE_FRACTION * batch_heads * tokens * head_dim * element_size,
               WORKSPACE_MIN_BYTES)


def block_bytes(block_q: int, block_kv: int, selected: int, head_dim: int, element_size: int,
                marginal: bool) -> float:
    """One query block's working set per batch·head in the sparse loop: its gathered K and
    V and its SDPA output; over the marginal keys also φ(K_sel), the critical state and
    the block's readout (φ(Q), the readout, the linear output and the sum)."""
    acc, d = max(element_size, 4), head_dim
    keys = selected * block_kv * d
    sparse = 2 * keys * element_size + block_q * d * element_size
    if not marginal:
        return sparse
    return sparse + keys * acc + 2 * d * (d + 1) * acc + block_q * ((2 * d + 1) * acc
                                                                     + 2 * d * element_size)


def chunk_blocks(batch_heads: int, tokens: int, head_dim: int, element_size: int,
                 block_q: int, block_kv: int, selected: int, marginal: bool) -> int:
    """Query blocks per chunk: as many as keep the chunk's working set (:func:`block_bytes`
    for every batch·head) within the budget (:data:`WORKSPACE_FRACTION` of q's bytes)."""
    per_block = max(1, batch_heads) * block_bytes(block_q, block_kv, selected, head_dim,
                                                  element_size, marginal)
    budget = _budget(batch_heads, tokens, head_dim, element_size)
    return max(1, min(num_blocks(tokens, block_q), int(budget // per_block)))


def state_tokens(batch_heads: int, tokens: int, head_dim: int, element_size: int) -> int:
    """Key tokens per step of the total state's sum: φ(K) of the step and its operands
    (with the matmul's packed copies of both, a pair per thread) within the budget."""
    per_token = max(1, batch_heads) * head_dim * STATE_COPIES * max(element_size, 4)
    return max(1, min(tokens, int(_budget(batch_heads, tokens, head_dim, element_size)
                                  // per_token)))


def total_state(k: torch.Tensor, v: torch.Tensor, phi, acc: torch.dtype) -> torch.Tensor:
    """``[Σ φ(k_j)ᵀ v_j | Σ φ(k_j)]`` over every token, ``[B, H, d, e + 1]``, summed in token
    chunks (no N-sized φ(K))."""
    b, h, n, d = k.shape
    step = state_tokens(b * h, n, d, k.element_size())
    state = normaliser = 0.0
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        fk = phi(k[:, :, rows].to(acc))
        state = state + torch.matmul(fk.transpose(-1, -2), v[:, :, rows].to(acc))
        normaliser = normaliser + fk.sum(dim=-2).unsqueeze(-1)
    return torch.cat((state, normaliser), dim=-1)


def readout_blocks(batch_heads: int, tokens: int, head_dim: int, element_size: int,
                   block_q: int) -> int:
    """Query blocks per step of the all-token readout: :data:`READOUT_COPIES` of the
    step's queries within the budget."""
    per_block = (max(1, batch_heads) * block_q * (head_dim + 1) * READOUT_COPIES
                 * max(element_size, 4))
    budget = _budget(batch_heads, tokens, head_dim, element_size)
    return max(1, min(num_blocks(tokens, block_q), int(budget // per_block)))


def _readout(queries: torch.Tensor, state: torch.Tensor, phi, eps: float) -> torch.Tensor:
    """``φ(Q) S / (φ(Q) z + eps)`` for ``state = [S | z]`` (one matmul), in q's dtype."""
    e = state.shape[-1] - 1
    readout = torch.matmul(phi(queries.to(state.dtype)), state)
    return (readout[..., :e] / (readout[..., e:] + eps)).to(queries.dtype)


def _gather(blocks: torch.Tensor, lut: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """Blocks ``[B·H·nk, bkv, d]`` at ``lut [B·H, c, kk]`` → ``[B·H, c, kk·bkv, d]``: one
    copy, into ``buffer`` when there is one (sizes named, not ``-1``: a batch of 0
    leaves nothing to infer them from)."""
    bh, c, kk = lut.shape
    index = lut.flatten()
    rows = blocks.index_select(0, index) if buffer is None else \
        torch.index_select(blocks, 0, index, out=buffer[: index.numel()])
    return rows.view(bh, c, kk * blocks.shape[1], blocks.shape[-1])


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
    marginal = linear and linear_over == "marginal"
    phi = FEATURE_MAPS[feature_map]
    if linear:
        with record_function("sla.state"):
            total = total_state(k, v, phi, acc).flatten(0, 1).unsqueeze(1)  # [B·H, 1, d, e+1]

    shape = (*q_blocks.shape[:3], e)
    o_s = q.new_empty(shape)
    o_l = q.new_empty(shape) if parts else None
    chunk = chunk_blocks(bh, n, q.shape[-1], q.element_size(), block_q, block_kv, kk, marginal)
    # without autograd every chunk gathers into the same buffers (SDPA's backward keeps
    # each chunk's gathered blocks, so training allocates them anew)
    buffers = (None, None)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        buffers = tuple(x.new_empty(bh * chunk * kk, block_kv, x.shape[-1]) for x in (k, v))
    for start in range(0, nq, chunk):
        rows = slice(start, min(nq, start + chunk))
        with record_function("sla.gather"):
            lut = flat[:, rows]  # [B·H, c, kk]
            keys = _gather(k_blocks, lut, buffers[0])
            values = _gather(v_blocks, lut, buffers[1])
            key_valid = None if valid is None else \
                valid[indices.flatten(0, 1)[:, rows]].flatten(-2).unsqueeze(-2)  # [B·H,c,1,kk·bkv]
        with record_function("sla.sdpa"):
            out = F.scaled_dot_product_attention(q_blocks[:, rows], keys, values,
                                                 attn_mask=key_valid)
        if marginal:  # the state minus the critical blocks' share, per query block
            with record_function("sla.linear"):
                fk = phi(keys.to(acc))
                if key_valid is not None:
                    fk = fk * key_valid.transpose(-1, -2)
                critical = torch.cat((torch.matmul(fk.transpose(-1, -2), values.to(acc)),
                                      fk.sum(dim=-2).unsqueeze(-1)), dim=-1)
                lin = _readout(q_blocks[:, rows], total - critical, phi, eps)
            if parts:
                o_l[:, rows] = lin
            else:
                out = out + lin
        o_s[:, rows] = out
    if linear and not marginal:  # one state for every query: the readout in larger chunks
        step = readout_blocks(bh, n, q.shape[-1], q.element_size(), block_q)
        for start in range(0, nq, step):
            rows = slice(start, min(nq, start + step))
            with record_function("sla.linear"):
                lin = _readout(q_blocks[:, rows], total, phi, eps)
                if parts:
                    o_l[:, rows] = lin
                else:
                    o_s[:, rows] += lin
    elif parts and not linear:
        o_l.zero_()
    unblock = lambda x: x.view(b, h, nq * block_q, e)[:, :, :n]  # noqa: E731
    return (unblock(o_s), unblock(o_l)) if parts else unblock(o_s)


def sla_batched_parts(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_s, O_l)`` by :func:`sla_batched` (the core applies ``proj_l`` to ``O_l``)."""
    return sla_batched(*args, parts=True, **kwargs)


def _workspace(batch, heads, tokens, head_dim, layout, *, element_size, topk, block_q,
               block_kv, linear_over="all", **_opts) -> float:
    """The selection, then beside the indices and the total state the largest of: the
    state's sum step, the sparse loop's chunk (:func:`block_bytes` per query block of
    :func:`chunk_blocks`, its LUT) and the all-token readout's step."""
    bh, d, acc = batch * heads, head_dim, max(element_size, 4)
    block_map, indices, _, _, kk = selection_bytes(bh, tokens, block_q, block_kv, topk)
    marginal = linear_over == "marginal"
    c = chunk_blocks(bh, tokens, d, element_size, block_q, block_kv, kk, marginal)
    work = bh * c * (block_bytes(block_q, block_kv, kk, d, element_size, marginal) + kk * 8)
    readout = 0 if marginal else \
        bh * readout_blocks(bh, tokens, d, element_size, block_q) * block_q * (d + 1) \
        * READOUT_COPIES * acc
    state = bh * d * (d + 1) * acc
    summing = bh * state_tokens(bh, tokens, d, element_size) * d * STATE_COPIES * acc
    return float(max(block_map, indices + state + max(work, readout, summing)))
