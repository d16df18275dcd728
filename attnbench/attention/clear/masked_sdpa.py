"""CLEAR's masked-SDPA path: SDPA with a dense N×M boolean mask (differentiable everywhere)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...common.capabilities import answered_by
from ..inputs import Grid
from ..paths import FastPath
from .pooling import _window_of, extend_kv, extended_bytes
from .window import (
    DEFAULT_RADIUS,
    MASK_CHUNK_ELEMENTS,
    Window,
    _args,
    _image_chunks,
    _index,
    allowed,
)

#: masked_sdpa refuses when its masks (bool + SDPA's additive copy) would exceed this.
MASK_BYTES_LIMIT = 1 << 30



def dense_mask(
    grid: Grid,
    radius: float = DEFAULT_RADIUS,
    text: int = 0,
    down_factor: int = 0,
    *,
    device: torch.device | str | None = None,
    radius_t: int | None = None,
) -> torch.Tensor:
    """The ``[N, M]`` boolean mask of CLEAR (True = attend); the masked_sdpa overhead.

    Evaluated in chunks of query rows and, for image queries, only over the keys
    within reach (``_band``); the result itself is N·M bytes. ``grid`` is ``(H, W)``
    or ``(T, H, W)``.
    """
    window = Window.of(grid, radius, text, down_factor, radius_t)
    return _dense_mask(window, torch.device(device or "cpu"))


def _dense_mask(window: Window, device: torch.device) -> torch.Tensor:
    n, m, g = window.tokens, window.keys, window.global_tokens
    mask = torch.zeros(n, m, dtype=torch.bool, device=device)
    rows = max(1, MASK_CHUNK_ELEMENTS // max(1, m))
    for start in range(0, g, rows):  # global queries: every key column
        stop = min(g, start + rows)
        q = _index(start, stop, device)[:, None]
        mask[start:stop] = allowed(q, _index(0, m, device)[None, :], _args(window))
    for q0, q1, keys in _image_chunks(window, 1, device):  # image queries: their band
        q = _index(q0, q1, device)[:, None]
        mask[q0:q1, keys] = allowed(q, keys[None, :], _args(window))
    return mask


@functools.lru_cache(maxsize=2)  # masks are N·M bytes: keep few alive
def _cached_dense_mask(window: Window, device: torch.device) -> torch.Tensor:
    return _dense_mask(window, device)


def _masked_sdpa(q, k, v, *, grid=None, layout=None, pool_weight=None, **opts):
    window = _window_of(q, layout, grid, pool_weight=pool_weight, **opts)
    k, v = extend_kv(k, v, window, pool_weight)
    mask = _cached_dense_mask(window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _mask_bytes(tokens: int, keys: int, element_size: int) -> float:
    """The bool mask plus the additive mask of the input dtype SDPA converts it to."""
    return float(tokens) * keys * (1 + element_size)


@answered_by("shape_only")
def _masked_sdpa_available(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    """The size limit of the dense mask (the dtypes are data)."""
    if shape is not None:
        n = shape[2]
        # M ≥ N (pooled tokens only add), so N² is the lower bound of the mask.
        need = _mask_bytes(n, n, torch.empty((), dtype=dtype).element_size())
        if need > MASK_BYTES_LIMIT:
            return (
                f"its dense N×M mask would take ≥ {need / 2**30:.1f} GiB at N={n} "
                f"(limit {MASK_BYTES_LIMIT / 2**30:.0f} GiB): use flex or the reference"
            )
    return None



def _workspace(batch, heads, tokens, head_dim, layout, *, element_size, **opts) -> float:
    """The masks, the extended K/V and, for float64 (SDPA's math path), full scores."""
    window = Window.of(layout, **opts)
    bh, n, m = batch * heads, window.tokens, window.keys
    scores = 2.0 * bh * n * m * element_size if element_size >= 8 else 0.0
    return extended_bytes(window, bh, head_dim, element_size) + _mask_bytes(n, m, element_size) \
        + scores


MASKED_SDPA = FastPath(
    "masked_sdpa",
    _masked_sdpa,
    dtypes={"cpu": (torch.float64, torch.float32, torch.bfloat16)},
    probe=_masked_sdpa_available,
    workspace=_workspace,
    doc="SDPA with a dense N×M boolean mask (differentiable everywhere)",
)
