"""xformers: exact softmax attention by xformers' memory-efficient kernels only
(``memory_efficient.py``); CUDA only, its reference is softmax's."""

from __future__ import annotations

from ..registry import register
from ..softmax import Softmax
from .memory_efficient import MEMORY_EFFICIENT


@register
class Xformers(Softmax):
    """Softmax attention computed only by xformers' memory-efficient kernels."""

    name = "xformers"
    summary = "exact softmax by xformers.ops.memory_efficient_attention; CUDA only"
    paper = "Lefaudeux et al. 2022; Rabe & Staats 2021"
    fast_paths = (MEMORY_EFFICIENT,)

    def kernel_only(self) -> bool:
        return True
