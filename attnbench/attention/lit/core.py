"""LiT's learned part: the depth-wise conv on V, in the method's core."""

from __future__ import annotations

from torch import nn

from ..base import AttentionCore


class LiTCore(AttentionCore):
    """Linear attention + LiT's depth-wise conv on V over the token grid (guideline 1).

    The conv (``dwc``, shared by all heads, d_head channels, kernel ``dwc_kernel``
    with 'same' padding) is LiT's only new parameter; its output is added to the
    attention output before the output projection. ``dwc_kernel=0`` drops it
    (the paper's "ReLU linear" ablation). Plain image grids only for now: text
    tokens and video grids raise ValueError.
    """

    def __init__(self, backend, num_heads, head_dim, **kw) -> None:
        super().__init__(backend, num_heads, head_dim, **kw)
        kernel = self.options["dwc_kernel"]
        self.dwc = None
        if kernel:
            self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size=kernel, padding=kernel // 2,
                                 groups=head_dim)
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        if self.dwc is not None:
            self.dwc.reset_parameters()  # PyTorch's default conv init, as LiT's code uses

    def forward(self, q, k, v, *, layout=None, grid=None):
        grid = self.plain_grid(layout, grid)
        out = self.backend.attend(q, k, v, grid=grid, impl=self.impl, **self.attend_options)
        if self.dwc is None:
            return out
        b, h, n, d = v.shape
        hg, wg = grid
        image = v.reshape(b * h, hg, wg, d).permute(0, 3, 1, 2)  # [B·H, d, Hg, Wg]
        local = self.dwc(image.to(self.dwc.weight.dtype)).permute(0, 2, 3, 1).reshape(b, h, n, d)
        return out + local.to(out.dtype)
