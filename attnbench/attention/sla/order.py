"""SLA's token order: blocks over tokens that are compact patches of the grid.

SLA cuts the token sequence into 1-D runs of ``block`` tokens. The official
code (thu-ml/SLA ``sparse_linear_attention/core.py``, ``utils.py``) blocks the
tokens in the order it is given -- row-major, so a 64-token block of a 64-wide
image is one grid row and of Wan's 52-wide frames a row and a piece of the
next; that is the default here. attnbench's extension, ``order="attnbench-tiles"``
(``"tiles"`` before it was an option; until then the default), permutes the image tokens
first so that a block is a compact patch: ``s × s`` tiles for an
image (``s`` the largest power of 2 with ``s² ≤ block``: 8×8 for 64), ``c × c
× c`` cubes for a video of at least ``c`` frames (``c³ ≤ block``: 4×4×4 for
64; fewer frames: the image tiles, frame by frame). Tiles run row by row
(cubes frame-block by frame-block), each tile's tokens row-major; tiles cut by
the grid's edge are partial, so a block may span two of them. The text tokens
follow the image tokens: they form their own blocks whenever the image count is
a multiple of the block (FLUX's and SD3's 64×64 grids), else one block at the
seam holds the last image and the first text tokens. ``order="row-major"`` keeps
the order ``attend`` hands over: the layout's, with any text first
(``AttentionBackend.dispatch`` moves text that follows the grid to the front, so on
SD3's [image; text] the blocks start at the text, where the official code would
block the sequence as given).
"""

from __future__ import annotations

import functools

import torch

from ..layout import Layout

#: the official order first (the default), then attnbench's tiles, named so in every label
ROW_MAJOR, TILES = "row-major", "attnbench-tiles"
ORDERS = (ROW_MAJOR, TILES)
#: the tiles' name before they became an option (rows measured then say "tiles")
ALIASES = {"tiles": TILES}


def tile_side(block: int, dims: int) -> int:
    """The largest power of 2 whose ``dims``-th power fits in ``block`` (at least 1)."""
    side = 1
    while (2 * side) ** dims <= block:
        side *= 2
    return side


def patch_shape(layout: Layout, block: int) -> tuple[int, int, int]:
    """``(frames, rows, cols)`` of one tile (image) or cube (video) of the order."""
    cube = tile_side(block, 3)
    if layout.is_video and layout.frames >= cube > 1:
        return cube, cube, cube
    side = tile_side(block, 2)
    return 1, side, side


def image_order(layout: Layout, block: int, device=None) -> torch.Tensor:
    """Long ``[T·H·W]``: the row-major image index at each position of the tile order."""
    pt, ph, pw = patch_shape(layout, block)
    t, (h, w) = layout.frames, layout.frame_grid
    ft, fy, fx = torch.meshgrid(torch.arange(t, device=device), torch.arange(h, device=device),
                                torch.arange(w, device=device), indexing="ij")
    rows, cols = -(-h // ph), -(-w // pw)
    patch = ((ft // pt) * rows + fy // ph) * cols + fx // pw
    within = ((ft % pt) * ph + fy % ph) * pw + fx % pw
    return torch.argsort((patch * (pt * ph * pw) + within).flatten())


@functools.lru_cache(maxsize=32)
def _cached_order(layout: Layout, block: int, device: torch.device):
    text = layout.text if layout.text_first else 0
    perm = torch.cat([image_order(layout, block, device) + text,
                      torch.arange(text, device=device)])
    if torch.equal(perm, torch.arange(len(perm), device=device)):
        return None
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=device)
    return perm, inverse


def token_order(layout: Layout, order: str, block: int, device) -> tuple | None:
    """``(perm, inverse)`` of a text-first layout's tokens into SLA's order, or ``None``
    when the order is the given one (``order="row-major"``, or tiles that change nothing).
    ``x.index_select(-2, perm)`` is in SLA's order; ``inverse`` takes it back."""
    order = ALIASES.get(order, order)
    if order not in ORDERS:
        raise ValueError(f"sla: order must be one of {list(ORDERS)}, got {order!r}")
    if order == ROW_MAJOR:
        return None
    return _cached_order(layout.text_first_form, int(block), torch.device(device))


def describe_order(layout: Layout, order: str, block: int) -> str:
    """``"row-major"``, ``"attnbench tiles 8x8"`` or ``"attnbench cubes 4x4x4"``: what the
    blocks are."""
    if ALIASES.get(order, order) == ROW_MAJOR:
        return ROW_MAJOR
    pt, ph, pw = patch_shape(layout, block)
    return f"attnbench cubes {pt}x{ph}x{pw}" if pt > 1 else f"attnbench tiles {ph}x{pw}"
