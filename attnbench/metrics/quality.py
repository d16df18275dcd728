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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cliutil
from ..results import HIGHER_IS_BETTER, Result, ResultsWriter, canonical_options
from ..results import label as result_label
from .sample import SampleSettings, check_vae, checkpoint_sha256, generate, save_npz

METRIC_GROUPS = ("fid", "geneval", "fidelity")


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
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in names if m not in METRIC_GROUPS]
    if bad or not names:
        raise ValueError(f"{flag} {text!r}: choose from {', '.join(METRIC_GROUPS)}")
    return names


def is_shapes_model(config) -> bool:
    from ..data.shapes import NUM_CLASSES

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
        level="quality", resolution=side, tokens=grid * grid, batch=settings.batch,
        dtype="float32", device=str(device), model=cfg.name or "custom", heads=cfg.heads,
        head_dim=cfg.hidden_size // cfg.heads, impl="sampling", latency_median_s=latency,
        repetitions=repetitions,
        timer="perf_counter around each model call while sampling (CUDA-synchronised), median"
        if latency is not None else "",
        extra=extra,
    )


def metric_group(metric: str) -> str:
    """The group (``fid``, ``geneval``, ``fidelity``) a metric of this stage belongs to."""
    if metric.startswith("geneval"):
        return "geneval"
    if metric in ("psnr", "ssim", "eps_mse_vs_teacher"):
        return "fidelity"
    return "fid"


def merge_row(writer, row) -> None:
    """Append ``row``, keeping an earlier row's metric groups (same model) it did not redo.

    A group evaluated again replaces its metrics and its provenance whole (so a
    clean-fid FID never sits beside torch-fidelity's precision under one record).
    """
    for old in writer.rows:
        if old.key() == row.key() and old.level == "quality":
            redone = {g for g in METRIC_GROUPS if g in row.extra}
            kept = {k: v for k, v in old.extra.get("metrics", {}).items()
                    if metric_group(k) not in redone}
            merged = {**old.extra, **row.extra}
            merged["metrics"] = {**kept, **row.extra.get("metrics", {})}
            merged["higher_is_better"] = {k: v for k, v in HIGHER_IS_BETTER.items()
                                          if k in merged["metrics"]}
            row.extra = merged
            if row.latency_median_s is None:
                row.latency_median_s, row.repetitions, row.timer = (
                    old.latency_median_s, old.repetitions, old.timer)
            break
    writer.append(row)


def evaluate(ckpt: str | Path | None, config: EvalConfig, run_dir: str | Path, *,
             teacher: str | Path | None = None, argv: list[str] | None = None,
             progress: bool = True, log=print, force: bool = False) -> dict[str, Any]:
    """Run the quality stage (module docstring); returns ``{"row", "metrics", "run_dir"}``."""
    from ..bench.environment import environment
    from ..models import load_dit

    device = cliutil.device(config.device)
    if ckpt is None:
        from ..distill.teacher import default_teacher_path

        ckpt = default_teacher_path()
    if config.vae is not None:
        check_vae(config.vae)
    model = load_dit(ckpt, device=device)
    cfg = model.config
    config.sampling.check_model(cfg)
    if config.vae is not None:
        check_vae(config.vae, cfg)
    shapes = is_shapes_model(cfg)
    if "geneval" in config.metrics and not shapes:
        raise ValueError(f"--metrics geneval scores shapes-world models; {ckpt} is a "
                         f"{cfg.in_channels}-channel model with {cfg.num_classes} classes")
    settings = config.sampling
    vae = None
    if not cfg.is_pixel:
        if config.vae is None and config.samples is None:
            raise ValueError(f"{ckpt} samples latents: pass --vae PATH (a diffusers "
                             "AutoencoderKL folder) to decode them")
        if config.vae is not None:
            from .sample import load_vae

            vae = load_vae(config.vae, device)

    ref_spec = config.reference or ("shapes" if shapes else None)
    extractor = config.extractor or ("shapes" if shapes else "inception")
    if "fid" in config.metrics:  # every input of the metrics, before minutes of sampling
        _check_fid_inputs(config, ref_spec, extractor)
    if "fidelity" in config.metrics and teacher is not None and not Path(teacher).exists():
        raise FileNotFoundError(f"--teacher {teacher}: no such file or folder")
    given = None
    if config.samples and ("fid" in config.metrics or "geneval" in config.metrics):
        from .fid import load_images_npz

        given = load_images_npz(config.samples, "--samples")  # checked before anything is written
    run_dir = Path(run_dir)
    writer = ResultsWriter(run_dir, {**environment(device, ["python", "-m", "attnbench",
                                                            *(argv or [])]),
                                     "stage": "quality"}, force=force, command="eval")
    label = result_label(cfg.attention, canonical_options(dict(cfg.attention_options or {})))
    metrics: dict[str, float] = {}
    extra: dict[str, Any] = {
        "checkpoint": str(ckpt), "checkpoint_sha256": checkpoint_sha256(model),
        "model_config": cfg.to_dict(),
    }
    latency = repetitions = None
    warnings = weight_warnings(model)

    images = labels = None
    if "fid" in config.metrics or "geneval" in config.metrics:
        if given is not None:
            images, labels = given
            extra["samples"] = str(Path(config.samples).resolve())
            extra["sampling"] = {"from_file": str(config.samples), "num": len(images)}
        else:
            log(f"eval: sampling {settings.num} images of {label} ({settings.sampler}, "
                f"{settings.steps} steps, CFG {settings.cfg_scale})")
            drawn = generate(model, settings, device=device, vae=vae, progress=progress)
            images, labels = drawn["images"], drawn["labels"]
            rel = Path("samples") / f"{safe_name(label)}.npz"
            save_npz(run_dir / rel, images, labels)
            extra["samples"] = str(rel)
            steps = drawn["step_seconds"]
            if steps:
                latency, repetitions = float(np.median(steps)), len(steps)
            extra["sampling"] = {**settings.describe(), "seconds": round(drawn["seconds"], 3),
                                 "seconds_per_image": round(drawn["seconds"] / settings.num, 5)}
        warnings += sample_warnings(images)
        for warning in warnings:
            log(f"eval: warning: {label}: {warning}")

    if "fid" in config.metrics:
        from .fid import load_reference, quality_metrics

        weights = config.shapes_weights if extractor == "shapes" else config.inception_weights
        reference = load_reference(ref_spec, image_size=images.shape[1],
                                   num=config.ref_num or (max(len(images), 1000)
                                                          if ref_spec == "shapes" else None),
                                   seed=config.ref_seed)
        log(f"eval: FID family ({config.engine}, {extractor} features) against "
            f"{reference.description}")
        result = quality_metrics(images, reference, metrics=config.fid_metrics,
                                 engine=config.engine, extractor=extractor, weights=weights,
                                 clean_mode=config.clean_mode, device=str(device),
                                 seed=settings.seed)
        metrics.update(result["metrics"])
        extra["fid"] = result["fid"]
        if "fid" in result["metrics"] and str(ref_spec).startswith("shapes"):
            # the floor: real world images, as many as the samples, against the same reference
            real = load_reference(f"shapes:{len(images)}", image_size=images.shape[1],
                                  seed=config.ref_seed + 1000)
            floor = quality_metrics(real.images, reference, metrics=("fid",),
                                    engine=config.engine, extractor=extractor, weights=weights,
                                    clean_mode=config.clean_mode, device=str(device))
            extra["fid"]["real_images_fid"] = floor["metrics"]["fid"]
            extra["fid"]["real_images_fid_note"] = (
                f"{len(images)} real world images (seed {config.ref_seed + 1000}) against the "
                "same reference: the FID of a perfect model at this sample count")

    if "geneval" in config.metrics:
        from .geneval import geneval_score

        scored = geneval_score(images, labels)
        metrics.update(scored.metrics())
        extra["geneval"] = scored.to_dict()

    if "fidelity" in config.metrics:
        extra["fidelity"] = _fidelity(model, ckpt, teacher, config, device, vae, metrics, log)

    if images is None:
        for warning in warnings:
            log(f"eval: warning: {label}: {warning}")
    if warnings:
        extra["warnings"] = warnings
    extra["metrics"] = metrics
    extra["higher_is_better"] = {k: v for k, v in HIGHER_IS_BETTER.items() if k in metrics}
    row = quality_row(model, settings, device, extra, latency, repetitions)
    merge_row(writer, row)
    writer.finalize()
    return {"row": row, "metrics": metrics, "run_dir": run_dir, "label": label}


def _check_fid_inputs(config: EvalConfig, ref_spec: str | None, extractor: str) -> None:
    """The FID reference and feature-extractor weights exist (never found out after sampling)."""
    if ref_spec is None:
        raise ValueError("--reference is needed for FID of a non-shapes model (an ADM "
                         "reference batch .npz, an .npz with arr_0, or an image folder)")
    if not str(ref_spec).startswith("shapes") and not Path(ref_spec).exists():
        raise FileNotFoundError(f"--reference {ref_spec}: no such file or folder")
    if extractor == "inception":
        from .engines import inception_weights

        inception_weights(config.engine, config.inception_weights)
    elif config.shapes_weights is not None and not Path(config.shapes_weights).is_file():
        raise FileNotFoundError(f"--shapes-weights {config.shapes_weights}: no such file")


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


def _fidelity(model, ckpt, teacher_path, config: EvalConfig, device, vae,
              metrics: dict[str, float], log) -> dict[str, Any]:
    """PSNR / SSIM / per-step ε error of ``model`` against the teacher (same noise, labels)."""
    from ..data.shapes import to_uint8
    from ..diffusion import Diffusion
    from ..models import load_dit
    from .fidelity import eps_error, psnr, ssim
    from .sample import chunk_ranges, chunk_seed, decode, sample_chunk

    if teacher_path is None:
        from ..distill.teacher import default_teacher_path

        teacher_path = default_teacher_path()
    teacher = load_dit(teacher_path, device=device)
    if checkpoint_sha256(teacher) is not None and checkpoint_sha256(
            teacher) == checkpoint_sha256(model):
        log("eval: the model is the teacher itself: fidelity skipped")
        return {"teacher": str(teacher_path), "skipped": "the model is the teacher"}
    t_cfg, s_cfg = teacher.config, model.config
    if (t_cfg.in_channels, t_cfg.input_size, t_cfg.num_classes) != (
            s_cfg.in_channels, s_cfg.input_size, s_cfg.num_classes):
        raise ValueError(f"the teacher {teacher_path} ({t_cfg.in_channels}×{t_cfg.input_size}², "
                         f"{t_cfg.num_classes} classes) does not match the student")
    base = config.sampling
    settings = SampleSettings(num=min(config.fidelity_num, base.num) if config.samples is None
                              else config.fidelity_num, steps=base.steps,
                              cfg_scale=base.cfg_scale, sampler=base.sampler, eta=base.eta,
                              cfg_channels=base.cfg_channels, batch=base.batch, seed=base.seed,
                              labels="balanced" if is_shapes_model(s_cfg) else "uniform",
                              clip_denoised=base.clip_denoised)
    log(f"eval: fidelity to the teacher on {settings.num} samples (same noise and labels)")
    diffusion = Diffusion(1000)
    pixel = s_cfg.is_pixel
    clip = pixel if settings.clip_denoised is None else settings.clip_denoised
    student_imgs, teacher_imgs, curves, timesteps = [], [], [], None
    for c, rows in enumerate(chunk_ranges(settings.num, settings.batch)):
        imgs, ys = sample_chunk(model, settings, c, device=device, vae=vae, diffusion=diffusion)
        student_imgs.append(imgs)
        g = torch.Generator(device="cpu").manual_seed(chunk_seed(settings.seed, c))
        # the same draws as sample_chunk: labels first (uniform mode), then the noise
        if settings.labels == "uniform":
            torch.randint(0, s_cfg.num_classes, (len(rows),), generator=g)
        shape = (len(rows), s_cfg.in_channels, s_cfg.input_size, s_cfg.input_size)
        err = eps_error(model, teacher, diffusion, shape, torch.as_tensor(ys),
                        steps=settings.steps, sampler=settings.sampler,
                        cfg_scale=settings.cfg_scale, cfg_channels=settings.cfg_channels,
                        clip_denoised=clip, generator=g, device=device)
        x = err["samples"] if pixel else decode(vae, err["samples"])
        teacher_imgs.append(to_uint8(x.cpu()))
        curves.append(np.array(err["eps_mse"]) * len(rows))
        timesteps = err["timesteps"]
    student = torch.from_numpy(np.concatenate(student_imgs))
    reference = torch.from_numpy(np.concatenate(teacher_imgs))
    p, s = psnr(student, reference), ssim(student, reference)
    curve = (np.sum(curves, axis=0) / settings.num).tolist()
    metrics["psnr"] = float(p.mean())
    metrics["ssim"] = float(s.mean())
    metrics["eps_mse_vs_teacher"] = float(np.mean(curve))
    return {
        "teacher": str(teacher_path), "teacher_sha256": checkpoint_sha256(teacher),
        "num": settings.num, "labels": settings.labels,
        "psnr_std": float(p.std()) if len(p) > 1 else 0.0,
        "ssim_std": float(s.std()) if len(s) > 1 else 0.0,
        "psnr": "per image on [0, 1] pixels (uint8 samples), mean over images; 100 dB cap",
        "ssim": "Gaussian 11×11 σ=1.5, K1=0.01, K2=0.03, valid windows, mean",
        "eps_mse": "mean over ε channels of (ε_student − ε_teacher)² on the teacher's x_t, "
                   "guided as sampled; per step, noisiest first",
        "eps_mse_per_step": [round(v, 8) if math.isfinite(v) else None for v in curve],
        "timesteps": timesteps,
        "identical_samples": bool(torch.equal(student, reference)),
    }


def safe_name(label: str) -> str:
    """A label as a file name (what is not alphanumeric or -_.= becomes _)."""
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)
