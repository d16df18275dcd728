"""FlashAttention: exact softmax attention by the FlashAttention kernels only.

The ``flash-attn`` package when it is installed (``flash_attn.py``), else
PyTorch SDPA restricted to its flash backend (``sdpa_flash.py``). Both are
CUDA-only, so on CPU this method is unavailable and says why; its reference is
softmax's, which is what it must match.
"""

from __future__ import annotations

from ..registry import register
from ..softmax import Softmax
from .flash_attn import FLASH_ATTN
from .sdpa_flash import SDPA_FLASH


@register
class Flash(Softmax):
    """Softmax attention computed only by FlashAttention kernels."""

    name = "flash"
    summary = "exact softmax by FlashAttention (flash-attn FA2/FA3, else SDPA flash); CUDA only"
    paper = "Dao et al. 2022 / 2023 / Shah et al. 2024"
    fast_paths = (FLASH_ATTN, SDPA_FLASH)

    def kernel_only(self) -> bool:
        return True
