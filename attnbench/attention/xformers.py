"""xformers' ``memory_efficient_attention``: exact softmax by the xformers kernels.

Unavailable with the precise reason when the package is missing, when its
compiled extensions do not load (a build for another torch or CUDA), or on a
device it has no kernel for (CPU).
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from .base import AttentionMixer, FastPath
from .registry import register
from .softmax import Softmax


@functools.cache
def _xformers_ops():
    """``(ops module, None)`` or ``(None, reason)``; the import is tried once."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            xformers = importlib.import_module("xformers")
            ops = importlib.import_module("xformers.ops")
    except ImportError as err:
        return None, f"xformers is not installed (pip install 'attnbench[xformers]'; {err})"
    except Exception as err:
        return None, f"xformers failed to import: {type(err).__name__}: {err}"
    if not getattr(xformers, "_has_cpp_library", True):
        built = "; ".join(str(w.message).splitlines()[0] for w in caught) or "unknown build"
        return None, (
            f"xformers {getattr(xformers, '__version__', '?')} cannot load its compiled "
            f"kernels, likely built for another torch than {torch.__version__} ({built})"
        )
    return ops, None


def _available(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    ops, reason = _xformers_ops()
    if ops is None:
        return reason
    if device.type != "cuda":
        return "xformers memory_efficient_attention has no CPU kernel"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers needs float16, bfloat16 or float32, got {dtype}"
    return None


def _memory_efficient(q, k, v, **_geometry) -> torch.Tensor:
    ops, _ = _xformers_ops()
    out = ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@register
class Xformers(Softmax):
    """Softmax attention computed only by xformers' memory-efficient kernels."""

    name = "xformers"
    summary = "exact softmax by xformers.ops.memory_efficient_attention; CUDA only"
    paper = "Lefaudeux et al. 2022; Rabe & Staats 2021"
    mixer_class = AttentionMixer
    fast_paths = (
        FastPath("memory_efficient", _memory_efficient, _available, doc="xformers fmha"),
    )

    def kernel_only(self) -> bool:
        return True
