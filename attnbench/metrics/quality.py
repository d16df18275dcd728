"""The quality stage: sample a model, score it, write a quality row into the results table.

:func:`evaluate` is what ``python -m attnbench eval`` runs (and what ``run`` calls
when a quality stage is asked for). It samples ``num`` images with DiT's protocol
(:mod:`.sample`), then computes the requested metric groups:

* ``fid`` -- FID, KID, IS, precision/recall (:mod:`.fid`) against a reference
  (the shapes world by default for shapes-world models);
* ``geneval`` -- the GenEval proxy (:mod:`.geneval`), shapes-world models only;
* ``fidelity`` -- PSNR / SSIM against the teacher from the same noise and labels,
  and the per-step ε error (:mod:`.fidelity`).

The row (one per evaluated model; :class:`~attnbench.results.Result`,
``level = "quality"``) follows the report's convention for quality rows
(:mod:`attnbench.report.tables`): the numbers in ``extra["metrics"]``, their
direction in ``extra["higher_is_better"]``, the sample ``.npz`` in
``extra["samples"]`` (relative to the run directory), and how every number was
made beside them (``extra["fid"]``, ``extra["geneval"]``, ``extra["fidelity"]``,
``extra["sampling"]``). Evaluating the same model again into the same run merges
into its row: the metric groups evaluated again replace theirs, the others stay.
``latency_median_s`` is the median wall time of one model call while sampling
(batch ``batch``, ×2 with CFG; perf_counter, CUDA-synchronised): a rough speed
beside the quality, not a benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cliutil
from ..common.environment import environment
from ..data.shapes import NUM_CLASSES
from ..models import load_dit
from ..models.teacher import default_teacher_path
from ..results import QUALITY_LEVEL, Result, ResultsWriter, canonical_options
from ..results import label as result_label
from . import groups
from .fid import load_images_npz
from .sample import (
    SampleSettings,
    check_vae,
    checkpoint_sha256,
    generate,
    load_vae,
    save_npz,
)

#: the metric groups of attnbench's DiT (:mod:`.groups`)
METRIC_GROUPS = groups.names("dit")


@dataclass
class EvalConfig:
    """Everything ``eval`` needs besides the checkpoint (CLI flags map 1:1)."""

    metrics: tuple[str, ...] = ("fid", "geneval", "fidelity")
    sampling: SampleSettings = field(default_factory=lambda: SampleSettings(num=1000))
    fid_metrics: tuple[str, ...] = ("fid", "kid", "is", "prc")
    reference: str | None = None  # None: "shapes" for shapes-world models
    ref_num: int | None = None
    ref_seed: int = 1
    engine: str = "torch-fidelity"
    extractor: str | None = None  # None: "shapes" for shapes-world models, else "inception"
    inception_weights: str | None = None
    shapes_weights: str | None = None
    clean_mode: str = "clean"
    fidelity_num: int = 64
    samples: str | None = None  # an existing .npz (arr_0, arr_1) instead of sampling
    device: str | None = None
    vae: str | None = None


def parse_metrics(text: str, flag: str = "--metrics") -> tuple[str, ...]:
    return groups.parse_groups(text, flag, kind="dit")


def is_shapes_model(config) -> bool:
    return config.is_pixel and config.num_classes == NUM_CLASSES


def quality_row(model, settings: SampleSettings, device: torch.device, extra: dict[str, Any],
                latency: float | None, repetitions: int | None):
    """The :class:`~attnbench.results.Result` of one evaluated model."""
    cfg = model.config
    pixel = cfg.is_pixel
    side = cfg.input_size * (1 if pixel else 8)
    grid = cfg.input_size // cfg.patch_size
    return Result(
        method=cfg.attention, options=canonical_options(dict(cfg.attention_options or {})),
        level=QUALITY_LEVEL, resolution=side, tokens=grid * grid, batch=settings.batch,
        dtype="float32", device=str(device), model=cfg.name or "custom", heads=cfg.heads,
        head_dim=cfg.hidden_size // cfg.heads, impl="sampling", latency_median_s=latency,
        repetitions=repetitions,
        timer="perf_counter around each model call while sampling (CUDA-synchronised), median"
        if latency is not None else "",
        extra=extra,
    )


def merge_row(writer, row) -> None:
    """Append ``row``, keeping an earlier row's metric groups (same model) it did not redo.

    A group evaluated again replaces its metrics and its provenance whole (so a
    clean-fid FID never sits beside torch-fidelity's precision under one record).
    """
    for old in writer.rows:
        if old.key() == row.key() and old.level == QUALITY_LEVEL:
            redone = {g for g in METRIC_GROUPS if g in row.extra}
            kept = {k: v for k, v in old.extra.get("metrics", {}).items()
                    if groups.group_of(k) not in redone}
            merged = {**old.extra, **row.extra}
            merged["metrics"] = {**kept, **row.extra.get("metrics", {})}
            merged["higher_is_better"] = groups.directions(merged["metrics"])
            row.extra = merged
            if row.latency_median_s is None:
                row.latency_median_s, row.repetitions, row.timer = (
                    old.latency_median_s, old.repetitions, old.timer)
            break
    writer.append(row)


@dataclass
class DitSubject:
    """The DiT an evaluation scores (what its metric groups read besides the samples)."""

    model: Any
    ckpt: str | Path
    teacher: str | Path | None
    config: EvalConfig
    vae: Any
    shapes: bool
    ref_spec: str | None
    extractor: str


def evaluate(ckpt: str | Path | None, config: EvalConfig, run_dir: str | Path, *,
             teacher: str | Path | None = None, argv: list[str] | None = None,
             progress: bool = True, log=print, force: bool = False) -> dict[str, Any]:
    """Run the quality stage (module docstring); returns ``{"row", "metrics", "run_dir"}``."""
    device = cliutil.device(config.device)
    chosen = groups.parse_groups(",".join(config.metrics), kind="dit")
    subject = _subject(ckpt, config, teacher, device)
    ctx = groups.EvalContext("dit", device=str(device), dit=subject, log=log)
    groups.check(chosen, ctx)  # every input of every group, before minutes of sampling
    sampled = any(groups.GROUPS[g].needs_samples for g in chosen)
    given = None
    if config.samples and sampled:
        given = load_images_npz(config.samples, "--samples")  # checked before anything is written
    run_dir = Path(run_dir)
    writer = ResultsWriter(run_dir, {**environment(device, ["python", "-m", "attnbench",
                                                            *(argv or [])]),
                                     "stage": "quality"}, force=force, command="eval")
    model, cfg = subject.model, subject.model.config
    label = result_label(cfg.attention, canonical_options(dict(cfg.attention_options or {})))
    extra: dict[str, Any] = {
        "checkpoint": str(subject.ckpt), "checkpoint_sha256": checkpoint_sha256(model),
        "model_config": cfg.to_dict(),
    }
    latency = repetitions = None
    warnings = weight_warnings(model)
    if sampled:
        latency, repetitions = _draw(ctx, given, run_dir, label, extra, progress)
        warnings += sample_warnings(ctx.images)
    for warning in warnings:
        log(f"eval: warning: {label}: {warning}")
    metrics = groups.compute(tuple(g for g in groups.GROUPS if g in chosen), ctx, extra)
    if warnings:
        extra["warnings"] = warnings
    extra["metrics"] = metrics
    extra["higher_is_better"] = groups.directions(metrics)
    row = quality_row(model, config.sampling, device, extra, latency, repetitions)
    merge_row(writer, row)
    writer.finalize()
    return {"row": row, "metrics": metrics, "run_dir": run_dir, "label": label}


def _subject(ckpt, config: EvalConfig, teacher, device: torch.device) -> DitSubject:
    """The checkpoint loaded and checked against the sampling settings and its VAE."""
    if ckpt is None:
        ckpt = default_teacher_path()
    if config.vae is not None:
        check_vae(config.vae)
    model = load_dit(ckpt, device=device)
    cfg = model.config
    config.sampling.check_model(cfg)
    if config.vae is not None:
        check_vae(config.vae, cfg)
    shapes = is_shapes_model(cfg)
    vae = None
    if not cfg.is_pixel:
        if config.vae is None and config.samples is None:
            raise ValueError(f"{ckpt} samples latents: pass --vae PATH (a diffusers "
                             "AutoencoderKL folder) to decode them")
        if config.vae is not None:
            vae = load_vae(config.vae, device)
    return DitSubject(model, ckpt, teacher, config, vae, shapes,
                      ref_spec=config.reference or ("shapes" if shapes else None),
                      extractor=config.extractor or ("shapes" if shapes else "inception"))


def _draw(ctx: groups.EvalContext, given, run_dir: Path, label: str, extra: dict[str, Any],
          progress: bool) -> tuple[float | None, int | None]:
    """The samples the groups score: ``--samples`` or drawn now (saved in the run folder);
    the median model-call latency while sampling."""
    config, settings = ctx.dit.config, ctx.dit.config.sampling
    if given is not None:
        ctx.images, ctx.labels = given
        extra["samples"] = str(Path(config.samples).resolve())
        extra["sampling"] = {"from_file": str(config.samples), "num": len(ctx.images)}
        return None, None
    ctx.log(f"eval: sampling {settings.num} images of {label} ({settings.sampler}, "
            f"{settings.steps} steps, CFG {settings.cfg_scale})")
    drawn = generate(ctx.dit.model, settings, device=torch.device(ctx.device), vae=ctx.dit.vae,
                     progress=progress)
    ctx.images, ctx.labels = drawn["images"], drawn["labels"]
    rel = Path("samples") / f"{safe_name(label)}.npz"
    save_npz(run_dir / rel, ctx.images, ctx.labels)
    extra["samples"] = str(rel)
    extra["sampling"] = {**settings.describe(), "seconds": round(drawn["seconds"], 3),
                         "seconds_per_image": round(drawn["seconds"] / settings.num, 5)}
    steps = drawn["step_seconds"]
    return (float(np.median(steps)), len(steps)) if steps else (None, None)


def weight_warnings(model) -> list[str]:
    """What is wrong with a model's weights that makes its samples meaningless."""
    bad = [name for name, p in model.state_dict().items()
           if p.is_floating_point() and not torch.isfinite(p).all()]
    if not bad:
        return []
    return [f"{len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): its samples and every metric of them are "
            "meaningless"]


def sample_warnings(images: np.ndarray) -> list[str]:
    """Samples that are constant (one colour: NaN weights decode to black) or non-finite."""
    flat = np.asarray(images).reshape(len(images), -1)
    if not len(flat):
        return []
    warnings = []
    if flat.dtype.kind == "f":
        nonfinite = int((~np.isfinite(flat)).any(axis=1).sum())
        if nonfinite:
            warnings.append(f"{nonfinite} of {len(flat)} samples hold NaN or inf")
    constant = int((np.nanmax(flat, axis=1) == np.nanmin(flat, axis=1)).sum())
    if constant:
        warnings.append(f"{constant} of {len(flat)} samples are constant images (one colour): "
                        "the model's output is degenerate (NaN weights give black images); "
                        "its metrics do not measure quality")
    return warnings


def safe_name(label: str) -> str:
    """A label as a file name (what is not alphanumeric or -_.= becomes _)."""
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)
