"""The attention contract, by its older single-module name: every name re-exported.

The contract lives in short files by job -- ``options.py`` (options and their
checks), ``paths.py`` (fast paths and their selection), ``inputs.py`` (input
checks), ``costs.py`` (FLOP and memory results, cost models), ``labels.py``
(honest labels), ``backend.py`` (:class:`AttentionBackend`: what a method
defines, its hooks) and ``module.py`` (the ``nn.Module`` core and mixer).
``from attnbench.attention.base import X`` keeps working for every one of them.
"""

from ..common.names import closest
from .backend import AttentionBackend
from .costs import CostModels, Flops, Memory, check_counts, dense_flops
from .inputs import ExactRows, ExtraInput, Grid, check_qkv, square_grid
from .labels import Labels, rows_in_order
from .module import AttentionCore, AttentionMixer
from .options import (
    MAX_OPTION,
    Option,
    non_negative,
    positive,
    resolve_options,
    unit_fraction,
)
from .paths import FLOAT_DTYPES, DTypes, FastPath, Selection, as_device

__all__ = [
    "FLOAT_DTYPES", "MAX_OPTION", "AttentionBackend", "AttentionCore", "AttentionMixer",
    "CostModels", "DTypes", "ExactRows", "ExtraInput", "FastPath", "Flops", "Grid", "Labels",
    "Memory", "Option", "Selection", "as_device", "check_counts", "check_qkv",
    "closest", "dense_flops", "non_negative", "positive", "resolve_options", "rows_in_order",
    "square_grid", "unit_fraction",
]
