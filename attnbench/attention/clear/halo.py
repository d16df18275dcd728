"""CLEAR's CPU path: halo-tiled SDPA, the FLOPs of a box around each tile, O(N·d) memory.

The image queries of each frame are cut into ``t × t`` tiles; a tile's keys are the
text tokens, its *halo* -- the ``(t + 2·reach)²`` box of grid keys around it, in every
frame within the temporal reach -- and the pooled tokens. Every tile has the same key
count, so one batched SDPA attends a chunk of tiles (batch and heads folded into
SDPA's batch, tiles into its heads) with the circle as a per-tile boolean mask. The
mask is the same for every tile (the box is centred on the tile, so each query sees
the same offsets), ANDed with whether each box key lies on the grid: keys past an
edge point at token 0 and are masked. An axis one tile spans (a small grid, a tile
as large as it) takes its whole extent instead of a box, and a temporal reach covering
every frame takes every frame, so the mask stays shared there too. The text queries
attend to every text and image key (one SDPA), as the official code does.

The work is ``N · keys_per_tile`` pairs instead of N² (the circle is ~πr² of the
``(t + 2r)²`` box); the tile side comes from :func:`choose_tile`, a cost model of the
pairs computed and the keys copied. Chunks of tiles bound the gathered copies to a
fraction of q (:data:`CHUNK_FRACTION`), so the memory is O(N·d) beside the cached
gather indices. Autograd runs through it (index_select, SDPA, index_copy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import FastPath
from .pooling import _window_of, extend_kv, extended_bytes
from .window import Window

#: tile sides the cost model considers (a side past the grid's is the whole axis)
TILE_SIDES = (4, 8, 12, 16, 24, 32, 48, 64)
#: the cost of copying one key and value (2·d floats), in pairs of the attention
#: (4·d FLOPs each): copies run at memory speed, pairs at matmul speed
GATHER_COST = 32.0
#: the cost of one tile chunk's fixed work (several small torch calls), in pairs
STEP_COST = 2.0e5
#: gathered keys one chunk of tiles may hold, as a fraction of the tokens ...
CHUNK_FRACTION = 4
#: ... but at least this many (fewer, smaller steps only add per-step overhead)
CHUNK_KEYS = 4096


@dataclass(frozen=True)
class Tiling:
    """How the halo path cuts one window: tile sides, the key window of a tile per axis."""

    window: Window
    th: int  # tile rows
    tw: int  # tile columns

    def _axis(self, side: int, tile: int) -> tuple[int, int]:
        """``(tiles, keys)`` along one axis: a box of ``tile + 2·reach`` centred on each
        tile, or the whole axis when one tile spans it."""
        tiles = -(-side // tile)
        return tiles, (side if tiles == 1 else tile + 2 * self.window.reach)

    @property
    def rows(self) -> tuple[int, int]:
        return self._axis(self.window.hg, self.th)

    @property
    def cols(self) -> tuple[int, int]:
        return self._axis(self.window.wg, self.tw)

    @property
    def frames(self) -> int:
        """Key frames per tile: every frame when the reach covers them all, else the
        ``2·limit_t + 1`` centred on the tile's (those past either end are masked)."""
        return self.window.frames if self.every_frame else 2 * self.window.limit_t + 1

    @property
    def every_frame(self) -> bool:
        """Whether the temporal reach covers every frame (then no frame limit applies)."""
        return self.window.limit_t >= self.window.frames - 1

    @property
    def tiles(self) -> int:
        return self.window.frames * self.rows[0] * self.cols[0]

    @property
    def queries(self) -> int:
        return self.th * self.tw

    @property
    def box(self) -> int:
        return self.frames * self.rows[1] * self.cols[1]

    @property
    def keys(self) -> int:
        """Keys of one tile: text, the halo in every frame within reach, pooled."""
        return self.window.global_tokens + self.box + self.window.pooled

    def chunk(self) -> int:
        """Tiles per SDPA call (bounds the gathered copies)."""
        budget = max(self.window.tokens // CHUNK_FRACTION, CHUNK_KEYS)
        return max(1, min(self.tiles, budget // self.keys))

    def cost(self) -> float:
        """Pairs computed + copies and steps in pair units (:data:`GATHER_COST`, ...)."""
        pairs = self.tiles * self.queries * self.keys
        steps = -(-self.tiles // self.chunk())
        return pairs + GATHER_COST * self.tiles * self.keys + STEP_COST * steps


def choose_tile(window: Window) -> Tiling:
    """The tiling of least :meth:`Tiling.cost` over :data:`TILE_SIDES` (square tiles, cut
    to the grid): small tiles compute fewer pairs, large ones copy fewer keys."""
    options = {Tiling(window, min(t, window.hg), min(t, window.wg)) for t in TILE_SIDES}
    return min(options, key=lambda tiling: (tiling.cost(), -tiling.th))


def _axis_index(side: int, tile: int, tiles: int, keys: int, reach: int, device):
    """Along one axis: query coordinates ``[tiles, tile]`` (may pass the grid's end: padding)
    and key coordinates ``[tiles, keys]`` (may fall off the grid), a box centred on each
    tile or the whole axis."""
    start = torch.arange(tiles, device=device)[:, None] * tile
    queries = start + torch.arange(tile, device=device)
    if keys == side and tiles == 1:
        return queries, torch.arange(side, device=device)[None]
    return queries, start - reach + torch.arange(keys, device=device)


@functools.lru_cache(maxsize=8)
def halo_index(tiling: Tiling, device: torch.device):
    """Cached gather indices and masks of a tiling.

    ``(query [tiles·t²], key [tiles, keys], near [t², keys], on_grid [tiles, 1, keys],
    padded [tiles, t², 1] or None)``: ``query`` points padding queries at row N (a dummy
    row of the output buffer); ``key`` points off-grid keys at token 0. A tile's mask
    is ``near & on_grid`` -- ``near`` (the circle and the frame reach, from offsets that
    are the same for every tile) shared by all tiles -- with padding query rows set
    all True (their outputs are dropped; no row is empty, so no NaN reaches a gradient).
    Text and pooled keys are True in both.
    """
    w = tiling.window
    g, n = w.global_tokens, w.tokens
    (tr, kr), (tc, kc) = tiling.rows, tiling.cols
    qy, ky = _axis_index(w.hg, tiling.th, tr, kr, w.reach, device)
    qx, kx = _axis_index(w.wg, tiling.tw, tc, kc, w.reach, device)
    frames = torch.arange(w.frames, device=device)
    every_frame = tiling.every_frame
    kt = frames[None].expand(w.frames, -1) if every_frame else \
        frames[:, None] - w.limit_t + torch.arange(tiling.frames, device=device)
    # tiles run frame by frame, row by row: [T, tr, tc]
    q_y, q_x = qy[None, :, None, :, None], qx[None, None, :, None, :]  # [1, tr, tc, th, tw]
    q_ok = (q_y < w.hg) & (q_x < w.wg)
    query = torch.where(q_ok, g + frames.view(-1, 1, 1, 1, 1) * w.frame + q_y * w.wg + q_x, n)
    k_t = kt.view(w.frames, 1, 1, -1, 1, 1)
    k_y, k_x = ky.view(1, tr, 1, 1, -1, 1), kx.view(1, 1, tc, 1, 1, -1)
    k_ok = (k_t >= 0) & (k_t < w.frames) & (k_y >= 0) & (k_y < w.hg) & (k_x >= 0) & \
        (k_x < w.wg)
    key = torch.where(k_ok, g + k_t * w.frame + k_y * w.wg + k_x, 0)
    # offsets of the first tile: every tile has the same (a box is centred on its tile;
    # an axis spanned whole has one tile), frames relative or all (then no limit)
    dy = ky[0][None, :] - qy[0][:, None]  # [th, kr]
    dx = kx[0][None, :] - qx[0][:, None]  # [tw, kc]
    near = (dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2) <= w.limit  # [th,tw,kr,kc]
    near = near.reshape(tiling.queries, 1, kr * kc).expand(-1, tiling.frames, -1)
    if not every_frame:  # frames relative to the tile's: |dt| ≤ limit_t
        dt = torch.arange(tiling.frames, device=device) - w.limit_t
        near = near & (dt.abs() <= w.limit_t).view(1, -1, 1)
    tiles = tiling.tiles
    key = key.expand(w.frames, tr, tc, -1, -1, -1).reshape(tiles, tiling.box)
    on_grid = k_ok.expand(w.frames, tr, tc, -1, -1, -1).reshape(tiles, tiling.box)
    near = near.reshape(tiling.queries, tiling.box)
    text = torch.arange(g, device=device).expand(tiles, g)
    pooled = torch.arange(n, w.keys, device=device).expand(tiles, w.pooled)
    key = torch.cat((text, key, pooled), dim=1).contiguous()
    always = functools.partial(torch.ones, dtype=torch.bool, device=device)
    on_grid = torch.cat((always(tiles, g), on_grid, always(tiles, w.pooled)), dim=1)
    near = torch.cat((always(tiling.queries, g), near, always(tiling.queries, w.pooled)), dim=1)
    q_ok = q_ok.expand(w.frames, tr, tc, -1, -1).reshape(tiles, tiling.queries)
    padded = None if bool(q_ok.all()) else ~q_ok.unsqueeze(-1)
    query = query.expand(w.frames, tr, tc, -1, -1).reshape(-1)
    return query, key, near.contiguous(), on_grid.unsqueeze(1).contiguous(), padded


def _halo(q, k, v, *, grid=None, layout=None, radius, radius_t=None, global_tokens=0,
          down_factor, pool_weight=None):
    window = _window_of(q, layout, grid, radius, radius_t, global_tokens, down_factor,
                        pool_weight)
    g, n = window.global_tokens, window.tokens
    b, h, _, d = q.shape
    k_ext, v_ext = extend_kv(k, v, window, pool_weight)
    tiling = choose_tile(window)
    query_index, key_index, near, on_grid, padded = halo_index(tiling, q.device)
    out = q.new_empty(b, h, n + 1, v.shape[-1])  # row n: where padding queries go
    if g:
        out[:, :, :g] = F.scaled_dot_product_attention(q[:, :, :g], k[:, :, :n], v[:, :, :n])
    # every head's tokens as rows of one matrix: a gather along dim 0 copies whole rows
    # (several times faster than along the token dim of [B, H, N, d])
    q_rows, k_rows, v_rows = (x.reshape(-1, x.shape[-1]) for x in (q, k_ext, v_ext))
    out_rows = out.view(-1, out.shape[-1])
    heads = torch.arange(b * h, device=q.device)[:, None]
    qn, kn, step = tiling.queries, tiling.keys, tiling.chunk()
    for start in range(0, tiling.tiles, step):
        tiles = slice(start, min(tiling.tiles, start + step))
        rows = query_index[start * qn: tiles.stop * qn]
        cols = (key_index[tiles].reshape(1, -1) + heads * window.keys).reshape(-1)
        c = tiles.stop - start
        mask = near & on_grid[tiles]
        if padded is not None:
            mask = mask | padded[tiles]
        queries = q_rows.index_select(0, (rows.clamp(max=n - 1) + heads * n).reshape(-1))
        keys, values = k_rows.index_select(0, cols), v_rows.index_select(0, cols)
        # a 4-D mask: SDPA's CPU flash kernel takes it (a 3-D one sends it to the math path)
        o = F.scaled_dot_product_attention(
            queries.view(b * h, c, qn, d), keys.view(b * h, c, kn, d),
            values.view(b * h, c, kn, -1), attn_mask=mask.unsqueeze(0))
        out_rows.index_copy_(0, (rows + heads * (n + 1)).reshape(-1), o.reshape(b * h * c * qn, -1))
    return out[:, :, :n]


def _workspace(batch, heads, tokens, head_dim, layout, *, element_size, radius, radius_t=None,
               global_tokens=0, down_factor) -> float:
    """The cached indices and masks (query and key indices, the per-tile on-grid flags,
    the shared circle), the extended K/V (pooled tokens), the output buffer's extra row,
    and per chunk the gathered q, k, v, the chunk's output, its key indices and its mask
    (bool, and the additive copy SDPA makes of it)."""
    window = Window.of(layout, radius, global_tokens, down_factor, radius_t)
    tiling = choose_tile(window)
    bh, c = batch * heads, tiling.chunk()
    qn, kn = tiling.queries, tiling.keys
    cached = 8.0 * tiling.tiles * (qn + kn) + tiling.tiles * (kn + qn) + qn * kn
    chunk = bh * c * (2 * qn + 2 * kn) * head_dim * element_size + 8.0 * bh * c * (kn + qn) \
        + c * qn * kn * (1 + element_size)
    text = 2.0 * bh * window.global_tokens * head_dim * element_size
    return extended_bytes(window, bh, head_dim, element_size) + cached + chunk + text \
        + bh * head_dim * element_size


HALO = FastPath(
    "halo",
    _halo,
    dtypes={"cpu": (torch.float64, torch.float32, torch.bfloat16)},
    workspace=_workspace,
    auto_devices=("cpu",),
    doc="tiles of queries, each with its (t+2r)² key halo (tile chosen by a cost model), "
    "one batched SDPA per chunk of tiles with the circle as a shared mask; text and "
    "pooled keys joined to every tile; every layout; differentiable (the CPU path)",
)
