"""CLEAR's FlexAttention path: a compiled FlexAttention with a cached block mask.

In row-major order a 128-token FlexAttention block is a strip of one grid
row, so a circle touches many blocks partially; the path therefore re-orders
the grid tokens into ``TILE×TILE`` tiles (:func:`tile_permutation`) before
FlexAttention and back after, with the block mask built in tile order: a
block is then a compact 2D patch and more whole blocks are skipped
(:func:`block_density` with ``tiled=True``). Grids at most 32 wide keep row
order (:func:`flex_tile_order`). The permutation is timed as the overhead
step ``tile_permute``.
"""

from __future__ import annotations

import functools
import shutil

import torch

from ...common.capabilities import FLEX_NO_COMPILER, answered_by
from ..inputs import Grid
from ..paths import FastPath
from .pooling import _window_of, extend_kv, extended_bytes
from .window import DEFAULT_RADIUS, Window, _args, _band, _index, allowed

#: FlexAttention's tile (both sides); the block mask is built at this granularity.
FLEX_BLOCK = 128


#: side of the square tiles the flex path orders the grid tokens by (see
#: :func:`tile_permutation`): 8×8 = 64 tokens, two tiles side by side fill one
#: 128-token FlexAttention block, an 8×16 patch instead of a strip of one row.
TILE = 8


#: whether the flex path may re-order tokens into tiles (:func:`flex_tile_order`)
FLEX_TILE_ORDER = True



def build_block_mask(
    grid: Grid,
    radius: float = DEFAULT_RADIUS,
    text: int = 0,
    down_factor: int = 0,
    *,
    device: torch.device | str | None = None,
    tiled: bool = False,
    radius_t: int | None = None,
    cached: bool = False,
):
    """FlexAttention ``BlockMask`` of CLEAR, built without an N×M tensor.

    ``create_block_mask`` evaluates the mask over all N×M pairs at once with
    int64 temporaries (GiBs at a 128×128 grid) unless compiled; here the same
    :func:`allowed` runs over a few 128-row query tiles at a time, is reduced
    to per-tile "partial" / "full" flags and handed to ``BlockMask.from_kv_blocks``.
    Full tiles skip the ``mask_mod`` inside the kernel. ``tiled=True``: the mask
    of the tokens in tile order (:func:`tile_permutation`), what the flex path runs.
    ``grid`` is ``(H, W)`` or ``(T, H, W)``. ``cached``: one mask per (window, device,
    tiled), as the path keeps it (:func:`block_mask`).
    """
    window = Window.of(grid, radius, text, down_factor, radius_t)
    build = _cached_block_mask if cached else _build_block_mask
    return build(window, torch.device(device or "cpu"), tiled=tiled)


def tile_permutation(window: Window, device: torch.device | str | None = None) -> torch.Tensor:
    """Long ``[M]``: the row-major index of the key at each tile-order position.

    Each frame's grid is cut into ``TILE×TILE`` tiles (the last row and column of
    tiles may be partial), taken frame by frame, row by row, each tile's tokens
    row by row. The text prefix and the pooled suffix keep their places; the
    first N entries are the permutation of the queries.
    """
    device = torch.device(device or "cpu")
    g, hg, wg, t = window.global_tokens, window.hg, window.wg, TILE
    frame = torch.arange(window.frames, device=device).repeat_interleave(hg * wg)
    y = torch.arange(hg, device=device).repeat_interleave(wg).repeat(window.frames)
    x = torch.arange(wg, device=device).repeat(hg * window.frames)
    tiles_per_row, tile_rows = -(-wg // t), -(-hg // t)
    tile = (frame * tile_rows + y // t) * tiles_per_row + x // t
    key = tile * (t * t) + (y % t) * t + x % t
    return torch.cat(
        [
            torch.arange(g, device=device),
            torch.argsort(key) + g,
            torch.arange(window.tokens, window.keys, device=device),
        ]
    )


def _tile_perm(window: Window, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)``: :func:`tile_permutation` and the tile position of each key."""
    perm = tile_permutation(window, device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=device)
    return perm, inverse


@functools.lru_cache(maxsize=32)
def _cached_tile_perm(window: Window, device: torch.device):
    return _tile_perm(window, device)


def _box(window: Window, tokens: torch.Tensor, device) -> torch.Tensor:
    """Keys image queries ``tokens`` (row-major indices) can see: text, the grid box
    within reach of their bounding box in the frames within reach, pooled (a superset,
    as :func:`_band`)."""
    g, wg, hg, reach, frame = window.global_tokens, window.wg, window.hg, window.reach, \
        window.frame
    image = tokens - g
    ts, ys, xs = image // frame, (image % frame) // wg, image % wg
    t0 = max(0, int(ts.min()) - window.limit_t)
    t1 = min(window.frames, int(ts.max()) + window.limit_t + 1)
    y0, y1 = max(0, int(ys.min()) - reach), min(hg, int(ys.max()) + reach + 1)
    x0, x1 = max(0, int(xs.min()) - reach), min(wg, int(xs.max()) + reach + 1)
    frames, rows, cols = _index(t0, t1, device), _index(y0, y1, device), _index(x0, x1, device)
    box = (g + frames[:, None, None] * frame + rows[None, :, None] * wg
           + cols[None, None, :]).flatten()
    return torch.cat([_index(0, g, device), box, _index(window.tokens, window.keys, device)])


def _block_flags(
    window: Window, device: torch.device, perm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` bool ``[Q tiles, KV tiles]``: tiles with some / all pairs allowed.

    One query tile at a time, over the kv tiles its keys can fall in: all of
    them for a tile holding global queries, else those overlapping its band
    (global, nearby rows, pooled) -- or, with ``perm`` (tokens in the order
    ``perm``, e.g. :func:`tile_permutation`), the tiles holding the keys of its
    queries' bounding box. The rest stay empty.
    """
    n, m, g, bs = window.tokens, window.keys, window.global_tokens, FLEX_BLOCK
    q_tiles, kv_tiles = -(-n // bs), -(-m // bs)
    counts = torch.zeros(q_tiles, kv_tiles, dtype=torch.int64, device=device)
    offsets = _index(0, bs, device)
    if perm is not None:
        position = torch.empty_like(perm)
        position[perm] = torch.arange(m, device=device)
        # pad to whole tiles (the padding is masked below) so tiles index it directly
        perm = torch.cat([perm, perm.new_zeros(kv_tiles * bs - m + bs)]).to(torch.int32)
    for t in range(q_tiles):
        q0, q1 = t * bs, min(n, (t + 1) * bs)
        if q0 < g:
            tiles = _index(0, kv_tiles, device)
        elif perm is None:
            tiles = torch.unique(_band(window, q0, q1, device) // bs)
        else:
            tiles = torch.unique(position[_box(window, perm[q0:q1], device)] // bs)
        kv = (tiles[:, None] * bs + offsets).flatten()
        q = (q0 + offsets)[:, None]
        valid = (kv < m) & (q < n)
        if perm is not None:
            q, kv = perm[q.long()], perm[kv.long()]
        ok = allowed(q, kv[None, :], _args(window)) & valid
        counts[t, tiles.long()] = ok.view(bs, len(tiles), bs).sum(dim=(0, 2))
    full = counts == bs * bs
    return (counts > 0) & ~full, full


def _ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile: how many kv tiles are set and their indices, set ones first."""
    num = flags.sum(dim=-1).to(torch.int32)[None, None]
    idx = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True)
    return num, idx.to(torch.int32)[None, None]


def _build_block_mask(window: Window, device: torch.device, *, tiled: bool = False):
    """The block mask of the tokens in row-major order, or in tile order (``tiled``)."""
    from torch.nn.attention.flex_attention import BlockMask

    perm = tile_permutation(window, device) if tiled else None
    partial, full = _block_flags(window, device, perm)
    # 0-d tensors, not ints: the compiled kernel takes them as inputs instead of
    # baking them in, so a new grid or radius of the same shapes is not a recompile.
    args = tuple(torch.tensor(a, device=device) for a in _args(window))

    if perm is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(q_idx, kv_idx, args)

    else:
        order = perm.to(torch.int32)  # tile position → row-major index, read in the kernel

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(order[q_idx], order[kv_idx], args)

    return BlockMask.from_kv_blocks(
        *_ordered(partial),
        *_ordered(full),
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(window.tokens, window.keys),
    )


@functools.lru_cache(maxsize=32)
def _cached_block_mask(window: Window, device: torch.device, tiled: bool = False):
    return _build_block_mask(window, device, tiled=tiled)


def block_mask(*args, **kwargs):
    """:func:`build_block_mask`, cached per (window, device, tiled): built once."""
    return build_block_mask(*args, cached=True, **kwargs)


def block_density(
    grid: Grid,
    radius: float = DEFAULT_RADIUS,
    text: int = 0,
    down_factor: int = 0,
    *,
    tiled: bool = False,
    radius_t: int | None = None,
) -> float:
    """Fraction of FlexAttention's 128×128 tiles that are computed.

    Row-major token order, or tile order (``tiled=True``, what the flex path
    runs). Compare with ``flops().ratio``: the gap is work the kernel does on
    masked pairs inside partially allowed tiles.
    """
    window = Window.of(grid, radius, text, down_factor, radius_t)
    perm = tile_permutation(window) if tiled else None
    partial, full = _block_flags(window, torch.device("cpu"), perm)
    return float((partial | full).sum()) / partial.numel()


_COMPILED_FLEX = None


def compiled_flex_attention():
    """The process-wide ``torch.compile(flex_attention)`` (compiled lazily, once).

    Static shapes: dynamic-shape FlexAttention does not build on CPU. Each new
    (B, H, N, M, d, dtype) is one recompile; grid, radius and G live in the
    BlockMask as tensors, so changing them is not. The first compile takes
    seconds (much less with inductor's on-disk cache warm): benchmarks must
    warm up before timing.
    """
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


#: shapes a benchmark sweep may compile before dynamo would silently fall back to
#: eager (unfused, N×M scores); its default limit is 8 per function.
FLEX_RECOMPILE_LIMIT = 64


def flex_tile_order(window: Window) -> bool:
    """Whether the flex path runs this window's tokens in tile order (:func:`tile_permutation`).

    Yes when the grid is wider than 4 tiles: a row-major 128-token block of a
    grid at most 32 wide already spans ≥ 4 whole rows, and there tile order
    computed as many blocks or more (32×32, r=8: 53% row-major, 62% tiled), while
    from 48 wide on it computes fewer (64×64, r=8: 26.2% → 21.5%; 128×128:
    11.4% → 6.2%). ``FLEX_TILE_ORDER = False`` turns it off.
    """
    return FLEX_TILE_ORDER and window.wg > 4 * TILE


def _to_tiles(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return x.index_select(2, order)


def keep_nonfinite(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``out`` with NaN where a query row, or any key of its head, is not finite.

    FlexAttention's online softmax drops NaN scores (a NaN query comes out 0),
    where the reference and the masked path give NaN: this restores the rule
    every path of every method follows -- a NaN the reference returns is never
    hidden. One pass over q and k.
    """
    ok = torch.isfinite(q).all(dim=-1, keepdim=True) & \
        torch.isfinite(k).flatten(-2).all(dim=-1)[..., None, None]
    return out.masked_fill(~ok, float("nan"))


def _flex(q, k, v, *, grid=None, layout=None, pool_weight=None, **opts):
    window = _window_of(q, layout, grid, pool_weight=pool_weight, **opts)
    q_in, k_in = q, k
    k, v = extend_kv(k, v, window, pool_weight)
    tiled = flex_tile_order(window)
    mask = _cached_block_mask(window, q.device, tiled)
    if tiled:  # grid tokens into tile order, the mask was built in that order
        perm, inverse = _cached_tile_perm(window, q.device)
        q = _to_tiles(q, perm[: window.tokens])
        k, v = _to_tiles(k, perm), _to_tiles(v, perm)
    with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
        out = compiled_flex_attention()(q, k, v, block_mask=mask)
    if tiled:  # back to row-major order
        out = _to_tiles(out, inverse[: window.tokens])
    return keep_nonfinite(out, q_in, k_in)


def _tile_permute_step(window: Window, q, k, v):
    """The flex path's re-ordering from scratch: q, k, v into tile order, an output back."""
    perm, inverse = _tile_perm(window, q.device)
    k, v = extend_kv(k, v, window)
    tq, tk, tv = _to_tiles(q, perm[: window.tokens]), _to_tiles(k, perm), _to_tiles(v, perm)
    return tk, tv, _to_tiles(tq, inverse[: window.tokens])


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor import cpp_builder

        return cpp_builder.get_cpp_compiler()
    except Exception:
        return shutil.which("g++") or shutil.which("c++")


@answered_by("flex")
def _flex_available(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    """What the capability data cannot say: FlexAttention and dynamo exist, Triton on
    CUDA, a C++ compiler on CPU (there its torch-free twin answers ``attnbench list``)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention (needs >= 2.5)"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (needed by FlexAttention) is not supported on this Python"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "FlexAttention on CUDA needs Triton"
    if device.type == "cpu":
        if not _cpp_compiler():
            return FLEX_NO_COMPILER
    return None



def _workspace(batch, heads, tokens, head_dim, layout, *, element_size, **opts) -> float:
    """Block-mask indices, the extended K/V, the tile-order copies and the logsumexp."""
    window = Window.of(layout, **opts)
    bh, n, m = batch * heads, window.tokens, window.keys
    q_tiles, kv_tiles = -(-n // FLEX_BLOCK), -(-m // FLEX_BLOCK)
    # int32 indices + counts, partial and full, kv-major and q-major.
    block = 4.0 * 4 * (q_tiles * kv_tiles + q_tiles + kv_tiles)
    tiles = 0.0
    if flex_tile_order(window):  # q, k, v, out in tile order + the permutations
        tiles = 2.0 * bh * (n + m) * head_dim * element_size + 2 * 8.0 * m + 4.0 * m
    return extended_bytes(window, bh, head_dim, element_size) + block + tiles + 4.0 * bh * n


FLEX = FastPath(
    "flex",
    _flex,
    devices=("cuda", "cpu"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    grad_devices=("cuda",),  # FlexAttention has no CPU backward
    auto_devices=("cuda",),  # on CPU the halo path is faster (and trains); flex when named
    probe=_flex_available,
    workspace=_workspace,
    flop_countable=False,
    doc="FlexAttention + cached BlockMask (compiled; CPU is forward-only)",
)
