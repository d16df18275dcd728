"""The two jobs of this stage as functions: ``train_teacher`` and ``distill``.

Both build what the :class:`~attnbench.distill.trainer.Trainer` needs (models,
data, held-out evaluation batch, run identity) and return its summary. They
run unchanged on one process or under torchrun, on CPU or GPU, with the
shipped pixel-space teacher or a real latent DiT checkpoint and latents.
"""

from __future__ import annotations

import io as _io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common import dist as _dist
from ..data.images import make_grid, save_png, upscale
from ..data.shapes import PROMPTS, TASKS, ShapesWorld, to_uint8
from ..data.sources import TensorSource, check_compatible, open_source
from ..diffusion import Diffusion
from ..diffusion.sampling import sample_images
from ..models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_dit
from ..models.configs import DiTConfig
from ..models.convert import InheritanceReport, convert
from ..models.dit import DiT
from ..models.teacher import TEACHER_CONFIG, TRAINING_FILE, default_teacher_path, write_sums
from . import fsdp as _fsdp
from .io import atomic_write_bytes, atomic_write_json
from .optim import resolve as resolve_optimisation
from .recipes import DistillRecipe, get_recipe, recipe_for
from .trainer import TrainConfig, Trainer, check_out, step_seed

#: the file of teacher-generated training samples, reused by --resume
SELF_SAMPLES_FILE = "teacher_samples.npz"
DISTILL_FILE = "distill.json"


# --------------------------------------------------------------------------- sampling


def sample_labels(n: int) -> list[int]:
    """``n`` labels cycling through GenEval's six tasks (a grid row shows every task)."""
    by_task = {task: [p.label for p in PROMPTS if p.task == task] for task in TASKS}
    labels, i = [], 0
    while len(labels) < n:
        task = TASKS[i % len(TASKS)]
        members = by_task[task]
        labels.append(members[(i // len(TASKS) * 7) % len(members)])
        i += 1
    return labels


def write_sample_grid(model: DiT, path: str | Path, *, n: int = 64, nrow: int = 8,
                      steps: int | str = 100, sampler: str = "ddpm", cfg_scale: float = 1.0,
                      seed: int = 0, scale: int = 4) -> dict[str, Any]:
    """A PNG grid of ``n`` samples (labels across the six tasks); returns its description."""
    if not model.config.is_pixel:
        raise ValueError("sample grids need a pixel-space (3-channel) model; latents need the "
                         "SD VAE to decode")
    labels = sample_labels(n)
    images = sample_images(model, torch.tensor(labels), steps=steps, sampler=sampler,
                           cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(seed),
                           batch=64).cpu()
    save_png(path, upscale(make_grid(to_uint8(images), nrow=nrow), scale))
    return {"path": str(path), "samples": n, "steps": steps, "sampler": sampler,
            "cfg_scale": cfg_scale, "seed": seed,
            "prompts": [PROMPTS[i].text for i in labels]}


# --------------------------------------------------------------------------- teacher


def train_teacher(out: str | Path, config: TrainConfig, *, model_config: DiTConfig = TEACHER_CONFIG,
                  data_seed: int = 0, device: str | None = None, resume: bool = False,
                  force: bool = False, grid: bool = True) -> dict[str, Any]:
    """Train a DiT on the shapes world (``train-teacher``); writes ``OUT/teacher/``."""
    info = _dist.setup(device)
    try:
        if model_config.in_channels != 3:
            raise ValueError("the shapes world is RGB: the teacher needs in_channels=3")
        source = ShapesWorld(model_config.input_size, seed=data_seed)
        check_compatible(source, model_config.in_channels, model_config.num_classes,
                         model_config.patch_size)
        if model_config.num_classes != source.num_classes:
            raise ValueError(f"the shapes world has {source.num_classes} classes; the model "
                             f"config has {model_config.num_classes}")
        with torch.random.fork_rng(devices=[]), \
                torch.device(_fsdp.build_device(info, config.fsdp, "cpu")):
            torch.manual_seed(config.seed)
            model = DiT(model_config)
        held_out = ShapesWorld(model_config.input_size, seed=data_seed + 1)
        eval_data = held_out.get(range(config.eval_samples)) if config.eval_samples else None
        identity = {"kind": "teacher", "method": model_config.attention,
                    "model_config": model_config.to_dict(),
                    "data": f"shapes:{model_config.input_size}px:seed{data_seed}",
                    "seed": config.seed, "batch_size": config.batch_size}
        trainer = Trainer(model, Diffusion(1000), source, out, config,
                          recipe=get_recipe("teacher"), identity=identity,
                          eval_data=eval_data, num_train=2**31 - 1, export_name="teacher",
                          dist_info=info)
        summary = trainer.run(resume=resume, force=force)
        if info.is_main:
            summary = _finish_teacher(Path(out), summary, grid=grid)
        return summary
    finally:
        _dist.teardown(info)


def _finish_teacher(out: Path, summary: dict[str, Any], *, grid: bool) -> dict[str, Any]:
    teacher_dir = out / "teacher"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tail = rows[-min(len(rows), 100):]
    training = {
        "objective": "DiT: MSE(ε) + VB, learned-range variance, 1000 linear-beta steps, "
                     "label dropout 0.1",
        "data": summary.get("data"),
        "config": summary.get("config"),
        "steps": summary.get("steps"),
        "elapsed_s": summary.get("elapsed_s"),
        "timing": summary.get("timing"),
        "device": summary.get("device"),
        "world_size": summary.get("world_size"),
        "final_loss_mean_last_100": {k: float(np.mean([r[k] for r in tail]))
                                     for k in ("loss", "mse", "vb") if k in tail[0]},
        "loss_curve": [{k: r[k] for k in ("step", "loss", "mse", "vb") if k in r}
                       for r in rows[:: max(1, len(rows) // 50)]],
        "eval": summary.get("eval"),
        "versions": summary.get("versions"),
        "weights": "EMA",
    }
    if grid:
        model = load_dit(teacher_dir)
        training["sample_grid"] = write_sample_grid(model, out / "samples.png")
    atomic_write_json(teacher_dir / TRAINING_FILE, training)
    write_sums(teacher_dir, [WEIGHTS_FILE, CONFIG_FILE, TRAINING_FILE])
    summary["teacher"] = str(teacher_dir)
    return summary


# --------------------------------------------------------------------------- distillation


def resolve_teacher(teacher: str | Path | None) -> Path:
    return Path(teacher) if teacher is not None else default_teacher_path()


@torch.no_grad()
def generate_teacher_samples(teacher: DiT, count: int, *, seed: int, steps: int | str = 50,
                             cfg_scale: float = 1.0, batch: int = 64,
                             info: _dist.DistInfo | None = None,
                             progress: bool = False) -> TensorSource:
    """``count`` samples of the teacher (DDIM, η = 0) with uniformly drawn labels.

    Sample ``i``'s label and initial noise come from its own seed, and DDIM with
    η = 0 is deterministic, so the set is the same whatever the number of
    processes: rank ``r`` generates samples ``r::world`` and they are gathered.
    A teacher sharded by FSDP makes them in lockstep (each of its forwards is a
    collective): every rank runs as many batches, a rank short of one running a sample it
    discards.
    """
    info = info or _dist.DistInfo()
    cfg = teacher.config
    device = next(teacher.parameters()).device
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    mine = list(range(info.rank, count, info.world_size))
    noises, labels = [], []
    for i in mine:
        g = torch.Generator().manual_seed(step_seed(seed, i, stream=3))
        labels.append(int(torch.randint(0, cfg.num_classes, (1,), generator=g)))
        noises.append(torch.randn(shape, generator=g))
    diffusion = Diffusion(1000)
    xs = []
    most = -(-count // info.world_size) if _fsdp.is_sharded(teacher) else len(mine)
    chunks = range(0, most, batch)
    if progress and info.is_main:
        chunks = tqdm(chunks, desc=f"teacher samples ({count}, {steps} DDIM steps)",
                      leave=False)
    for start in chunks:
        chunk_labels = labels[start:start + batch] or [0]
        chunk_noise = noises[start:start + batch] or [torch.zeros(shape)]
        x = sample_images(teacher, torch.tensor(chunk_labels), steps=steps, sampler="ddim",
                          cfg_scale=cfg_scale, noise=torch.stack(chunk_noise),
                          diffusion=diffusion, device=device).cpu()
        xs.append(x[:len(labels[start:start + batch])])
    x = torch.cat(xs) if xs else torch.empty((0, *shape))
    y = torch.tensor(labels, dtype=torch.long)
    x = _dist.gather_rows(info, x, count)
    y = _dist.gather_rows(info, y, count)
    return TensorSource(x, y, origin=f"teacher samples (DDIM {steps}, cfg {cfg_scale})")


def _self_source(teacher: DiT, out: Path, count: int, *, seed: int, steps: int | str,
                 cfg_scale: float, teacher_sha: str, info: _dist.DistInfo,
                 progress: bool) -> TensorSource:
    """Teacher samples, cached in ``OUT/teacher_samples.npz`` (reused when they match)."""
    key = {"teacher_sha256": teacher_sha, "count": count, "seed": seed, "steps": str(steps),
           "cfg_scale": cfg_scale}
    path = out / SELF_SAMPLES_FILE
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                if json.loads(str(data["key"])) == key:
                    return TensorSource(torch.from_numpy(data["x"]), torch.from_numpy(data["y"]),
                                        origin=f"{path} (teacher samples, cached)")
        except (OSError, ValueError, KeyError):
            pass  # unreadable or another key: generate again
    source = generate_teacher_samples(teacher, count, seed=seed, steps=steps,
                                      cfg_scale=cfg_scale, info=info, progress=progress)
    if info.is_main:
        buf = _io.BytesIO()
        np.savez(buf, x=source.x.numpy(), y=source.y.numpy(), key=np.array(json.dumps(key)))
        atomic_write_bytes(path, buf.getvalue())
    return source


def distill(
    out: str | Path,
    method: str,
    config: TrainConfig,
    *,
    teacher: str | Path | None = None,
    options: dict[str, Any] | None = None,
    num_heads: int | None = None,
    weights: dict[str, Any] | None = None,
    trainable: str | None = None,
    recipe: str | None = None,
    data: str = "self",
    gen_samples: int = 512,
    gen_steps: int | str = 50,
    gen_cfg: float = 1.0,
    device: str | None = None,
    resume: bool = False,
    force: bool = False,
    convert_seed: int = 0,
) -> dict[str, Any]:
    """Convert ``teacher`` to ``method`` and distil the student (``distill`` subcommand).

    ``recipe``: a recipe's name instead of the method's own (``sla-attnbench``).
    ``data``: ``"self"`` (teacher samples, the default: CLEAR's finding), ``"shapes"``
    or a path to latents (.npz / folder). Writes ``OUT/student/`` (EMA weights,
    config, inheritance.json, distill.json), ``checkpoint.pt``, metrics and
    ``summary.json`` with the held-out ε error before and after.
    """
    out = Path(out)
    check_out(out, resume=resume, force=force)  # before minutes of sample generation
    info = _dist.setup(device)
    try:
        teacher_path = resolve_teacher(teacher)
        chosen: DistillRecipe = (get_recipe(recipe) if recipe else recipe_for(method)) \
            .with_overrides(weights, trainable)
        opts = {**chosen.options, **(options or {})}  # the recipe's method options unless given
        teacher_model, student, report, teacher_sha = _teacher_and_student(
            teacher_path, method, num_heads=num_heads, seed=convert_seed, options=opts,
            info=info, fsdp=config.fsdp)
        if info.is_main and not resume:  # said when the run started; kept in inheritance.json
            for warning in report.warnings:
                print(f"attnbench distill: warning: {warning}", file=sys.stderr)
        config = resolve_optimisation(config, chosen.optimisation)
        cfg = teacher_model.config
        sharded = None
        if config.fsdp:  # before the teacher makes samples: it makes them sharded
            sharded = _fsdp.Sharded(student, teacher_model, info)
        else:
            teacher_model.to(info.device)
            student.to(info.device)

        eval_n = config.eval_samples
        if data == "self":
            source = _self_source(teacher_model, out, gen_samples + eval_n, seed=config.seed,
                                  steps=gen_steps, cfg_scale=gen_cfg, teacher_sha=teacher_sha,
                                  info=info, progress=config.progress)
            num_train = gen_samples
            eval_data = (source.x[gen_samples:], source.y[gen_samples:])
        elif data == "shapes":
            source = open_source("shapes", image_size=cfg.input_size, seed=config.seed)
            num_train = 2**31 - 1
            held = ShapesWorld(cfg.input_size, seed=config.seed + 1)
            eval_data = held.get(range(eval_n)) if eval_n else None
        else:
            source = open_source(data)
            if len(source) <= eval_n:
                raise ValueError(f"{data} holds {len(source)} samples: fewer than "
                                 f"--eval-samples {eval_n} + 1")
            num_train = len(source) - eval_n
            eval_data = source.get(range(num_train, len(source))) if eval_n else None
        check_compatible(source, cfg.in_channels, cfg.num_classes, cfg.patch_size)
        if data == "shapes" and cfg.num_classes != ShapesWorld.num_classes:
            raise ValueError(f"the shapes world has {ShapesWorld.num_classes} classes but the "
                             f"teacher has {cfg.num_classes}: use --data self or its latents")

        identity = {"kind": "distill", "method": method,
                    "attention_options": report.options, "student_heads": report.student_heads,
                    "recipe": chosen.to_dict(), "teacher_sha256": teacher_sha,
                    "data": data if data in ("self", "shapes") else str(Path(data).resolve()),
                    "convert_seed": convert_seed}
        recipe_doc = {"recipe": chosen.to_dict(), "describe": chosen.describe(),
                      "teacher": {"path": str(teacher_path), "sha256": teacher_sha},
                      "data": data, "config": config.__dict__,
                      "gen": {"samples": gen_samples, "steps": str(gen_steps), "cfg": gen_cfg}
                      if data == "self" else None}
        trainer = Trainer(
            student, Diffusion(1000), source, out, config, recipe=chosen,
            teacher=teacher_model, identity=identity,
            info={"method": method, "teacher": str(teacher_path), "distill": recipe_doc,
                  "inheritance": {k: v for k, v in report.to_dict().items()
                                  if k in ("method", "options", "recipe", "student_heads",
                                           "teacher_heads", "parameters")}},
            eval_data=eval_data, num_train=num_train, export_name="student",
            export_extra={"inheritance.json": report.to_dict(), DISTILL_FILE: recipe_doc},
            dist_info=info, sharded=sharded,
        )
        return trainer.run(resume=resume, force=force)
    finally:
        _dist.teardown(info)


def _teacher_and_student(teacher_path: Path, method: str, *, num_heads: int | None,
                         seed: int, options: dict[str, Any], info: _dist.DistInfo,
                         fsdp: bool) -> tuple[DiT, DiT, InheritanceReport, str]:
    """``(teacher, student, conversion report, teacher's SHA-256)``.

    With ``fsdp`` only rank 0 reads the teacher and converts it; the other ranks build both
    models on the meta device from its configs (no memory) and :class:`~attnbench.distill.
    fsdp.Sharded` fills their shards from rank 0's tensors. A failure on rank 0 (an
    unreadable teacher, a bad option) is raised on every rank.
    """
    built, error = None, None
    if info.is_main or not fsdp:
        try:
            teacher = load_dit(teacher_path)
            student, report = convert(teacher, method, num_heads=num_heads, seed=seed,
                                      **options)
            built = (teacher.config, student.config, report, teacher.checkpoint.sha256())
        except (ValueError, FileNotFoundError) as err:
            if not fsdp:
                raise
            error = (type(err).__name__, str(err))
    if not fsdp:
        return teacher, student, report, built[3]
    error, built = _dist.broadcast_object(info, (error, built))
    if error is not None:
        raise (FileNotFoundError if error[0] == "FileNotFoundError" else ValueError)(error[1])
    teacher_config, student_config, report, sha = built
    if not info.is_main:
        with torch.device("meta"):
            teacher, student = (DiT(c, initialize=False).eval()
                                for c in (teacher_config, student_config))
    return teacher, student, report, sha
