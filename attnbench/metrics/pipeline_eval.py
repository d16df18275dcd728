"""``eval --pipeline-samples STUDENT_DIR --teacher-samples TEACHER_DIR``: a student's quality.

Both folders come from ``sample --model-path`` with the same prompts, seeds and
settings (checked before any work: same ``prompts.jsonl``, same image shape,
same pipeline folder), so image ``i`` of one pairs with image ``i`` of the
other. Metric groups:

* ``fidelity`` -- PSNR and SSIM of each student image against the teacher's for
  the same prompt and seed (video: every frame), their means;
* ``fid`` -- FID and KID of the student's samples against the teacher's own
  (CLEAR's protocol), through the existing engines and extractors (Inception
  weights given locally, or the shipped shapes classifier's feature space).

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

from ..results import HIGHER_IS_BETTER, Result, ResultsWriter, canonical_options
from ..results import label as result_label
from .pipeline_sample import PROMPTS_FILE
from .sample import INFO_FILE, NPZ_FILE

#: the groups this evaluation computes, in order
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


def check_groups(groups: tuple[str, ...], engine: str, extractor: str,
                 weights: str | Path | None) -> str | Path | None:
    """The metric groups and the files they read, checked before any work (returns the
    feature extractor's weights file)."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ValueError(f"--metrics {','.join(unknown)}: a pipeline evaluation computes "
                         f"{', '.join(GROUPS)}")
    if "fid" in groups and extractor == "inception":
        from .engines import inception_weights

        return inception_weights(engine, weights)  # the file named before any work
    return weights


def score_student(model_path: str | Path, student: str | Path, run_dir: str | Path, *,
                  num: int, steps: int | None = None, height: int | None = None,
                  width: int | None = None, frames: int | None = None,
                  prompts: str | Path | None = None, seed: int = 0,
                  guidance: float | None = None, max_sequence_length: int | None = None,
                  groups: tuple[str, ...] = GROUPS, engine: str = "torch-fidelity",
                  extractor: str = "inception", weights: str | Path | None = None,
                  device: str = "cpu", argv: list[str] | None = None, force: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Teacher and student sampled alike into ``run_dir/samples/``, then scored (module
    docstring). Every input is checked before the first sample."""
    from ..results import label as result_label
    from .pipeline_sample import check_sampling, run_pipeline_sampling
    from .quality import safe_name

    _, _, _, _, meta = check_sampling(model_path, student=student, prompts=prompts, num=num,
                                      height=height, width=width, frames=frames)
    weights = check_groups(groups, engine, extractor, weights)
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
                         engine=engine, extractor=extractor, weights=weights, device=device,
                         argv=argv, force=force)


def _images(folder: Path) -> np.ndarray:
    with np.load(folder / NPZ_FILE, allow_pickle=False) as data:
        images = data["arr_0"]
    return images.reshape(-1, *images.shape[-3:])  # video: every frame an image


def evaluate_pair(student: str | Path, teacher: str | Path, run_dir: str | Path, *,
                  groups: tuple[str, ...] = GROUPS, engine: str = "torch-fidelity",
                  extractor: str = "inception", weights: str | Path | None = None,
                  device: str = "cpu", argv: list[str] | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Score the student folder against the teacher's; one quality row in ``run_dir``."""
    import torch

    from ..bench.environment import environment
    from .fid import Reference, quality_metrics
    from .fidelity import psnr, ssim

    s_dir, s_info, t_dir, _ = check_pair(student, teacher)
    weights = check_groups(groups, engine, extractor, weights)
    writer = ResultsWriter(Path(run_dir), {**environment(torch.device(device),
                                                         ["python", "-m", "attnbench",
                                                          *(argv or [])]),
                                           "stage": "quality"}, force=force, command="eval")
    s_images, t_images = _images(s_dir), _images(t_dir)
    metrics: dict[str, float] = {}
    extra: dict[str, Any] = {"student_samples": str(s_dir), "teacher_samples": str(t_dir),
                             "model_path": s_info.get("model_path"),
                             "family": s_info.get("family"), "student": s_info.get("student"),
                             "sampling": s_info.get("settings")}
    if "fidelity" in groups:
        a, b = torch.from_numpy(s_images), torch.from_numpy(t_images)
        p, q = psnr(a, b), ssim(a, b)
        metrics.update(psnr=float(p.mean()), ssim=float(q.mean()))
        extra["fidelity"] = {"pairs": len(a), "reference": "the teacher's sample for the same "
                             "prompt and seed", "psnr_per_image": [round(float(x), 4) for x in p],
                             "ssim_per_image": [round(float(x), 5) for x in q]}
    if "fid" in groups:
        reference = Reference(description=f"teacher samples {t_dir}", images=t_images)
        result = quality_metrics(s_images, reference, metrics=("fid", "kid"), engine=engine,
                                 extractor=extractor, weights=weights, device=device,
                                 kid_subset_size=len(s_images))
        metrics.update(result["metrics"])
        extra["fid"] = result["fid"]
    extra["metrics"] = metrics
    extra["higher_is_better"] = {k: v for k, v in HIGHER_IS_BETTER.items() if k in metrics}
    attention = s_info.get("attention") or {}
    method = attention.get("method", "softmax")
    options = canonical_options(dict(attention.get("options") or {}))
    settings = s_info.get("settings") or {}
    shape = s_info.get("image_shape") or [0, 0, 3]
    h, w = int(shape[-3]), int(shape[-2])
    row = Result(method=method, options=options, level="quality", resolution=w, tokens=0,
                 batch=1, dtype="float32", device=device,
                 model=Path(str(s_info.get("model_path"))).name, heads=0, head_dim=0,
                 impl="pipeline", height=h if h != w else 0, extra=extra)
    writer.append(row)
    writer.finalize()
    return {"row": row, "metrics": metrics, "label": result_label(method, options),
            "steps": settings.get("steps")}
