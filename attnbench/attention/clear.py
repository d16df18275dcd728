"""CLEAR: local attention inside a circle on the token grid (arXiv 2412.16112).

Each image token ``(qy, qx)`` of a row-major ``Hg × Wg`` grid attends only to
the image tokens with ``(qy−ky)² + (qx−kx)² < r²`` (strict), with exact
softmax over that neighbourhood; cost O(N·πr²·d) instead of O(N²·d).

Two additions of the public code (Huage001/CLEAR, ``attention_processor.py``):

* ``global_tokens`` -- a prefix of G non-grid tokens (FLUX's text tokens) that
  attend to every text and image token and are attended by every image token.
* ``down_factor`` -- f > 0 appends ``(Hg//f)·(Wg//f)`` extra key/value tokens,
  each the weighted sum of one f×f patch of the image keys (and values). Who
  sees them follows ``init_local_downsample_mask_flex`` there: every *image*
  query attends to all of them (a coarse global view beside the local circle);
  the global (text) queries do not (their mask stops at ``kv_idx < text_length
  + height·width``). The weights are one ``[f, f]`` tensor per layer, shared by
  heads, channels, K and V (``spatial_weight`` of shape ``(1,1,1,f,1,f,1)``,
  initialised ``1/f²``). The stateless ``attend`` uses that initial, uniform
  average; the mixer owns and learns the weights. Grid sides that are not a
  multiple of f are handled by pooling the top-left ``(Hg//f·f) × (Wg//f·f)``
  region only (the public code sizes its mask with ``height // down_factor`` the
  same way): the leftover bottom rows and right columns are still attended
  through the circle, they just have no pooled summary.

The API's token order is the grid's row-major order. In row-major order a
128-token FlexAttention block is a strip of one row, so a circle touches many
blocks partially; the ``flex`` path therefore re-orders the grid tokens into
``TILE×TILE`` tiles (:func:`tile_permutation`) before FlexAttention and back
after, with the block mask built in tile order: a block is then a compact 2D
patch and more whole blocks are skipped (:func:`block_density` with
``tiled=True``; at 64×64, r=8, 78.5% of the blocks are skipped in tile order
against 73.8% in row order; 93.8% against 88.6% at 128×128). Grids at most 32
wide keep row order (:func:`flex_tile_order`). The permutation is timed as the
overhead step ``tile_permute``.

Implementations: the float64-capable ``reference`` (query rows in chunks, keys
restricted to the grid rows within the radius, so nothing N×N is formed);
``flex`` (FlexAttention with a cached block mask, tokens in tile order; the public
code's path, which keeps row order); and
``masked_sdpa`` (SDPA with a dense boolean mask, differentiable everywhere).
"""

from __future__ import annotations

import functools
import math
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import softmax as _softmax
from .base import (
    AttentionBackend,
    AttentionMixer,
    FastPath,
    Flops,
    Grid,
    Option,
    check_grid,
    dense_flops,
    non_negative,
)
from .registry import register
from .softmax import softmax_reference

#: score elements one reference chunk may hold (16 Mi elements = 64 MiB in fp32).
REFERENCE_CHUNK_ELEMENTS = 1 << 24
#: FlexAttention's tile (both sides); the block mask is built at this granularity.
FLEX_BLOCK = 128
#: side of the square tiles the flex path orders the grid tokens by (see
#: :func:`tile_permutation`): 8×8 = 64 tokens, two tiles side by side fill one
#: 128-token FlexAttention block, an 8×16 patch instead of a strip of one row.
TILE = 8
#: whether the flex path may re-order tokens into tiles (:func:`flex_tile_order`)
FLEX_TILE_ORDER = True
#: masked_sdpa refuses when its masks (bool + SDPA's additive copy) would exceed this.
MASK_BYTES_LIMIT = 1 << 30
#: mask elements one step of the mask builders may hold (their integer temporaries
#: are several times that in bytes).
MASK_CHUNK_ELEMENTS = 1 << 20

DEFAULT_RADIUS = 8.0


def _finite_positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be a finite number > 0"


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Where every token of one CLEAR call sits: G global, then the grid, then pooled.

    Queries are ``[0, tokens)``; keys are ``[0, keys)`` = the same tokens plus
    ``pooled`` down-sampled ones. ``limit`` is the largest allowed squared grid
    distance (an integer: ``dy² + dx² < r²`` ⇔ ``dy² + dx² ≤ ceil(r²) − 1``), so
    every mask here is exact integer arithmetic, never a float comparison.
    """

    hg: int
    wg: int
    global_tokens: int
    down_factor: int
    limit: int

    @classmethod
    def build(cls, grid: Grid, radius: float, global_tokens: int = 0, down_factor: int = 0):
        """Validate the pieces (for callers that bypass ``resolve``) and derive ``limit``."""
        hg, wg = (int(s) for s in grid)
        if hg <= 0 or wg <= 0:
            raise ValueError(f"grid sides must be positive, got {grid!r}")
        reason = _finite_positive(radius)
        if reason:
            raise ValueError(f"clear: radius={radius!r} {reason}")
        if global_tokens < 0 or down_factor < 0:
            raise ValueError(
                f"clear: global_tokens={global_tokens!r} and down_factor={down_factor!r} "
                "must be >= 0"
            )
        # Clamp to the grid's diameter: beyond it every radius means "the whole grid",
        # and the integer stays small enough for int32 index arithmetic in kernels.
        diameter2 = (hg - 1) ** 2 + (wg - 1) ** 2
        r2 = float(radius) ** 2
        limit = diameter2 if r2 > diameter2 else math.ceil(r2) - 1
        return cls(hg, wg, int(global_tokens), int(down_factor), limit)

    @property
    def image(self) -> int:
        return self.hg * self.wg

    @property
    def tokens(self) -> int:
        """N: the query (and non-pooled key) count."""
        return self.global_tokens + self.image

    @property
    def pooled_grid(self) -> Grid:
        f = self.down_factor
        return (self.hg // f, self.wg // f) if f else (0, 0)

    @property
    def pooled(self) -> int:
        ph, pw = self.pooled_grid
        return ph * pw

    @property
    def keys(self) -> int:
        """M: keys after the pooled tokens are appended."""
        return self.tokens + self.pooled

    @property
    def reach(self) -> int:
        """Largest |dy| (and |dx|) inside the circle."""
        return math.isqrt(self.limit)


def _layout(grid, tokens: int, radius, global_tokens=0, down_factor=0) -> Layout:
    grid = check_grid(grid, tokens, extra=int(global_tokens))
    return Layout.build(grid, radius, global_tokens, down_factor)


# --------------------------------------------------------------------------- the mask


def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor, layout_args) -> torch.Tensor:
    """True where query ``q_idx`` may attend key ``kv_idx`` (broadcasting index tensors).

    ``layout_args = (G, Wg, N, limit)`` as Python ints or 0-d tensors. This one
    function is the mask of every path: the dense mask, the reference's chunk
    masks and the FlexAttention ``mask_mod`` (where tensors keep it from being
    recompiled for every grid and radius).
    """
    g, wg, n, limit = layout_args
    qi, ki = q_idx - g, kv_idx - g
    dy, dx = qi // wg - ki // wg, qi % wg - ki % wg
    local = dy * dy + dx * dx <= limit
    image_query = q_idx >= g
    global_query = (~image_query) & (kv_idx < n)  # text sees text + image, not pooled
    image_sees = (kv_idx < g) | (kv_idx >= n) | local  # text, pooled, the circle
    return global_query | (image_query & image_sees)


def _args(layout: Layout) -> tuple[int, int, int, int]:
    return layout.global_tokens, layout.wg, layout.tokens, layout.limit


def _row_block(layout: Layout, batch_heads: int) -> int:
    """Grid rows of queries per reference chunk.

    Halved until the chunk's scores (``B·H·rows·Wg·keys``) fit
    ``REFERENCE_CHUNK_ELEMENTS`` and its mask (int32 index arithmetic,
    ``rows·Wg·keys``) fits ``MASK_CHUNK_ELEMENTS``.
    """

    def too_big(rows: int) -> bool:
        pairs = rows * layout.wg * _band_keys(layout, rows)
        return batch_heads * pairs > REFERENCE_CHUNK_ELEMENTS or pairs > MASK_CHUNK_ELEMENTS

    rows = layout.hg
    while rows > 1 and too_big(rows):
        rows = (rows + 1) // 2
    return rows


def _band_keys(layout: Layout, rows: int) -> int:
    """Keys one chunk of ``rows`` grid rows looks at: global + band + pooled."""
    band = min(layout.hg, rows + 2 * layout.reach)
    return layout.global_tokens + band * layout.wg + layout.pooled


def _index(start: int, stop: int, device) -> torch.Tensor:
    return torch.arange(start, stop, device=device, dtype=torch.int32)


def _band(layout: Layout, q0: int, q1: int, device) -> torch.Tensor:
    """Keys image queries ``[q0, q1)`` can see: global, the grid rows within reach, pooled.

    Every other key is masked for them, so the mask (and the scores) of these
    queries need only these columns: O(rows·(G + band + pooled)), not O(rows·M).
    """
    g, wg, hg, reach = layout.global_tokens, layout.wg, layout.hg, layout.reach
    y0, y1 = (q0 - g) // wg, (q1 - 1 - g) // wg + 1
    ky0, ky1 = max(0, y0 - reach), min(hg, y1 + reach)
    return torch.cat(
        [
            _index(0, g, device),
            _index(g + ky0 * wg, g + ky1 * wg, device),
            _index(layout.tokens, layout.keys, device),
        ]
    )


def _image_chunks(layout: Layout, batch_heads: int, device):
    """``(q0, q1, keys)`` per chunk of whole grid rows of image queries (see ``_row_block``)."""
    g, wg = layout.global_tokens, layout.wg
    rows = _row_block(layout, batch_heads)
    for y0 in range(0, layout.hg, rows):
        q0, q1 = g + y0 * wg, g + min(layout.hg, y0 + rows) * wg
        yield q0, q1, _band(layout, q0, q1, device)


def dense_mask(
    grid: Grid,
    radius: float = DEFAULT_RADIUS,
    global_tokens: int = 0,
    down_factor: int = 0,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``[N, M]`` boolean mask of CLEAR (True = attend); the masked_sdpa overhead.

    Evaluated in chunks of query rows and, for image queries, only over the keys
    within reach (``_band``); the result itself is N·M bytes.
    """
    layout = Layout.build(grid, radius, global_tokens, down_factor)
    return _dense_mask(layout, torch.device(device or "cpu"))


def _dense_mask(layout: Layout, device: torch.device) -> torch.Tensor:
    n, m, g = layout.tokens, layout.keys, layout.global_tokens
    mask = torch.zeros(n, m, dtype=torch.bool, device=device)
    rows = max(1, MASK_CHUNK_ELEMENTS // max(1, m))
    for start in range(0, g, rows):  # global queries: every key column
        stop = min(g, start + rows)
        q = _index(start, stop, device)[:, None]
        mask[start:stop] = allowed(q, _index(0, m, device)[None, :], _args(layout))
    for q0, q1, keys in _image_chunks(layout, 1, device):  # image queries: their band
        q = _index(q0, q1, device)[:, None]
        mask[q0:q1, keys] = allowed(q, keys[None, :], _args(layout))
    return mask


@functools.lru_cache(maxsize=2)  # masks are N·M bytes: keep few alive
def _cached_dense_mask(layout: Layout, device: torch.device) -> torch.Tensor:
    return _dense_mask(layout, device)


def build_block_mask(
    grid: Grid,
    radius: float = DEFAULT_RADIUS,
    global_tokens: int = 0,
    down_factor: int = 0,
    *,
    device: torch.device | str | None = None,
    tiled: bool = False,
):
    """FlexAttention ``BlockMask`` of CLEAR, built without an N×M tensor (uncached).

    ``create_block_mask`` evaluates the mask over all N×M pairs at once with
    int64 temporaries (GiBs at a 128×128 grid) unless compiled; here the same
    :func:`allowed` runs over a few 128-row query tiles at a time, is reduced
    to per-tile "partial" / "full" flags and handed to ``BlockMask.from_kv_blocks``.
    Full tiles skip the ``mask_mod`` inside the kernel. ``tiled=True``: the mask
    of the tokens in tile order (:func:`tile_permutation`), what the flex path runs.
    """
    layout = Layout.build(grid, radius, global_tokens, down_factor)
    return _build_block_mask(layout, torch.device(device or "cpu"), tiled=tiled)


def tile_permutation(layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
    """Long ``[M]``: the row-major index of the key at each tile-order position.

    The grid is cut into ``TILE×TILE`` tiles (the last row and column of tiles
    may be partial), taken row by row, each tile's tokens row by row. The
    global prefix and the pooled suffix keep their places; the first N entries
    are the permutation of the queries.
    """
    device = torch.device(device or "cpu")
    g, hg, wg, t = layout.global_tokens, layout.hg, layout.wg, TILE
    y = torch.arange(hg, device=device).repeat_interleave(wg)
    x = torch.arange(wg, device=device).repeat(hg)
    tiles_per_row = -(-wg // t)
    key = ((y // t) * tiles_per_row + x // t) * (t * t) + (y % t) * t + x % t
    return torch.cat(
        [
            torch.arange(g, device=device),
            torch.argsort(key) + g,
            torch.arange(layout.tokens, layout.keys, device=device),
        ]
    )


def _tile_perm(layout: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)``: :func:`tile_permutation` and the tile position of each key."""
    perm = tile_permutation(layout, device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=device)
    return perm, inverse


@functools.lru_cache(maxsize=32)
def _cached_tile_perm(layout: Layout, device: torch.device):
    return _tile_perm(layout, device)


def _box(layout: Layout, tokens: torch.Tensor, device) -> torch.Tensor:
    """Keys image queries ``tokens`` (row-major indices) can see: global, the grid box
    within reach of their bounding box, pooled (a superset, as :func:`_band`)."""
    g, wg, hg, reach = layout.global_tokens, layout.wg, layout.hg, layout.reach
    ys, xs = (tokens - g) // wg, (tokens - g) % wg
    y0, y1 = max(0, int(ys.min()) - reach), min(hg, int(ys.max()) + reach + 1)
    x0, x1 = max(0, int(xs.min()) - reach), min(wg, int(xs.max()) + reach + 1)
    rows, cols = _index(y0, y1, device), _index(x0, x1, device)
    box = (g + rows[:, None] * wg + cols[None, :]).flatten()
    return torch.cat([_index(0, g, device), box, _index(layout.tokens, layout.keys, device)])


def _block_flags(
    layout: Layout, device: torch.device, perm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` bool ``[Q tiles, KV tiles]``: tiles with some / all pairs allowed.

    One query tile at a time, over the kv tiles its keys can fall in: all of
    them for a tile holding global queries, else those overlapping its band
    (global, nearby rows, pooled) -- or, with ``perm`` (tokens in the order
    ``perm``, e.g. :func:`tile_permutation`), the tiles holding the keys of its
    queries' bounding box. The rest stay empty.
    """
    n, m, g, bs = layout.tokens, layout.keys, layout.global_tokens, FLEX_BLOCK
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
            tiles = torch.unique(_band(layout, q0, q1, device) // bs)
        else:
            tiles = torch.unique(position[_box(layout, perm[q0:q1], device)] // bs)
        kv = (tiles[:, None] * bs + offsets).flatten()
        q = (q0 + offsets)[:, None]
        valid = (kv < m) & (q < n)
        if perm is not None:
            q, kv = perm[q.long()], perm[kv.long()]
        ok = allowed(q, kv[None, :], _args(layout)) & valid
        counts[t, tiles.long()] = ok.view(bs, len(tiles), bs).sum(dim=(0, 2))
    full = counts == bs * bs
    return (counts > 0) & ~full, full


def _ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile: how many kv tiles are set and their indices, set ones first."""
    num = flags.sum(dim=-1).to(torch.int32)[None, None]
    idx = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True)
    return num, idx.to(torch.int32)[None, None]


def _build_block_mask(layout: Layout, device: torch.device, *, tiled: bool = False):
    """The block mask of the tokens in row-major order, or in tile order (``tiled``)."""
    from torch.nn.attention.flex_attention import BlockMask

    perm = tile_permutation(layout, device) if tiled else None
    partial, full = _block_flags(layout, device, perm)
    # 0-d tensors, not ints: the compiled kernel takes them as inputs instead of
    # baking them in, so a new grid or radius of the same shapes is not a recompile.
    args = tuple(torch.tensor(a, device=device) for a in _args(layout))

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
        seq_lengths=(layout.tokens, layout.keys),
    )


@functools.lru_cache(maxsize=32)
def _cached_block_mask(layout: Layout, device: torch.device, tiled: bool = False):
    return _build_block_mask(layout, device, tiled=tiled)


def block_mask(
    grid: Grid,
    radius: float = DEFAULT_RADIUS,
    global_tokens: int = 0,
    down_factor: int = 0,
    *,
    device: torch.device | str | None = None,
    tiled: bool = False,
):
    """:func:`build_block_mask`, cached per (grid, radius, G, f, device, tiled): built once."""
    layout = Layout.build(grid, radius, global_tokens, down_factor)
    return _cached_block_mask(layout, torch.device(device or "cpu"), tiled)


def clear_mask_caches() -> None:
    """Drop the cached block and dense masks and tile permutations (e.g. between cases)."""
    _cached_block_mask.cache_clear()
    _cached_dense_mask.cache_clear()
    _cached_tile_perm.cache_clear()


def block_density(
    grid: Grid,
    radius: float = DEFAULT_RADIUS,
    global_tokens: int = 0,
    down_factor: int = 0,
    *,
    tiled: bool = False,
) -> float:
    """Fraction of FlexAttention's 128×128 tiles that are computed.

    Row-major token order, or tile order (``tiled=True``, what the flex path
    runs). Compare with ``flops().ratio``: the gap is work the kernel does on
    masked pairs inside partially allowed tiles.
    """
    layout = Layout.build(grid, radius, global_tokens, down_factor)
    perm = tile_permutation(layout) if tiled else None
    partial, full = _block_flags(layout, torch.device("cpu"), perm)
    return float((partial | full).sum()) / partial.numel()


# --------------------------------------------------------------------------- pair counts


def local_pairs(grid: Grid, radius: float) -> int:
    """Allowed (query, key) image pairs, in closed form over the circle's offsets.

    ``Σ_{dy²+dx²<r²} (Hg−|dy|)(Wg−|dx|)`` (terms ≤ 0 dropped): each offset
    occurs once for every query whose shifted key is still on the grid. The sum
    over dx for a given dy is an arithmetic series, so this is O(r), not O(N).
    """
    layout = Layout.build(grid, radius)
    hg, wg = layout.hg, layout.wg
    total = 0
    for dy in range(-layout.reach, layout.reach + 1):
        rows = hg - abs(dy)
        if rows <= 0:
            continue
        m = min(math.isqrt(layout.limit - dy * dy), wg - 1)  # |dx| ≤ m
        total += rows * (wg + 2 * (m * wg - m * (m + 1) // 2))
    return total


def allowed_pairs(grid: Grid, radius: float, global_tokens: int = 0, down_factor: int = 0) -> int:
    """Every allowed pair: the circle + global rows and columns + pooled columns."""
    layout = Layout.build(grid, radius, global_tokens, down_factor)
    g, img = layout.global_tokens, layout.image
    return (
        local_pairs(grid, radius)
        + g * layout.tokens  # global queries: every text and image key
        + img * g  # image queries: every global key
        + img * layout.pooled  # image queries: every pooled key
    )


# --------------------------------------------------------------------------- pooled K/V


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
    k: torch.Tensor, v: torch.Tensor, layout: Layout, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V with the pooled tokens appended (unchanged when ``down_factor`` is 0 or
    the grid is smaller than one patch)."""
    if not layout.pooled:
        return k, v
    g, grid, f = layout.global_tokens, (layout.hg, layout.wg), layout.down_factor
    k_pool = pool_patches(k[:, :, g:], grid, f, weight)
    v_pool = pool_patches(v[:, :, g:], grid, f, weight)
    return torch.cat([k, k_pool], dim=2), torch.cat([v, v_pool], dim=2)


def _check_weight(weight: torch.Tensor | None, down_factor: int) -> None:
    if weight is None:
        return
    if not down_factor:
        raise ValueError("pool_weight was given but down_factor is 0 (no pooled tokens)")
    if tuple(weight.shape) != (down_factor, down_factor):
        raise ValueError(
            f"pool_weight must be [{down_factor}, {down_factor}] (down_factor²), "
            f"got {tuple(weight.shape)}"
        )


# --------------------------------------------------------------------------- reference


def clear_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLEAR in pure PyTorch, any dtype; memory O(chunk), never N×N.

    Global queries attend to all N non-pooled keys (plain softmax). Image
    queries go ``rows`` grid rows at a time; their keys are the global ones,
    the grid rows within ``reach`` of the chunk, and the pooled ones, masked by
    :func:`allowed` and handed to :func:`softmax_reference`.
    """
    b, h, n, _ = q.shape
    g = layout.global_tokens
    k, v = extend_kv(k, v, layout, weight)
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    if g:
        out[:, :, :g] = softmax_reference(q[:, :, :g], k[:, :, :n], v[:, :, :n])
    for q0, q1, keys in _image_chunks(layout, b * h, q.device):
        mask = allowed(_index(q0, q1, q.device)[:, None], keys[None, :], _args(layout))
        out[:, :, q0:q1] = softmax_reference(
            q[:, :, q0:q1], k.index_select(2, keys), v.index_select(2, keys), key_mask=mask
        )
    return out


# --------------------------------------------------------------------------- fast paths


def _layout_of(q, grid, radius, global_tokens, down_factor, pool_weight) -> Layout:
    _check_weight(pool_weight, down_factor)
    return _layout(grid, q.shape[2], radius, global_tokens, down_factor)


_COMPILED_FLEX = None


def compiled_flex_attention():
    """The process-wide ``torch.compile(flex_attention)`` (compiled lazily, once).

    Static shapes: dynamic-shape FlexAttention does not build on CPU in torch
    2.13 (its C++ fails to compile). Each new (B, H, N, M, d, dtype) is one
    recompile; grid, radius and G live in the BlockMask as tensors, so changing
    them is not. Measured on 2 CPU cores (torch 2.13, gcc): ~18-20 s for the
    first compile with an empty inductor cache, ~5-7 s per further shape; with
    the on-disk cache warm, ~3-5 s for the first call of a process and ~0.3 s
    per shape. Benchmarks must warm up before timing.
    """
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


#: shapes a benchmark sweep may compile before dynamo would silently fall back to
#: eager (unfused, N×M scores); its default limit is 8 per function.
FLEX_RECOMPILE_LIMIT = 64


def flex_tile_order(layout: Layout) -> bool:
    """Whether the flex path runs this layout's tokens in tile order (:func:`tile_permutation`).

    Yes when the grid is wider than 4 tiles: a row-major 128-token block of a
    grid at most 32 wide already spans ≥ 4 whole rows, and there tile order
    computed as many blocks or more (32×32, r=8: 53% row-major, 62% tiled), while
    from 48 wide on it computes fewer (64×64, r=8: 26.2% → 21.5%; 128×128:
    11.4% → 6.2%). ``FLEX_TILE_ORDER = False`` turns it off.
    """
    return FLEX_TILE_ORDER and layout.wg > 4 * TILE


def _to_tiles(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return x.index_select(2, order)


def _flex(q, k, v, *, grid, radius, global_tokens, down_factor, pool_weight=None):
    layout = _layout_of(q, grid, radius, global_tokens, down_factor, pool_weight)
    k, v = extend_kv(k, v, layout, pool_weight)
    tiled = flex_tile_order(layout)
    mask = _cached_block_mask(layout, q.device, tiled)
    if tiled:  # grid tokens into tile order, the mask was built in that order
        perm, inverse = _cached_tile_perm(layout, q.device)
        q = _to_tiles(q, perm[: layout.tokens])
        k, v = _to_tiles(k, perm), _to_tiles(v, perm)
    with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
        out = compiled_flex_attention()(q, k, v, block_mask=mask)
    if tiled:  # back to row-major order
        out = _to_tiles(out, inverse[: layout.tokens])
    return out


def _tile_permute_step(layout: Layout, q, k, v):
    """The flex path's re-ordering from scratch: q, k, v into tile order, an output back."""
    perm, inverse = _tile_perm(layout, q.device)
    k, v = extend_kv(k, v, layout)
    tq, tk, tv = _to_tiles(q, perm[: layout.tokens]), _to_tiles(k, perm), _to_tiles(v, perm)
    return tk, tv, _to_tiles(tq, inverse[: layout.tokens])


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor import cpp_builder

        return cpp_builder.get_cpp_compiler()
    except Exception:
        return shutil.which("g++") or shutil.which("c++")


def _flex_available(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention (needs >= 2.5)"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (needed by FlexAttention) is not supported on this Python"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"FlexAttention kernels take float32/float16/bfloat16, not {dtype}"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "FlexAttention on CUDA needs Triton"
    if device.type == "cpu":
        if not _cpp_compiler():
            return "FlexAttention on CPU compiles C++ kernels: no C++ compiler found"
        return None
    return f"FlexAttention is not supported on {device.type}"


def _masked_sdpa(q, k, v, *, grid, radius, global_tokens, down_factor, pool_weight=None):
    layout = _layout_of(q, grid, radius, global_tokens, down_factor, pool_weight)
    k, v = extend_kv(k, v, layout, pool_weight)
    mask = _cached_dense_mask(layout, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _mask_bytes(tokens: int, keys: int, element_size: int) -> float:
    """The bool mask plus the additive mask of the input dtype SDPA converts it to."""
    return float(tokens) * keys * (1 + element_size)


def _masked_sdpa_available(device: torch.device, dtype: torch.dtype, shape) -> str | None:
    if device.type == "cpu" and dtype == torch.float16:
        return "SDPA on CPU has no fast float16 kernel (use float32 or bfloat16)"
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


# --------------------------------------------------------------------------- the mixer


class ClearMixer(AttentionMixer):
    """CLEAR attention with the softmax projections inherited unchanged.

    Its only new parameter, when ``down_factor`` f > 0, is ``pool_weight``
    ``[f, f]``: the weights of the patch sums that make the pooled K/V tokens,
    shared by heads, channels, K and V, initialised to the mean (1/f²) so a
    freshly converted layer equals the stateless ``attend``.
    """

    def __init__(self, backend, dim, num_heads, **kw) -> None:
        super().__init__(backend, dim, num_heads, **kw)
        f = self.options["down_factor"]
        self.pool_weight = nn.Parameter(torch.empty(f, f)) if f else None
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        if self.pool_weight is not None:
            f = self.pool_weight.shape[0]
            with torch.no_grad():
                self.pool_weight.fill_(1.0 / (f * f))

    def core(self, q, k, v, grid: Grid) -> torch.Tensor:
        return self.backend.attend(
            q, k, v, grid=grid, impl=self.impl, pool_weight=self.pool_weight, **self.attend_options
        )


# --------------------------------------------------------------------------- backend


@register
class Clear(AttentionBackend):
    """CLEAR local (circular-window) attention; reference, FlexAttention and masked SDPA."""

    name = "clear"
    summary = "CLEAR: softmax inside a circle of radius r on the token grid"
    paper = "Liu et al., CLEAR, arXiv 2412.16112"
    options = (
        Option(
            "radius",
            DEFAULT_RADIUS,
            "circle radius in grid tokens: attend where dy²+dx² < r² (released: 8, 16, 32)",
            float,
            check=_finite_positive,
        ),
        Option(
            "global_tokens",
            0,
            "non-grid prefix tokens (MM-DiT text) that attend to and are seen by all",
            int,
            check=non_negative,
        ),
        Option(
            "down_factor",
            0,
            "0 = off; f adds one K/V token per f×f patch, seen by every image query",
            int,
            check=non_negative,
        ),
    )
    mixer_class = ClearMixer
    fast_paths = (
        FastPath(
            "flex",
            _flex,
            _flex_available,
            differentiable=lambda device: device.type == "cuda",
            flop_countable=False,
            doc="FlexAttention + cached BlockMask (compiled; CPU is forward-only)",
        ),
        FastPath(
            "masked_sdpa",
            _masked_sdpa,
            _masked_sdpa_available,
            doc="SDPA with a dense N×M boolean mask (differentiable everywhere)",
        ),
    )

    def grid_extra_tokens(self, options: dict[str, Any]) -> int:
        return int(options["global_tokens"])

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        grid: Grid,
        impl: str = "auto",
        pool_weight: torch.Tensor | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """As :meth:`AttentionBackend.attend`, plus the mixer's learned ``pool_weight``.

        ``pool_weight`` (``[f, f]``) replaces the uniform 1/f² patch average; a
        weight that requires grad makes the choice a differentiable path even
        when q, k, v do not (projections frozen, pooling trained).
        """
        chosen, grid, opts = self.prepare(q, k, v, grid=grid, impl=impl, options=options)
        _check_weight(pool_weight, opts["down_factor"])
        if pool_weight is not None and pool_weight.requires_grad and torch.is_grad_enabled():
            chosen = self.select(q.device, q.dtype, tuple(q.shape), impl=impl, needs_grad=True)
        if chosen == "reference":
            return self.reference(q, k, v, grid=grid, pool_weight=pool_weight, **opts)
        path = next(p for p in self.fast_paths if p.name == chosen)
        return path.fn(q, k, v, grid=grid, pool_weight=pool_weight, **opts)

    def reference(
        self,
        q,
        k,
        v,
        *,
        grid: Grid,
        radius: float = DEFAULT_RADIUS,
        global_tokens: int = 0,
        down_factor: int = 0,
        pool_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        layout = _layout_of(q, grid, radius, global_tokens, down_factor, pool_weight)
        return clear_reference(q, k, v, layout, pool_weight)

    def overhead_steps(self, q, k, v, *, grid: Grid, impl: str, **options: Any):
        """CLEAR's work besides the attention proper, each step from scratch (uncached).

        ``pool_kv`` (when ``down_factor`` > 0): the pooled K/V tokens and the
        concatenation; ``block_mask`` (flex) or ``dense_mask`` (masked_sdpa): the
        mask, which the paths otherwise build once per layout and cache;
        ``tile_permute`` (flex, when it runs in tile order): building the
        permutation and re-ordering q, k, v into tiles and an output back. The
        reference builds its small chunk masks inline; it has no separate step.
        """
        impl, grid, opts = self.prepare(q, k, v, grid=grid, impl=impl, options=options)
        layout = Layout.build(grid, **opts)
        steps: dict[str, Any] = {}
        if layout.pooled:
            steps["pool_kv"] = lambda: extend_kv(k, v, layout)
        if impl == "flex":
            tiled = flex_tile_order(layout)
            steps["block_mask"] = lambda: _build_block_mask(layout, q.device, tiled=tiled)
            if tiled:
                steps["tile_permute"] = lambda: _tile_permute_step(layout, q, k, v)
        elif impl == "masked_sdpa":
            steps["dense_mask"] = lambda: _dense_mask(layout, q.device)
        return steps

    # ----- cost models --------------------------------------------------------------
    def flop_model(
        self, batch, heads, tokens, head_dim, grid, *, radius, global_tokens, down_factor
    ) -> Flops:
        """``4·B·H·pairs·d`` over the allowed pairs only (CLEAR's own convention).

        No implementation here computes exactly that many (flex computes whole
        128×128 tiles, masked_sdpa and the reference dense rows); the pooling is
        element-wise and not counted.
        """
        pairs = allowed_pairs(grid, radius, global_tokens, down_factor)
        return Flops(
            actual=4.0 * batch * heads * pairs * head_dim,
            dense=dense_flops(batch, heads, tokens, head_dim),
        )

    def workspace_model(
        self,
        batch,
        heads,
        tokens,
        head_dim,
        grid,
        *,
        element_size,
        impl,
        radius,
        global_tokens,
        down_factor,
    ) -> float:
        """Bytes beside q, k, v, out: ``impl`` = "flex", "masked_sdpa" or "reference"."""
        layout = Layout.build(grid, radius, global_tokens, down_factor)
        bh, n, m = batch * heads, layout.tokens, layout.keys
        # torch.cat of K and V with their pooled tokens copies both whole.
        extended = 2.0 * bh * m * head_dim * element_size if layout.pooled else 0.0
        if impl == "flex":
            q_tiles, kv_tiles = -(-n // FLEX_BLOCK), -(-m // FLEX_BLOCK)
            # int32 indices + counts, partial and full, kv-major and q-major.
            block = 4.0 * 4 * (q_tiles * kv_tiles + q_tiles + kv_tiles)
            tiles = 0.0
            if flex_tile_order(layout):  # q, k, v, out in tile order + the permutations
                tiles = 2.0 * bh * (n + m) * head_dim * element_size + 2 * 8.0 * m + 4.0 * m
            return extended + block + tiles + 4.0 * bh * n  # + the kernel's fp32 logsumexp
        if impl == "masked_sdpa":
            masks = _mask_bytes(n, m, element_size)
            # float64 (and other kernel-less dtypes) run SDPA's math path: full scores.
            scores = 2.0 * bh * n * m * element_size if element_size >= 8 else 0.0
            return extended + masks + scores
        if impl == "reference":
            acc = max(element_size, 4)
            rows = _row_block(layout, bh)
            q_rows, keys = rows * layout.wg, _band_keys(layout, rows)
            chunk = (
                2.0 * bh * q_rows * keys * acc  # scores and probabilities
                + q_rows * keys * (1 + 3 * 4)  # the bool mask, its int32 index math
                + 2.0 * bh * keys * head_dim * element_size  # gathered K, V
            )
            text = 0.0
            if layout.global_tokens:
                budget = _softmax.REFERENCE_CHUNK_ELEMENTS
                text_rows = max(1, min(layout.global_tokens, budget // max(1, bh * n)))
                text = 2.0 * bh * text_rows * n * acc
            return extended + max(chunk, text)
        raise ValueError(
            f"clear: unknown impl {impl!r} for the memory model; "
            "use 'flex', 'masked_sdpa' or 'reference'"
        )
