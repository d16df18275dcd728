"""LiT's learned part: the depth-wise conv on V, in the method's core."""

from __future__ import annotations

import torch
from torch import nn

from ..layout import Layout
from ..module import AttentionCore


class LiTCore(AttentionCore):
    """Linear attention + LiT's depth-wise conv on V over the image tokens (guideline 1).

    The conv (``dwc``, shared by all heads, d_head channels, kernel ``dwc_kernel``
    with 'same' padding) is LiT's only new parameter; its output is added to the
    attention output of the image tokens before the output projection.
    ``dwc_kernel=0`` drops it (the paper's "ReLU linear" ablation).

    Layouts (attnbench's extension; LiT is image-only): the linear
    attention runs over every token -- text tokens are queries, keys and values
    of the linear sums like any other -- while the conv sees the image tokens
    only, on their grid: text tokens get no conv term and are no conv input.
    A video grid is convolved frame by frame (a ``Conv2d`` over ``B·H·T``
    frames) by default; ``dwc_3d=True`` makes it one ``k×k×k`` ``Conv3d`` over
    ``(T, H, W)``, zero-padded in time as in space.
    """

    def __init__(self, backend, num_heads, head_dim, **kw) -> None:
        super().__init__(backend, num_heads, head_dim, **kw)
        kernel = self.options["dwc_kernel"]
        conv = nn.Conv3d if self.options.get("dwc_3d") else nn.Conv2d
        self.dwc = None
        if kernel:
            self.dwc = conv(head_dim, head_dim, kernel_size=kernel, padding=kernel // 2,
                            groups=head_dim)
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        if self.dwc is not None:
            self.dwc.reset_parameters()  # PyTorch's default conv init, as FLatten's dwc

    def forward(self, q, k, v, *, layout=None, grid=None):
        layout = Layout.coerce(layout, grid)
        out = self.backend.attend(q, k, v, layout=layout, impl=self.impl, **self.attend_options)
        if self.dwc is None:
            return out
        text, image = layout.split(out)
        local = self.local(layout.split(v)[1], layout)
        return layout.join(text, image + local.to(out.dtype))

    def local(self, image: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The conv term of the image tokens ``[B, H, T·Hg·Wg, d]`` (same shape)."""
        b, h, n, d = image.shape
        t, (hg, wg) = layout.frames, layout.frame_grid
        x = image.to(self.dwc.weight.dtype).reshape(b * h, t, hg, wg, d)
        if isinstance(self.dwc, nn.Conv3d):
            y = self.dwc(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # [B·H, d, T, Hg, Wg]
        else:
            frames = x.reshape(b * h * t, hg, wg, d).permute(0, 3, 1, 2)  # [B·H·T, d, Hg, Wg]
            y = self.dwc(frames).permute(0, 2, 3, 1)
        return y.reshape(b, h, n, d)
