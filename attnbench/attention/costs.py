"""What a cost model returns: forward FLOPs and bytes of one ``attend`` call.

FLOP convention, everywhere in attnbench: 2 FLOPs per multiply-add of the
matrix contractions (the convention of FlashAttention's benchmarks and of
``torch.utils.flop_counter``); element-wise work (softmax, feature maps,
divisions) is not counted. Backward is not modelled here. :class:`CostModels` is the
public side of a backend's cost hooks (``flop_model``, ``workspace_model``):
``flops`` and ``memory`` on shapes and a geometry, checked first.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from .inputs import Grid
from .layout import Layout


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one ``attend`` call (2 FLOPs per multiply-add).

    ``actual`` is what the method computes; ``dense`` is softmax attention on the
    same shapes (``4·B·H·N²·d``), the number sparse/linear methods are often,
    misleadingly, reported with. ``overhead`` is the part of ``actual`` spent
    outside the attention proper (e.g. SLA's block scoring).
    """

    actual: float
    dense: float
    overhead: float = 0.0

    @property
    def ratio(self) -> float:
        return self.actual / self.dense if self.dense else float("nan")


@dataclass(frozen=True)
class Memory:
    """Bytes of one ``attend`` call: inputs/outputs plus the largest workspace.

    ``io`` = q, k, v and the output; ``workspace`` = what the chosen algorithm
    keeps alive beside them (an N×N score matrix for materialising softmax, a
    d×d state for linear attention, ...). ``dense`` is the workspace-free
    (flash-style) softmax on the same shapes, for ratios.
    """

    io: float
    workspace: float
    dense: float

    @property
    def actual(self) -> float:
        return self.io + self.workspace


def dense_flops(batch: int, heads: int, tokens: int, head_dim: int) -> float:
    """``4·B·H·N²·d``: QKᵀ and PV of exact softmax attention."""
    return 4.0 * batch * heads * tokens * tokens * head_dim


def check_counts(method: str, **counts: object) -> None:
    """Raise ``ValueError`` unless every shape a cost model is given is an integer >= 0
    (``batch=2, heads=16, ...``; a bool or a float is not a count)."""
    for name, value in counts.items():
        try:
            ok = not isinstance(value, bool) and operator.index(value) >= 0
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{method}: {name} must be an integer >= 0, got {value!r}")


class CostModels:
    """The cost side of :class:`~attnbench.attention.backend.AttentionBackend`."""

    def _cost_args(self, dims: tuple[int, int, int, int], grid: Grid | Layout | None,
                   layout: Layout | None, options: dict[str, Any]
                   ) -> tuple[Layout, dict[str, Any]]:
        """Layout and options of a cost model, after checking the shapes are counts."""
        check_counts(self.name, **dict(zip(("batch", "heads", "tokens", "head_dim"), dims,
                                           strict=True)))
        return self.geometry(layout, grid, self.resolve(options), tokens=dims[2], square=True)

    def flops(self, batch: int, heads: int, tokens: int, head_dim: int,
              grid: Grid | Layout | None = None, *, layout: Layout | None = None,
              **options: Any) -> Flops:
        """Analytic forward FLOPs of ``attend`` on these shapes (module docstring).

        ``grid`` (or ``layout``) as for ``attend``; a :class:`Layout` counts text tokens
        and video frames; neither: the square image grid of ``tokens``.
        """
        layout, opts = self._cost_args((batch, heads, tokens, head_dim), grid, layout, options)
        return self.flop_model(batch, heads, tokens, head_dim, layout.text_first_form, **opts)

    def memory(self, batch: int, heads: int, tokens: int, head_dim: int,
               grid: Grid | Layout | None = None, *, layout: Layout | None = None,
               element_size: int = 2, impl: str = "fast", **options: Any) -> Memory:
        """Analytic bytes of one forward call of ``impl``: a path's name, ``"reference"``,
        or ``"fast"`` (the first fast path: what runs where every kernel is available).
        ``grid``/``layout`` as for :meth:`flops`; a text-last layout adds the text-first
        copies of q, k, v and the output that ``attend`` makes."""
        if impl == "fast":
            impl = self.fast_paths[0].name if self.fast_paths else "reference"
        elif impl not in ("reference", *self.paths()):
            raise ValueError(f"{self.name}: unknown implementation {impl!r}; valid: fast, "
                             f"{', '.join(dict.fromkeys(['reference', *self.paths()]))}")
        layout, opts = self._cost_args((batch, heads, tokens, head_dim), grid, layout, options)
        io = 4.0 * batch * heads * tokens * head_dim * element_size
        workspace = self.workspace_model(
            batch, heads, tokens, head_dim, layout.text_first_form, element_size=element_size,
            impl=impl, **opts
        )
        if layout.text and not layout.text_first:
            workspace += io  # the text-first copies of q, k, v and the output
        return Memory(io=io, workspace=float(workspace), dense=io)
