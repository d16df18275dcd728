"""SLA's learned part: the projection of the linear branch, in the method's core."""

from __future__ import annotations

from torch import nn

from ..module import AttentionCore


class SLACore(AttentionCore):
    """SLA on projected heads: ``O_s + proj_l(O_l)`` per head.

    ``proj_l`` is the official ``nn.Linear(head_dim, head_dim)`` (with bias),
    shared by all heads and zero-initialised, so a freshly converted model is
    block-sparse attention and fine-tuning learns how much of the linear branch
    to let in. Every layout the method defines goes to ``attend_parts``.
    """

    def __init__(self, backend, num_heads, head_dim, **kw) -> None:
        super().__init__(backend, num_heads, head_dim, **kw)
        self.proj_l = nn.Linear(head_dim, head_dim)
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)

    def forward(self, q, k, v, *, layout=None, grid=None):
        o_s, o_l = self.backend.attend_parts(q, k, v, layout=layout, grid=grid,
                                             impl=self.impl, **self.attend_options)
        return o_s + self.proj_l(o_l.to(self.proj_l.weight.dtype)).to(o_s.dtype)
