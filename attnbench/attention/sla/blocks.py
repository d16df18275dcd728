"""SLA's blocks and their selection, shared by every path so they attend identical blocks.

Tokens are cut into blocks of ``block_q`` queries and ``block_kv`` keys (1-D
runs in the row-major token order, as the official code does). Block scores
come from mean-pooled q against mean-pooled, centred k; per query block the
top ``selected_count`` KV blocks are critical.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..softmax.reference import accumulation_dtype

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # the paper's setting: a distribution over the head dim, so φ(q)·φ(k) ∈ (0, 1]
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "relu": torch.relu,
    # elu + 1 (Katharopoulos et al.): positive and smooth
    "elu": lambda x: F.elu(x) + 1,
}


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
    acc = accumulation_dtype(q.dtype)
    pooled_q = mean_pool(q, block_q, acc)
    pooled_k = mean_pool(k, block_kv, acc) - k.mean(dim=-2, keepdim=True, dtype=acc)
    return torch.matmul(pooled_q, pooled_k.transpose(-1, -2)) * q.shape[-1] ** -0.5


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """The paper's ``P_c = softmax(pool(Q) pool(K)ᵀ/√d)`` per query block (for analysis).

    Selection uses :func:`block_logits` directly: the softmax is monotone per row,
    so it selects the same blocks, without ties from ``exp`` underflowing to 0.
    """
    return torch.softmax(block_logits(q, k, block_q, block_kv), dim=-1)


def official_count(kv_blocks: int, topk: float) -> int:
    """The official count, ``min(K, int(topk_ratio·K))`` (thu-ml/SLA ``utils.py``
    ``get_block_map``): the float product truncated, so topk 0.29 of 100 blocks keeps
    28 (0.29·100 = 28.999999999999996), and a small topk can keep 0."""
    return min(kv_blocks, int(topk * kv_blocks))


def selected_count(kv_blocks: int, topk: float) -> int:
    """How many KV blocks each query block keeps: the official count, at least 1.

    The one difference from the official rule: where it keeps 0 blocks -- a query
    block with no critical block has an undefined softmax (the official kernel
    would divide by zero) -- one is kept; the row's ``effective`` says so
    (``official_kept_blocks``).
    """
    return max(1, official_count(kv_blocks, topk))


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



def selection_bytes(batch_heads: int, tokens: int, block_q: int, block_kv: int,
                    topk: float) -> tuple[float, float, int, int, int]:
    """``(block map bytes, index bytes, nq, nk, kk)`` of the selection, every path's first step.

    The float32 block logits ``[B·H, nq, nk]`` and the top-k indices (int64, and
    their sorted copy); the indices stay alive while the path runs.
    """
    nq, nk = num_blocks(tokens, block_q), num_blocks(tokens, block_kv)
    kk = selected_count(nk, topk)
    indices = 2.0 * batch_heads * nq * kk * 8
    return batch_heads * nq * nk * 4 + indices, indices, nq, nk, kk
