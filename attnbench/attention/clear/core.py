"""CLEAR's learned part: the weights of the pooled keys, in the method's core."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..module import AttentionCore
from .window import pools


class ClearCore(AttentionCore):
    """CLEAR on projected heads; the softmax projections around it are inherited unchanged.

    Its only parameter, when ``down_factor`` f > 1, is ``pool_weight`` ``[f, f]``:
    the weights of the patch sums that make the pooled K/V tokens, shared by
    heads, channels, K and V (the official ``spatial_weight``), initialised to
    the mean (1/f²) so a freshly converted layer equals the stateless ``attend``.
    Every layout the method defines (text tokens, video grids) goes to ``attend``.
    ``proportional_attention`` (off by default, as the official processors) scales q by
    :func:`proportional_gain` first: the official high-resolution logit scale.
    """

    def __init__(self, backend, num_heads, head_dim, **kw) -> None:
        super().__init__(backend, num_heads, head_dim, **kw)
        f = self.options["down_factor"]
        self.pool_weight = nn.Parameter(torch.empty(f, f)) if pools(f) else None
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        if self.pool_weight is not None:
            f = self.pool_weight.shape[0]
            with torch.no_grad():
                self.pool_weight.fill_(1.0 / (f * f))

    def forward(self, q, k, v, *, layout=None, grid=None):
        if self.options.get("proportional_attention"):
            q = q * proportional_gain(k.shape[2], pools(self.options["down_factor"]))
        return self.backend.attend(q, k, v, layout=layout, grid=grid, impl=self.impl,
                                   pool_weight=self.pool_weight, **self.attend_options)


#: the sequence length CLEAR's FLUX was trained at: 64×64 image tokens + 512 text tokens
#: (Huage001/CLEAR attention_processor.py ``train_seq_len``)
TRAIN_TOKENS = 64**2 + 512


def proportional_gain(keys: int, pooled: bool = False) -> float:
    """The factor on q of the official proportional attention: its scale
    ``√(log_L n / d)`` over the usual ``√(1/d)`` is ``√(log n / log L)``, L =
    :data:`TRAIN_TOKENS`, n the key count (text + image). With pooled keys the official
    processor takes ``10·n`` (``LocalDownsampleFlexAttnProcessor``), and so does this."""
    return math.sqrt(math.log((10 if pooled else 1) * keys) / math.log(TRAIN_TOKENS))
