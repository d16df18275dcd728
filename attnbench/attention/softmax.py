"""Exact softmax attention, the teacher and the baseline every method is measured against.

``O = softmax(Q Kᵀ / sqrt(d)) V`` per head. The reference materialises the
scores one block of queries at a time (so its memory stays bounded at large N)
in the input dtype, float64 included; the fast path is PyTorch's
``scaled_dot_product_attention``, which dispatches to FlashAttention / cuDNN /
memory-efficient kernels on CUDA and to a flash-style kernel on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import (
    AttentionBackend,
    AttentionMixer,
    FastPath,
    Flops,
    dense_flops,
)
from .registry import register

#: score elements one reference chunk may hold (64 Mi elements = 256 MiB in fp32).
REFERENCE_CHUNK_ELEMENTS = 1 << 26


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
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
    acc = _accumulation_dtype(q.dtype)
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


def _sdpa(q, k, v, **_geometry) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_available(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    if device.type == "cpu" and dtype in (torch.float16,):
        return "SDPA on CPU has no fast float16 kernel (use float32 or bfloat16)"
    return None


@register
class Softmax(AttentionBackend):
    """Exact softmax attention (reference + PyTorch SDPA)."""

    name = "softmax"
    summary = "exact softmax attention; fast path torch SDPA (flash/cuDNN/mem-efficient)"
    paper = "Vaswani et al. 2017"
    options = ()
    mixer_class = AttentionMixer
    fast_paths = (
        FastPath(
            "sdpa",
            _sdpa,
            _sdpa_available,
            doc="torch.nn.functional.scaled_dot_product_attention, backend chosen by torch",
        ),
    )

    any_layout = True  # exact attention does not depend on where the tokens sit

    def reference(self, q, k, v, **_geometry) -> torch.Tensor:
        return softmax_reference(q, k, v)

    def flop_model(self, batch, heads, tokens, head_dim, grid) -> Flops:
        dense = dense_flops(batch, heads, tokens, head_dim)
        return Flops(actual=dense, dense=dense)

    def workspace_model(self, batch, heads, tokens, head_dim, grid, *, element_size, impl):
        if impl != "reference":  # SDPA's flash-style kernels keep O(N·d)
            return 0.0
        rows = max(1, min(tokens, REFERENCE_CHUNK_ELEMENTS // max(1, batch * heads * tokens)))
        return 2.0 * batch * heads * rows * tokens * 4  # a chunk of fp32 scores and probs
