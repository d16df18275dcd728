"""Softmax's fast path: PyTorch's ``scaled_dot_product_attention``.

Torch picks the kernel: FlashAttention / cuDNN / memory-efficient on CUDA, a
flash-style kernel on CPU (which has no fast float16 kernel). All keep O(N·d)
workspace, so the path's memory model is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..paths import FastPath


def sdpa(q, k, v, **_geometry) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


SDPA = FastPath(
    "sdpa",
    sdpa,
    dtypes={"cpu": (torch.float64, torch.float32, torch.bfloat16)},
    doc="torch.nn.functional.scaled_dot_product_attention, backend chosen by torch",
)
