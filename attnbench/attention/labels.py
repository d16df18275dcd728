"""Honest labels: what a call computes exactly and what its options became at a geometry.

The public side of a backend's label hooks (``density_model``,
``exact_rows_model``, ``rounded_options``, ``rounding_checks``): a result row's
density, the query–key pairs it computed exactly, its options after rounding
and a warning when rounding moved a request far; and ``describe`` for
``attnbench list``. :class:`AttentionBackend` inherits them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .inputs import ExactRows, Grid
from .layout import Layout


def rows_in_order(rows: ExactRows, positions: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of a text-first mask ``rows``, both axes in the caller's order
    (``positions[i]`` = token i's text-first index)."""
    wanted = positions[r0:r1]
    lo, hi = int(wanted.min()), int(wanted.max()) + 1
    block = rows(lo, hi)
    return block.index_select(-2, wanted - lo).index_select(-1, positions)


class Labels:
    """The label side of :class:`~attnbench.attention.backend.AttentionBackend`."""

    def _label_args(self, geometry: Grid | Layout, options: dict[str, Any]):
        opts = self.resolve(self.attend_options(options))
        if isinstance(geometry, Layout):
            layout, opts = self.geometry(geometry, None, opts)
        else:
            layout, opts = self.geometry(None, tuple(int(s) for s in geometry), opts)
        return layout.text_first_form, opts

    def density(self, geometry: Grid | Layout, **options: Any) -> float:
        """Fraction of the N×N query–key pairs this method computes exactly, in [0, 1].

        Softmax-exact methods 1; a local or sparse method the pairs it attends
        with exact softmax over N²; a linear method 0 (it computes no exact pair).
        ``geometry`` is ``(H, W)`` or a :class:`Layout` (N counts its text tokens and
        every frame); ``options`` as for ``attend`` (mixer-only ones are ignored).
        """
        layout, opts = self._label_args(geometry, options)
        return float(self.density_model(layout, **opts))

    def exact_pairs(self, q: torch.Tensor, k: torch.Tensor, geometry: Grid | Layout,
                    **options: Any) -> ExactRows | None:
        """The query–key pairs this method computes exactly on ``q, k``, row by row.

        Returns ``rows(r0, r1)``: a bool mask broadcastable to ``[B, H, r1 - r0, N]``
        (True = the pair is computed by exact softmax), in the call's token order; or
        ``None`` for a method that computes no pair exactly (linear attention). The
        pairs whose softmax probability mass a method keeps (zero-shot fidelity's
        mass recall); rows keep the memory at O(rows · N). Pooled or extra key tokens
        that are not input tokens are not pairs.
        """
        layout, opts = self._label_args(geometry, options)
        given = geometry if isinstance(geometry, Layout) else layout
        given.check(k.shape[2])
        density = self.density_model(layout, **opts)
        if density == 0.0:
            return None
        if density == 1.0 and not self.sparse_pairs:
            n = k.shape[2]
            return lambda r0, r1: torch.ones(1, 1, r1 - r0, n, dtype=torch.bool, device=k.device)
        rows = self.exact_rows_model(given.to_text_first(q), given.to_text_first(k), layout,
                                     **opts)
        if given.text_first or not given.text:
            return rows
        pos = given.text_first_positions(k.device)
        return lambda r0, r1: rows_in_order(rows, pos, r0, r1)

    def effective_options(self, geometry: Grid | Layout, **options: Any) -> dict[str, Any]:
        """The options as they act at this geometry: resolved, plus what rounding made of
        them (SLA's kept blocks, CLEAR's integer distance limits and pooled tokens)."""
        layout, opts = self._label_args(geometry, options)
        return {**opts, **self.rounded_options(layout, **opts)}

    def stated_options(self, options: Mapping[str, Any],
                       effective: Mapping[str, Any]) -> dict[str, Any]:
        """The options a result row ran with, said in today's terms: the requested ones
        plus each option its ``effective`` record holds at a value other than today's
        default. A row measured before a default changed (SLA's ``order`` was "tiles",
        its ``linear_over`` "marginal") keeps saying what it ran instead of taking the
        new default's label; a row at today's defaults is unchanged."""
        defaults = {o.name: o.default for o in self.options}
        kept = {k: v for k, v in effective.items()
                if k in defaults and k not in options and v != defaults[k]}
        return {**options, **kept}

    #: relative distance between a requested and an effective value that is worth a warning
    ROUNDING_TOLERANCE = 0.2

    def rounding_warning(self, geometry: Grid | Layout, **options: Any) -> str | None:
        """A sentence when rounding moves an option more than 20% (relative) from the
        request, e.g. ``"sla:topk=0.05 keeps 1 of 4 blocks (25%)"``; else ``None``."""
        layout, opts = self._label_args(geometry, options)
        for requested, effective, sentence in self.rounding_checks(layout, **opts):
            if requested == effective:
                continue
            if requested == 0 or abs(effective - requested) > self.ROUNDING_TOLERANCE * abs(
                requested
            ):
                return sentence
        return None

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for ``attnbench list``."""
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "options": [
                {
                    "name": o.name,
                    "default": o.default,
                    "type": o.type.__name__,
                    "choices": list(o.choices) if o.choices else None,
                    "mixer_only": o.mixer_only,
                    "help": o.help,
                    "source": o.source,
                }
                for o in self.options
            ],
            "extra_inputs": {e.name: e.help for e in self.extra_inputs},
            "implementations": self.paths(),
            "layouts": list(self.layout_kinds),
            "capabilities": {p.name: p.capabilities() for p in self.fast_paths},
            "conversion_recipe": self.conversion_recipe.to_dict()
            if self.conversion_recipe else None,
            "distill_recipe": {**self.distill_recipe.to_dict(),
                               "describe": self.distill_recipe.describe()}
            if self.distill_recipe else None,
            "distill_alternatives": [r.describe() for r in self.distill_alternatives],
            "notes": list(self.notes),
        }
