"""xformers' ``memory_efficient_attention`` as a fast path.

Unavailable with the precise reason when the package is missing, when its
compiled extensions do not load (a build for another torch or CUDA), or on a
device it has no kernel for (CPU).
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from ..paths import FastPath


@functools.cache
def xformers_ops():
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


def _loads(device, dtype, shape) -> str | None:
    return xformers_ops()[1]


def memory_efficient(q, k, v, **_geometry) -> torch.Tensor:
    ops, _ = xformers_ops()
    out = ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


MEMORY_EFFICIENT = FastPath(
    "memory_efficient",
    memory_efficient,
    devices=("cuda",),
    label="xformers' kernels",
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    requires=("xformers",),
    install="pip install 'attnbench[xformers]'",
    probe=_loads,
    doc="xformers fmha",
)
