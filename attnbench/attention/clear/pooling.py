"""CLEAR's pooled keys: one K/V token per f×f patch of the image keys (``down_factor`` f > 1)."""

from __future__ import annotations

import torch

from ..inputs import Grid
from ..layout import text_first_geometry
from .window import Window, pools


def pool_patches(
    x: torch.Tensor, grid: Grid, down_factor: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, H, Hg·Wg, d]`` image tokens → ``[B, H, (Hg//f)·(Wg//f), d]`` patch sums.

    Each output is ``Σ_{i,j} weight[i, j] · x[f·py + i, f·px + j]``; ``weight``
    defaults to ``1/f²`` (the mean). A broadcast multiply and a sum, as the
    public code does: element-wise work, not counted as FLOPs.
    """
    b, h, _, d = x.shape
    hg, wg = grid
    f = down_factor
    ph, pw = hg // f, wg // f
    patches = x.unflatten(2, (hg, wg))[:, :, : ph * f, : pw * f]
    patches = patches.reshape(b, h, ph, f, pw, f, d)
    if weight is None:
        pooled = patches.mean(dim=(3, 5))
    else:
        w = weight.to(x.dtype).view(1, 1, 1, f, 1, f, 1)
        pooled = (patches * w).sum(dim=(3, 5))
    return pooled.reshape(b, h, ph * pw, d)


def extend_kv(
    k: torch.Tensor, v: torch.Tensor, window: Window, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V with the pooled tokens appended (unchanged when ``down_factor`` is 0 or 1,
    or the grid is smaller than one patch)."""
    if not window.pooled:
        return k, v
    g, grid, f = window.global_tokens, (window.hg, window.wg), window.down_factor
    k_pool = pool_patches(k[:, :, g:], grid, f, weight)
    v_pool = pool_patches(v[:, :, g:], grid, f, weight)
    return torch.cat([k, k_pool], dim=2), torch.cat([v, v_pool], dim=2)


def weight_reason(weight: torch.Tensor | None, down_factor: int) -> str | None:
    """``None`` when ``weight`` fits ``down_factor`` (or is not given), else why not."""
    if weight is None:
        return None
    if not pools(down_factor):
        return (f"pool_weight was given but down_factor is {down_factor} "
                "(0 and 1 mean no pooled tokens)")
    if tuple(weight.shape) != (down_factor, down_factor):
        return (f"pool_weight must be [{down_factor}, {down_factor}] (down_factor²), "
                f"got {tuple(weight.shape)}")
    return None


def _check_weight(weight: torch.Tensor | None, down_factor: int) -> None:
    reason = weight_reason(weight, down_factor)
    if reason:
        raise ValueError(reason)


def _window_of(q, layout, grid, radius, radius_t=None, text=0, down_factor=0,
               pool_weight=None) -> Window:
    """The window of one call of a path (``layout=`` or ``grid=``, text first), checked
    against the input's token count, its pooling weight checked against it (``text``:
    tokens before a plain ``grid``; a layout carries its own)."""
    _check_weight(pool_weight, down_factor)
    geometry = text_first_geometry(layout, grid)
    window = Window.of(geometry, radius, text, down_factor, radius_t)
    if window.tokens != q.shape[2]:
        more = f" + {window.global_tokens} text tokens" if window.global_tokens else ""
        raise ValueError(f"grid {'x'.join(map(str, geometry.grid))}{more} = {window.tokens} "
                         f"tokens, but the input has {q.shape[2]}")
    return window


def extended_bytes(window: Window, batch_heads: int, head_dim: int, element_size: int) -> float:
    """``torch.cat`` of K and V with their pooled tokens copies both whole."""
    return 2.0 * batch_heads * window.keys * head_dim * element_size if window.pooled else 0.0
