"""Where the tokens of an attention call sit: an image or video grid, plus text tokens.

Every method of the contract sees ``[B, H, N, d]``; a :class:`Layout` says what
the ``N`` tokens are. The image (or video) tokens form a row-major grid --
``(H, W)`` for an image, ``(T, H, W)`` (frame-major) for a video -- and a
block of ``text`` tokens (global tokens: a text encoder's output joined to the
image tokens, as in MM-DiTs) sits either before the grid (FLUX) or after it
(SD3). A plain image DiT is ``Layout((H, W))``; ``grid=(H, W)`` in ``attend``
means exactly that.

Methods that use the geometry (CLEAR's window, LiT's depth-wise conv, SLA's
blocks) say what they do with text tokens and with video; methods that do not
(softmax) accept every layout.

Text after the grid (SD3) is handled once, by ``AttentionBackend.attend``: it
moves the text tokens to the front (:meth:`Layout.to_text_first`, one
``torch.cat``), runs the method on the text-first layout and moves them back
(:meth:`Layout.from_text_first`). A method's reference and fast paths
therefore only ever see "text prefix + grid" (:func:`text_first_geometry`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch

#: every kind of layout (:attr:`Layout.kind`), for capability data
KINDS = ("image", "image+text", "video", "video+text")


@dataclass(frozen=True)
class Layout:
    """The token geometry of one attention call.

    ``grid`` -- ``(H, W)`` or ``(T, H, W)``, row-major (the last axis fastest).
    ``text`` -- the number of text (global) tokens, 0 for none.
    ``text_first`` -- True when the text tokens precede the grid (FLUX), False
    when they follow it (SD3).
    """

    grid: tuple[int, ...]
    text: int = 0
    text_first: bool = True

    def __post_init__(self) -> None:
        try:  # operator.index: 4.7 is refused, never rounded down to 4
            grid = tuple(operator.index(g) for g in self.grid)
        except TypeError:
            raise ValueError(
                f"layout grid must be (H, W) or (T, H, W) integers, got {self.grid!r}"
            ) from None
        if len(grid) not in (2, 3) or any(g <= 0 for g in grid):
            raise ValueError(
                f"layout grid must be (H, W) or (T, H, W) with positive sides, got {self.grid!r}"
            )
        if isinstance(self.text, bool) or int(self.text) != self.text or self.text < 0:
            raise ValueError(f"layout text must be a token count >= 0, got {self.text!r}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "text", int(self.text))
        object.__setattr__(self, "text_first", bool(self.text_first))

    # ----- geometry -----------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return len(self.grid) == 3

    @property
    def frames(self) -> int:
        """Frames of a video grid; 1 for an image."""
        return self.grid[0] if self.is_video else 1

    @property
    def frame_grid(self) -> tuple[int, int]:
        """``(H, W)`` of one frame (the whole grid for an image)."""
        return self.grid[-2], self.grid[-1]

    @property
    def image_tokens(self) -> int:
        n = 1
        for side in self.grid:
            n *= side
        return n

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text

    @property
    def is_plain(self) -> bool:
        """An image grid with no text tokens: what ``grid=(H, W)`` means."""
        return not self.is_video and self.text == 0

    @property
    def frame_tokens(self) -> int:
        """Tokens of one frame: ``H·W``."""
        return self.grid[-2] * self.grid[-1]

    @property
    def kind(self) -> str:
        """``image``, ``image+text``, ``video`` or ``video+text`` (see :data:`KINDS`)."""
        return ("video" if self.is_video else "image") + ("+text" if self.text else "")

    @property
    def text_first_form(self) -> Layout:
        """The same tokens with the text before the grid: what methods compute on."""
        return self if self.text_first or not self.text else Layout(self.grid, self.text, True)

    @property
    def image_slice(self) -> slice:
        start = self.text if self.text_first else 0
        return slice(start, start + self.image_tokens)

    @property
    def text_slice(self) -> slice:
        start = 0 if self.text_first else self.image_tokens
        return slice(start, start + self.text)

    # ----- tensors ------------------------------------------------------------------
    def check(self, tokens: int) -> None:
        """Raise ``ValueError`` unless the layout accounts for exactly ``tokens`` tokens."""
        if self.tokens != tokens:
            raise ValueError(f"grid {self.describe()} = {self.tokens} tokens, "
                             f"but the input has {tokens}")

    def split(self, x: torch.Tensor, dim: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text, image)`` parts of ``x`` along the token dimension ``dim``."""
        return (x.narrow(dim, self.text_slice.start, self.text),
                x.narrow(dim, self.image_slice.start, self.image_tokens))

    def join(self, text: torch.Tensor, image: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """The inverse of :meth:`split`: text and image tokens in this layout's order."""
        parts = (text, image) if self.text_first else (image, text)
        return torch.cat(parts, dim=dim)

    def to_text_first(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """``x`` in :attr:`text_first_form` order (``x`` itself when it already is)."""
        if self.text_first or not self.text:
            return x
        text, image = self.split(x, dim)
        return torch.cat((text, image), dim=dim)

    def from_text_first(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """The inverse of :meth:`to_text_first`: ``x`` back in this layout's order."""
        if self.text_first or not self.text:
            return x
        return self.join(x.narrow(dim, 0, self.text),
                         x.narrow(dim, self.text, self.image_tokens), dim)

    def text_first_positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """For each token in this layout's order, its index in :attr:`text_first_form`."""
        order = self.to_text_first(torch.arange(self.tokens, device=device).unsqueeze(-1))
        positions = torch.empty_like(order.squeeze(-1))
        positions[order.squeeze(-1)] = torch.arange(self.tokens, device=device)
        return positions

    def describe(self) -> str:
        """A short label: ``16x16``, ``4x16x16``, ``512 text + 64x64``, ``64x64 + 333 text``."""
        grid = "x".join(str(g) for g in self.grid)
        if not self.text:
            return grid
        text = f"{self.text} text"
        return f"{text} + {grid}" if self.text_first else f"{grid} + {text}"

    @classmethod
    def coerce(cls, layout: Any = None, grid: Any = None) -> Layout:
        """The layout of an ``attend`` call given ``layout=`` or the plain ``grid=``."""
        if layout is not None and grid is not None:
            raise ValueError("pass either grid=(H, W) or layout=Layout(...), not both")
        if isinstance(layout, Layout):
            return layout
        if layout is not None:
            raise ValueError(f"layout must be an attnbench.attention.Layout, got {layout!r}")
        if grid is None:
            raise ValueError(
                "grid=(Hgrid, Wgrid) or layout=Layout(...) is required: where the image tokens sit"
            )
        if isinstance(grid, Layout):
            return grid
        try:
            sides = tuple(grid)
        except TypeError:
            raise ValueError(f"grid must be a pair (Hgrid, Wgrid), got {grid!r}") from None
        if len(sides) != 2:
            raise ValueError(f"grid must be a pair (Hgrid, Wgrid), got {grid!r} "
                             "(a video grid goes in layout=Layout((T, H, W)))")
        return cls(sides)


def text_first_geometry(layout: Layout | None = None, grid: Any = None) -> Layout:
    """The layout a method's reference or fast path was called with, text first.

    Paths receive ``grid=(H, W)`` for plain image grids and ``layout=`` otherwise,
    always with any text tokens in front (``attend`` moves them); a text-last
    layout here means the path was called around ``attend``: ValueError.
    """
    layout = Layout.coerce(layout, grid)
    if layout.text and not layout.text_first:
        raise ValueError(
            f"layout {layout.describe()}: a method's paths take text tokens first; call "
            "backend.attend(...), which moves them to the front and back"
        )
    return layout
