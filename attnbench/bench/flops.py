"""Counted FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` with the formulas it lacks.

The analytic models of the registry (``backend.flops``) are checked against
these counts. Same convention: 2 FLOPs per multiply-add of matrix
contractions. PyTorch counts 0 for the CPU flash kernel of SDPA
(``aten._scaled_dot_product_flash_attention_for_cpu``) and its backward; we
register the formulas PyTorch uses for the CUDA flash kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)


def _register_cpu_sdpa() -> None:
    aten = torch.ops.aten

    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is not None and forward not in flop_registry:

        @register_flop_formula(forward, get_raw=True)
        def _cpu_flash_forward(query, key, value, *args, out_val=None, **kwargs) -> int:
            return sdpa_flop_count(query.shape, key.shape, value.shape)

    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if backward is not None and backward not in flop_registry:

        @register_flop_formula(backward, get_raw=True)
        def _cpu_flash_backward(grad_out, query, key, value, *args, out_val=None, **kw) -> int:
            return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_register_cpu_sdpa()


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs PyTorch counts while running ``fn(*args, **kwargs)``."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
