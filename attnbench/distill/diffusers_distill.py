"""``distill --model-path DIR``: distil a diffusers transformer with its family's objective.

The student is the pipeline's transformer with ``swap_attention`` (the
method's conversion recipe decides what is inherited); the teacher is the same
transformer, frozen, in the run's dtype. Both read the same text-encoder
outputs (stored with the latents: only the transformer is ever trained). The
loss is the recipe's, computed the family's way (``diffusers_objective.py``).
The trainer is attnbench's (``trainer.py``: torchrun DDP, SIGINT saves,
``--resume``, the run-folder lock, the progress bar); this module plugs the
family's batches, trainable set and student export into it.

The model: a pipeline folder (``--model-path``), or a zoo entry (``--model``: the
transformer with random weights, what a check of the training's memory and speed needs;
no text encoders, so its data is ``random`` or a file).

Data (``--data``):

* ``self`` -- the teacher pipeline generates latents from the prompt file (its
  own scheduler, steps and guidance: CLEAR's protocol), one seed per sample so
  any number of ranks makes the same set; written once to
  ``OUT/teacher_latents.safetensors`` and reused by ``--resume``;
* a ``.safetensors`` file (or a folder holding one) with ``latents`` (in the
  transformer's input layout, as the pipeline's ``output_type="latent"`` gives
  them) and the text inputs by the transformer's argument names
  (``encoder_hidden_states``, ``pooled_projections``, ``encoder_attention_mask``),
  and ``height``/``width`` (``frames``) in its metadata;
* ``random`` (``--model ZOO``) -- ``--gen-samples`` random latents and text inputs at the
  model's true shapes.

Output: ``OUT/student/`` (``student.safetensors``: the changed and new tensors;
``student.json``), ``checkpoint.pt``, ``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from tqdm.auto import tqdm

from .. import attention
from ..common import dist as _dist
from ..data.prompts import read_prompts
from ..diffusion import Diffusion
from ..integrations.diffusers.build import build_transformer, make_inputs, model_shapes
from ..integrations.diffusers.families import (
    PIPELINE_FAMILIES,
    Family,
    draw_sigmas,
    flow_shift,
    get_family,
)
from ..integrations.diffusers.pipelines import (
    check_pipeline,
    check_size,
    config_hash,
    load_pipeline,
    load_transformer,
    text_length,
)
from ..integrations.diffusers.student import WEIGHTS, save_student
from ..integrations.diffusers.swap import kd_attn_modules, swap_attention
from ..models.diffusers_configs import get_diffusers_config
from . import fsdp as _fsdp
from .diffusers_objective import (
    DiffusersBatch,
    diffusers_losses,
    trainable_names,
)
from .io import atomic_write_bytes
from .recipes import DistillRecipe, for_objective, get_recipe, recipe_for
from .trainer import TrainConfig, Trainer, check_out, step_seed

SELF_FILE = "teacher_latents.safetensors"
#: ``--data random`` (with ``--model ZOO``): random latents and text at the model's shapes
RANDOM_DATA = "random"
#: the transformer's text inputs a data file may hold
TEXT_INPUTS = ("encoder_hidden_states", "pooled_projections", "encoder_attention_mask")
STUDENT_DIR = "student"
#: the seed stream of the self-generated samples (the trainer's batches use stream 0)
SAMPLE_STREAM = 5


# --------------------------------------------------------------------------- data


class LatentTextSource:
    """Latents in the transformer's input layout and their text inputs, row by row."""

    def __init__(self, x: torch.Tensor, text: dict[str, torch.Tensor], meta: dict[str, Any],
                 origin: str) -> None:
        self.x, self.text, self.meta, self.origin = x, text, meta, origin

    def __len__(self) -> int:
        return len(self.x)

    def get(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], {k: v[idx] for k, v in self.text.items()}

    def describe(self) -> dict[str, Any]:
        return {"origin": self.origin, "samples": len(self), "latent": list(self.x.shape[1:]),
                "text": {k: list(v.shape[1:]) for k, v in self.text.items()}, **self.meta}

    def save(self, path: Path) -> None:
        tensors = {"latents": self.x.contiguous(), **{k: v.contiguous()
                                                      for k, v in self.text.items()}}
        meta = {k: json.dumps(v) for k, v in self.meta.items()}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, flag: str = "--data") -> LatentTextSource:
        path = Path(path).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise ValueError(f"{flag} {path}: expected one *.safetensors of latents and "
                                 f"text embeddings in the folder, found {len(files)}")
            path = files[0]
        if not path.is_file() or path.suffix != ".safetensors":
            raise ValueError(f"{flag} {path}: give 'self' or a .safetensors file (or a folder "
                             "holding one) of latents and text embeddings; pickles are never "
                             "read")
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()
                        if k != "format"}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{flag} {path}: not a readable safetensors file ({err})") from None
        if "latents" not in tensors or "encoder_hidden_states" not in tensors:
            raise ValueError(f"{flag} {path}: needs tensors 'latents' and "
                             f"'encoder_hidden_states' (has {', '.join(sorted(tensors))})")
        if "height" not in meta or "width" not in meta:
            raise ValueError(f"{flag} {path}: its metadata must give height and width (px)")
        x = tensors.pop("latents")
        if any(len(v) != len(x) for v in tensors.values()):
            raise ValueError(f"{flag} {path}: every tensor needs one row per latent")
        return cls(x, tensors, meta, origin=str(path))


@torch.no_grad()
def generate_latents(pipe, family: Family, prompts: list[str], count: int, *, seed: int,
                     steps: int, guidance: float, height: int, width: int,
                     frames: int | None, max_len: int, info: _dist.DistInfo,
                     progress: bool = False) -> LatentTextSource:
    """``count`` teacher latents (prompt ``i mod len``, seed ``(seed, i)``) + text inputs.

    A transformer sharded by FSDP makes them in lockstep (each of its forwards is a
    collective): a rank short of one sample makes one it discards.
    """
    lockstep = _fsdp.is_sharded(pipe.transformer)
    most = -(-count // info.world_size) * info.world_size if lockstep else count
    mine = list(range(info.rank, most, info.world_size))
    device = pipe.transformer.device
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
              output_type="latent", max_sequence_length=max_len, **family.call_kwargs)
    if family.video:
        kw["num_frames"] = frames
    xs, texts = [], []
    rows = mine
    if progress and info.is_main:
        rows = tqdm(mine, desc=f"teacher latents ({count}, {steps} steps)", leave=False)
    for i in rows:
        prompt = prompts[i % len(prompts)]
        g = torch.Generator(device).manual_seed(step_seed(seed, i, stream=SAMPLE_STREAM))
        latent = pipe(prompt=prompt, generator=g, **kw)[0].cpu()
        if i >= count:  # lockstep's spare
            continue
        xs.append(latent)
        texts.append({k: v.cpu() for k, v in family.encode(pipe, [prompt], device,
                                                             max_len).items()})
    x = torch.cat(xs) if xs else torch.empty(0)
    text = {k: torch.cat([t[k] for t in texts]) for k in (texts[0] if texts else {})}
    x = _dist.gather_rows(info, x, count)
    text = {k: _dist.gather_rows(info, v, count) for k, v in text.items()}
    meta = {"height": height, "width": width, "frames": frames, "guidance": guidance,
            "steps": steps, "seed": seed, "prompts": len(prompts), "max_sequence_length": max_len}
    return LatentTextSource(x, text, meta, origin="teacher pipeline samples")


def _grid(family: Family, transformer: nn.Module, x: torch.Tensor, meta: dict[str, Any]
          ) -> tuple[int, ...]:
    """The token grid of one latent: packed tokens ``[1, T, C]`` (FLUX) need it from the
    pixel size, each token covering (VAE factor × pack) pixels a side -- read from the token
    count, since a pipeline's own VAE may downsample otherwise than the family's (16 px a
    token for FLUX's own VAE)."""
    if family.pack > 1:
        height, width = int(meta["height"]), int(meta["width"])
        side = math.isqrt(height * width // x.shape[1])
        return height // side, width // side
    return tuple(x.shape[-2:])


# --------------------------------------------------------------------------- the trainer


class DiffusersTrainer(Trainer):
    """The trainer with a diffusers family's batches, trainable set and student export."""

    def __init__(self, student, teacher, source: LatentTextSource, out, config: TrainConfig, *,
                 recipe: DistillRecipe, family: Family, handle, teacher_hash: str,
                 shift: float, identity: dict[str, Any], info: dict[str, Any],
                 dist_info: _dist.DistInfo, student_extra: dict[str, Any],
                 sharded=None) -> None:
        self.family, self.handle, self.teacher_hash = family, handle, teacher_hash
        self.shift, self.student_extra = shift, student_extra
        diffusion = Diffusion(1000) if family.objective == "eps_vb" else None
        super().__init__(student, diffusion, source, out, config, recipe=recipe,
                         teacher=teacher, identity=identity, info=info, eval_data=None,
                         num_train=len(source), export_name=STUDENT_DIR, dist_info=dist_info,
                         sharded=sharded)

    def setup_batches(self) -> None:
        self.sample_shape = tuple(self.source.x.shape[1:])
        self.grid = _grid(self.family, self.model, self.source.x[:1], self.source.meta)
        self.guidance = float(self.source.meta.get("guidance") or 1.0)
        self.tapped = kd_attn_modules(self.model, self.recipe)
        if self.recipe.needs_attention and not self.tapped:
            raise ValueError(f"recipe {self.recipe.name!r}: no attention module of this "
                             f"{self.family.name} model is tapped by its kd_attn rule; pass "
                             "--weight kd_attn=0")

    def step_terms(self, net: nn.Module, step: int, rows: slice) -> dict[str, torch.Tensor]:
        cfg = self.config
        g = torch.Generator().manual_seed(step_seed(cfg.seed, step))
        b = cfg.batch_size
        idx = torch.randint(0, self.num_train, (b,), generator=g)[rows]
        u = torch.rand(b, generator=g)[rows]
        noise = torch.randn((b, *self.sample_shape), generator=g)[rows]
        x0, text = self.source.get(idx.tolist())
        if self.family.objective == "flow":
            level = draw_sigmas(self.family, u, self.shift)
        else:
            level = (u * self.diffusion.num_steps).long().clamp(max=self.diffusion.num_steps - 1)
        dtype = next(self.model.parameters()).dtype
        batch = DiffusersBatch(x0.to(self.device, dtype),
                               {k: v.to(self.device, dtype if v.is_floating_point() else v.dtype)
                                for k, v in text.items()},
                               noise.to(self.device, dtype), level.to(self.device), self.grid)
        return diffusers_losses(self.recipe, self.family, net, self.teacher, batch,
                                guidance=self.guidance, tapped=self.tapped,
                                diffusion=self.diffusion)

    def ema_init(self, model: nn.Module, trainable_keys: list[str]) -> dict[str, torch.Tensor]:
        """The trainable entries only (the frozen ones never move): 10 GB for FLUX.1-dev's
        attention instead of a 48 GB float copy of the whole student."""
        state = model.state_dict()
        return {k: state[k].detach().clone().float() for k in trainable_keys}

    def ema_model(self, model: nn.Module, ema: dict[str, torch.Tensor]) -> nn.Module:
        exported = copy.deepcopy(model)
        state = exported.state_dict()
        with torch.no_grad():
            for key, value in ema.items():
                state[key].copy_(value.to(state[key].dtype))
        return exported.eval()

    def trainable_names(self, model: nn.Module) -> set[str]:
        return set(trainable_names(model, self.family, self.recipe.trainable))

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return json.loads(json.dumps(dict(model.config), default=list))

    def export(self, exported: nn.Module) -> Path:
        folder = self.out / STUDENT_DIR
        save_student(folder, exported, self.handle, self.teacher.state_dict(),
                     recipe=self.recipe.to_dict(), teacher_hash=self.teacher_hash,
                     extra=self.student_extra)
        return folder / WEIGHTS


# --------------------------------------------------------------------------- the job


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def distill_pipeline(
    out: str | Path, method: str, config: TrainConfig, *, model_path: str | Path | None = None,
    model: str | None = None,
    options: dict[str, Any] | None = None, weights: dict[str, Any] | None = None,
    trainable: str | None = None, recipe: str | None = None, data: str = "self",
    prompts: str | Path | None = None,
    gen_samples: int = 64, gen_steps: int | None = None, gen_guidance: float | None = None,
    height: int | None = None, width: int | None = None, frames: int | None = None,
    max_sequence_length: int | None = None, device: str | None = None,
    resume: bool = False, force: bool = False, gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Distil the transformer of the pipeline in ``model_path``, or of the zoo entry
    ``model`` with random weights (module docstring)."""
    out = Path(out)
    if (model_path is None) == (model is None):
        raise ValueError("give one model: --model-path PIPELINE_DIR or --model ZOO_NAME")
    if model is not None:
        root, entry = None, _zoo_entry(model, data)
        family = get_family(entry.family)
    else:
        if data == RANDOM_DATA:
            raise ValueError("--data random is for --model ZOO (random weights); a pipeline's "
                             "teacher makes its own data: --data self")
        root, family = check_pipeline(model_path)
        entry = None
    prompt_list = read_prompts(prompts) if data == "self" else None
    source = None if data in ("self", RANDOM_DATA) else LatentTextSource.load(data)
    s = family.sampling
    if source is None:
        default_h, default_w = family.default_res
        height, width = height or default_h, width or default_w
        frames = frames if frames is not None else (s.frames if family.video else None)
    else:
        height, width = int(source.meta["height"]), int(source.meta["width"])
        frames = source.meta.get("frames")
    if root is not None:
        check_size(root, family, height, width, frames)
    else:
        shapes = model_shapes(entry, (height, width), frames)  # a size it cannot take: here
    chosen = get_recipe(recipe) if recipe else for_objective(recipe_for(method),
                                                             family.objective)
    resolved_recipe: DistillRecipe = chosen.with_overrides(weights, trainable)
    # the recipe's method options (SLA: topk 0.1) unless given
    resolved = attention.get(method).resolve({**chosen.options, **(options or {})}, mixer=True)
    check_out(out, resume=resume, force=force)  # before minutes of sample generation
    info = _dist.setup(device)
    try:
        dtype = torch.bfloat16 if config.precision == "bf16" and info.device.type == "cuda" \
            else None
        # under --fsdp the transformer is whole on rank 0's CPU only (fsdp.build_device): a
        # zoo entry's random weights are then drawn by the CPU's generator, not the GPU's
        where = _fsdp.build_device(info, config.fsdp, info.device)
        if root is not None:
            pipe, _ = load_pipeline(root, device=info.device, dtype=dtype,
                                    transformer=not config.fsdp)
            teacher = pipe.transformer if not config.fsdp else load_transformer(
                root, device=where, dtype=dtype)
            scheduler = dict(pipe.scheduler.config)
        else:
            pipe, scheduler = None, dict(family.scheduler)
            teacher = build_transformer(entry, device=where, dtype=dtype or torch.float32,
                                        seed=config.seed)
        teacher = teacher.eval().requires_grad_(False)
        teacher_hash = config_hash(teacher)
        student, handle = student_of(teacher, method, resolved, family,
                                     resolved_recipe.trainable, seed=config.seed)
        sharded = None
        if config.fsdp:  # before the teacher makes data: it makes them sharded
            sharded = _fsdp.Sharded(student, teacher, info)
            if pipe is not None:
                pipe.transformer = teacher
        if data == RANDOM_DATA:
            source = random_source(entry, shapes, gen_samples, seed=config.seed)
        elif data == "self":
            source = _self_data(out, pipe, family, prompt_list, config, info, teacher_hash,
                                count=gen_samples, steps=gen_steps or s.steps,
                                guidance=s.guidance if gen_guidance is None else gen_guidance,
                                height=height, width=width, frames=frames,
                                max_len=text_length(pipe, family, max_sequence_length))
        if resolved_recipe.needs_attention:
            swap_attention(teacher, "softmax")  # the stock output, with a core to tap
        if gradient_checkpointing:
            student.enable_gradient_checkpointing()
        shift = flow_shift(scheduler, int(torch.tensor(_grid(family, student, source.x[:1],
                                                             source.meta)).prod()))
        origin = str(root) if root is not None else f"--model {entry.name} (random weights)"
        identity = {"kind": "distill-diffusers", "method": method, "family": family.name,
                    "attention_options": resolved, "recipe": resolved_recipe.to_dict(),
                    "teacher_config_sha256": teacher_hash,
                    "data": data if data in ("self", RANDOM_DATA) else str(Path(data).resolve())}
        doc = {"family": family.name, "model_path": origin, "objective": family.objective,
               "timestep_density": family.timestep_density, "shift": shift,
               "tapped": kd_attn_modules(student, resolved_recipe)
               if resolved_recipe.needs_attention else [],
               "recipe": resolved_recipe.describe(), "data": source.describe(),
               "gradient_checkpointing": gradient_checkpointing}
        trainer = DiffusersTrainer(
            student, teacher, source, out, config, recipe=resolved_recipe, family=family,
            handle=handle, teacher_hash=teacher_hash, shift=shift, identity=identity,
            info={"method": method, "model_path": origin, "distill": doc},
            dist_info=info, student_extra={"model_path": origin, "objective": family.objective,
                                           "shift": shift, "tapped": doc["tapped"]},
            sharded=sharded)
        return trainer.run(resume=resume, force=force)
    finally:
        _dist.teardown(info)


def _zoo_entry(model: str, data: str):
    """``--model ZOO``: the entry, and data that needs no pipeline."""
    entry = get_diffusers_config(model)
    family = get_family(entry.family)
    if family.encode is None:
        raise ValueError(f"--model {entry.name}: {family.name} has no text pipeline to distil "
                         f"(families: {', '.join(PIPELINE_FAMILIES)})")
    if data == "self":
        raise ValueError(f"--model {entry.name}: --data self needs the pipeline's text encoders "
                         "and VAE; pass --model-path PIPELINE_DIR, or --data random / a "
                         ".safetensors of latents and text embeddings")
    return entry


def random_source(entry, shapes, count: int, *, seed: int) -> LatentTextSource:
    """``--data random``: ``count`` random latents and text inputs at the entry's true shapes
    (a random teacher's memory and throughput need no real data)."""
    inputs = make_inputs(entry, shapes, batch=count,
                         generator=torch.Generator().manual_seed(seed))
    text = {k: inputs[k] for k in TEXT_INPUTS if k in inputs}
    h, w = shapes.resolution
    meta = {"height": h, "width": w, "frames": shapes.frames, "guidance": 3.5}
    return LatentTextSource(inputs["hidden_states"], text, meta,
                            origin=f"random latents and text at {entry.name}'s shapes")


def _self_data(out: Path, pipe, family: Family, prompt_list: list[str], config: TrainConfig,
               info, teacher_hash: str, *, count: int, steps: int, guidance: float,
               height: int, width: int, frames: int | None, max_len: int) -> LatentTextSource:
    """``--data self``: the teacher pipeline's latents, written once and reused by
    ``--resume`` when they were made the same way."""
    key = {"teacher_config_sha256": teacher_hash, "count": count, "seed": config.seed,
           "steps": steps, "guidance": guidance, "height": height, "width": width,
           "frames": frames, "max_sequence_length": max_len,
           "prompts_sha256": hashlib.sha256("\n".join(prompt_list).encode()).hexdigest()}
    path = out / SELF_FILE
    if path.is_file():
        try:
            cached = LatentTextSource.load(path)
            if cached.meta.get("key") == key:
                return cached
        except ValueError:
            pass
    source = generate_latents(pipe, family, prompt_list, count, seed=config.seed, steps=steps,
                              guidance=guidance, height=height, width=width, frames=frames,
                              max_len=max_len, info=info, progress=config.progress)
    source.meta["key"] = key
    if info.is_main:
        source.save(path)
    return source


def student_of(teacher: nn.Module, method: str, options: dict[str, Any], family: Family,
               trainable: str, *, seed: int = 0):
    """The student: a copy of ``teacher`` with ``method``'s attention, whose trainable
    parameters train in float32 and whose frozen ones *are* the teacher's tensors (equal
    values, frozen on both sides): beyond its teacher a student costs only its trainable
    parameters (FLUX.1-dev with ``--trainable attention``: 2.5 of its 11.9 billion).
    What it does not inherit (the method's new parameters, re-initialised projections) is
    drawn from ``seed`` (the global generator left as it was), as ``convert``'s DiT
    students are: the same student in every run. Returns ``(student, swap handle)``."""
    student = copy.deepcopy(teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        handle = swap_attention(student, method, **options)
    chosen = set(trainable_names(student, family, trainable))
    stock = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        ref = stock.get(name)
        if name not in chosen and ref is not None and ref.shape == p.shape:
            p.data = ref.data
        elif p.dtype != torch.float32:
            p.data = p.data.float()
    return student, handle
