"""LiT: linear attention with a depth-wise conv on V (Wang et al., arXiv 2501.12976).

``O_i = φ(q_i) S̄ / (φ(q_i) z̄ + eps)``, ``S̄ = mean_j φ(k_j)ᵀ v_j`` (d×d),
``z̄ = mean_j φ(k_j)``, ``φ(x) = relu(x) + 1e-6``: the paper's formula in
FLatten-Transformer's normalised form (``reference.py``; no LiT code is public, so
nothing here is "official LiT code"); ``phi_shift=0`` is the paper's plain-ReLU
form. Cost O(N·d²) per head and O(d²) state: nothing N×N is ever formed, so no
query–key pair is computed exactly (density 0). The core adds LiT's depth-wise
5×5 conv on V (``core.py``); LiT is meant for few heads (guideline 2), chosen by
the conversion recipe wherever no part of the model's attention is per head.

Layouts: the linear attention does not depend on where tokens sit, so every
layout is the same formula over all N tokens (text tokens join the sums as
queries, keys and values); the conv acts on the image tokens only, per frame
for video or as a 3-D conv (``dwc_3d``) -- see ``core.py`` (attnbench's
extension: LiT is image-only).

Files: ``reference.py`` the reference, ``triton.py`` the fused Triton kernels
(forward and backward, the same formula), ``chunked.py`` the CPU path (the same
formula in token chunks, no N-sized temporary), ``core.py`` the learned part.
"""

from __future__ import annotations

import torch

from .. import _triton
from ..backend import AttentionBackend
from ..costs import Flops, dense_flops
from ..layout import KINDS, Layout
from ..options import Option, non_negative, positive
from ..paths import FastPath
from ..recipes import ConversionRecipe, DistillRecipe
from ..registry import register
from .chunked import CHUNKED
from .core import LiTCore
from .reference import EPS, PHI_SHIFT, feature_map, linear_attention, reference_workspace

#: the kernel module (imports triton; loaded lazily by the path)
TRITON_MODULE = f"{__name__}.triton"


def _triton_linear(q, k, v, *, eps: float, phi_shift: float, **_geometry) -> torch.Tensor:
    return _triton.load(TRITON_MODULE).linear_attention(q, k, v, eps=eps, phi_shift=phi_shift)


def _triton_workspace(batch, heads, tokens, head_dim, layout, *, element_size, **_opts) -> float:
    """The float32 state ``S, z`` per head as per-split partials and their sum (a few
    splits fill the GPU; counted as two copies); φ is applied on the fly."""
    return float(2 * batch * heads * (head_dim * head_dim + head_dim) * 4)


TRITON = FastPath(
    "triton",
    _triton_linear,
    devices=("cuda", "cpu"),  # CPU only under Triton's interpreter (the probe says)
    dtypes=_triton.KERNEL_DTYPES,
    requires=("triton",),
    install="pip install 'attnbench[triton]'",
    probe=_triton.kernel_probe(TRITON_MODULE),
    workspace=_triton_workspace,
    flop_countable=False,  # Triton kernels are invisible to FlopCounterMode
    doc="fused Triton kernels: K, V read once into the d×d state, Q read once; Triton backward",
)


def lit_heads(teacher_heads: int, hidden_size: int) -> int:
    """LiT's few heads: ``max(2, heads // 4)`` (S/2: 6 → 2, XL/2: 16 → 4, as in the paper).

    Lowered to the nearest count dividing the hidden size if it does not.
    """
    heads = max(2, teacher_heads // 4)
    while heads > 1 and hidden_size % heads:
        heads -= 1
    return heads


def _odd_or_zero(value: int) -> str | None:
    return None if value == 0 or (value > 0 and value % 2) else "must be 0 (off) or odd"


#: where φ and eps come from: no LiT code is public (the project page's code link is
#: disabled); its ReLU linear attention is written in FLatten-Transformer's normalised form
FLATTEN = ("the LiT paper's formula in FLatten's normalised form (LeapLabTHU/FLatten-"
           "Transformer models/flatten_swin.py FocusedLinearAttention without focusing: "
           "relu(x) + 1e-6, 1/(φ(q)·mean φ(k) + 1e-6)); no LiT code is public")


@register
class LiT(AttentionBackend):
    """LiT linear attention (ReLU + 1e-6 kernel), O(N) time and memory."""

    name = "lit"
    summary = "LiT: ReLU linear attention + depth-wise conv on V; O(N·d²), few heads"
    paper = "Wang et al., LiT, arXiv 2501.12976 (ICCV 2025)"
    options = (
        Option("eps", EPS, "added to the normaliser φ(q)·mean φ(k)", float, check=positive,
               source=FLATTEN),
        Option("phi_shift", PHI_SHIFT, "feature map φ(x) = relu(x) + phi_shift on q and k "
               "(0: the paper's plain ReLU)", float, check=non_negative, source=FLATTEN),
        Option("dwc_kernel", 5, "kernel of the depth-wise conv on V (0 = none)", int,
               check=_odd_or_zero, mixer_only=True,
               source="LiT paper, guideline 1 (DWC kernel 5), as FLatten's kernel_size=5"),
        Option("dwc_3d", False, "video: one k×k×k 3-D conv over (T, H, W) instead of the "
               "k×k conv per frame", bool, mixer_only=True,
               source="attnbench's choice (LiT is image-only): per frame by default, as an "
               "image model's conv sees each frame"),
    )
    notes = (
        "no LiT code is public: attnbench implements the paper's formula in FLatten-"
        "Transformer's normalised form (φ = relu + 1e-6, normaliser φ(q)·mean φ(k) + "
        "1e-6, depth-wise conv k=5 on V); phi_shift=0 gives the paper's plain ReLU",
        "few heads max(2, heads // 4) wherever no part of the attention is per head: "
        "attnbench's DiT, PixArt and DiT in diffusers, SANA; FLUX, SD3.5 and Wan keep their "
        "heads (per-head QK norms / RoPE: integrations/diffusers/swap.py head_split)",
    )
    layout_kinds = KINDS
    core_class = LiTCore
    fast_paths = (TRITON, CHUNKED)
    conversion_recipe = ConversionRecipe(
        "lit",
        "LiT: inherit everything except the attention (q/k/v/proj re-initialised "
        "Xavier-uniform, bias 0); few heads max(2, heads//4): S/2 2, XL/2 4",
        "LiT, arXiv 2501.12976, guidelines 2 and 4 (its class-to-image code drops every "
        "key containing 'attn')",
        inherit_projections=False,
        heads=lit_heads,
        heads_rule="max(2, heads // 4), lowered until it divides the hidden size",
    )
    distill_recipe = DistillRecipe(
        "lit", {"diffusion": 1.0, "kd_eps": 0.5, "kd_sigma": 0.05}, "all",
        "LiT hybrid KD: diffusion + λ1‖ε_T − ε_S‖² + λ2‖Σ_T − Σ_S‖², λ1 = 0.5, λ2 = 0.05",
        "LiT, arXiv 2501.12976, guideline 5",
    )

    def reference(self, q, k, v, *, eps: float, phi_shift: float, **_geometry) -> torch.Tensor:
        return linear_attention(q, k, v, eps=eps, phi_shift=phi_shift)

    def flop_model(self, batch, heads, tokens, head_dim, layout, **_opts) -> Flops:
        # φ(K)ᵀV and φ(Q)S: 2·N·d² each; φ(Q)z: 2·N·d.
        actual = batch * heads * (4.0 * tokens * head_dim * head_dim + 2.0 * tokens * head_dim)
        return Flops(actual=actual, dense=dense_flops(batch, heads, tokens, head_dim))

    def mixer_flops(self, batch, heads, tokens, head_dim, *, layout: Layout | None = None,
                    **options) -> float:
        """The depth-wise conv: ``2·k²`` (``2·k³`` for ``dwc_3d``) FLOPs per image token and
        channel; text tokens have no conv term."""
        opts = self.resolve(options, mixer=True)
        kernel = opts["dwc_kernel"]
        image = tokens if layout is None else layout.image_tokens
        taps = kernel ** (3 if opts["dwc_3d"] else 2)
        return 2.0 * batch * heads * image * head_dim * taps

    def reference_workspace(self, batch, heads, tokens, head_dim, layout, *, element_size, **_o):
        return reference_workspace(batch, heads, tokens, head_dim, element_size=element_size)

    def density_model(self, layout, **options) -> float:
        return 0.0  # linear attention computes no query–key pair exactly


__all__ = ["TRITON_MODULE", "LiT", "LiTCore", "feature_map", "linear_attention", "lit_heads"]
