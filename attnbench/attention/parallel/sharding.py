"""Which tokens each rank holds: a slice of the grid's rows (image) or frames (video).

The image tokens are cut along the grid's first axis -- rows of an image, frames of a
video -- into ``world`` equal slices, rank ``r`` holding slice ``r``: a slice is
contiguous in the row-major token order, and a local method (CLEAR's circle, LiT's
conv) needs only the neighbouring rows of the slices next to it.

Text tokens are *replicated*: every rank holds all of them, in the layout's place
(before or after its image slice), and gets all of their outputs back. Why: every
method lets every image query see every text key (CLEAR's global tokens, LiT's sums,
softmax), so each rank needs the text K/V anyway; the text is small beside the image
(FLUX: 512 of 4,096–262,144 tokens); and replicated text keeps every rank's load equal
(owned by rank 0, that rank would do the text queries' work alone and broadcast the
text K/V to the others). The text queries' outputs, which depend on every image key,
are merged across ranks by each strategy, identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import Layout


@dataclass(frozen=True)
class Sharding:
    """The global ``layout`` cut into ``world`` slices along its first grid axis."""

    layout: Layout
    world: int
    rank: int

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of world size {self.world} is not a rank")
        if self.parts % self.world:
            raise ValueError(
                f"layout {self.layout.describe()}: its {self.parts} {self.axis} do not divide "
                f"into {self.world} ranks; choose a world size dividing {self.parts} (or a "
                f"size whose {self.axis} it divides)")

    @property
    def axis(self) -> str:
        """What is cut: ``"frames"`` of a video, ``"rows"`` of an image."""
        return "frames" if self.layout.is_video else "rows"

    @property
    def parts(self) -> int:
        """Rows (image) or frames (video) of the whole grid."""
        return self.layout.grid[0]

    @property
    def per_rank(self) -> int:
        return self.parts // self.world

    @property
    def unit(self) -> int:
        """Tokens of one row (image) or one frame (video)."""
        return self.layout.image_tokens // self.parts

    @property
    def image_tokens(self) -> int:
        """Image tokens one rank holds."""
        return self.per_rank * self.unit

    def units(self, rank: int | None = None) -> range:
        """The rows (frames) rank ``rank`` (default: this one) holds."""
        rank = self.rank if rank is None else rank
        return range(rank * self.per_rank, (rank + 1) * self.per_rank)

    def sub_layout(self, units: int, text_first: bool | None = None) -> Layout:
        """The layout of ``units`` consecutive rows (frames) and every text token."""
        first = self.layout.text_first if text_first is None else text_first
        return Layout((units, *self.layout.grid[1:]), self.layout.text, first)

    @property
    def local(self) -> Layout:
        """What one rank holds: its slice and the text, in the layout's order."""
        return self.sub_layout(self.per_rank)

    def image_index(self, rank: int | None = None, device=None) -> torch.Tensor:
        """Text-first global token indices of rank ``rank``'s image tokens (int32)."""
        start = self.layout.text + self.units(rank).start * self.unit
        return torch.arange(start, start + self.image_tokens, device=device, dtype=torch.int32)

    def shard(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """This rank's part of a whole-sequence tensor ``x`` (text + its image slice)."""
        text, image = self.layout.split(x, dim)
        mine = image.narrow(dim, self.units().start * self.unit, self.image_tokens)
        return self.local.join(text, mine, dim)

    def unshard(self, parts: list[torch.Tensor], dim: int = -2) -> torch.Tensor:
        """The whole sequence from every rank's part (rank order; text from rank 0)."""
        splits = [self.local.split(p, dim) for p in parts]
        return self.layout.join(splits[0][0], torch.cat([s[1] for s in splits], dim=dim), dim)
