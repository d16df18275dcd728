"""Flash's second path: PyTorch SDPA restricted to its FlashAttention backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..paths import FastPath
from .flash_attn import FLASH_KERNELS


def _has_backend(device, dtype, shape) -> str | None:
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no SDPA flash backend"
    return None


def sdpa_flash(q, k, v, **_geometry) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


SDPA_FLASH = FastPath(
    "sdpa_flash",
    sdpa_flash,
    **FLASH_KERNELS,
    probe=_has_backend,
    doc="SDPA flash backend",
)
