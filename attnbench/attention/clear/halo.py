"""CLEAR's CPU path: halo-tiled SDPA, the FLOPs of a box around each tile, O(N·d) memory.

The image queries of each frame are cut into ``t × t`` tiles; a tile's keys are the
text tokens, its *halo* -- the ``(t + 2·reach)²`` box of grid keys around it, in every
frame within the temporal reach -- and the pooled tokens. Every tile has the same key
count, so one batched SDPA attends a chunk of tiles (batch and heads folded into
SDPA's batch, tiles into its heads) with the circle as a per-tile additive mask. The
circle is the same for every tile (the box is centred on the tile, so each query sees
the same offsets), ANDed with whether each box key lies on the grid: keys past an
edge point at token 0 and are masked. An axis one tile spans (a small grid, a tile
as large as it) takes its whole extent instead of a box, and a temporal reach covering
every frame takes every frame, so the mask stays shared there too. The text queries
attend to every text and image key (one SDPA), as the official code does.

The work is ``N · keys_per_tile`` pairs instead of N² (the circle is ~πr² of the
``(t + 2r)²`` box); the tile side comes from :func:`choose_tile`, a cost model of the
pairs computed and the keys copied. Chunks of tiles bound the gathered copies to a
budget (:data:`WORKSPACE_FRACTION` of q's bytes, :meth:`Tiling.chunking`): every head
and as many tiles as fit, else one tile and as many heads as fit; without autograd
the chunks reuse one set of buffers and the mask is one sum of two cached additive
biases in SDPA's dtype, so the memory is the output plus that budget beside the
cached indices. Autograd runs through it (index_select, SDPA, index_copy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..paths import FastPath
from .pooling import _window_of, extend_kv, extended_bytes
from .window import Window

#: tile sides the cost model considers (a side past the grid's is the whole axis)
TILE_SIDES = (4, 8, 12, 16, 24, 32, 48, 64)
#: the cost of copying one key and value (2·d floats), in pairs of the attention
#: (4·d FLOPs each): copies run at memory speed, pairs at matmul speed
GATHER_COST = 32.0
#: the cost of one chunk's fixed work (several small torch calls), in pairs
STEP_COST = 5.0e4
#: a chunk's working set (gathered q, k, v, its SDPA output and its mask) as a fraction
#: of q's bytes: the path's peak is then the output plus this, within 2× softmax SDPA's
WORKSPACE_FRACTION = 0.75
#: ... but at least this many bytes (a small input runs in a few steps, not one per tile)
WORKSPACE_MIN_BYTES = 3 << 20


@dataclass(frozen=True)
class Chunking:
    """How many batch·heads and tiles one SDPA call takes, within the workspace budget."""

    heads: int
    tiles: int
    steps: int


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

    def unit_bytes(self, head_dim: int, element_size: int) -> tuple[float, float]:
        """``(per batch·head and tile, per tile)`` bytes of a chunk: the gathered q, k, v
        and the SDPA output of one tile of one head, and the tile's additive mask (shared
        by the heads)."""
        per_head = (2 * self.queries + 2 * self.keys) * head_dim * element_size
        return per_head, self.queries * self.keys * element_size

    def budget(self, batch_heads: int, head_dim: int, element_size: int) -> float:
        """A chunk's bytes: :data:`WORKSPACE_FRACTION` of q's, at least
        :data:`WORKSPACE_MIN_BYTES`."""
        return max(WORKSPACE_FRACTION * batch_heads * self.window.tokens * head_dim
                   * element_size, WORKSPACE_MIN_BYTES)

    def fits(self, batch_heads: int, head_dim: int, element_size: int) -> bool:
        """Whether one tile of one head fits the budget."""
        return sum(self.unit_bytes(head_dim, element_size)) <= self.budget(
            batch_heads, head_dim, element_size)

    def chunking(self, batch_heads: int, head_dim: int, element_size: int) -> Chunking:
        """The chunk that fits :meth:`budget`: every head and as many tiles as fit, else
        one tile and as many heads as fit (at least one of each)."""
        batch_heads = max(1, batch_heads)  # a batch of 0: chunks as for 1 (no work)
        budget = self.budget(batch_heads, head_dim, element_size)
        per_head, per_tile = self.unit_bytes(head_dim, element_size)
        if batch_heads * per_head + per_tile <= budget:
            heads = batch_heads
            tiles = min(self.tiles, int(budget // (batch_heads * per_head + per_tile)))
        else:
            heads = max(1, min(batch_heads, int((budget - per_tile) // per_head)))
            tiles = 1
        steps = -(-self.tiles // tiles) * -(-batch_heads // heads)
        return Chunking(heads, tiles, steps)

    def cost(self, batch_heads: int, head_dim: int, element_size: int) -> float:
        """Pairs computed + copies (per batch·head) and SDPA calls in pair units
        (:data:`GATHER_COST`, :data:`STEP_COST`)."""
        pairs = self.tiles * self.queries * self.keys
        steps = self.chunking(batch_heads, head_dim, element_size).steps
        return pairs + GATHER_COST * self.tiles * self.keys + STEP_COST * steps


def choose_tile(window: Window, batch_heads: int = 1, head_dim: int = 64,
                element_size: int = 4) -> Tiling:
    """The tiling of least :meth:`Tiling.cost` over :data:`TILE_SIDES` (square tiles, cut
    to the grid) among those whose tile fits the workspace budget (the smallest tile
    when none does): small tiles compute fewer pairs, large ones copy fewer keys, and a
    tile whose chunks are fewer pays less fixed work."""
    shape = (batch_heads, head_dim, element_size)
    options = {Tiling(window, min(t, window.hg), min(t, window.wg)) for t in TILE_SIDES}
    fitting = [tiling for tiling in options if tiling.fits(*shape)]
    if not fitting:
        return min(options, key=lambda tiling: (tiling.th * tiling.tw, tiling.th))
    return min(fitting, key=lambda tiling: (tiling.cost(*shape), -tiling.th))


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


@functools.lru_cache(maxsize=8)
def halo_bias(tiling: Tiling, device: torch.device, dtype: torch.dtype):
    """:func:`halo_index`'s masks as additive biases in ``dtype`` (0 kept, -inf not):
    ``(near [t², keys], on_grid [tiles, 1, keys])``; a chunk's mask is one sum of the
    two, made in SDPA's dtype, so SDPA converts nothing."""
    _, _, near, on_grid, _ = halo_index(tiling, device)
    bias = lambda keep: torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(  # noqa: E731
        ~keep, float("-inf"))
    return bias(near), bias(on_grid)


def _take(rows: torch.Tensor, index: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """``rows[index]``, into ``buffer`` (reused by every chunk) when there is one."""
    if buffer is None:
        return rows.index_select(0, index)
    return torch.index_select(rows, 0, index, out=buffer[: index.numel()])


def _halo(q, k, v, *, grid=None, layout=None, radius, radius_t=None, global_tokens=0,
          down_factor, pool_weight=None):
    window = _window_of(q, layout, grid, radius, radius_t, global_tokens, down_factor,
                        pool_weight)
    g, n = window.global_tokens, window.tokens
    b, h, _, d = q.shape
    e, bh = v.shape[-1], b * h
    k_ext, v_ext = extend_kv(k, v, window, pool_weight)
    tiling = choose_tile(window, bh, d, q.element_size())
    query_index, key_index, _, _, padded = halo_index(tiling, q.device)
    near, on_grid = halo_bias(tiling, q.device, q.dtype)
    out = q.new_empty(b, h, n + 1, e)  # row n: where padding queries go
    if g:
        out[:, :, :g] = F.scaled_dot_product_attention(q[:, :, :g], k[:, :, :n], v[:, :, :n])
    # every head's tokens as rows of one matrix: a gather along dim 0 copies whole rows
    # (several times faster than along the token dim of [B, H, N, d])
    q_rows, k_rows, v_rows = (x.reshape(-1, x.shape[-1]) for x in (q, k_ext, v_ext))
    out_rows = out.view(-1, e)
    qn, kn = tiling.queries, tiling.keys
    chunk = tiling.chunking(bh, d, q.element_size())
    # without autograd the chunks reuse one set of buffers (SDPA's backward would keep
    # the mask and the gathered rows of every chunk, so training allocates them anew)
    reuse = not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k_ext, v_ext)))
    buffers = (None,) * 4
    if reuse:
        rows_of = lambda keys, dim: q.new_empty(chunk.heads * chunk.tiles * keys, dim)  # noqa: E731
        buffers = (rows_of(qn, d), rows_of(kn, d), rows_of(kn, e),
                   q.new_empty(chunk.tiles, qn, kn))
    q_buf, k_buf, v_buf, mask_buf = buffers
    for start in range(0, tiling.tiles, chunk.tiles):
        tiles = slice(start, min(tiling.tiles, start + chunk.tiles))
        c = tiles.stop - start
        rows = query_index[start * qn: tiles.stop * qn]
        with record_function("halo.mask"):
            mask = near + on_grid[tiles] if mask_buf is None else \
                torch.add(near, on_grid[tiles], out=mask_buf[:c])
            if padded is not None:  # padding query rows see every key (output dropped)
                mask.masked_fill_(padded[tiles], 0.0)
        for first in range(0, bh, chunk.heads):
            heads = torch.arange(first, min(bh, first + chunk.heads), device=q.device)[:, None]
            hc = heads.shape[0]
            with record_function("halo.gather"):
                cols = (key_index[tiles].reshape(1, -1) + heads * window.keys).reshape(-1)
                queries = _take(q_rows, (rows.clamp(max=n - 1) + heads * n).reshape(-1), q_buf)
                keys, values = _take(k_rows, cols, k_buf), _take(v_rows, cols, v_buf)
            with record_function("halo.sdpa"):  # a 4-D mask: SDPA's CPU flash kernel takes
                o = F.scaled_dot_product_attention(  # it (a 3-D one: the math path)
                    queries.view(hc, c, qn, d), keys.view(hc, c, kn, d),
                    values.view(hc, c, kn, e), attn_mask=mask.unsqueeze(0))
            with record_function("halo.scatter"):
                out_rows.index_copy_(0, (rows + heads * (n + 1)).reshape(-1), o.reshape(-1, e))
    return out[:, :, :n]


def _workspace(batch, heads, tokens, head_dim, layout, *, element_size, radius, radius_t=None,
               global_tokens=0, down_factor) -> float:
    """The cached indices and biases (query and key indices, the per-tile on-grid bias,
    the shared circle's), the extended K/V (pooled tokens), the output buffer's extra row,
    the text queries' SDPA output, and the chunk's buffers (:meth:`Tiling.chunking`: the
    gathered q, k, v, the mask) with its SDPA output and key indices."""
    window = Window.of(layout, radius, global_tokens, down_factor, radius_t)
    bh, d = batch * heads, head_dim
    tiling = choose_tile(window, bh, d, element_size)
    chunk = tiling.chunking(bh, d, element_size)
    qn, kn = tiling.queries, tiling.keys
    cached = 8.0 * tiling.tiles * (qn + kn) + tiling.tiles * (kn + qn) + qn * kn \
        + (qn + tiling.tiles) * kn * element_size
    per_head, per_tile = tiling.unit_bytes(d, element_size)
    work = chunk.heads * chunk.tiles * (per_head + 8.0 * 2 * kn) + chunk.tiles * per_tile
    text = 2.0 * bh * window.global_tokens * d * element_size
    return extended_bytes(window, bh, d, element_size) + cached + work + text \
        + bh * d * element_size


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
