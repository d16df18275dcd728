"""Recipes as data: how a method's student is made from a softmax DiT and how it is trained.

Each method declares one :class:`ConversionRecipe` (which softmax projections
its student inherits, how many heads it has) and one :class:`DistillRecipe`
(the loss terms and their weights, which parameters train, which layers the
attention term taps, and the :class:`Optimisation`: optimiser, its settings,
EMA and the published length) on its backend, with the source of every choice
-- the paper, the official code, or "attnbench's choice" where nothing is
published. ``models/convert.py`` and
``distill/`` read them; they hold no per-method rule of their own.

The loss terms a distillation recipe may name (``distill/losses.py`` computes them):
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..common.names import closest

#: the loss terms (every one a batch mean)
TERMS: dict[str, str] = {
    "diffusion": "DiT's loss on the data: MSE(ε) + VB (learned variance)",
    "kd_eps": "‖ε_T − ε_S‖², the ε channels (LiT λ1)",
    "kd_sigma": "‖Σ_T − Σ_S‖², the learned-variance channels (LiT λ2)",
    "kd_out": "‖f_T − f_S‖², the whole output (CLEAR, SLA)",
    "kd_attn": "mean over the tapped layers of ‖attn_T − attn_S‖² (CLEAR)",
}
#: which parameters train: every one, or only the attention (projections + the core)
TRAINABLE = ("all", "attention")
#: where ``kd_attn`` taps a layer: the core's output before the output projection (the
#: official CLEAR code) or the mixer's output after it
ATTN_TAPS = ("pre_proj", "post_proj")
#: the statement a recipe carries when no published recipe exists
OWN_CHOICE = "attnbench's choice (no published recipe)"
#: the optimisers a recipe may name (Prodigy needs the optional ``prodigyopt`` package)
OPTIMIZERS = ("adamw", "prodigy")
#: the settings each optimiser takes besides lr and weight decay
OPTIMIZER_SETTINGS = {"adamw": ("betas", "eps"),
                      "prodigy": ("betas", "beta3", "eps", "decouple", "use_bias_correction",
                                  "safeguard_warmup", "d0")}


@dataclass(frozen=True)
class Optimisation:
    """How a recipe trains: the optimiser, its settings, the EMA and the published length.

    ``ema_decay`` 0 means no EMA (the exported weights are the trained ones);
    ``steps`` is the length the source trained for (``None``: none published) --
    attnbench's runs choose their own length, and their summary sets it beside
    this one; ``batch`` states the source's batch in words. ``source`` says
    where every value comes from and ``substitutes`` what attnbench does
    differently and why.
    """

    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    settings: dict[str, Any] = field(default_factory=lambda: {"betas": (0.9, 0.999)})
    ema_decay: float = 0.999
    warmup_steps: int = 0
    grad_clip: float = 1.0
    steps: int | None = None
    batch: str = ""
    source: str = OWN_CHOICE
    substitutes: str = ""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got "
                             f"{self.optimizer!r}")
        unknown = sorted(set(self.settings) - set(OPTIMIZER_SETTINGS[self.optimizer]))
        if unknown:
            raise ValueError(f"{self.optimizer} takes no setting(s) {unknown}; valid: "
                             f"{', '.join(OPTIMIZER_SETTINGS[self.optimizer])}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.ema_decay < 1
                and self.grad_clip >= 0 and self.warmup_steps >= 0):
            raise ValueError(f"optimisation settings out of range: {self}")

    def describe(self) -> str:
        ema = f"EMA {self.ema_decay:g}" if self.ema_decay else "no EMA"
        length = f"{self.steps} steps" if self.steps else "no published length"
        parts = [f"{self.optimizer} lr {self.lr:g}, weight decay {self.weight_decay:g}", ema,
                 f"warm-up {self.warmup_steps}" if self.warmup_steps else "",
                 f"grad clip {self.grad_clip:g}" if self.grad_clip else "no grad clip",
                 length, self.batch]
        return "; ".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the optimisation of recipes without a published one: AdamW 2e-4 with an EMA
OWN_OPTIMISATION = Optimisation()


@dataclass(frozen=True)
class ConversionRecipe:
    """How a softmax DiT becomes a student of a method (weight inheritance).

    ``inherit_projections``: the student copies the softmax q/k/v/out
    projections (CLEAR, SLA) or re-initialises them (LiT's rule). ``heads``:
    ``heads(teacher_heads, hidden_size) -> student heads``; ``None`` keeps the
    teacher's. Everything else outside the attention is always inherited; the
    core's own parameters are always new.
    """

    name: str
    summary: str
    source: str
    inherit_projections: bool = True
    heads: Callable[[int, int], int] | None = None
    heads_rule: str = "the teacher's heads"

    def student_heads(self, teacher_heads: int, hidden_size: int) -> int:
        return self.heads(teacher_heads, hidden_size) if self.heads else teacher_heads

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "source": self.source,
                "inherit_projections": self.inherit_projections, "heads": self.heads_rule}


@dataclass(frozen=True)
class DistillRecipe:
    """A named set of loss weights, the parameters that train, and where they come from.

    ``attn_tap``, ``attn_every`` and ``attn_kind`` define ``kd_attn``: the
    per-layer term is taken at ``attn_tap`` (:data:`ATTN_TAPS`) on the
    attention layers whose position in the model's layer order is a multiple of
    ``attn_every`` (1 = every layer) and, when the model has layers of kind
    ``attn_kind`` (FLUX's "single"-stream blocks), only on those
    (:meth:`tapped_layers`). ``optimisation`` is how it trains.
    """

    name: str
    weights: dict[str, float] = field(default_factory=dict)
    trainable: str = "all"
    summary: str = ""
    source: str = ""
    attn_tap: str = "pre_proj"
    attn_every: int = 1
    attn_kind: str | None = None
    optimisation: Optimisation = OWN_OPTIMISATION
    #: the method options the source trained with (SLA: topk 0.1); a student converted
    #: for this recipe takes them unless options are given
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(TERMS))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; valid: {', '.join(TERMS)}")
        for key, value in self.weights.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"loss weight {key}={value!r} must be a number >= 0")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {list(TRAINABLE)}, got "
                             f"{self.trainable!r}")
        if self.attn_tap not in ATTN_TAPS:
            raise ValueError(f"attn_tap must be one of {list(ATTN_TAPS)}, got {self.attn_tap!r}")
        if isinstance(self.attn_every, bool) or not isinstance(self.attn_every, int) \
                or self.attn_every < 1:
            raise ValueError(f"attn_every must be a positive integer, got {self.attn_every!r}")
        if not any(v > 0 for v in self.weights.values()):
            raise ValueError(f"recipe {self.name!r}: every loss weight is 0, nothing to train")

    @property
    def needs_teacher(self) -> bool:
        return any(self.weights.get(k, 0) > 0 for k in TERMS if k.startswith("kd_"))

    @property
    def needs_attention(self) -> bool:
        return self.weights.get("kd_attn", 0) > 0

    def tapped_layers(self, kinds: list[str] | tuple[str, ...]) -> list[int]:
        """The positions of the layers ``kd_attn`` taps, given every attention layer's kind
        in the model's order (e.g. FLUX: 19 × "double", then 38 × "single").

        The official CLEAR rule (Huage001/CLEAR ``distill.py``: ``distill='single' in
        name and idx % 4 == 0`` over ``enumerate(transformer.attn_processors)``): count
        every layer, take those at a multiple of ``attn_every`` that are of kind
        ``attn_kind`` -- on FLUX positions 20, 24, ..., 56, i.e. single blocks 1, 5,
        ..., 37. A model without layers of that kind (attnbench's DiT, PixArt: every
        block single-stream) is tapped at every multiple of ``attn_every``.
        """
        kind = self.attn_kind if self.attn_kind in kinds else None
        return [i for i, k in enumerate(kinds)
                if i % self.attn_every == 0 and (kind is None or k == kind)]

    def active(self) -> dict[str, float]:
        """The terms with a non-zero weight."""
        return {k: float(v) for k, v in self.weights.items() if v > 0}

    def with_overrides(self, weights: dict[str, Any] | None = None,
                       trainable: str | None = None, **fields: Any) -> DistillRecipe:
        """A copy with weights (CLI strings allowed), ``trainable`` and/or ``attn_tap`` /
        ``attn_every`` replaced; the name gets ``+custom`` when anything changed."""
        merged = dict(self.weights)
        for key, value in (weights or {}).items():
            if key not in TERMS:
                raise ValueError(f"unknown loss term {key!r}" + closest(key, list(TERMS)))
            try:
                merged[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"--weight {key}={value!r} is not a number") from None
            if not (math.isfinite(merged[key]) and merged[key] >= 0):
                raise ValueError(f"--weight {key}={value}: a loss weight is a finite number "
                                 ">= 0 (0 turns the term off)")
        valid = ("attn_tap", "attn_every", "optimisation", "options")
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}; valid: {', '.join(valid)}")
        changed = (merged != self.weights or (trainable and trainable != self.trainable)
                   or any(getattr(self, k) != v for k, v in fields.items()))
        return replace(self, weights=merged, trainable=trainable or self.trainable,
                       name=self.name + ("+custom" if changed else ""), **fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        terms = " + ".join(f"{w:g}·{k}" for k, w in self.active().items())
        attn = ""
        if self.needs_attention:
            layers = "every block" if self.attn_every == 1 else \
                f"blocks with index % {self.attn_every} == 0"
            if self.attn_kind:
                layers = (f"{self.attn_kind}-stream layers at a position ≡ 0 mod "
                          f"{self.attn_every} of all layers (DiT: {layers})")
            attn = f" (kd_attn {self.attn_tap.replace('_', '-')}, {layers})"
        options = "".join(f"; {k}={v}" for k, v in self.options.items())
        return (f"{self.name}: {terms}{attn}; trains {self.trainable} parameters{options}; "
                f"{self.optimisation.describe()}")
