"""Distillation recipes: which loss terms, with which weights, train which parameters.

The loss terms (every one a batch mean; see ``losses.py``):

* ``diffusion`` -- DiT's own loss on the data: ``MSE(ε) + VB`` (learned variance);
* ``kd_eps`` -- ``‖ε_T − ε_S‖²`` on the ε channels (LiT's λ1 term);
* ``kd_sigma`` -- ``‖Σ_T − Σ_S‖²`` on the learned-variance channels (LiT's λ2);
* ``kd_out`` -- ``‖f_T − f_S‖²`` on the whole model output (ε and Σ): CLEAR's
  and SLA's "teacher-output" term;
* ``kd_attn`` -- the mean over layers of ``‖a_T − a_S‖²``, ``a`` = a block's
  attention output (the mixer's, after its output projection): CLEAR's
  per-layer term.

Recipes (../shared/METHODS.md):

* ``lit`` -- LiT's hybrid distillation (arXiv 2501.12976): ``diffusion +
  0.5·kd_eps + 0.05·kd_sigma``; every parameter trains.
* ``clear`` -- CLEAR (arXiv 2412.16112, its training code): ``diffusion +
  0.5·kd_out + 0.5·kd_attn``; only the attention (q/k/v/out and the method's
  own parameters) trains.
* ``sla`` -- SLA (arXiv 2509.24006): ``diffusion + kd_out``; every parameter
  trains; the linear branch's projection starts at zero (the conversion does it).
* ``default`` -- any other method: ``diffusion + kd_out``, everything trains.
* ``teacher`` -- plain DiT training (``train-teacher``): ``diffusion`` only.

Every weight is overridable (``--weight kd_eps=0.3``), as is what trains
(``--trainable all|attention``); the recipe used is written with the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

TERMS: dict[str, str] = {
    "diffusion": "DiT's loss on the data: MSE(ε) + VB (learned variance)",
    "kd_eps": "‖ε_T − ε_S‖², the ε channels (LiT λ1)",
    "kd_sigma": "‖Σ_T − Σ_S‖², the learned-variance channels (LiT λ2)",
    "kd_out": "‖f_T − f_S‖², the whole output (CLEAR, SLA)",
    "kd_attn": "mean over layers of ‖attn_T − attn_S‖² (CLEAR)",
}
TRAINABLE = ("all", "attention")


@dataclass(frozen=True)
class DistillRecipe:
    """A named set of loss weights and the parameters that train."""

    name: str
    weights: dict[str, float] = field(default_factory=dict)
    trainable: str = "all"
    summary: str = ""
    source: str = ""

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
        if not any(v > 0 for v in self.weights.values()):
            raise ValueError(f"recipe {self.name!r}: every loss weight is 0, nothing to train")

    @property
    def needs_teacher(self) -> bool:
        return any(self.weights.get(k, 0) > 0 for k in TERMS if k.startswith("kd_"))

    @property
    def needs_attention(self) -> bool:
        return self.weights.get("kd_attn", 0) > 0

    def active(self) -> dict[str, float]:
        """The terms with a non-zero weight."""
        return {k: float(v) for k, v in self.weights.items() if v > 0}

    def with_overrides(self, weights: dict[str, Any] | None = None,
                       trainable: str | None = None) -> DistillRecipe:
        """A copy with weights (CLI strings allowed) and/or ``trainable`` replaced."""
        merged = dict(self.weights)
        for key, value in (weights or {}).items():
            if key not in TERMS:
                from ..attention.base import closest

                raise ValueError(f"unknown loss term {key!r}" + closest(key, list(TERMS)))
            try:
                merged[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"loss weight {key}={value!r} is not a number") from None
        changed = merged != self.weights or (trainable and trainable != self.trainable)
        return replace(self, weights=merged, trainable=trainable or self.trainable,
                       name=self.name + ("+custom" if changed else ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        terms = " + ".join(f"{w:g}·{k}" for k, w in self.active().items())
        return f"{self.name}: {terms}; trains {self.trainable} parameters"


RECIPES: dict[str, DistillRecipe] = {
    r.name: r
    for r in (
        DistillRecipe(
            "lit", {"diffusion": 1.0, "kd_eps": 0.5, "kd_sigma": 0.05}, "all",
            "LiT hybrid KD: diffusion + λ1‖ε_T − ε_S‖² + λ2‖Σ_T − Σ_S‖², λ1 = 0.5, λ2 = 0.05",
            "LiT, arXiv 2501.12976, guideline 5",
        ),
        DistillRecipe(
            "clear", {"diffusion": 1.0, "kd_out": 0.5, "kd_attn": 0.5}, "attention",
            "CLEAR: diffusion + 0.5·output MSE + 0.5·per-layer attention-output MSE; only "
            "the attention trains", "CLEAR, arXiv 2412.16112 (training code)",
        ),
        DistillRecipe(
            "sla", {"diffusion": 1.0, "kd_out": 1.0}, "all",
            "SLA: diffusion + teacher-output MSE; linear-branch projection zero-initialised",
            "SLA, arXiv 2509.24006",
        ),
        DistillRecipe(
            "default", {"diffusion": 1.0, "kd_out": 1.0}, "all",
            "any other method: diffusion + teacher-output MSE", "attnbench default",
        ),
        DistillRecipe(
            "teacher", {"diffusion": 1.0}, "all",
            "DiT training: MSE(ε) + VB with learned variance", "DiT, arXiv 2212.09748",
        ),
    )
}


def recipe_for(method: str) -> DistillRecipe:
    """The distillation recipe of ``method`` (its own, else ``default``)."""
    return RECIPES.get(method, RECIPES["default"])


def get_recipe(name: str) -> DistillRecipe:
    if name not in RECIPES:
        from ..attention.base import closest

        raise ValueError(f"unknown distillation recipe {name!r}" + closest(name, list(RECIPES)))
    return RECIPES[name]
