"""SLA's CPU path: one gather of the kept key blocks for a chunk of query blocks of every
head, one SDPA over them, the linear branch as two matmuls; O(N·d) memory.

The gather path (``gather.py``) keeps per-block states ``φ(K_j)ᵀV_j`` of every KV
block and gathers ``kk`` of them per query block ("total minus selected" as
element-wise sums): ``nq·kk·d²`` floats, 10-40× softmax's memory on a CPU. Here the
query blocks of every batch·head are one sequence (``[B·H·nq, bq, d]``, a view of q),
cut into chunks of consecutive blocks -- so a chunk's queries, its look-up table and
its slice of the output are contiguous, and a chunk may span heads -- and per chunk:

* the kept K and V blocks are gathered once (one ``index_select`` each) and one
  batched SDPA attends every query block of the chunk to its own ``kk·bkv`` keys;
* over the marginal keys, the linear branch is one matmul of ``φ(Q)`` with its head's
  total state ``Σ φ(K)ᵀV`` (summed before the loop, in steps within the budget) minus
  the critical share ``φ(K_sel)ᵀ V_sel`` (one batched matmul on the gathered blocks,
  ``2·nq·kk·bkv·d²`` FLOPs that the FLOP model, the gather path's, counts as
  element-wise sums of states), and ``O_s + O_l`` is written into the output slice in
  one step (``addcdiv``);
* over all keys (the default) every query of a head reads the same state: ``O_l`` is
  written into the output before the loop, a matmul per step of many tokens of every
  head, and each chunk adds its ``O_s`` in place.

So the workspace is a chunk's working set (its gathered blocks and the per-query
temporaries, within the budget of :func:`chunk_blocks`) and the ``d×d`` state,
whatever N is; without autograd the chunks gather into one reused pair of buffers and
write the output in place. Fewer, larger chunks matter on a CPU: every chunk is a
handful of torch calls whose fixed cost (dispatch, allocation, waking the other
threads) does not shrink with the chunk. Token order, selection and formula are the
other paths' (``sla_parts``): the path runs on the blocks of SLA's order and is held to
the float64 reference on every layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..softmax.reference import accumulation_dtype
from .blocks import FEATURE_MAPS, _split_blocks, num_blocks, selection_bytes

#: a chunk's working set (gathered K, V and φ(K_sel), the per-query temporaries) as a
#: fraction of q's bytes: the path's peak is then the output plus this, within 2× softmax's
WORKSPACE_FRACTION = 0.5
#: ... but at least this many bytes (a small input runs in a few steps)
WORKSPACE_MIN_BYTES = 2 << 20
#: copies of a state step's keys alive at once: the slice made contiguous for φ, and φ(K)
STATE_COPIES = 2
#: copies of a readout step's queries alive at once: the slice made contiguous for φ, φ(Q)
#: and the readout
READOUT_COPIES = 3


def _budget(batch_heads: int, tokens: int, head_dim: int, element_size: int) -> float:
    return max(WORKSPACE_FRACTION * batch_heads * tokens * head_dim * element_size,
               WORKSPACE_MIN_BYTES)


def block_bytes(block_q: int, block_kv: int, selected: int, head_dim: int, element_size: int,
                marginal: bool) -> float:
    """One query block's working set in the sparse loop: its gathered K and V, its look-up
    table and its SDPA output; over the marginal keys also φ(K_sel), its head's state less
    the critical share, φ(Q) and the readout."""
    acc, d = max(element_size, 4), head_dim
    keys = selected * block_kv * d
    work = 2 * keys * element_size + block_q * d * element_size + selected * 8
    if marginal:
        work += keys * acc + 2 * d * (d + 1) * acc + block_q * (2 * d + 1) * acc
    return work


def chunk_blocks(batch_heads: int, tokens: int, head_dim: int, element_size: int,
                 block_q: int, block_kv: int, selected: int, marginal: bool) -> int:
    """Query blocks (of every batch·head together) per chunk: as many as keep the chunk's
    working set (:func:`block_bytes` each) within the budget -- :data:`WORKSPACE_FRACTION`
    of q's bytes, at least :data:`WORKSPACE_MIN_BYTES`."""
    per_block = block_bytes(block_q, block_kv, selected, head_dim, element_size, marginal)
    budget = _budget(batch_heads, tokens, head_dim, element_size)
    blocks = max(1, batch_heads) * num_blocks(tokens, block_q)
    return max(1, min(blocks, int(budget // per_block)))


def state_step(batch_heads: int, tokens: int, head_dim: int,
               element_size: int) -> tuple[int, int]:
    """``(key tokens per step of the total state's sum, copies of a step's keys alive)``:
    all keys in one step when φ(K) fits the budget (K whole is contiguous: φ(K) is the
    one copy, with K's cast to the accumulation dtype for half inputs), else steps of as
    many keys as keep :data:`STATE_COPIES` of them within it."""
    acc = max(element_size, 4)
    per_token = max(1, batch_heads) * head_dim * acc
    budget = _budget(batch_heads, tokens, head_dim, element_size)
    whole = 1 if element_size >= acc else 2
    if tokens * per_token * whole <= budget:
        return max(1, tokens), whole
    return max(1, min(tokens, int(budget // (STATE_COPIES * per_token)))), STATE_COPIES


def state_tokens(batch_heads: int, tokens: int, head_dim: int, element_size: int) -> int:
    """Key tokens per step of the total state's sum (:func:`state_step`)."""
    return state_step(batch_heads, tokens, head_dim, element_size)[0]


def total_state(k: torch.Tensor, v: torch.Tensor, phi, acc: torch.dtype) -> torch.Tensor:
    """``[Σ φ(k_j)ᵀ v_j | Σ φ(k_j)]`` over every token, ``[B, H, d, e + 1]``, summed in token
    chunks (:func:`state_tokens`)."""
    b, h, n, d = k.shape
    step = state_tokens(b * h, n, d, k.element_size())
    total = k.new_zeros(b, h, d, v.shape[-1] + 1, dtype=acc) if n == 0 else None
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        fk = phi(k[:, :, rows].to(acc))
        part = torch.cat((torch.matmul(fk.transpose(-1, -2), v[:, :, rows].to(acc)),
                          fk.sum(dim=-2).unsqueeze(-1)), dim=-1)
        total = part if total is None else total + part
    return total


def readout_tokens(batch_heads: int, tokens: int, head_dim: int, element_size: int) -> int:
    """Query tokens per step of the shared-state readout: :data:`READOUT_COPIES` of the
    step's queries within the budget."""
    per_token = max(1, batch_heads) * (head_dim + 1) * READOUT_COPIES * max(element_size, 4)
    budget = _budget(batch_heads, tokens, head_dim, element_size)
    return max(1, min(tokens, int(budget // per_token)))


def linear_readout(queries: torch.Tensor, state: torch.Tensor, phi, eps: float,
                   out: torch.Tensor, grad: bool) -> None:
    """``out = φ(Q) S / (φ(Q) z + eps)`` for ``queries [B·H, N, d]`` and one ``state = [S | z]``
    per batch·head (``[B·H, d, e + 1]``): a matmul per step of :func:`readout_tokens`
    tokens, every head at once, the quotient written into ``out`` (a view of the output)."""
    bh, n, d = queries.shape
    e = state.shape[-1] - 1
    step = readout_tokens(bh, n, d, queries.element_size())
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        readout = torch.matmul(phi(queries[:, rows].to(state.dtype)), state)
        numerator, denominator = readout[..., :e], readout[..., e:] + eps
        if grad:
            out[:, rows] = numerator / denominator
        else:
            torch.div(numerator, denominator, out=out[:, rows])


def _gather(blocks: torch.Tensor, lut: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """Blocks ``[B·H·nk, bkv, d]`` at ``lut [c, kk]`` → ``[1, c, kk·bkv, d]`` (the chunk's
    blocks as SDPA's heads): one copy, into ``buffer`` when there is one (sizes named, not
    ``-1``: a batch of 0 leaves nothing to infer them from)."""
    c, kk = lut.shape
    index = lut.flatten()
    rows = blocks.index_select(0, index) if buffer is None else \
        torch.index_select(blocks, 0, index, out=buffer[: index.numel()])
    return rows.view(1, c, kk * blocks.shape[1], blocks.shape[-1])


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
    b, h, n, d = q.shape
    e = v.shape[-1]
    nq, nk, kk = num_blocks(n, block_q), num_blocks(n, block_kv), indices.shape[-1]
    bh, acc = b * h, accumulation_dtype(q.dtype)
    q_blocks = _split_blocks(q, block_q).flatten(0, 2)  # [B·H·nq, bq, d]
    k_blocks = _split_blocks(k, block_kv).flatten(0, 2)  # [B·H·nk, bkv, d]
    v_blocks = _split_blocks(v, block_kv).flatten(0, 2)
    # query block i (of B·H·nq) is block i % nq of batch·head i // nq; its KV block j sits at
    # row (i // nq)·nk + j of the flattened blocks
    head = torch.arange(bh, device=q.device).repeat_interleave(nq)  # [B·H·nq]
    lut = (indices.reshape(bh * nq, kk) + (head * nk)[:, None]).contiguous()
    valid = None
    if n % block_kv:
        valid = (torch.arange(nk * block_kv, device=q.device) < n).view(nk, block_kv)

    linear = linear_over == "all" or kk < nk
    marginal = linear and linear_over == "marginal"
    phi = FEATURE_MAPS[feature_map]
    if linear:
        with record_function("sla.state"):
            total = total_state(k, v, phi, acc).flatten(0, 1)  # [B·H, d, e+1]

    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    o_s = q.new_empty(bh * nq, block_q, e)
    o_l = q.new_empty(bh * nq, block_q, e) if parts else None
    shared = linear and not marginal  # one state for every query: O_l first, in large steps
    if shared:
        with record_function("sla.linear"):
            target = o_l if parts else o_s
            linear_readout(q_blocks.reshape(bh, nq * block_q, d), total, phi, eps,
                           target.view(bh, nq * block_q, e), grad)
    chunk = chunk_blocks(bh, n, d, q.element_size(), block_q, block_kv, kk, marginal)
    # without autograd every chunk gathers into the same buffers (SDPA's backward keeps
    # each chunk's gathered blocks, so training allocates them anew)
    buffers = (None, None) if grad else \
        tuple(x.new_empty(min(chunk, bh * nq) * kk, block_kv, x.shape[-1]) for x in (k, v))
    for start in range(0, bh * nq, chunk):
        rows = slice(start, min(bh * nq, start + chunk))
        with record_function("sla.gather"):
            keys = _gather(k_blocks, lut[rows], buffers[0])  # [1, c, kk·bkv, d]
            values = _gather(v_blocks, lut[rows], buffers[1])
            key_valid = None if valid is None else \
                valid[indices.reshape(bh * nq, kk)[rows]].view(1, -1, 1, keys.shape[-2])
        with record_function("sla.sdpa"):
            out = F.scaled_dot_product_attention(q_blocks[rows].unsqueeze(0), keys, values,
                                                 attn_mask=key_valid)[0]
        if shared and not parts:
            o_s[rows] += out  # O_l is there already
            continue
        if not marginal:
            o_s[rows] = out
            continue
        with record_function("sla.linear"):  # the state minus the critical blocks' share
            fk = phi(keys[0].to(acc))
            if key_valid is not None:
                fk = fk * key_valid[0].transpose(-1, -2)
            state = total.index_select(0, head[rows]) - torch.cat(
                (torch.matmul(fk.transpose(-1, -2), values[0].to(acc)),
                 fk.sum(dim=-2).unsqueeze(-1)), dim=-1)  # [c, d, e+1]
            readout = torch.matmul(phi(q_blocks[rows].to(acc)), state)
            numerator, denominator = readout[..., :e], readout[..., e:] + eps
            if parts:
                o_l[rows] = numerator / denominator
                o_s[rows] = out
            elif grad:
                o_s[rows] = torch.addcdiv(out, numerator, denominator)
            else:  # O_s + O_l straight into the output
                torch.addcdiv(out, numerator, denominator, out=o_s[rows])
    if parts and not linear:
        o_l.zero_()
    unblock = lambda x: x.view(b, h, nq * block_q, e)[:, :, :n]  # noqa: E731
    return (unblock(o_s), unblock(o_l)) if parts else unblock(o_s)


def sla_batched_parts(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_s, O_l)`` by :func:`sla_batched` (the core applies ``proj_l`` to ``O_l``)."""
    return sla_batched(*args, parts=True, **kwargs)


def _workspace(batch, heads, tokens, head_dim, layout, *, element_size, topk, block_q,
               block_kv, linear_over="all", **_opts) -> float:
    """The selection, then beside the indices, the LUT and the total state the largest of
    the state's sum step (:func:`state_step`), the shared-state readout's step
    (:func:`readout_tokens`) and the sparse loop's chunk (:func:`block_bytes` per query
    block of :func:`chunk_blocks`)."""
    bh, d, acc = batch * heads, head_dim, max(element_size, 4)
    block_map, indices, nq, nk, kk = selection_bytes(bh, tokens, block_q, block_kv, topk)
    marginal = linear_over == "marginal" and kk < nk
    c = chunk_blocks(bh, tokens, d, element_size, block_q, block_kv, kk, marginal)
    work = c * block_bytes(block_q, block_kv, kk, d, element_size, marginal)
    readout = 0 if marginal else \
        bh * readout_tokens(bh, tokens, d, element_size) * (d + 1) * READOUT_COPIES * acc
    state = bh * d * (d + 1) * acc
    step, copies = state_step(bh, tokens, d, element_size)
    summing = bh * step * d * copies * acc
    lut = bh * nq * (kk + 1) * 8
    return float(max(block_map, indices + lut + state + max(work, summing, readout)))
