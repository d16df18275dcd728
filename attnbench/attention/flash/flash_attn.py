"""Flash's first path: the ``flash-attn`` package (FA3's ``flash_attn_interface`` on
Hopper first, else FA2's ``flash_attn``)."""

from __future__ import annotations

import functools
import importlib

import torch

from ..paths import FastPath

HALF = (torch.float16, torch.bfloat16)
#: FlashAttention's head-dim limits (both packages)
HEAD_DIM_MAX, HEAD_DIM_MULTIPLE = 256, 8
#: what every FlashAttention kernel needs, whoever ships it (the package or SDPA)
FLASH_KERNELS = {"devices": ("cuda",), "label": "FlashAttention kernels", "dtypes": HALF,
                 "head_dim_max": HEAD_DIM_MAX, "head_dim_multiple": HEAD_DIM_MULTIPLE}


@functools.cache
def flash_attn_func():
    """``(module name, flash_attn_func)`` of the best installed package, or the import error."""
    errors = []
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return module, importlib.import_module(module).flash_attn_func
        except Exception as err:  # ImportError, or an ABI error from a mismatched build
            errors.append(f"{module}: {type(err).__name__}: {err}")
    return None, "; ".join(errors)


def _loads(device, dtype, shape) -> str | None:
    """Installed is not enough: a build for another torch fails at import."""
    module, error = flash_attn_func()
    return None if module is not None else f"flash-attn does not load ({error})"


def flash_attn(q, k, v, **_geometry) -> torch.Tensor:
    _, fn = flash_attn_func()
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if isinstance(out, tuple):  # FA3 returns (out, lse)
        out = out[0]
    return out.transpose(1, 2)


FLASH_ATTN = FastPath(
    "flash_attn",
    flash_attn,
    **FLASH_KERNELS,
    requires=("flash_attn_interface", "flash_attn"),
    install="pip install 'attnbench[flash-attn]'",
    probe=_loads,
    doc="flash-attn package (FA3, else FA2)",
)
