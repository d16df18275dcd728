"""A call's inputs and their checks, before any work: q, k, v, a method's declared extra
inputs (:class:`ExtraInput`) and the grid of a shape-only caller."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .paths import FLOAT_DTYPES, _dtype_names

Grid = tuple[int, int]
#: rows ``(r0, r1)`` → bool mask ``[B|1, H|1, r1 - r0, N]`` of the pairs computed exactly
ExactRows = Callable[[int, int], torch.Tensor]



def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "") -> None:
    """Raise ``ValueError`` unless q, k, v are floating ``[B, H, N, d]`` tensors that agree.

    Integer, bool and complex inputs are refused here, before any work, with
    one message for every method (attention is defined on real numbers; an
    integer input would otherwise give an integer result or a torch error).
    """
    where = f"{method}: " if method else ""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{where}{name} has dtype {str(t.dtype).removeprefix('torch.')}; attention takes "
                f"floating-point tensors ({_dtype_names(FLOAT_DTYPES)}): convert with .float()"
            )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}"
            )
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v disagree on batch/heads: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head_dim mismatch: q has {q.shape[-1]}, k has {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} tokens but v has {v.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def square_grid(tokens: int) -> Grid:
    """The grid of a square image of ``tokens`` tokens (for shape-only callers)."""
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens is not a square grid: pass grid=(Hgrid, Wgrid)")
    return side, side


@dataclass(frozen=True)
class ExtraInput:
    """A tensor a method's ``attend`` and every one of its paths take beside q, k, v.

    The learned parts a core passes to the stateless method (CLEAR's pooling weight):
    declared, so ``attend`` accepts it by ``name``, checks it with ``check(value,
    resolved options)`` (``None``, or a sentence naming it and saying what is wrong)
    before any work,
    counts it for autograd (a weight that requires grad needs a differentiable path
    even when q, k, v do not) and hands it to the chosen path and the reference as a
    keyword. Left out or ``None``, the paths use their default.
    """

    name: str
    help: str
    check: Callable[[torch.Tensor, Mapping[str, Any]], str | None] | None = None

    def validate(self, value: Any, options: Mapping[str, Any]) -> None:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{self.name} must be a torch.Tensor, got {type(value).__name__}")
        reason = self.check(value, options) if self.check is not None else None
        if reason:
            raise ValueError(reason)


def split_extra(declared: tuple[ExtraInput, ...], options: Mapping[str, Any]
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(options, extra inputs)``: a call's keywords apart from the ``declared`` tensors it
    was given (those left ``None`` are not given)."""
    names = {e.name for e in declared}
    extra = {k: v for k, v in options.items() if k in names and v is not None}
    return {k: v for k, v in options.items() if k not in names}, extra


def check_extra(declared: tuple[ExtraInput, ...], extra: Mapping[str, Any] | None,
                options: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` (the call's extra inputs), each checked against the resolved ``options``."""
    extra = dict(extra or {})
    for e in declared:
        if e.name in extra:
            e.validate(extra[e.name], options)
    return extra
