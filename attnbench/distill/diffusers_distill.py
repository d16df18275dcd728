"""``distill --model-path DIR``: distil a diffusers transformer with its family's objective.

The student is the pipeline's transformer with ``swap_attention`` (the
method's conversion recipe decides what is inherited); the teacher is the same
transformer, frozen, in the run's dtype. Both read the same text-encoder
outputs (stored with the latents: only the transformer is ever trained). The
loss is the recipe's, computed the family's way (``diffusers_objective.py``).
The trainer is attnbench's (``trainer.py``: torchrun DDP, SIGINT saves,
``--resume``, the run-folder lock, the progress bar); this module plugs the
family's batches, trainable set and student export into it.

Data (``--data``):

* ``self`` -- the teacher pipeline generates latents from the prompt file (its
  own scheduler, steps and guidance: CLEAR's protocol), one seed per sample so
  any number of ranks makes the same set; written once to
  ``OUT/teacher_latents.safetensors`` and reused by ``--resume``;
* a ``.safetensors`` file (or a folder holding one) with ``latents`` (in the
  transformer's input layout, as the pipeline's ``output_type="latent"`` gives
  them) and the text inputs by the transformer's argument names
  (``encoder_hidden_states``, ``pooled_projections``, ``encoder_attention_mask``),
  and ``height``/``width`` (``frames``) in its metadata.

Output: ``OUT/student/`` (``student.safetensors``: the changed and new tensors;
``student.json``), ``checkpoint.pt``, ``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.prompts import read_prompts
from ..integrations.diffusers.families import Family, draw_sigmas, flow_shift
from ..integrations.diffusers.swap import kd_attn_modules
from . import dist as _dist
from .diffusers_objective import (
    DiffusersBatch,
    diffusers_losses,
    trainable_names,
)
from .recipes import DistillRecipe, get_recipe, recipe_for
from .trainer import TrainConfig, Trainer, check_out, step_seed

SELF_FILE = "teacher_latents.safetensors"
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
        from safetensors.torch import save

        from .io import atomic_write_bytes

        tensors = {"latents": self.x.contiguous(), **{k: v.contiguous()
                                                      for k, v in self.text.items()}}
        meta = {k: json.dumps(v) for k, v in self.meta.items()}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, flag: str = "--data") -> LatentTextSource:
        from safetensors import safe_open

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


def text_length(pipe, family: Family, requested: int | None = None) -> int:
    """The prompt length: ``requested``, else the family's, capped by the tokenizers'."""
    if requested is not None:
        return requested
    caps = [getattr(pipe, name).model_max_length for name in ("tokenizer", "tokenizer_2",
                                                               "tokenizer_3")
            if getattr(pipe, name, None) is not None]
    caps = [c for c in caps if isinstance(c, int) and c < 10**6]
    return min([family.sampling.max_sequence_length, *([max(caps)] if caps else [])])


@torch.no_grad()
def generate_latents(pipe, family: Family, prompts: list[str], count: int, *, seed: int,
                     steps: int, guidance: float, height: int, width: int,
                     frames: int | None, max_len: int, info: _dist.DistInfo,
                     progress: bool = False) -> LatentTextSource:
    """``count`` teacher latents (prompt ``i mod len``, seed ``(seed, i)``) + text inputs."""
    mine = list(range(info.rank, count, info.world_size))
    device = pipe.transformer.device
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
              output_type="latent", max_sequence_length=max_len, **family.call_kwargs)
    if family.video:
        kw["num_frames"] = frames
    xs, texts = [], []
    rows = mine
    if progress and info.is_main:
        from tqdm.auto import tqdm

        rows = tqdm(mine, desc=f"teacher latents ({count}, {steps} steps)", leave=False)
    for i in rows:
        prompt = prompts[i % len(prompts)]
        g = torch.Generator(device).manual_seed(step_seed(seed, i, stream=SAMPLE_STREAM))
        xs.append(pipe(prompt=prompt, generator=g, **kw)[0].cpu())
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
    """The token grid of one latent (FLUX's packed tokens ``[1, T, C]`` need it from the
    pixel size: each token covers VAE factor × 2 pixels a side, 16 for FLUX's own VAE)."""
    if family.name == "flux":
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
                 dist_info: _dist.DistInfo, student_extra: dict[str, Any]) -> None:
        from ..diffusion import Diffusion

        self.family, self.handle, self.teacher_hash = family, handle, teacher_hash
        self.shift, self.student_extra = shift, student_extra
        diffusion = Diffusion(1000) if family.objective == "eps_vb" else None
        super().__init__(student, diffusion, source, out, config, recipe=recipe,
                         teacher=teacher, identity=identity, info=info, eval_data=None,
                         num_train=len(source), export_name=STUDENT_DIR, dist_info=dist_info)

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

    def trainable_names(self, model: nn.Module) -> set[str]:
        return set(trainable_names(model, self.family, self.recipe.trainable))

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return json.loads(json.dumps(dict(model.config), default=list))

    def export(self, exported: nn.Module) -> Path:
        from ..integrations.diffusers.student import WEIGHTS, save_student

        folder = self.out / STUDENT_DIR
        save_student(folder, exported, self.handle, self.teacher.state_dict(),
                     recipe=self.recipe.to_dict(), teacher_hash=self.teacher_hash,
                     extra=self.student_extra)
        return folder / WEIGHTS


# --------------------------------------------------------------------------- the job


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def distill_pipeline(
    out: str | Path, method: str, config: TrainConfig, *, model_path: str | Path,
    options: dict[str, Any] | None = None, weights: dict[str, Any] | None = None,
    trainable: str | None = None, recipe: str | None = None, data: str = "self",
    prompts: str | Path | None = None,
    gen_samples: int = 64, gen_steps: int | None = None, gen_guidance: float | None = None,
    height: int | None = None, width: int | None = None, frames: int | None = None,
    max_sequence_length: int | None = None, device: str | None = None,
    resume: bool = False, force: bool = False, gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Distil the transformer of the pipeline in ``model_path`` (module docstring)."""
    from ..integrations.diffusers.pipelines import check_pipeline, check_size, config_hash
    from ..integrations.diffusers.swap import swap_attention

    out = Path(out)
    root, family = check_pipeline(model_path)
    prompt_list = read_prompts(prompts) if data == "self" else None
    source = None if data == "self" else LatentTextSource.load(data)
    s = family.sampling
    if data == "self":
        from ..models.diffusers_configs import FAMILY_DEFAULTS

        default_h, default_w = FAMILY_DEFAULTS[family.name]["default_res"]
        height, width = height or default_h, width or default_w
        frames = frames if frames is not None else (s.frames if family.video else None)
    else:
        height, width = int(source.meta["height"]), int(source.meta["width"])
        frames = source.meta.get("frames")
    check_size(root, family, height, width, frames)
    chosen = get_recipe(recipe) if recipe else recipe_for(method)
    resolved_recipe: DistillRecipe = chosen.with_overrides(weights, trainable)
    from .. import attention

    # the recipe's method options (SLA: topk 0.1) unless given
    resolved = attention.get(method).resolve({**chosen.options, **(options or {})}, mixer=True)
    check_out(out, resume=resume, force=force)  # before minutes of sample generation
    info = _dist.setup(device)
    try:
        from ..integrations.diffusers.pipelines import load_pipeline

        dtype = torch.bfloat16 if config.precision == "bf16" and info.device.type == "cuda" \
            else None
        pipe, _ = load_pipeline(root, device=info.device, dtype=dtype)
        teacher = pipe.transformer.eval().requires_grad_(False)
        teacher_hash = config_hash(teacher)
        max_len = text_length(pipe, family, max_sequence_length)
        steps = gen_steps or s.steps
        guidance = s.guidance if gen_guidance is None else gen_guidance
        if data == "self":
            key = {"teacher_config_sha256": teacher_hash, "count": gen_samples,
                   "seed": config.seed, "steps": steps, "guidance": guidance, "height": height,
                   "width": width, "frames": frames, "max_sequence_length": max_len,
                   "prompts_sha256": hashlib.sha256("\n".join(prompt_list).encode()).hexdigest()}
            path = out / SELF_FILE
            if path.is_file():
                try:
                    cached = LatentTextSource.load(path)
                    source = cached if cached.meta.get("key") == key else None
                except ValueError:
                    source = None
            if source is None:
                source = generate_latents(pipe, family, prompt_list, gen_samples,
                                          seed=config.seed, steps=steps, guidance=guidance,
                                          height=height, width=width, frames=frames,
                                          max_len=max_len, info=info, progress=config.progress)
                source.meta["key"] = key
                if info.is_main:
                    source.save(path)
        student = _student_copy(teacher)
        handle = swap_attention(student, method, **resolved)
        if resolved_recipe.needs_attention:
            swap_attention(teacher, "softmax")  # the stock output, with a core to tap
        if gradient_checkpointing:
            student.enable_gradient_checkpointing()
        shift = flow_shift(dict(pipe.scheduler.config),
                           int(torch.tensor(_grid(family, student, source.x[:1],
                                                  source.meta)).prod()))
        identity = {"kind": "distill-diffusers", "method": method, "family": family.name,
                    "attention_options": resolved, "recipe": resolved_recipe.to_dict(),
                    "teacher_config_sha256": teacher_hash,
                    "data": data if data == "self" else str(Path(data).resolve())}
        doc = {"family": family.name, "model_path": str(root), "objective": family.objective,
               "timestep_density": family.timestep_density, "shift": shift,
               "tapped": kd_attn_modules(student, resolved_recipe)
               if resolved_recipe.needs_attention else [],
               "recipe": resolved_recipe.describe(), "data": source.describe()}
        trainer = DiffusersTrainer(
            student, teacher, source, out, config, recipe=resolved_recipe, family=family,
            handle=handle, teacher_hash=teacher_hash, shift=shift, identity=identity,
            info={"method": method, "model_path": str(root), "distill": doc},
            dist_info=info, student_extra={"model_path": str(root), "objective": family.objective,
                                           "shift": shift, "tapped": doc["tapped"]})
        return trainer.run(resume=resume, force=force)
    finally:
        _dist.teardown(info)


def _student_copy(teacher: nn.Module) -> nn.Module:
    """A trainable float copy of the teacher's transformer (its own parameters)."""
    import copy

    student = copy.deepcopy(teacher)
    return student.float() if student.dtype != torch.float32 else student
