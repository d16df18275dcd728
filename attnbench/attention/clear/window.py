"""CLEAR's window: which key each query of one call may attend, in exact integer arithmetic.

A :class:`Window` holds the geometry of one call (G text tokens first, the
``Hg × Wg`` grid or ``T × Hg × Wg`` video grid, pooled keys), the circle as an
integer limit on the squared distance within a frame and the temporal reach as
an integer limit on the frame distance. :meth:`Window.of` is the one builder of a
window (the backend, the paths and the mask helpers all call it); :func:`allowed` is
the one mask every path uses; the pair counts (:func:`local_pairs`,
:func:`allowed_pairs`) are closed forms of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs import Grid
from ..layout import Layout

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
    """Where every token of one CLEAR call sits: G text, then the grid, then pooled.

    The grid is ``frames × hg × wg`` tokens, frame-major (``frames`` = 1 for an
    image). Queries are ``[0, tokens)``; keys are ``[0, keys)`` = the same tokens
    plus ``pooled`` down-sampled ones (``down_factor`` f > 1, images only: one per
    f×f patch; 0 and 1 mean none, as in the official code). ``limit`` is the
    largest allowed squared distance within a frame (an integer: ``dy² + dx² < r²``
    ⇔ ``dy² + dx² ≤ ceil(r²) − 1``) and ``limit_t`` the largest allowed frame
    distance ``|dt|``, so every mask here is exact integer arithmetic.
    ``global_tokens`` is G, the text tokens before the grid (a layout's ``text``).
    """

    hg: int
    wg: int
    global_tokens: int
    down_factor: int
    limit: int
    frames: int = 1
    limit_t: int = 0

    @classmethod
    def of(cls, geometry, radius: float = DEFAULT_RADIUS, text: int = 0, down_factor: int = 0,
           radius_t: int | None = None) -> Window:
        """The window of a text-first :class:`Layout`, or of a grid ``(H, W)`` / ``(T, H,
        W)`` with ``text`` tokens before it: the one builder of a window.

        Validates the pieces (for callers that bypass ``resolve``) and derives the integer
        limits; ``radius_t`` is the largest frame distance (``None``: every frame).
        """
        if isinstance(geometry, Layout):
            if text and geometry.text:
                raise ValueError(_BOTH_TEXT.format(g=text, text=geometry.text))
            if geometry.text and not geometry.text_first:
                raise ValueError("clear: a window's text tokens come first (attend moves them)")
            geometry, text = geometry.grid, geometry.text or text
        sides = tuple(int(s) for s in geometry)
        if len(sides) not in (2, 3) or any(s <= 0 for s in sides):
            raise ValueError(f"grid must be (H, W) or (T, H, W) with positive sides, "
                             f"got {geometry!r}")
        frames, hg, wg = (1, *sides) if len(sides) == 2 else sides
        reason = _finite_positive(radius)
        if reason:
            raise ValueError(f"clear: radius={radius!r} {reason}")
        if text < 0 or down_factor < 0:
            raise ValueError(f"clear: text={text!r} and down_factor={down_factor!r} must be >= 0")
        if radius_t is not None and radius_t < 0:
            raise ValueError(f"clear: radius_t={radius_t!r} must be >= 0 (or None: every frame)")
        if frames > 1 and pools(down_factor):
            raise ValueError(_POOLED_VIDEO.format(f=down_factor))
        # Clamp to the grid's diameter: beyond it every radius means "the whole grid",
        # and the integer stays small enough for int32 index arithmetic in kernels.
        diameter2 = (hg - 1) ** 2 + (wg - 1) ** 2
        r2 = float(radius) ** 2
        limit = diameter2 if r2 > diameter2 else math.ceil(r2) - 1
        limit_t = frames - 1 if radius_t is None else min(int(radius_t), frames - 1)
        return cls(hg, wg, int(text), int(down_factor), limit, frames, limit_t)

    @property
    def frame(self) -> int:
        """Tokens of one frame: ``hg·wg``."""
        return self.hg * self.wg

    @property
    def image(self) -> int:
        return self.frames * self.frame

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

    @property
    def covers_grid(self) -> bool:
        """Whether every image token sees every other: exact softmax attention."""
        return (self.limit >= (self.hg - 1) ** 2 + (self.wg - 1) ** 2
                and self.limit_t >= self.frames - 1)


_POOLED_VIDEO = ("clear: down_factor={f} (pooled keys) is defined on image grids; a video "
                 "layout takes down_factor 0 or 1")
_BOTH_TEXT = ("clear: text={g} and a layout with {text} text tokens both give the text "
              "count: pass the layout only")


def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor, window_args) -> torch.Tensor:
    """True where query ``q_idx`` may attend key ``kv_idx`` (broadcasting index tensors).

    ``window_args = (G, Wg, Hg·Wg, N, limit, limit_t)`` as Python ints or 0-d tensors.
    This one function is the mask of every path: the dense mask, the reference's
    chunk masks and the FlexAttention ``mask_mod`` (where tensors keep it from being
    recompiled for every grid and radius). Image tokens are ``(t, y, x)`` frame-major;
    a pair is local when ``dy² + dx² ≤ limit`` and ``|dt| ≤ limit_t``.
    """
    g, wg, frame, n, limit, limit_t = window_args
    qi, ki = q_idx - g, kv_idx - g
    qr, kr = qi % frame, ki % frame
    dy, dx, dt = qr // wg - kr // wg, qr % wg - kr % wg, qi // frame - ki // frame
    local = (dy * dy + dx * dx <= limit) & (dt * dt <= limit_t * limit_t)
    image_query = q_idx >= g
    global_query = (~image_query) & (kv_idx < n)  # text sees text + image, not pooled
    image_sees = (kv_idx < g) | (kv_idx >= n) | local  # text, pooled, the window
    return global_query | (image_query & image_sees)


def _args(window: Window) -> tuple[int, int, int, int, int, int]:
    return (window.global_tokens, window.wg, window.frame, window.tokens, window.limit,
            window.limit_t)


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


def _frame_reach(window: Window) -> int:
    """Frames one query sees: ``2·limit_t + 1``, at most all of them."""
    return min(window.frames, 2 * window.limit_t + 1)


def _band_keys(window: Window, rows: int) -> int:
    """Keys one chunk of ``rows`` grid rows of one frame looks at: text + band + pooled."""
    band = min(window.hg, rows + 2 * window.reach)
    return window.global_tokens + _frame_reach(window) * band * window.wg + window.pooled


def _index(start: int, stop: int, device) -> torch.Tensor:
    return torch.arange(start, stop, device=device, dtype=torch.int32)


def _band(window: Window, q0: int, q1: int, device) -> torch.Tensor:
    """Keys image queries ``[q0, q1)`` can see: text, the grid rows within reach in the
    frames within reach, pooled.

    Every other key is masked for them, so the mask (and the scores) of these
    queries need only these columns: O(rows·(G + band + pooled)), not O(rows·M).
    Queries spanning several frames get whole frames (a superset).
    """
    g, wg, hg, reach, frame = window.global_tokens, window.wg, window.hg, window.reach, \
        window.frame
    t0, t1 = (q0 - g) // frame, (q1 - 1 - g) // frame
    if t0 == t1:
        y0, y1 = (q0 - g - t0 * frame) // wg, (q1 - 1 - g - t0 * frame) // wg + 1
        ky0, ky1 = max(0, y0 - reach), min(hg, y1 + reach)
    else:
        ky0, ky1 = 0, hg
    frames = range(max(0, t0 - window.limit_t), min(window.frames, t1 + window.limit_t + 1))
    return torch.cat(
        [
            _index(0, g, device),
            *(_index(g + t * frame + ky0 * wg, g + t * frame + ky1 * wg, device)
              for t in frames),
            _index(window.tokens, window.keys, device),
        ]
    )


def _image_chunks(window: Window, batch_heads: int, device):
    """``(q0, q1, keys)`` per chunk of whole grid rows of one frame (see ``_row_block``)."""
    g, wg, frame = window.global_tokens, window.wg, window.frame
    rows = _row_block(window, batch_heads)
    for t in range(window.frames):
        for y0 in range(0, window.hg, rows):
            q0 = g + t * frame + y0 * wg
            q1 = g + t * frame + min(window.hg, y0 + rows) * wg
            yield q0, q1, _band(window, q0, q1, device)


def local_pairs(grid, radius: float, radius_t: int | None = None) -> int:
    """Allowed (query, key) image pairs, in closed form over the window's offsets.

    Per frame pair ``Σ_{dy²+dx²<r²} (Hg−|dy|)(Wg−|dx|)`` (terms ≤ 0 dropped): each
    offset occurs once for every query whose shifted key is still on the grid. The
    sum over dx for a given dy is an arithmetic series, so this is O(r), not O(N).
    A video multiplies it by the frame pairs within reach, ``Σ_{|dt|≤limit_t} (T−|dt|)``.
    """
    window = Window.of(grid, radius, radius_t=radius_t)
    hg, wg = window.hg, window.wg
    total = 0
    for dy in range(-window.reach, window.reach + 1):
        rows = hg - abs(dy)
        if rows <= 0:
            continue
        m = min(math.isqrt(window.limit - dy * dy), wg - 1)  # |dx| ≤ m
        total += rows * (wg + 2 * (m * wg - m * (m + 1) // 2))
    t, lt = window.frames, window.limit_t
    return total * (t + lt * (2 * t - lt - 1))


def allowed_pairs(grid, radius: float, text: int = 0, down_factor: int = 0,
                  radius_t: int | None = None) -> int:
    """Every allowed pair: the window + text rows and columns + pooled columns (``grid`` a
    grid with ``text`` tokens before it, or a text-first :class:`Layout`)."""
    window = Window.of(grid, radius, text, down_factor, radius_t)
    g, img = window.global_tokens, window.image
    return (
        local_pairs((window.frames, window.hg, window.wg), radius, radius_t)
        + g * window.tokens  # text queries: every text and image key
        + img * g  # image queries: every text key
        + img * window.pooled  # image queries: every pooled key
    )
