"""LiT's CPU path: the state and the readout in token chunks, nothing N-sized but the output.

The reference (``reference.py``) forms φ(q) and φ(k) whole: two ``[B, H, N, d]``
float temporaries beside q, k, v and the output (3-4× softmax's peak memory on
a CPU). Here the sums ``S = Σ_j φ(k_j)ᵀ v_j`` and ``z = Σ_j φ(k_j)`` are
accumulated over chunks of :data:`CHUNK_TOKENS` keys, and the readout
``φ(q_i) S̄ / (φ(q_i) z̄ + eps)`` is written chunk by chunk into the output, so the
workspace is one chunk of features and the ``d×d`` state whatever N is. The
formula, the feature map and the accumulation dtype are the reference's
(:func:`attnbench.attention.lit.reference.linear_attention`); autograd runs through the
chunks (pure torch ops), so the path also trains.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from ..paths import FastPath
from ..softmax.reference import accumulation_dtype
from .reference import EPS, PHI_SHIFT

#: tokens per chunk at least: large enough that each chunk's matmul runs at the CPU's
#: matmul speed, small enough that the path's peak stays within 2× softmax SDPA's at
#: DiT-Ti/2's 1024 px ...
CHUNK_TOKENS = 512
#: ... and at most this fraction of the tokens beyond it (fewer, larger calls; the chunk's
#: temporaries stay a fixed fraction of q's bytes)
CHUNK_FRACTION = 16
#: chunk-sized temporaries alive at once: the features, the matmul's packed operands, the
#: readout and the division's result
CHUNK_COPIES = 6


def chunk_tokens(n: int) -> int:
    """Tokens per chunk: :data:`CHUNK_TOKENS`, or ``n / CHUNK_FRACTION`` when larger."""
    return max(CHUNK_TOKENS, n // CHUNK_FRACTION)


def _chunks(n: int):
    step = chunk_tokens(n)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _features(x: torch.Tensor, acc: torch.dtype, shift: float) -> torch.Tensor:
    """``φ(x) = relu(x) + shift`` in ``acc`` (one fresh chunk; clamp keeps NaN as relu does)."""
    return torch.clamp_min(x.to(acc), 0).add_(shift)


def chunked_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = EPS,
    phi_shift: float = PHI_SHIFT, **_geometry,
) -> torch.Tensor:
    """LiT linear attention (``reference.py``'s formula) in chunks of :data:`CHUNK_TOKENS` tokens.

    The state and the normaliser are summed per key chunk (a matmul and a sum, as the
    FLOP model counts them); the readout is one matmul per query chunk against
    ``[S | z]`` (``d × (e+1)``): numerator and denominator together.
    """
    acc = accumulation_dtype(q.dtype)
    n = k.shape[2]
    e = v.shape[-1]
    state = normaliser = 0.0
    with record_function("lit.state"):
        for rows in _chunks(n):
            fk = _features(k[:, :, rows], acc, phi_shift)
            state = state + torch.matmul(fk.transpose(-1, -2), v[:, :, rows].to(acc))
            normaliser = normaliser + fk.sum(dim=-2).unsqueeze(-1)
        both = torch.cat((state, normaliser), dim=-1) / max(1, n)  # [B, H, d, e + 1]
    out = q.new_empty(*q.shape[:3], e)
    with record_function("lit.readout"):
        for rows in _chunks(q.shape[2]):
            readout = torch.matmul(_features(q[:, :, rows], acc, phi_shift), both)
            out[:, :, rows] = readout[..., :e] / (readout[..., e:] + eps)
    return out


def _workspace(batch, heads, tokens, head_dim, layout, *, element_size, **_opts) -> float:
    """Per chunk :data:`CHUNK_COPIES` chunk-sized temporaries in the accumulation dtype, and
    the ``d × (d+1)`` state and its running sum."""
    acc = max(element_size, 4)
    chunk = min(tokens, chunk_tokens(tokens))
    return float(batch * heads * (CHUNK_COPIES * chunk * (head_dim + 1) * acc
                                  + 2 * head_dim * (head_dim + 1) * acc))


CHUNKED = FastPath(
    "chunked",
    chunked_linear_attention,
    workspace=_workspace,
    doc=f"pure torch: φ(K)ᵀV and the normaliser over chunks of max({CHUNK_TOKENS}, "
    f"N/{CHUNK_FRACTION}) tokens, the "
    "readout written chunk by chunk (no N-sized temporary); differentiable",
)
