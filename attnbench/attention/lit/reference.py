"""LiT's linear attention in pure PyTorch, any dtype: the oracle of the Triton path.

No LiT code is public (its project page's code link is disabled), so this is the
paper's formula -- ReLU linear attention with a depth-wise conv on V -- in the
normalised form of FLatten-Transformer (LeapLabTHU/FLatten-Transformer,
``models/flatten_swin.py`` ``FocusedLinearAttention`` without its focusing
function), the code LiT's linear attention is described as building on:
``φ(x) = relu(x) + 1e-6`` on q and k, and the normaliser uses the *mean* of
φ(k) over the tokens::

    O_i = φ(q_i) (Σ_j φ(k_j)ᵀ v_j / N) / (φ(q_i) · mean_j φ(k_j) + eps)

which is ``φ(q_i) S / (φ(q_i) z + N·eps)`` in sum form. The shift keeps every
feature positive: a query row with all entries negative has ``φ(q) = 1e-6·1``
and outputs about the φ(k)-weighted mean of V, not 0 as a plain ReLU would.
``phi_shift=0`` is the paper's plain-ReLU form ``relu(q) Σ relu(k)ᵀv / relu(q) Σ
relu(k)`` (with ``eps`` on the mean normaliser, i.e. ``N·eps`` on the sum).
"""

from __future__ import annotations

import torch

from ..softmax.reference import accumulation_dtype

#: added to relu(x) on q and k (FLatten's ``kernel_function(q) + 1e-6``)
PHI_SHIFT = 1e-6
#: added to the normaliser φ(q)·mean φ(k) (FLatten's ``+ 1e-6``)
EPS = 1e-6


def feature_map(x: torch.Tensor, shift: float = PHI_SHIFT) -> torch.Tensor:
    """``φ(x) = relu(x) + shift`` (NaN stays NaN)."""
    return torch.relu(x) + shift


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = EPS,
    phi_shift: float = PHI_SHIFT,
) -> torch.Tensor:
    """LiT linear attention (module docstring), accumulated in float32 for half inputs."""
    acc = accumulation_dtype(q.dtype)
    n = max(1, k.shape[-2])
    fq, fk = feature_map(q.to(acc), phi_shift), feature_map(k.to(acc), phi_shift)
    state = torch.matmul(fk.transpose(-1, -2), v.to(acc)) / n  # [B, H, d, e]
    normaliser = fk.mean(dim=-2, keepdim=True).transpose(-1, -2)  # [B, H, d, 1]
    out = torch.matmul(fq, state) / (torch.matmul(fq, normaliser) + eps)
    return out.to(q.dtype)


def reference_workspace(batch, heads, tokens, head_dim, *, element_size: int) -> float:
    """Bytes beside q, k, v, out: φ(q), φ(k) in the accumulation dtype and the state."""
    acc = max(element_size, 4)
    state = batch * heads * (head_dim * head_dim + head_dim) * 4
    return float(batch * heads * 2 * tokens * head_dim * acc + state)
