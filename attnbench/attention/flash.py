"""FlashAttention: exact softmax attention by the FlashAttention kernels.

The ``flash-attn`` package (FA2, or FA3's ``flash_attn_interface`` on Hopper)
when it is installed, else PyTorch SDPA restricted to its flash backend. Both
are CUDA-only, so on CPU this method is unavailable and says why; its
reference is softmax's, which is what it must match.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from .base import AttentionMixer, FastPath
from .registry import register
from .softmax import Softmax

HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_attn_func():
    """``(module name, flash_attn_func)`` of the best installed package, or the import error."""
    errors = []
    for module in ("flash_attn_interface", "flash_attn"):  # FA3 first (Hopper), then FA2
        try:
            return module, importlib.import_module(module).flash_attn_func
        except Exception as err:  # ImportError, or an ABI error from a mismatched build
            errors.append(f"{module}: {type(err).__name__}: {err}")
    return None, "; ".join(errors)


def _cuda_half_reason(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    if device.type != "cuda":
        return "FlashAttention kernels are CUDA-only (no CPU kernel exists)"
    if dtype not in HALF:
        return f"FlashAttention needs float16 or bfloat16, got {dtype}"
    if shape is not None and (shape[-1] > 256 or shape[-1] % 8):
        return f"FlashAttention needs head_dim ≤ 256 and a multiple of 8, got {shape[-1]}"
    return None


def _package_available(device, dtype, shape) -> str | None:
    reason = _cuda_half_reason(device, dtype, shape)
    if reason:
        return reason
    module, fn = _flash_attn_func()
    if module is None:
        return f"flash-attn is not installed (pip install 'attnbench[flash-attn]'; {fn})"
    return None


def _package(q, k, v, **_geometry) -> torch.Tensor:
    _, fn = _flash_attn_func()
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if isinstance(out, tuple):  # FA3 returns (out, lse)
        out = out[0]
    return out.transpose(1, 2)


def _sdpa_flash_available(device, dtype, shape) -> str | None:
    reason = _cuda_half_reason(device, dtype, shape)
    if reason:
        return reason
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no SDPA flash backend"
    return None


def _sdpa_flash(q, k, v, **_geometry) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


@register
class Flash(Softmax):
    """Softmax attention computed only by FlashAttention kernels."""

    name = "flash"
    summary = "exact softmax by FlashAttention (flash-attn FA2/FA3, else SDPA flash); CUDA only"
    paper = "Dao et al. 2022 / 2023 / Shah et al. 2024"
    mixer_class = AttentionMixer
    fast_paths = (
        FastPath("flash_attn", _package, _package_available, doc="flash-attn package"),
        FastPath("sdpa_flash", _sdpa_flash, _sdpa_flash_available, doc="SDPA flash backend"),
    )

    def kernel_only(self) -> bool:
        return True
