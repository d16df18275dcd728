"""Sampling for evaluation: DiT's protocol, seeded chunks, torchrun, ADM-format ``.npz``.

The sampler is :class:`attnbench.diffusion.Diffusion` (ancestral DDPM on a
respaced subset of the 1000 training steps -- DiT's 250 -- or DDIM, with
classifier-free guidance on the first three channels as DiT does, or on all
channels). Its module explains why it is not diffusers' scheduler: diffusers
imports torchvision and has no IIDPM learned-range variance sampler with DiT's
respacing; this module is the thin layer that turns it into an evaluation run.

Seeds: the ``N`` samples are cut into chunks of ``batch``; chunk ``c`` draws its
labels and every noise tensor from its own generator, seeded from
``(seed, c)``. Under ``torchrun`` rank ``r`` of ``W`` samples the chunks
``c ≡ r (mod W)`` -- DiT's ``sample_ddp.py`` gives each rank its own seed; here
each chunk has one, so the union over any number of ranks is *identical* to a
single-process run with the same ``seed`` and ``batch`` (tests/metrics check it).

Output (:func:`run_sampling`): ``DIR/000000.png ...``, ``DIR/samples.npz`` with
``arr_0`` (uint8 ``N × H × W × 3``, ADM's evaluator format) and ``arr_1``
(labels), and ``DIR/samples.json`` (how they were made). Latent models are
decoded through a VAE given by path (diffusers' ``AutoencoderKL`` folder).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import runfolder
from ..cliutil import check_number
from ..common import dist
from ..data.images import save_png
from ..data.shapes import NUM_CLASSES, TASKS, task_labels, to_uint8
from ..diffusion import SAMPLERS, Diffusion
from ..diffusion.sampling import sample_images
from ..models import load_dit
from ..models.teacher import default_teacher_path

NPZ_FILE = "samples.npz"
INFO_FILE = "samples.json"
SHARD_DIR = ".shards"
#: finished chunks of a run not yet merged into samples.npz (what a resume keeps)
CHUNK_DIR = ".chunks"
LABEL_MODES = ("uniform", "balanced")


@dataclass
class SampleSettings:
    """How samples are drawn. ``cfg_channels`` 3 = DiT's quirk, ``None`` = all channels."""

    num: int
    steps: int | str = 250
    cfg_scale: float = 1.5
    sampler: str = "ddpm"
    eta: float = 0.0
    cfg_channels: int | None = 3
    batch: int = 64
    seed: int = 0
    labels: str | list[int] = "uniform"
    clip_denoised: bool | None = None  # None: clip x̂_0 for pixel models (3 channels)

    def __post_init__(self) -> None:
        if isinstance(self.num, bool) or not isinstance(self.num, int) or self.num <= 0:
            raise ValueError(f"the number of samples must be a positive integer, got {self.num!r}")
        if self.batch <= 0:
            raise ValueError(f"the batch size must be positive, got {self.batch}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        check_number("--cfg", self.cfg_scale, low=1,
                     example="1.5: the CFG scale; 1 = no guidance")
        check_number("--eta", self.eta, low=0, high=1, example="0 = deterministic DDIM")
        if self.cfg_channels is not None:
            check_number("--cfg-channels", self.cfg_channels, low=1, integer=True, example="3")
        if isinstance(self.labels, str) and self.labels not in LABEL_MODES:
            raise ValueError(f"unknown label mode {self.labels!r}; valid: "
                             f"{', '.join(LABEL_MODES)} or a list of labels")
        if not isinstance(self.labels, str) and not len(self.labels):
            raise ValueError(f"--labels is empty: give {' or '.join(LABEL_MODES)}, or "
                             "comma-separated label ids")

    def check_model(self, config) -> None:
        """Refuse settings this model cannot take (before sampling: every given label, even
        one past ``num``, and the guided channels)."""
        who = config.name or "the model"
        if self.cfg_channels is not None and self.cfg_channels > config.in_channels:
            raise ValueError(f"--cfg-channels {self.cfg_channels}: {who} has "
                             f"{config.in_channels} channels (give 1 to {config.in_channels}, "
                             "or all)")
        if not isinstance(self.labels, str):
            bad = [y for y in self.labels if not 0 <= int(y) < config.num_classes]
            if bad:
                raise ValueError(f"--labels {bad[0]}: {who} has labels 0 to "
                                 f"{config.num_classes - 1}")

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        if not isinstance(self.labels, str):
            data["labels"] = f"{len(self.labels)} given labels"
        data["cfg_channels"] = "all" if self.cfg_channels is None else self.cfg_channels
        data["seeds"] = "one generator per chunk of `batch`, seeded from (seed, chunk)"
        return data


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` (independent of the number of processes)."""
    state = np.random.SeedSequence([int(seed), int(chunk)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def chunk_ranges(num: int, batch: int) -> list[range]:
    return [range(s, min(s + batch, num)) for s in range(0, num, batch)]


def balanced_labels(n: int, num_classes: int = NUM_CLASSES) -> list[int]:
    """``n`` labels cycling over GenEval's six tasks (shapes world), else over the classes."""
    if num_classes != NUM_CLASSES:
        return [i % num_classes for i in range(n)]
    members = [task_labels(t) for t in TASKS]
    return [members[i % len(TASKS)][(i // len(TASKS)) % len(members[i % len(TASKS)])]
            for i in range(n)]


# --------------------------------------------------------------------------- VAE


def load_vae(path: str | Path, device: torch.device | str = "cpu"):
    """A diffusers ``AutoencoderKL`` from a local folder (never a hub download)."""
    path = check_vae(path)
    diffusers = import_diffusers()
    return diffusers.AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(
        device).eval()


def check_vae(path: str | Path, model_config=None) -> Path:
    """``--vae PATH`` is a diffusers AutoencoderKL folder (its ``config.json`` says so), and a
    model given is a latent one that needs it; checked before any weights are read."""
    path = Path(path).expanduser()
    if not str(path).strip() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"--vae {path}: not a diffusers AutoencoderKL folder (no "
                                "config.json); e.g. save stabilityai/sd-vae-ft-ema there")
    try:
        document = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        document = None
    kind = document.get("_class_name") if isinstance(document, dict) else None
    if kind != "AutoencoderKL":
        raise ValueError(f"--vae {path}: its config.json describes "
                         f"{kind or 'no diffusers class'}, not an AutoencoderKL (give the "
                         "VAE's folder, e.g. sd-vae-ft-ema)")
    if model_config is not None and model_config.is_pixel:
        raise ValueError(f"--vae {path}: {model_config.name or 'the model'} samples pixels "
                         f"({model_config.in_channels} channels), not latents: leave --vae out")
    return path


def import_diffusers():
    """``diffusers`` (optional; it imports torchvision, so the workaround of
    :mod:`attnbench.torchvision_compat` comes first)."""
    from ..torchvision_compat import import_torchvision

    import_torchvision()
    try:
        import diffusers
    except ImportError:
        raise ImportError("decoding latents needs diffusers: pip install diffusers") from None
    return diffusers


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images in [-1, 1] (DiT: ``vae.decode(z / 0.18215).sample``)."""
    scale = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
    with torch.no_grad():
        return vae.decode(latents.to(next(vae.parameters()).dtype) / scale).sample.float()


# --------------------------------------------------------------------------- sampling


class _TimedModel:
    """The model, with the wall time of each call recorded (CUDA-synchronised)."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = getattr(model, "config", None)
        self.seconds: list[float] = []

    def parameters(self):
        return self.model.parameters()

    def __call__(self, x, t, y):
        sync = x.is_cuda
        if sync:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        out = self.model(x, t, y)
        if sync:
            torch.cuda.synchronize(x.device)
        self.seconds.append(time.perf_counter() - start)
        return out


def sample_chunk(model, settings: SampleSettings, chunk: int, *, device: torch.device | str,
                 vae=None, diffusion: Diffusion | None = None,
                 timer: _TimedModel | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``chunk`` of a run: ``(uint8 images [n, H, W, 3], labels [n])``."""
    config = model.config
    rows = chunk_ranges(settings.num, settings.batch)[chunk]
    g = torch.Generator(device="cpu").manual_seed(chunk_seed(settings.seed, chunk))
    if isinstance(settings.labels, str) and settings.labels == "uniform":
        y = torch.randint(0, config.num_classes, (len(rows),), generator=g)
    else:
        given = (balanced_labels(settings.num, config.num_classes)
                 if settings.labels == "balanced" else settings.labels)
        y = torch.tensor([int(given[i % len(given)]) for i in rows], dtype=torch.long)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= config.num_classes):
        raise ValueError(f"labels must lie in [0, {config.num_classes}) for this model")
    pixel = config.is_pixel
    if not pixel and vae is None:
        raise ValueError(f"the model samples {config.in_channels}-channel latents: pass --vae "
                         "PATH (a diffusers AutoencoderKL folder, e.g. sd-vae-ft-ema) to "
                         "decode them")
    x = sample_images(timer or model, y, steps=settings.steps, sampler=settings.sampler,
                      cfg_scale=settings.cfg_scale, cfg_channels=settings.cfg_channels,
                      eta=settings.eta, clip_denoised=settings.clip_denoised, generator=g,
                      diffusion=diffusion, device=device)
    if not pixel:
        x = decode(vae, x)
    return to_uint8(x.cpu()), y.numpy()


def generate(model, settings: SampleSettings, *, device: torch.device | str = "cpu",
             rank: int = 0, world_size: int = 1, vae=None, progress: bool = False,
             on_chunk: Callable[[range, np.ndarray, np.ndarray], None] | None = None,
             done: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Any]:
    """This rank's chunks: ``{"indices", "images", "labels", "seconds", "step_seconds"}``.

    ``done`` maps a chunk's first index to its ``(images, labels)`` drawn before (a
    resumed run): those chunks are taken as they are, not drawn again.
    """
    chunks = [c for c in range(len(chunk_ranges(settings.num, settings.batch)))
              if c % world_size == rank]
    ranges = chunk_ranges(settings.num, settings.batch)
    timer = _TimedModel(model)
    diffusion = Diffusion(1000)
    images, labels, indices = [], [], []
    iterator = chunks
    if progress:
        iterator = tqdm(chunks, desc=f"sampling ({settings.sampler}, {settings.steps} steps)",
                        unit="batch")
    start = time.perf_counter()
    for c in iterator:
        if done and ranges[c].start in done:
            imgs, ys = done[ranges[c].start]
        else:
            imgs, ys = sample_chunk(model, settings, c, device=device, vae=vae,
                                    diffusion=diffusion, timer=timer)
            if on_chunk is not None:
                on_chunk(ranges[c], imgs, ys)
        images.append(imgs)
        labels.append(ys)
        indices.extend(ranges[c])
    config = model.config
    side = config.input_size * (1 if config.is_pixel else 8)
    return {
        "indices": np.array(indices, dtype=np.int64),
        "images": np.concatenate(images) if images else np.zeros((0, side, side, 3), np.uint8),
        "labels": np.concatenate(labels) if labels else np.zeros((0,), np.int64),
        "seconds": time.perf_counter() - start,
        "step_seconds": timer.seconds,
    }


def save_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """ADM's sample format: ``arr_0`` uint8 ``N × H × W × 3`` (and ``arr_1`` labels)."""
    arrays = [images] if labels is None else [images, np.asarray(labels, dtype=np.int64)]

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, *arrays)

    return runfolder.atomic_write(path, write)


def _identity(ckpt, model, settings: SampleSettings, vae_path, png: bool) -> dict[str, Any]:
    """What a resumed ``sample`` must share with the run it continues."""
    return json.loads(json.dumps({
        **settings.describe(), "labels": settings.labels,
        "checkpoint": str(ckpt), "checkpoint_sha256": checkpoint_sha256(model),
        "vae": str(vae_path) if vae_path else None, "png": png}, default=str))


def _chunk_file(out: Path, rows: range) -> Path:
    return out / CHUNK_DIR / f"chunk{rows.start:09d}.npz"


#: the files and folder a ``sample`` run claims in its ``--out``
_OUTPUTS = (NPZ_FILE, INFO_FILE, CHUNK_DIR)


def _prepare_out(out: Path, identity: dict[str, Any], *, force: bool
                 ) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
    """Check ``out`` for this ``sample`` run; the chunks an interrupted run of it left.

    An empty folder starts a run; a folder of an interrupted run with the same
    identity resumes it (its finished chunks are kept); a finished one returns
    None (nothing to do); anything else needs ``--force``, which starts over.
    """
    mine = [p for p in out.iterdir() if p.name not in runfolder.BOOKKEEPING] \
        if out.is_dir() else []
    try:
        saved = json.loads((out / INFO_FILE).read_text())
    except (OSError, ValueError):
        saved = None
    ours = isinstance(saved, dict) and "identity" in saved
    if mine and not force:
        runfolder.claim_files(out, _OUTPUTS, kind="samples", ours=lambda _path: ours)
        if not ours:
            raise ValueError(f"--out {out} is not empty and holds no sample run of attnbench: "
                             "choose a new directory, or pass --force to write into it")
        if saved["identity"] != identity:
            differ = sorted(k for k in set(identity) | set(saved["identity"])
                            if identity.get(k) != saved["identity"].get(k))
            raise ValueError(f"--out {out} holds samples drawn with other settings "
                             f"({', '.join(differ)} differ): repeat the original command to "
                             "resume, pass --force to start over, or choose another directory")
        if saved.get("status") == "done" and (out / NPZ_FILE).is_file():
            return None
        done = {}
        for path in sorted((out / CHUNK_DIR).glob("chunk*.npz")):
            with np.load(path, allow_pickle=False) as data:
                done[int(path.stem[5:])] = (data["images"], data["labels"])
        return done
    return {}


def _start_run(out: Path, identity: dict[str, Any]) -> None:
    """Rank 0 claims ``out``'s outputs, clears an earlier run's and records this run's
    identity. Called after every rank has checked ``out`` (:func:`_prepare_out` only
    reads), so no rank inspects the folder while it is being written."""
    if not runfolder.is_rank_zero():
        return
    runfolder.claim_files(out, _OUTPUTS, kind="samples", force=True)
    for name in (NPZ_FILE, INFO_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / CHUNK_DIR, ignore_errors=True)
    runfolder.atomic_write(out / INFO_FILE, json.dumps(
        {"status": "running", "identity": identity}, indent=2) + "\n")


def claim_out(out: str | Path, force: bool) -> Path:
    """``--out`` locked for this sampling run: a directory, empty unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    runfolder.lock_folder(out, "sample")
    if out.is_dir() and any(p.name not in runfolder.BOOKKEEPING for p in out.iterdir()) \
            and not force:
        raise ValueError(f"--out {out} is not empty: choose a new directory or pass --force")
    return out


def run_sampling(ckpt: str | Path | None, settings: SampleSettings, out: str | Path, *,
                 device: str | None = None, vae_path: str | Path | None = None,
                 png: bool = True, force: bool = False, progress: bool = True,
                 argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m attnbench sample``: one process or every torchrun rank (module docstring).

    Each finished chunk is kept in ``OUT/.chunks/``: the same command run again
    after an interruption resumes (drawing only the missing chunks, whose seeds
    do not depend on what was drawn before); ``force`` starts over.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    runfolder.lock_folder(out, "sample")
    if ckpt is None:
        ckpt = default_teacher_path()
    if vae_path is not None:
        check_vae(vae_path)
    info = dist.setup(device)
    try:
        model = load_dit(ckpt, device=info.device)
        settings.check_model(model.config)
        if vae_path is not None:
            check_vae(vae_path, model.config)
        identity = _identity(ckpt, model, settings, vae_path, png)
        done = _prepare_out(out, identity, force=force)
        if done is None:
            print(f"attnbench sample: {out} already holds these {settings.num} samples: "
                  "nothing to do (--force draws them again)", file=sys.stderr)
            return json.loads((out / INFO_FILE).read_text())
        if done:
            print(f"attnbench sample: resuming {out}: {len(done)} chunk(s) already drawn",
                  file=sys.stderr)
        vae = load_vae(vae_path, info.device) if vae_path else None
        dist.barrier(info)  # every rank checked --out before any writes
        if not done:
            _start_run(out, identity)
            dist.barrier(info)  # the folder is ready before any rank writes a chunk

        def keep_chunk(rows: range, imgs: np.ndarray, labels: np.ndarray) -> None:
            if png:
                for i, image in zip(rows, imgs, strict=True):
                    save_png(out / f"{i:06d}.png", image)
            buf = io.BytesIO()
            np.savez(buf, images=imgs, labels=labels)
            runfolder.atomic_write(_chunk_file(out, rows), buf.getvalue())

        mine = generate(model, settings, device=info.device, rank=info.rank,
                        world_size=info.world_size, vae=vae,
                        progress=progress and info.is_main, on_chunk=keep_chunk, done=done)
        out.mkdir(parents=True, exist_ok=True)
        images, labels = gather_samples(out, mine, info, settings.num)
        summary: dict[str, Any] = {}
        if info.is_main:
            npz = save_npz(out / NPZ_FILE, images, labels)
            summary = {
                "samples": str(npz), "num": settings.num, "image_shape": list(images.shape[1:]),
                "checkpoint": str(ckpt), "checkpoint_sha256": checkpoint_sha256(model),
                "model": model.config.name,
                "attention": model.config.attention, "settings": settings.describe(),
                "world_size": info.world_size, "device": str(info.device),
                "vae": str(vae_path) if vae_path else None, "png": png,
                "seconds_rank0": round(mine["seconds"], 3),
                "command": " ".join(["python -m attnbench", *(argv or [])]),
                "status": "done", "identity": _identity(ckpt, model, settings, vae_path, png),
            }
            runfolder.atomic_write(out / INFO_FILE, json.dumps(summary, indent=2, default=str)
                                   + "\n")
            shutil.rmtree(out / CHUNK_DIR, ignore_errors=True)
        dist.barrier(info)
        return summary
    finally:
        dist.teardown(info)


def gather_samples(out: Path, mine: dict[str, Any], info, num: int
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Every rank's samples (``indices``, ``images``, ``labels``) on rank 0 in index order,
    through shard files in ``out``; ``(None, None)`` on the other ranks."""
    if info.enabled:
        shard = out / SHARD_DIR / f"rank{info.rank:03d}.npz"
        buf = io.BytesIO()
        np.savez(buf, indices=mine["indices"], images=mine["images"], labels=mine["labels"])
        runfolder.atomic_write(shard, buf.getvalue())
    dist.barrier(info)
    if not info.is_main:
        return None, None
    return _merge(out, mine, info.world_size, num)


def _merge(out: Path, mine: dict[str, Any], world_size: int, num: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's samples in global index order (rank 0's own when alone)."""
    if world_size == 1:
        order = np.argsort(mine["indices"])
        return mine["images"][order], mine["labels"][order]
    parts = []
    for r in range(world_size):
        path = out / SHARD_DIR / f"rank{r:03d}.npz"
        with np.load(path, allow_pickle=False) as data:
            parts.append((data["indices"], data["images"], data["labels"]))
        path.unlink()
    (out / SHARD_DIR).rmdir()
    indices = np.concatenate([p[0] for p in parts])
    images = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    order = np.argsort(indices)
    if not np.array_equal(indices[order], np.arange(num)):
        raise RuntimeError("the ranks' samples do not cover every index exactly once")
    return images[order], labels[order]


def checkpoint_sha256(model) -> str | None:
    """The sha256 of the file a model was loaded from (``load_dit`` records it), if any."""
    info = getattr(model, "checkpoint", None)
    try:
        return info.sha256() if info is not None else None
    except OSError:
        return None
