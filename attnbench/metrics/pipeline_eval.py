"""``eval --pipeline-samples STUDENT_DIR --teacher-samples TEACHER_DIR``: a student's quality.

Both folders come from ``sample --model-path`` with the same prompts, seeds and
settings (checked before any work: same ``prompts.jsonl``, same image shape,
same pipeline folder), so image ``i`` of one pairs with image ``i`` of the
other. Metric groups:

* ``fidelity`` -- PSNR and SSIM of each student image against the teacher's for
  the same prompt and seed (video: every frame), their means;
* ``fid`` -- FID and KID of the student's samples against the teacher's own
  (CLEAR's protocol), through the existing engines and extractors (Inception
  weights given locally, or the shipped shapes classifier's feature space);
* ``clip`` -- the CLIP score of each student image against its prompt, with a local
  CLIP model folder (:mod:`.clip_score`); the teacher's beside it;
* ``lpips`` -- LPIPS of each student image against the teacher's, with AlexNet's and
  the linear layers' weights given as local files (:mod:`.lpips`).

Each group is an entry of :mod:`.groups`; every asked group checks its inputs before
any work.

The row goes into the run folder's results table with ``level = quality``,
the student's method and options, so the report puts it beside the speed rows.

:func:`score_student` is the one-command form (``eval --model-path PIPELINE_DIR
--student DIR`` and ``run --model-path ... --quality ... --student DIR``): it samples the
teacher and the student with the same prompts and seeds into ``RUN/samples/teacher`` and
``RUN/samples/<student label>``, then scores the pair as above.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.environment import environment
from ..results import QUALITY_LEVEL, Result, ResultsWriter, canonical_options
from ..results import label as result_label
from . import groups as metric_groups
from .pipeline_sample import PROMPTS_FILE, check_sampling, run_pipeline_sampling
from .quality import safe_name
from .sample import INFO_FILE, NPZ_FILE

#: the groups a pipeline evaluation computes unless told (CLIP and LPIPS need weights given)
GROUPS = ("fidelity", "fid")


def _read_folder(path: str | Path, flag: str) -> tuple[Path, dict[str, Any], str]:
    folder = Path(path).expanduser()
    for name in (NPZ_FILE, INFO_FILE, PROMPTS_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"{flag} {folder}: no {name} (pass a folder written by "
                             "`attnbench sample --model-path`)")
    info = json.loads((folder / INFO_FILE).read_text())
    return folder, info, (folder / PROMPTS_FILE).read_text()


def check_pair(student: str | Path, teacher: str | Path):
    """The two folders, checked to pair up image by image (module docstring)."""
    s_dir, s_info, s_prompts = _read_folder(student, "--pipeline-samples")
    t_dir, t_info, t_prompts = _read_folder(teacher, "--teacher-samples")
    if s_prompts != t_prompts:
        raise ValueError(f"--teacher-samples {t_dir}: its prompts/seeds differ from "
                         f"--pipeline-samples {s_dir}; sample both with the same --prompts, "
                         "--num and --seed")
    for key in ("image_shape", "model_path", "settings"):
        if s_info.get(key) != t_info.get(key):
            raise ValueError(f"--teacher-samples {t_dir}: {key} differs from --pipeline-samples "
                             f"({t_info.get(key)} vs {s_info.get(key)}); sample both from the "
                             "same pipeline with the same flags")
    return s_dir, s_info, t_dir, t_info


def pair_context(groups: tuple[str, ...], *, size: tuple[int, int], device: str = "cpu",
                 **settings) -> metric_groups.EvalContext:
    """The context of a pair's metric groups, every group's inputs checked (before any
    work: sampling or scoring). ``size``: the images' (height, width)."""
    unknown = [g for g in groups if g not in metric_groups.names("pair")]
    if unknown or not groups:
        raise ValueError(f"--metrics {','.join(unknown)}: a pipeline evaluation computes "
                         f"{', '.join(metric_groups.names('pair'))}")
    ctx = metric_groups.EvalContext("pair", device=device, settings={**settings, "size": size})
    metric_groups.check(groups, ctx)
    return ctx


def score_student(model_path: str | Path, student: str | Path, run_dir: str | Path, *,
                  num: int, steps: int | None = None, height: int | None = None,
                  width: int | None = None, frames: int | None = None,
                  prompts: str | Path | None = None, seed: int = 0,
                  guidance: float | None = None, max_sequence_length: int | None = None,
                  groups: tuple[str, ...] = GROUPS, engine: str = "torch-fidelity",
                  extractor: str = "inception", weights: str | Path | None = None,
                  clip_model: str | Path | None = None, lpips_backbone: str | Path | None = None,
                  lpips_weights: str | Path | None = None, device: str = "cpu",
                  argv: list[str] | None = None, force: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Teacher and student sampled alike into ``run_dir/samples/``, then scored (module
    docstring). Every input is checked before the first sample."""
    _, _, _, (h, w, _), meta = check_sampling(model_path, student=student, prompts=prompts,
                                              num=num, height=height, width=width,
                                              frames=frames)
    scoring = dict(engine=engine, extractor=extractor, weights=weights, clip_model=clip_model,
                   lpips_backbone=lpips_backbone, lpips_weights=lpips_weights)
    pair_context(groups, size=(h, w), device=device, **scoring)
    name = result_label(meta["method"], canonical_options(dict(meta.get("options") or {})))
    folders = {"teacher": Path(run_dir) / "samples" / "teacher",
               "student": Path(run_dir) / "samples" / safe_name(name)}
    for who, folder in folders.items():
        run_pipeline_sampling(model_path, folder, student=student if who == "student" else None,
                              prompts=prompts, num=num, seed=seed, steps=steps, height=height,
                              width=width, frames=frames, guidance=guidance,
                              max_sequence_length=max_sequence_length, device=device,
                              force=force, progress=progress, argv=argv)
    return evaluate_pair(folders["student"], folders["teacher"], run_dir, groups=groups,
                         device=device, argv=argv, force=force, **scoring)


def _images(folder: Path) -> np.ndarray:
    with np.load(folder / NPZ_FILE, allow_pickle=False) as data:
        images = data["arr_0"]
    return images.reshape(-1, *images.shape[-3:])  # video: every frame an image


def evaluate_pair(student: str | Path, teacher: str | Path, run_dir: str | Path, *,
                  groups: tuple[str, ...] = GROUPS, engine: str = "torch-fidelity",
                  extractor: str = "inception", weights: str | Path | None = None,
                  clip_model: str | Path | None = None, lpips_backbone: str | Path | None = None,
                  lpips_weights: str | Path | None = None, device: str = "cpu",
                  argv: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Score the student folder against the teacher's; one quality row in ``run_dir``."""
    s_dir, s_info, t_dir, _ = check_pair(student, teacher)
    s_images, t_images = _images(s_dir), _images(t_dir)
    per_image = len(s_images) // max(1, int(s_info.get("num") or len(s_images)))
    prompts = [json.loads(line)["prompt"] for line in
               (s_dir / PROMPTS_FILE).read_text().splitlines() if line.strip()]
    ctx = pair_context(groups, engine=engine, extractor=extractor, weights=weights,
                       clip_model=clip_model, lpips_backbone=lpips_backbone,
                       lpips_weights=lpips_weights, device=device,
                       size=tuple(s_images.shape[1:3]))
    ctx.images, ctx.teacher_images = s_images, t_images
    ctx.prompts = [p for p in prompts for _ in range(per_image)]  # video: each frame
    ctx.settings["teacher_description"] = f"teacher samples {t_dir}"
    writer = ResultsWriter(Path(run_dir), {**environment(torch.device(device),
                                                         ["python", "-m", "attnbench",
                                                          *(argv or [])]),
                                           "stage": "quality"}, force=force, command="eval")
    extra: dict[str, Any] = {"student_samples": str(s_dir), "teacher_samples": str(t_dir),
                             "model_path": s_info.get("model_path"),
                             "family": s_info.get("family"), "student": s_info.get("student"),
                             "sampling": s_info.get("settings")}
    metrics = metric_groups.compute(tuple(g for g in metric_groups.GROUPS if g in groups), ctx,
                                    extra)
    extra["metrics"] = metrics
    extra["higher_is_better"] = metric_groups.directions(metrics)
    attention = s_info.get("attention") or {}
    method = attention.get("method", "softmax")
    options = canonical_options(dict(attention.get("options") or {}))
    settings = s_info.get("settings") or {}
    shape = s_info.get("image_shape") or [0, 0, 3]
    h, w = int(shape[-3]), int(shape[-2])
    row = Result(method=method, options=options, level=QUALITY_LEVEL, resolution=w, tokens=0,
                 batch=1, dtype="float32", device=device,
                 model=Path(str(s_info.get("model_path"))).name, heads=0, head_dim=0,
                 impl="pipeline", height=h if h != w else 0, extra=extra)
    writer.append(row)
    writer.finalize()
    return {"row": row, "metrics": metrics, "label": result_label(method, options),
            "steps": settings.get("steps")}
