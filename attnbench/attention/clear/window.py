"""CLEAR's window: which key each query of one call may attend, in exact integer arithmetic.

A :class:`Window` holds the geometry of one call (G global tokens, the
``Hg × Wg`` grid, pooled keys) and the circle as an integer limit on the
squared grid distance. :func:`allowed` is the one mask every path uses; the
pair counts (:func:`local_pairs`, :func:`allowed_pairs`) are closed forms of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import Grid, check_grid

#: score elements one reference chunk may hold (16 Mi elements = 64 MiB in fp32).
REFERENCE_CHUNK_ELEMENTS = 1 << 24
#: mask elements one step of the mask builders may hold (their integer temporaries
#: are several times that in bytes).
MASK_CHUNK_ELEMENTS = 1 << 20
#: the official training default (``distill.py``/``distill.sh``: ``--window_size 16``);
#: the paper's 8192² headline uses r = 8
DEFAULT_RADIUS = 16.0
#: the official default ``--down_factor 1``: no pooled keys
DEFAULT_DOWN_FACTOR = 1


def pools(down_factor: int) -> bool:
    """Whether ``down_factor`` appends pooled keys: f > 1 (0 and 1 mean none, as officially)."""
    return down_factor > 1


def _finite_positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be a finite number > 0"


@dataclass(frozen=True)
class Window:
    """Where every token of one CLEAR call sits: G global, then the grid, then pooled.

    Queries are ``[0, tokens)``; keys are ``[0, keys)`` = the same tokens plus
    ``pooled`` down-sampled ones (``down_factor`` f > 1: one per f×f patch; 0 and
    1 mean none, as in the official code). ``limit`` is the largest allowed squared grid
    distance (an integer: ``dy² + dx² < r²`` ⇔ ``dy² + dx² ≤ ceil(r²) − 1``), so
    every mask here is exact integer arithmetic, never a float comparison.
    """

    hg: int
    wg: int
    global_tokens: int
    down_factor: int
    limit: int

    @classmethod
    def build(cls, grid: Grid, radius: float = DEFAULT_RADIUS, global_tokens: int = 0,
              down_factor: int = 0):
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
        return (self.hg // f, self.wg // f) if pools(f) else (0, 0)

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


def _window(grid, tokens: int, radius, global_tokens=0, down_factor=0) -> Window:
    grid = check_grid(grid, tokens, extra=int(global_tokens))
    return Window.build(grid, radius, global_tokens, down_factor)


def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor, window_args) -> torch.Tensor:
    """True where query ``q_idx`` may attend key ``kv_idx`` (broadcasting index tensors).

    ``window_args = (G, Wg, N, limit)`` as Python ints or 0-d tensors. This one
    function is the mask of every path: the dense mask, the reference's chunk
    masks and the FlexAttention ``mask_mod`` (where tensors keep it from being
    recompiled for every grid and radius).
    """
    g, wg, n, limit = window_args
    qi, ki = q_idx - g, kv_idx - g
    dy, dx = qi // wg - ki // wg, qi % wg - ki % wg
    local = dy * dy + dx * dx <= limit
    image_query = q_idx >= g
    global_query = (~image_query) & (kv_idx < n)  # text sees text + image, not pooled
    image_sees = (kv_idx < g) | (kv_idx >= n) | local  # text, pooled, the circle
    return global_query | (image_query & image_sees)


def _args(window: Window) -> tuple[int, int, int, int]:
    return window.global_tokens, window.wg, window.tokens, window.limit


def _row_block(window: Window, batch_heads: int) -> int:
    """Grid rows of queries per reference chunk.

    Halved until the chunk's scores (``B·H·rows·Wg·keys``) fit
    ``REFERENCE_CHUNK_ELEMENTS`` and its mask (int32 index arithmetic,
    ``rows·Wg·keys``) fits ``MASK_CHUNK_ELEMENTS``.
    """

    def too_big(rows: int) -> bool:
        pairs = rows * window.wg * _band_keys(window, rows)
        return batch_heads * pairs > REFERENCE_CHUNK_ELEMENTS or pairs > MASK_CHUNK_ELEMENTS

    rows = window.hg
    while rows > 1 and too_big(rows):
        rows = (rows + 1) // 2
    return rows


def _band_keys(window: Window, rows: int) -> int:
    """Keys one chunk of ``rows`` grid rows looks at: global + band + pooled."""
    band = min(window.hg, rows + 2 * window.reach)
    return window.global_tokens + band * window.wg + window.pooled


def _index(start: int, stop: int, device) -> torch.Tensor:
    return torch.arange(start, stop, device=device, dtype=torch.int32)


def _band(window: Window, q0: int, q1: int, device) -> torch.Tensor:
    """Keys image queries ``[q0, q1)`` can see: global, the grid rows within reach, pooled.

    Every other key is masked for them, so the mask (and the scores) of these
    queries need only these columns: O(rows·(G + band + pooled)), not O(rows·M).
    """
    g, wg, hg, reach = window.global_tokens, window.wg, window.hg, window.reach
    y0, y1 = (q0 - g) // wg, (q1 - 1 - g) // wg + 1
    ky0, ky1 = max(0, y0 - reach), min(hg, y1 + reach)
    return torch.cat(
        [
            _index(0, g, device),
            _index(g + ky0 * wg, g + ky1 * wg, device),
            _index(window.tokens, window.keys, device),
        ]
    )


def _image_chunks(window: Window, batch_heads: int, device):
    """``(q0, q1, keys)`` per chunk of whole grid rows of image queries (see ``_row_block``)."""
    g, wg = window.global_tokens, window.wg
    rows = _row_block(window, batch_heads)
    for y0 in range(0, window.hg, rows):
        q0, q1 = g + y0 * wg, g + min(window.hg, y0 + rows) * wg
        yield q0, q1, _band(window, q0, q1, device)


def local_pairs(grid: Grid, radius: float) -> int:
    """Allowed (query, key) image pairs, in closed form over the circle's offsets.

    ``Σ_{dy²+dx²<r²} (Hg−|dy|)(Wg−|dx|)`` (terms ≤ 0 dropped): each offset
    occurs once for every query whose shifted key is still on the grid. The sum
    over dx for a given dy is an arithmetic series, so this is O(r), not O(N).
    """
    window = Window.build(grid, radius)
    hg, wg = window.hg, window.wg
    total = 0
    for dy in range(-window.reach, window.reach + 1):
        rows = hg - abs(dy)
        if rows <= 0:
            continue
        m = min(math.isqrt(window.limit - dy * dy), wg - 1)  # |dx| ≤ m
        total += rows * (wg + 2 * (m * wg - m * (m + 1) // 2))
    return total


def allowed_pairs(grid: Grid, radius: float, global_tokens: int = 0, down_factor: int = 0) -> int:
    """Every allowed pair: the circle + global rows and columns + pooled columns."""
    window = Window.build(grid, radius, global_tokens, down_factor)
    g, img = window.global_tokens, window.image
    return (
        local_pairs(grid, radius)
        + g * window.tokens  # global queries: every text and image key
        + img * g  # image queries: every global key
        + img * window.pooled  # image queries: every pooled key
    )

