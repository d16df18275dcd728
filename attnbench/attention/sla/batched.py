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
whatever N is; without autograd every step carves its large temporaries (φ(K), φ(Q)
and the readout, the gathered blocks) from one buffer allocated once per call
(:func:`arena_bytes`) and writes the output in place, so the peak does not depend on the
allocator finding room for one step's temporaries where the last one's were. Fewer,
larger chunks matter on a CPU: every chunk is a handful of torch calls whose fixed cost
(dispatch, allocation, waking the other threads) does not shrink with the chunk. Token
order, selection and formula are the other paths' (``sla_parts``): the path runs on the
blocks of SLA's order and is held to the float64 reference on every layout.
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
#: φ of the feature maps that have an ``out=`` form: written into a carved buffer
_PHI_INTO = {
    "softmax": lambda x, out: torch.softmax(x, -1, out=out),
    "relu": lambda x, out: torch.clamp_min(x, 0, out=out),  # relu, NaN kept
}


def _budget(batch_heads: int, tokens: int, head_dim: int, element_size: int) -> float:
    return max(WORKSPACE_FRACTION * batch_heads * tokens * head_dim * element_size,
               WORKSPACE_MIN_BYTES)


def _row_bytes(head_dim: int, element_size: int, columns: int) -> int:
    """Bytes of one token row of a step: ``columns`` floats in the accumulation dtype, and
    for half inputs the row's cast to it."""
    acc = max(element_size, 4)
    return columns * acc + (head_dim * acc if element_size < acc else 0)


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


def arena_bytes(batch_heads: int, tokens: int, head_dim: int, element_size: int, block_q: int,
                block_kv: int, selected: int, marginal: bool) -> int:
    """Bytes of the buffer the steps of a call without autograd carve their large
    temporaries from, one step at a time: the largest of a state step's φ(K), a readout
    step's φ(Q) and readout, and a chunk's gathered K and V (each rounded up to 64 bytes)."""
    acc, d, n = max(element_size, 4), head_dim, max(1, tokens)
    rows = min(tokens, state_tokens(batch_heads, tokens, d, element_size))
    state = rows * d * acc if rows < tokens else \
        min(batch_heads, max(1, rows // n)) * tokens * d * acc
    padded = num_blocks(tokens, block_q) * block_q  # the readout runs on the query blocks
    rows = readout_tokens(batch_heads, tokens, d, element_size)
    rows = rows if rows < padded else min(batch_heads, rows // max(1, padded)) * padded
    readout = 2 * 64 + rows * (2 * d + 1) * acc
    c = chunk_blocks(batch_heads, tokens, d, element_size, block_q, block_kv, selected, marginal)
    c = max(1, min(c, batch_heads * num_blocks(tokens, block_q)))  # as the loop takes it
    gathered = 2 * 64 + 2 * c * selected * block_kv * d * element_size
    return int(max(state, readout, gathered))


def state_tokens(batch_heads: int, tokens: int, head_dim: int, element_size: int) -> int:
    """Token rows (of any batch·head) per step of the total state's sum: φ(K) of the
    step within the budget."""
    budget = _budget(batch_heads, tokens, head_dim, element_size)
    return max(1, int(budget // _row_bytes(head_dim, element_size, head_dim)))


def readout_tokens(batch_heads: int, tokens: int, head_dim: int, element_size: int) -> int:
    """Token rows per step of the shared-state readout: φ(Q) and its readout ``[num | den]``
    within the budget."""
    budget = _budget(batch_heads, tokens, head_dim, element_size)
    return max(1, int(budget // _row_bytes(head_dim, element_size, 2 * head_dim + 1)))


def _steps(heads: int, tokens: int, rows: int):
    """``(heads, tokens)`` slices of the steps of at most ``rows`` token rows over a
    ``[heads, tokens, ·]`` tensor: whole heads, as many as fit, when one head's tokens
    fit; else runs of one head's tokens. Each step is a contiguous piece of it."""
    if rows >= tokens:
        per = max(1, rows // max(1, tokens))
        for start in range(0, heads, per):
            yield slice(start, min(heads, start + per)), slice(0, tokens)
        return
    for head in range(heads):
        for start in range(0, tokens, rows):
            yield slice(head, head + 1), slice(start, min(tokens, start + rows))


def _carve(arena: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
           offset: int = 0) -> torch.Tensor | None:
    """A ``shape`` tensor of ``dtype`` on ``arena``'s bytes from ``offset`` (``None``
    without an arena: the op allocates)."""
    if arena is None:
        return None
    nbytes = dtype.itemsize * torch.Size(shape).numel()
    return arena[offset: offset + nbytes].view(dtype).view(shape)


def _features(x: torch.Tensor, acc: torch.dtype, feature_map: str,
              out: torch.Tensor | None) -> torch.Tensor:
    """φ(x) in ``acc``, into ``out`` when given (and the map has an ``out=`` form)."""
    x = x.to(acc)
    if out is None or feature_map not in _PHI_INTO:
        return FEATURE_MAPS[feature_map](x)
    return _PHI_INTO[feature_map](x, out)


def total_state(k: torch.Tensor, v: torch.Tensor, feature_map: str, acc: torch.dtype,
                arena: torch.Tensor | None = None) -> torch.Tensor:
    """``[Σ φ(k_j)ᵀ v_j | Σ φ(k_j)]`` over every token, ``[B·H, d, e + 1]``, in steps of
    :func:`state_tokens` rows (whole heads or runs of one head's tokens, each contiguous;
    φ(K) of a step on ``arena`` when given)."""
    b, h, n, d = k.shape
    keys, values = k.reshape(b * h, n, d), v.reshape(b * h, n, v.shape[-1])
    total = k.new_zeros(b * h, d, v.shape[-1] + 1, dtype=acc)
    for heads, rows in _steps(b * h, n, state_tokens(b * h, n, d, k.element_size())):
        step = keys[heads, rows]
        fk = _features(step, acc, feature_map, _carve(arena, step.shape, acc))
        total[heads] += torch.cat((torch.matmul(fk.transpose(-1, -2), values[heads, rows].to(acc)),
                                   fk.sum(dim=-2).unsqueeze(-1)), dim=-1)
    return total


def linear_readout(queries: torch.Tensor, state: torch.Tensor, feature_map: str, eps: float,
                   out: torch.Tensor, arena: torch.Tensor | None = None) -> None:
    """``out = φ(Q) S / (φ(Q) z + eps)`` for ``queries [B·H, N, d]`` and one ``state = [S | z]``
    per batch·head (``[B·H, d, e + 1]``), in steps of :func:`readout_tokens` rows: a
    matmul each, the quotient written into ``out`` (a view of the output); φ(Q) and the
    readout on ``arena`` when given (then without autograd)."""
    bh, n, d = queries.shape
    e, acc = state.shape[-1] - 1, state.dtype
    for heads, rows in _steps(bh, n, readout_tokens(bh, n, d, queries.element_size())):
        step = queries[heads, rows]
        fq = _features(step, acc, feature_map, _carve(arena, step.shape, acc))
        shape = (*step.shape[:2], e + 1)
        buffer = _carve(arena, shape, acc, -(-fq.numel() * acc.itemsize // 64) * 64)
        readout = torch.matmul(fq, state[heads]) if buffer is None else \
            torch.matmul(fq, state[heads], out=buffer)
        numerator, denominator = readout[..., :e], readout[..., e:] + eps
        if arena is None:
            out[heads, rows] = numerator / denominator
        else:
            torch.div(numerator, denominator, out=out[heads, rows])


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
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    # without autograd every step carves its large temporaries from one buffer (SDPA's
    # backward keeps each chunk's gathered blocks, so training allocates them anew)
    arena = None if grad else torch.empty(
        arena_bytes(bh, n, d, q.element_size(), block_q, block_kv, kk, marginal),
        dtype=torch.uint8, device=q.device)
    if linear:
        with record_function("sla.state"):
            total = total_state(k, v, feature_map, acc, arena)  # [B·H, d, e+1]

    o_s = q.new_empty(bh * nq, block_q, e)
    o_l = q.new_empty(bh * nq, block_q, e) if parts else None
    shared = linear and not marginal  # one state for every query: O_l first, in large steps
    if shared:
        with record_function("sla.linear"):
            target = o_l if parts else o_s
            linear_readout(q_blocks.reshape(bh, nq * block_q, d), total, feature_map, eps,
                           target.view(bh, nq * block_q, e), arena)
    chunk = max(1, min(bh * nq, chunk_blocks(bh, n, d, q.element_size(), block_q, block_kv,
                                             kk, marginal)))  # a batch of 0: no block
    size = (chunk * kk, block_kv, d)
    buffers = (_carve(arena, size, k.dtype),
               _carve(arena, (chunk * kk, block_kv, e), v.dtype,
                      -(-torch.Size(size).numel() * k.element_size() // 64) * 64))
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
    """The selection, then beside the indices, the LUT and the total state: the buffer the
    steps carve from (:func:`arena_bytes`) and what a chunk of the sparse loop allocates
    besides (:func:`block_bytes` less the gathered blocks, per query block of
    :func:`chunk_blocks`)."""
    bh, d, acc = batch * heads, head_dim, max(element_size, 4)
    block_map, indices, nq, nk, kk = selection_bytes(bh, tokens, block_q, block_kv, topk)
    marginal = linear_over == "marginal" and kk < nk
    c = chunk_blocks(bh, tokens, d, element_size, block_q, block_kv, kk, marginal)
    gathered = 2 * kk * block_kv * d * element_size
    work = c * (block_bytes(block_q, block_kv, kk, d, element_size, marginal) - gathered)
    arena = arena_bytes(bh, tokens, d, element_size, block_q, block_kv, kk, marginal)
    state = bh * d * (d + 1) * acc
    lut = bh * nq * (kk + 1) * 8
    return float(max(block_map, indices + lut + state + arena + work))
