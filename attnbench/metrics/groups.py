"""The metric groups of ``eval``: one registry entry per group, one module per computation.

A :class:`MetricGroup` says what the group writes (each metric with its direction),
whether it scores samples (the evaluator draws or loads them first), how it checks its
inputs -- called for every asked group *before any work*, so a missing weights file is
one line, not a failure after minutes of sampling -- and how it computes. Both
evaluators run the registry: :func:`attnbench.metrics.quality.evaluate` (attnbench's
DiT: it samples the model) and :func:`attnbench.metrics.pipeline_eval.evaluate_pair`
(a diffusers student's samples paired with its teacher's).

A new metric is one module with its computation plus one entry in :data:`GROUPS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class EvalContext:
    """What a group reads. ``images`` -- the scored samples (uint8 ``N×H×W×3``) and their
    ``labels`` (class ids) or ``prompts`` (text, one per image); ``teacher_images`` -- the
    teacher's image for each (a paired evaluation); ``dit`` -- attnbench's DiT evaluation
    (:class:`~attnbench.metrics.quality.DitSubject`); ``settings`` -- the flags (FID engine,
    feature extractor and its weights, CLIP model, LPIPS files, ...)."""

    kind: str  # "dit" or "pair"
    device: str = "cpu"
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    prompts: list[str] | None = None
    teacher_images: np.ndarray | None = None
    dit: Any = None
    settings: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class MetricGroup:
    """One group: ``metrics`` (name → higher is better), ``kinds`` (the evaluations it
    applies to), and ``module``, whose ``check_group(ctx)`` runs before any work and whose
    ``compute_group(ctx) -> (metrics, provenance)`` computes (imported when used: the
    registry loads fast)."""

    name: str
    help: str
    metrics: dict[str, bool]
    needs_samples: bool
    kinds: tuple[str, ...]
    module: str

    def owns(self, metric: str) -> bool:
        return metric in self.metrics

    def check(self, ctx: EvalContext) -> None:
        importlib.import_module(self.module).check_group(ctx)

    def compute(self, ctx: EvalContext) -> tuple[dict[str, float], dict[str, Any]]:
        return importlib.import_module(self.module).compute_group(ctx)


_GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

#: every metric group, in the order they run
GROUPS: dict[str, MetricGroup] = {g.name: g for g in (
    MetricGroup("fid", "FID, KID, IS, precision/recall against a reference (a diffusers "
                "student: against its teacher's own samples)",
                {"fid": False, "kid": False, "inception_score": True, "precision": True,
                 "recall": True}, True, ("dit", "pair"), "attnbench.metrics.fid"),
    MetricGroup("geneval", "the GenEval proxy (shapes-world models)",
                {"geneval": True, "geneval_strict": True,
                 **{f"geneval_{t}": True for t in _GENEVAL_TASKS}},
                True, ("dit",), "attnbench.metrics.geneval"),
    MetricGroup("fidelity", "PSNR/SSIM against the teacher from the same noise and "
                "conditioning (a DiT: and the per-step ε error)",
                {"psnr": True, "ssim": True, "eps_mse_vs_teacher": False},
                False, ("dit", "pair"), "attnbench.metrics.fidelity"),
    MetricGroup("clip", "CLIP score of each image against its prompt (--clip-model DIR)",
                {"clip_score": True}, True, ("pair",), "attnbench.metrics.clip_score"),
    MetricGroup("lpips", "LPIPS (AlexNet) against the teacher's image for the same prompt and "
                "seed (--lpips-backbone FILE, --lpips-weights FILE)",
                {"lpips": False}, True, ("pair",), "attnbench.metrics.lpips"),
)}


def names(kind: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, g in GROUPS.items() if kind is None or kind in g.kinds)


def describe(kind: str | None = None) -> str:
    """``fid (FID, KID, ...); fidelity (...)``: help text of the groups of ``kind``."""
    return "; ".join(f"{n} ({GROUPS[n].help})" for n in names(kind))


def parse_groups(text: str, flag: str = "--metrics", kind: str | None = None
                 ) -> tuple[str, ...]:
    """``"fid,fidelity"`` → the groups, each known (and applying to ``kind``)."""
    chosen = tuple(dict.fromkeys(m.strip() for m in str(text).split(",") if m.strip()))
    valid = names(kind)
    bad = [m for m in chosen if m not in valid]
    if bad or not chosen:
        where = {"dit": " for attnbench's DiT", "pair": " for a diffusers student"}.get(kind, "")
        raise ValueError(f"{flag} {text!r}: choose from {', '.join(valid)}{where}")
    return chosen


def group_of(metric: str) -> str | None:
    """The group that writes ``metric``."""
    for group in GROUPS.values():
        if group.owns(metric):
            return group.name
    return None


def directions(metrics: dict[str, float]) -> dict[str, bool]:
    """``higher_is_better`` of each metric written."""
    out = {}
    for metric in metrics:
        group = group_of(metric)
        if group is not None:
            out[metric] = GROUPS[group].metrics[metric]
    return out


def check(groups: tuple[str, ...], ctx: EvalContext) -> None:
    """Every asked group's inputs, before any work."""
    for name in groups:
        GROUPS[name].check(ctx)


def compute(groups: tuple[str, ...], ctx: EvalContext, extra: dict[str, Any]
            ) -> dict[str, float]:
    """Run ``groups`` on ``ctx``: their metrics (merged), their provenance in ``extra``."""
    metrics: dict[str, float] = {}
    for name in groups:
        values, provenance = GROUPS[name].compute(ctx)
        metrics.update(values)
        extra[name] = provenance
    return metrics
