"""``sample --model-path PIPELINE_DIR [--student DIR]``: samples of a stock diffusers pipeline.

The pipeline is loaded from its local folder (``from_pretrained(...,
local_files_only=True)``, safetensors only), the student's attention and
trained tensors go into ``pipe.transformer`` (:func:`load_student`), and the
pipeline samples with its own scheduler and guidance (steps, guidance and size
are flags with the family's usual values as defaults).

Pairing: sample ``i`` is prompt ``i mod len(prompts)`` with its own generator
seeded from ``(seed, i)`` (:func:`.sample.chunk_seed`) and is drawn alone, so a
teacher run and a student run with the same flags pair up image by image, and
the samples do not depend on the number of processes: under torchrun rank ``r``
of ``W`` draws ``i ≡ r (mod W)`` and the union equals a one-process run.

Output: ``OUT/000000.png ...`` (video: the first frame), ``OUT/samples.npz``
(``arr_0`` uint8 ``N × H × W × 3``, or ``N × F × H × W × 3`` for video;
``arr_1`` the prompt index), ``OUT/prompts.jsonl`` (index, prompt, seed) and
``OUT/samples.json`` (how they were made).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import runfolder
from ..cliutil import UsageError, non_empty, number, positive_int
from ..common import dist
from ..data.images import save_png
from ..data.prompts import read_prompts
from .sample import INFO_FILE, NPZ_FILE, chunk_seed, claim_out, gather_samples, save_npz

PROMPTS_FILE = "prompts.jsonl"


def _to_uint8(images) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    return np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)


def check_sampling(model_path, *, student=None, prompts=None, num: int, height=None,
                   width=None, frames=None):
    """Every flag checked before any weight loads: ``(root, family, prompts, size, meta)``."""
    # lazy: diffusers is an optional extra (the integrations import it)
    from ..integrations.diffusers.pipelines import check_pipeline, check_size, transformer_config
    from ..integrations.diffusers.student import student_for

    if isinstance(num, bool) or not isinstance(num, int) or num <= 0:
        raise UsageError(f"--num {num!r}: must be an integer > 0 (e.g. --num 16)")
    root, family = check_pipeline(model_path)
    prompt_list = read_prompts(prompts)
    default_h, default_w = family.default_res
    height, width = height or default_h, width or default_w
    if family.video:
        frames = frames or family.sampling.frames
    elif frames is not None:
        raise UsageError(f"--frames: {family.name} is an image model (frames are for Wan)")
    check_size(root, family, height, width, frames)
    meta = None
    if student is not None:
        _, meta = student_for(student, family.name, transformer_config(root))
    return root, family, prompt_list, (height, width, frames), meta


def run_pipeline_sampling(model_path, out, *, student=None, prompts=None, num: int,
                          seed: int = 0, steps: int | None = None,
                          guidance: float | None = None, height: int | None = None,
                          width: int | None = None, frames: int | None = None,
                          max_sequence_length: int | None = None, device: str | None = None,
                          png: bool = True, force: bool = False, progress: bool = True,
                          argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m attnbench sample --model-path``: one process or every torchrun rank."""
    # lazy: diffusers is an optional extra (the integrations import it)
    from ..integrations.diffusers.pipelines import load_pipeline, text_length
    from ..integrations.diffusers.student import load_student

    root, family, prompt_list, (height, width, frames), _ = check_sampling(
        model_path, student=student, prompts=prompts, num=num, height=height, width=width,
        frames=frames)
    out = claim_out(out, force)
    info = dist.setup(device)
    try:
        pipe, _ = load_pipeline(root, device=info.device)
        described = None
        if student is not None:
            described = load_student(pipe.transformer, student).describe()
        s = family.sampling
        steps = steps or s.steps
        guidance = s.guidance if guidance is None else guidance
        max_len = text_length(pipe, family, max_sequence_length)
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                  output_type="np", max_sequence_length=max_len, **family.call_kwargs)
        if family.video:
            kw["num_frames"] = frames
        dist.barrier(info)  # every rank checked --out before any writes
        mine_idx = list(range(info.rank, num, info.world_size))
        rows = mine_idx
        if progress and info.is_main:
            rows = tqdm(mine_idx, desc=f"sampling ({num}, {steps} steps)")
        started = time.perf_counter()
        images = []
        out.mkdir(parents=True, exist_ok=True)
        for i in rows:
            g = torch.Generator(info.device).manual_seed(chunk_seed(seed, i))
            with torch.no_grad():
                result = pipe(prompt=prompt_list[i % len(prompt_list)], generator=g, **kw)[0]
            image = _to_uint8(result[0])
            images.append(image)
            if png:
                save_png(out / f"{i:06d}.png", image[0] if family.video else image)
        mine = {"indices": np.asarray(mine_idx, dtype=np.int64),
                "images": np.stack(images) if images else np.zeros((0,), np.uint8),
                "labels": np.asarray([i % len(prompt_list) for i in mine_idx], dtype=np.int64),
                "seconds": time.perf_counter() - started}
        all_images, labels = gather_samples(out, mine, info, num)
        summary: dict[str, Any] = {}
        if info.is_main:
            npz = save_npz(out / NPZ_FILE, all_images, labels)
            lines = [json.dumps({"index": i, "prompt": prompt_list[i % len(prompt_list)],
                                 "seed": chunk_seed(seed, i)}) for i in range(num)]
            runfolder.atomic_write(out / PROMPTS_FILE, "\n".join(lines) + "\n")
            summary = {
                "samples": str(npz), "num": num, "image_shape": list(all_images.shape[1:]),
                "model_path": str(root), "family": family.name, "pipeline": family.pipeline,
                "student": str(student) if student else None, "attention": described,
                "method": described["method"] if described else "teacher",
                "settings": {"steps": steps, "guidance": guidance, "height": height,
                             "width": width, "frames": frames, "seed": seed,
                             "max_sequence_length": max_len,
                             "scheduler": type(pipe.scheduler).__name__,
                             "seeds": "sample i: its own generator seeded from (seed, i)"},
                "world_size": info.world_size, "device": str(info.device), "png": png,
                "seconds_rank0": round(mine["seconds"], 3),
                "command": " ".join(["python -m attnbench", *(argv or [])]),
            }
            runfolder.atomic_write(out / INFO_FILE,
                                   json.dumps(summary, indent=2, default=str) + "\n")
        dist.barrier(info)
        return summary
    finally:
        dist.teardown(info)


def add_pipeline_flags(p, sample: bool = True) -> None:
    """The ``sample`` (``eval``: ``sample=False``) flags of a ``--model-path`` pipeline run."""
    g = p.add_argument_group("diffusers pipeline (--model-path)")
    g.add_argument("--model-path", default=None, type=non_empty("--model-path", "a folder"),
                   help="a local diffusers pipeline folder (FLUX, SD3, PixArt-Σ, SANA, Wan): "
                        "sample with its own scheduler and guidance" + (
                            "" if sample else "; with --student: sample the teacher and the "
                            "student alike into OUT/samples/ and score the pair"))
    if sample:
        g.add_argument("--model", default=None, type=non_empty("--model", "a model name"),
                       help="world-t2i: the shipped shapes-world FLUX pipeline (its 64-px size "
                            "and the world's prompts unless given)")
    g.add_argument("--student", default=None, type=non_empty("--student", "a folder"),
                   help="a student folder (distill --model-path OUT/student) installed in "
                        "the pipeline's transformer")
    g.add_argument("--prompts", default=None, type=non_empty("--prompts", "a file"),
                   help="prompt file, one per line (default: the shipped set)")
    g.add_argument("--guidance", type=number("--guidance", low=0), default=None,
                   help="the pipeline's guidance scale (default: the family's usual)")
    g.add_argument("--height", type=positive_int, default=None, help="pixels (default: family's)")
    g.add_argument("--width", type=positive_int, default=None, help="pixels (default: family's)")
    g.add_argument("--frames", type=positive_int, default=None, help="video frames (Wan)")
    g.add_argument("--max-sequence-length", type=positive_int, default=None,
                   help="prompt tokens (default: the family's, capped by the tokenizers')")


def sample_command(args) -> dict[str, Any]:
    """``sample --model-path``: the pipeline's flags, then the run."""
    if args.ckpt is not None or args.vae is not None:
        raise UsageError("--ckpt/--vae are for attnbench's DiT; with --model-path the pipeline "
                         "holds the transformer and its VAE (drop them)")
    if args.steps is not None and not isinstance(args.steps, int):
        raise UsageError(f"--steps {args.steps!r}: with --model-path give a number of steps")
    return run_pipeline_sampling(
        args.model_path, args.out, student=args.student, prompts=args.prompts, num=args.num,
        seed=args.seed, steps=args.steps, guidance=args.guidance, height=args.height,
        width=args.width, frames=args.frames, max_sequence_length=args.max_sequence_length,
        device=args.device, png=not args.no_png, force=args.force,
        progress=not args.no_progress, argv=args.argv)
