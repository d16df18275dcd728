"""LiT: ReLU linear attention with a depth-wise conv on V (arXiv 2501.12976).

``O_i = φ(Q_i) S / (φ(Q_i) z + eps)`` with ``S = Σ_j φ(K_j)ᵀ V_j`` (d×d) and
``z = Σ_j φ(K_j)``, φ = ReLU. Cost O(N·d²) per head and O(d²) state: nothing
N×N is ever formed. The mixer adds LiT's depth-wise 5×5 conv on V laid out on
the token grid (guideline 1) and is meant for few heads (guideline 2: 2 for
DiT-S/2, 4 for DiT-XL/2), chosen by ``num_heads`` at conversion.
"""

from __future__ import annotations

import torch
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
)
from .kernels import _triton
from .registry import register
from .softmax import _accumulation_dtype


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float
) -> torch.Tensor:
    """ReLU-kernel linear attention, accumulated in float32 for half inputs."""
    acc = _accumulation_dtype(q.dtype)
    fq, fk = torch.relu(q.to(acc)), torch.relu(k.to(acc))
    state = torch.matmul(fk.transpose(-1, -2), v.to(acc))  # [B, H, d, e]
    normaliser = fk.sum(dim=-2, keepdim=True).transpose(-1, -2)  # [B, H, d, 1]
    out = torch.matmul(fq, state) / (torch.matmul(fq, normaliser) + eps)
    return out.to(q.dtype)


class LiTMixer(AttentionMixer):
    """LiT attention: linear attention + depth-wise conv on V over the token grid.

    The conv (``dwc``, shared by all heads, d_head channels, kernel ``dwc_kernel``
    with 'same' padding) is LiT's only new parameter; its output is added to the
    attention output before ``proj``. ``dwc_kernel=0`` drops it (the paper's
    "ReLU linear" ablation).
    """

    def __init__(self, backend, dim, num_heads, **kw) -> None:
        super().__init__(backend, dim, num_heads, **kw)
        dwc_kernel = self.options["dwc_kernel"]
        self.dwc = None
        if dwc_kernel:
            self.dwc = nn.Conv2d(
                self.head_dim,
                self.head_dim,
                kernel_size=dwc_kernel,
                padding=dwc_kernel // 2,
                groups=self.head_dim,
            )
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        if self.dwc is not None:
            self.dwc.reset_parameters()  # PyTorch's default conv init, as LiT's code uses

    def core(self, q, k, v, grid: Grid) -> torch.Tensor:
        out = super().core(q, k, v, grid)
        if self.dwc is None:
            return out
        b, h, n, d = v.shape
        hg, wg = grid
        image = v.reshape(b * h, hg, wg, d).permute(0, 3, 1, 2)  # [B·H, d, Hg, Wg]
        local = self.dwc(image).permute(0, 2, 3, 1).reshape(b, h, n, d)
        return out + local


def _triton_linear(q, k, v, *, grid: Grid, eps: float) -> torch.Tensor:
    return _triton.load("lit_triton").linear_attention(q, k, v, eps=eps)


def _triton_available(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    return _triton.kernel_reason("lit_triton", device, dtype, shape)


def _odd_or_zero(value: int) -> str | None:
    return None if value == 0 or (value > 0 and value % 2) else "must be 0 (off) or odd"


@register
class LiT(AttentionBackend):
    """LiT linear attention (ReLU kernel), O(N) time and memory."""

    name = "lit"
    summary = "LiT: ReLU linear attention + depth-wise conv on V; O(N·d²), few heads"
    paper = "Wang et al., LiT, arXiv 2501.12976 (ICCV 2025)"
    options = (
        Option("eps", 1e-6, "added to the normaliser φ(q)·Σφ(k)", float, check=positive),
        Option(
            "dwc_kernel",
            5,
            "kernel of the depth-wise conv on V (0 = none)",
            int,
            check=_odd_or_zero,
            mixer_only=True,
        ),
    )
    mixer_class = LiTMixer
    inherits_projections = False  # guideline 4: load everything except the attention
    fast_paths = (
        FastPath(
            "triton",
            _triton_linear,
            _triton_available,
            flop_countable=False,  # Triton kernels are invisible to FlopCounterMode
            doc="fused Triton kernels: K, V read once into the d×d state, Q read once; "
            "Triton backward",
        ),
    )

    def reference(self, q, k, v, *, grid: Grid, eps: float) -> torch.Tensor:
        return linear_attention(q, k, v, eps=eps)

    def flop_model(self, batch, heads, tokens, head_dim, grid, *, eps) -> Flops:
        # φ(K)ᵀV and φ(Q)S: 2·N·d² each; φ(Q)z: 2·N·d.
        actual = batch * heads * (4.0 * tokens * head_dim * head_dim + 2.0 * tokens * head_dim)
        return Flops(actual=actual, dense=dense_flops(batch, heads, tokens, head_dim))

    def mixer_flops(self, batch, heads, tokens, head_dim, **options) -> float:
        kernel = self.resolve(options, mixer=True)["dwc_kernel"]
        return 2.0 * batch * heads * tokens * head_dim * kernel * kernel  # depth-wise conv

    def workspace_model(self, batch, heads, tokens, head_dim, grid, *, element_size, impl, eps):
        """Bytes beside q, k, v, out: the float32 state ``S, z`` per head, and

        reference: φ(q), φ(k) in the accumulation dtype (≥ fp32); triton: φ is applied
        on the fly, the state is kept as per-split partials and their sum (a few
        splits fill the GPU; counted as two copies).
        """
        acc = max(element_size, 4)
        state = batch * heads * (head_dim * head_dim + head_dim) * 4
        if impl == "triton":
            return float(2 * state)
        return float(batch * heads * 2 * tokens * head_dim * acc + state)
