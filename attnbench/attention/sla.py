"""SLA: Sparse-Linear Attention (Zhang et al., arXiv 2509.24006; code thu-ml/SLA).

Tokens are cut into blocks of ``block_q`` queries and ``block_kv`` keys (1-D
runs in the row-major token order, as the reference code does; the grid is only
validated). Per query block, the ``topk`` fraction of KV blocks with the highest
pooled score are *critical* and get exact softmax attention restricted to them
(``O_s``); the other, *marginal*, blocks are summarised by linear attention
(``O_l``)::

    O_s = softmax(Q Kᵀ/√d restricted to the critical blocks) V
    O_l = φ(Q) Σ_j φ(K_j)ᵀV_j / (φ(Q) Σ_j φ(K_j)ᵀ + eps)      j over the marginal blocks
    O   = O_s + proj_l(O_l)                                    proj_l = identity in attend()

``linear_over="all"`` runs the linear branch over every token instead, as the
newer reference code does; ``topk=1.0`` with the default ``"marginal"`` is exact
softmax attention.

The pieces, each usable alone (benchmarks time :func:`block_map` as overhead):

* :func:`block_logits` / :func:`block_scores` -- pooled, centred block scores;
* :func:`selected_count`, :func:`block_indices`, :func:`block_map` -- the selection,
  shared by every implementation so they attend to identical blocks;
* :func:`sla_reference_parts` -- the naive ``(O_s, O_l)``: masked score matrices,
  chunked over query blocks (any dtype, float64 included);
* :func:`sla_gather_parts` -- the fast ``(O_s, O_l)``: dense attention over the
  gathered critical blocks, and the marginal linear branch from per-block states
  as "total minus selected" (nothing N×N), differentiable, CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    AttentionBackend,
    AttentionMixer,
    FastPath,
    Flops,
    Grid,
    Option,
    dense_flops,
    positive,
    unit_fraction,
)
from .kernels import CORRECTION, _triton
from .registry import register
from .softmax import _accumulation_dtype, softmax_reference

#: score elements one reference chunk may hold (64 Mi elements = 256 MiB in fp32).
REFERENCE_CHUNK_ELEMENTS = 1 << 26
#: gathered key (and state) elements one chunk of the gather path may hold.
GATHER_CHUNK_ELEMENTS = 1 << 26

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # the paper's setting: a distribution over the head dim, so φ(q)·φ(k) ∈ (0, 1]
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "relu": torch.relu,
    # elu + 1 (Katharopoulos et al.): positive and smooth
    "elu": lambda x: F.elu(x) + 1,
}


# --------------------------------------------------------------------------- blocks


def num_blocks(tokens: int, block: int) -> int:
    """Blocks of ``block`` tokens covering ``tokens`` (the last one may be partial)."""
    return -(-tokens // block)


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the token dim (-2) of ``x`` to ``length``."""
    extra = length - x.shape[-2]
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def _split_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, N, d]`` → ``[B, H, nblocks, block, d]``, the last block zero-padded."""
    nb = num_blocks(x.shape[-2], block)
    return _pad_tokens(x, nb * block).unflatten(-2, (nb, block))


def mean_pool(x: torch.Tensor, block: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-block mean of ``[B, H, N, d]`` → ``[B, H, nblocks, d]``, over valid tokens only.

    The partial last block is divided by its own token count, as the reference
    ``compress_kernel`` does (``nx = min(BLOCK_L, L - idx·BLOCK_L)``). ``dtype``
    accumulates in another precision without a converted copy of ``x``.
    """
    n = x.shape[-2]
    sums = _split_blocks(x, block).sum(dim=-2, dtype=dtype)
    starts = torch.arange(sums.shape[-2], device=x.device) * block
    counts = (n - starts).clamp(max=block).to(sums.dtype)
    return sums / counts[:, None]


def block_logits(q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """Scaled scores of mean-pooled q against mean-pooled centred k: ``[B, H, nq, nk]``.

    k is centred over its tokens first (the "smooth-k" of SageAttention the
    reference uses). Centring shifts each row by the constant ``q̄_i·mean(k)``,
    so it changes neither the softmax nor the top-k in exact arithmetic; it keeps
    the scores small, which matters in low precision. Accumulated in float32 for
    half inputs. Centring commutes with pooling (``pool(k − k̄) = pool(k) − k̄``,
    partial last block included), so neither q nor k is copied: at 8192 px a
    float32 copy of q, k and centred k would be 3.6 GB for DiT-XL.
    """
    acc = _accumulation_dtype(q.dtype)
    pooled_q = mean_pool(q, block_q, acc)
    pooled_k = mean_pool(k, block_kv, acc) - k.mean(dim=-2, keepdim=True, dtype=acc)
    return torch.matmul(pooled_q, pooled_k.transpose(-1, -2)) * q.shape[-1] ** -0.5


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """The paper's ``P_c = softmax(pool(Q) pool(K)ᵀ/√d)`` per query block (for analysis).

    Selection uses :func:`block_logits` directly: the softmax is monotone per row,
    so it selects the same blocks, without ties from ``exp`` underflowing to 0.
    """
    return torch.softmax(block_logits(q, k, block_q, block_kv), dim=-1)


def selected_count(kv_blocks: int, topk: float) -> int:
    """How many KV blocks each query block keeps: ``floor(topk·nk)``, at least 1.

    The reference rounds down (``min(K, int(topk_ratio·K))``) and can keep 0
    blocks -- a query block with no critical block has an undefined softmax -- so
    at least one is kept. The 1e-9 absorbs the representation error of products
    such as 0.29·100 = 28.999999999999996.
    """
    return max(1, min(kv_blocks, math.floor(topk * kv_blocks + 1e-9)))


@torch.no_grad()
def block_indices(
    q: torch.Tensor, k: torch.Tensor, block_q: int = 64, block_kv: int = 64, topk: float = 0.05
) -> torch.Tensor:
    """The critical KV blocks of each query block, ascending: long ``[B, H, nq, kk]``.

    The same ``kk = selected_count(nk, topk)`` for every query block, as in the
    reference (one LUT width). Not differentiable: the selection is discrete.
    """
    logits = block_logits(q, k, block_q, block_kv)
    kk = selected_count(logits.shape[-1], topk)
    return torch.topk(logits, kk, dim=-1, sorted=False).indices.sort(dim=-1).values


def indices_to_map(indices: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """Block indices ``[..., kk]`` → bool map ``[..., kv_blocks]`` (True = critical)."""
    shape = (*indices.shape[:-1], kv_blocks)
    selected = torch.zeros(shape, dtype=torch.bool, device=indices.device)
    return selected.scatter_(-1, indices, True)


def block_map(
    q: torch.Tensor, k: torch.Tensor, block_q: int = 64, block_kv: int = 64, topk: float = 0.05
) -> torch.Tensor:
    """Bool ``[B, H, nq, nk]``: True where KV block j is critical for query block i."""
    kv_blocks = num_blocks(k.shape[-2], block_kv)
    return indices_to_map(block_indices(q, k, block_q, block_kv, topk), kv_blocks)


def _expand_map(selected: torch.Tensor, block_q: int, block_kv: int, rows: int, cols: int):
    """Block map ``[..., nq, nk]`` → token mask ``[..., rows, cols]``."""
    tokens = selected.repeat_interleave(block_q, dim=-2)[..., :rows, :]
    return tokens.repeat_interleave(block_kv, dim=-1)[..., :cols]


# --------------------------------------------------------------------------- naive


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
    acc = _accumulation_dtype(q.dtype)
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


# --------------------------------------------------------------------------- gather


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
        keys.reshape(b, h * c, -1, d),
        values.reshape(b, h * c, -1, values.shape[-1]),
        attn_mask=mask,
    )
    return out.view(b, h, c, bq, -1)


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
    acc = _accumulation_dtype(q.dtype)
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


# --------------------------------------------------------------------------- triton


def sla_triton_parts(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_s, O_l)`` by the fused Triton kernel (``kernels/sla_triton.py``), forward only."""
    return _triton.load("sla_triton").sla_triton_parts(*args, **kwargs)


def _triton_available(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    return _triton.kernel_reason("sla_triton", device, dtype, shape, max_head_dim=128)


# --------------------------------------------------------------------------- dispatch

PARTS = {"reference": sla_reference_parts, "gather": sla_gather_parts, "triton": sla_triton_parts}


def sla_parts(
    impl: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    topk: float,
    feature_map: str,
    linear_over: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_s, O_l)`` by implementation ``impl``, the selection by :func:`block_indices`."""
    indices = block_indices(q, k, block_q, block_kv, topk)
    return PARTS[impl](
        q,
        k,
        v,
        indices,
        block_q=block_q,
        block_kv=block_kv,
        feature_map=feature_map,
        linear_over=linear_over,
        eps=eps,
    )


def _gather(q, k, v, *, grid: Grid, **options) -> torch.Tensor:
    o_s, o_l = sla_parts("gather", q, k, v, **options)
    return o_s + o_l


def _triton_attend(q, k, v, *, grid: Grid, **options) -> torch.Tensor:
    o_s, o_l = sla_parts("triton", q, k, v, **options)
    return o_s + o_l


def _anywhere(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    return None  # plain torch ops (gather, SDPA, matmul): every device and dtype


# --------------------------------------------------------------------------- mixer


class SLAMixer(AttentionMixer):
    """SLA attention: ``O_s + proj_l(O_l)`` per head, then the shared ``proj``.

    ``proj_l`` is the reference's ``nn.Linear(head_dim, head_dim)`` (with bias),
    shared by all heads and zero-initialised, so a freshly converted model is
    block-sparse attention and fine-tuning learns how much of the linear branch
    to let in (the paper's recipe).
    """

    def __init__(self, backend, dim, num_heads, **kw) -> None:
        super().__init__(backend, dim, num_heads, **kw)
        self.proj_l = nn.Linear(self.head_dim, self.head_dim)
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)

    def core(self, q, k, v, grid: Grid) -> torch.Tensor:
        o_s, o_l = self.backend.attend_parts(
            q, k, v, grid=grid, impl=self.impl, **self.attend_options
        )
        return o_s + self.proj_l(o_l.to(self.proj_l.weight.dtype)).to(o_s.dtype)


# --------------------------------------------------------------------------- backend


@register
class SLA(AttentionBackend):
    """SLA: exact softmax on the top-k blocks, linear attention on the rest."""

    name = "sla"
    summary = (
        "SLA: block-sparse softmax on the top-k KV blocks per query block + linear "
        "attention on the marginal ones; fast path gathers the critical blocks"
    )
    paper = "Zhang et al., SLA, arXiv 2509.24006"
    options = (
        Option(
            "topk",
            0.05,
            "fraction of KV blocks each query block attends exactly (floor, at least 1)",
            float,
            check=unit_fraction,
        ),
        Option("block_q", 64, "query block size (tokens)", int, check=positive),
        Option("block_kv", 64, "key/value block size (tokens)", int, check=positive),
        Option(
            "feature_map",
            "softmax",
            "φ of the linear branch: softmax over the head dim, relu, or elu+1",
            str,
            choices=tuple(FEATURE_MAPS),
        ),
        Option(
            "linear_over",
            "marginal",
            "keys of the linear branch: the non-selected blocks (paper) or all (newer code)",
            str,
            choices=("marginal", "all"),
        ),
        Option("eps", 1e-5, "added to the linear branch's normaliser", float, check=positive),
    )
    mixer_class = SLAMixer
    inherits_projections = True
    fast_paths = (
        FastPath(
            "triton",
            _triton_attend,
            _triton_available,
            differentiable=False,  # forward only: training takes the gather path
            flop_countable=False,  # Triton kernels are invisible to FlopCounterMode
            doc="one Triton kernel: online softmax over the critical blocks + the marginal "
            "linear branch (total state minus the critical blocks' share); forward only",
        ),
        FastPath(
            "gather",
            _gather,
            _anywhere,
            doc="pure torch: SDPA over the gathered critical blocks + block-state linear branch",
        ),
    )

    def reference(self, q, k, v, *, grid: Grid, **options) -> torch.Tensor:
        o_s, o_l = sla_parts("reference", q, k, v, **options)
        return o_s + o_l

    def attend_parts(
        self, q, k, v, *, grid: Grid, impl: str = "auto", **options: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(O_s, O_l)`` separately, checked and dispatched exactly as ``attend``.

        The mixer needs them apart to apply ``proj_l`` to the linear branch only.
        """
        chosen, _, opts = self.prepare(q, k, v, grid=grid, impl=impl, options=options)
        return sla_parts(chosen, q, k, v, **opts)

    def block_map(self, q: torch.Tensor, k: torch.Tensor, **options: Any) -> torch.Tensor:
        """The critical-block map ``attend`` would use with these options (the overhead)."""
        opts = self.resolve(options)
        return block_map(q, k, opts["block_q"], opts["block_kv"], opts["topk"])

    def overhead_steps(self, q, k, v, *, grid: Grid, impl: str, **options: Any):
        """The block map (pooling, scoring, top-k): timed apart from the attention."""
        return {"block_map": lambda: self.block_map(q, k, **options)}

    def mixer_flops(self, batch, heads, tokens, head_dim, **options) -> float:
        return 2.0 * batch * heads * tokens * head_dim * head_dim  # proj_l on O_l

    def flop_model(
        self,
        batch,
        heads,
        tokens,
        head_dim,
        grid,
        *,
        topk,
        block_q,
        block_kv,
        feature_map,
        linear_over,
        eps,
    ) -> Flops:
        """FLOPs of the gather path (what FlopCounterMode counts on it).

        Block scoring ``2·nq·nk·d`` (also the ``overhead``); sparse ``4·pairs·d``
        with ``pairs = nq·bq · kk·bkv`` -- a partial last block counts as full, as
        the gather path computes it padded (exact when bq and bkv divide N);
        linear branch: states ``2·nk·bkv·d²``, readout ``2·nq·bq·(d² + d)``,
        skipped when every block is critical and ``linear_over="marginal"``.
        Pooling, centring, softmax, feature maps and the state sums are
        element-wise and not counted.
        """
        nq, nk = num_blocks(tokens, block_q), num_blocks(tokens, block_kv)
        kk = selected_count(nk, topk)
        bh, d = batch * heads, head_dim
        scoring = 2.0 * bh * nq * nk * d
        sparse = 4.0 * bh * (nq * block_q) * (kk * block_kv) * d
        linear = 0.0
        if linear_over == "all" or kk < nk:
            linear = 2.0 * bh * (nk * block_kv * d * d + nq * block_q * (d * d + d))
        dense = dense_flops(batch, heads, tokens, head_dim)
        return Flops(actual=scoring + sparse + linear, dense=dense, overhead=scoring)

    def workspace_model(
        self, batch, heads, tokens, head_dim, grid, *, element_size, impl, **opts
    ) -> float:
        """Bytes beside q, k, v, O (approximate: the largest live tensors).

        First the block map: float32 block logits ``[B·H, nq, nk]`` and the top-k
        indices (int64, and their sorted copy); then, with the indices still alive,
        the path's own. All paths: the second output (``O_s`` and ``O_l`` apart).
        Reference: φ(k) or φ(q), φ(k) in the accumulation dtype and, per chunk of
        query rows, the token mask (1 byte) and three score-sized matrices (softmax
        scores and probabilities, the linear weights). Gather: the same features,
        padded block copies of q, k, v, the per-block states, and per chunk the
        gathered keys, values and states (SDPA's fused kernels keep no score
        matrix). Triton: the int32 LUT, the float32 total state, and for the "gemm"
        correction the per-block states, the 0/1 selection and its product with
        them (bf16 for half inputs).
        """
        acc = max(element_size, 4)
        bh, n, d = batch * heads, tokens, head_dim
        nq, nk = num_blocks(n, opts["block_q"]), num_blocks(n, opts["block_kv"])
        bq, bkv = opts["block_q"], opts["block_kv"]
        kk = selected_count(nk, opts["topk"])
        indices = 2 * bh * nq * kk * 8
        block_map = bh * nq * nk * 4 + indices
        output = bh * n * d * element_size
        if impl == "triton":
            marginal = opts["linear_over"] == "marginal"
            state = bh * (d * d + d) * 4 if (kk < nk or not marginal) else 0
            corr = 0
            if marginal and kk < nk and CORRECTION == "gemm":
                c = 4 if element_size >= 4 else 2
                corr = bh * ((nk + nq) * (d * d + d) + nq * nk) * c
            return float(max(block_map, indices + bh * nq * kk * 4 + output + state + corr))
        if impl == "reference":
            blocks = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, bh * n * bq))
            rows = min(n, blocks * bq)
            chunk = bh * rows * n * (3 * acc + 1)
            return float(max(block_map, indices + output + bh * n * d * acc + chunk))
        padded = bh * (nq * bq + 2 * nk * bkv) * d * element_size
        features = bh * (nq * bq + nk * bkv) * d * acc
        states = bh * nk * (d * d + d) * acc
        c = min(nq, gather_chunk_blocks(batch, heads, kk, bkv, d))
        gathered = bh * c * kk * (2 * bkv * d * element_size + (d * d + d) * acc)
        return float(max(block_map, indices + output + padded + features + states + gathered))
