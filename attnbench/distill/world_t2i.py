"""Training the world-t2i pipeline (``python -m attnbench world --train-pipeline OUT``).

Two stages on the shapes world streamed from its seed, both with every random
choice drawn from ``(seed, step, stage)`` (:func:`~.trainer.step_seed`), so a
run resumed from its checkpoint continues bit for bit as if never stopped:

1. **VAE** (``vae_steps``): the ``AutoencoderKL`` learns to reconstruct world
   images (L1 + ``vae_kl`` × KL, decoding a sampled latent). Then the latents of
   ``STATS_IMAGES`` world images set the VAE's ``shift_factor`` (mean) and
   ``scaling_factor`` (1 / std), as FLUX's pipeline expects.
2. **Transformer** (``steps``): rectified flow as FLUX/SD3 train it: ``x_σ = (1 −
   σ) z + σ ε``, target ``ε − z``, σ logit-normal, the VAE and text encoders
   frozen; 10 % of prompts replaced by the empty prompt (so true CFG works);
   AdamW, warm-up then cosine to 0, EMA (the EMA weights ship), bf16 autocast.
   The prompts' text features come from the frozen encoders once (92 prompts).

``OUT`` holds ``run.json`` (the settings; a resume must match them),
``checkpoint.pt`` (the whole training state), ``log.jsonl`` (one row per
logged step), ``loss.png``, and ``pipeline/`` -- the EMA pipeline as
``save_pretrained(safe_serialization=True)`` writes it, with ``SHA256SUMS``
and ``training.json`` -- rewritten at every checkpoint, so any checkpoint can
be sampled; ``samples.png`` and the GenEval proxy of ``pipeline/`` at the end.
SIGINT/SIGTERM save a checkpoint and stop; ``--resume`` continues.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import runfolder
from ..data.shapes import (
    NUM_CLASSES,
    TASKS,
    ShapesWorld,
    render,
    task_labels,
    to_tensor,
    to_uint8,
)
from ..integrations.diffusers import world_t2i as w
from .io import atomic_torch_save, atomic_write_json, load_training_checkpoint
from .trainer import _sdpa_backends, _StopSignals, step_seed

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
LOSS_PNG = "loss.png"
SAMPLES_PNG = "samples.png"
PIPELINE_DIR = "pipeline"
OUTPUTS = (RUN_FILE, CHECKPOINT_FILE, LOG_FILE, LOSS_PNG, SAMPLES_PNG, PIPELINE_DIR)
#: world images whose latents set the VAE's shift and scale
STATS_IMAGES = 512
#: the streams of :func:`step_seed`: one per stage, one for the latent statistics
VAE_STREAM, FLOW_STREAM, STATS_STREAM = 1, 2, 3
#: world indices are drawn from [0, WORLD_INDICES)
WORLD_INDICES = 1 << 31


@dataclass
class WorldTrainSettings:
    """Everything that fixes a run (``run.json``; a resume must match it)."""

    config: str = "default"
    seed: int = 0
    world_seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    steps: int = 12000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 500
    weight_decay: float = 0.0
    ema: float = 0.999
    drop: float = 0.1
    grad_clip: float = 1.0
    precision: str = "bf16"
    ckpt_every: int = 200
    ckpt_minutes: float = 5.0  # also a checkpoint when this long has passed since the last
    log_every: int = 10
    eval_samples: int = 182  # two per label
    sample_steps: int = 28
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> w.WorldT2IConfig:
        return w.CONFIGS[self.config]

    def validate(self) -> None:
        if self.config not in w.CONFIGS:
            raise ValueError(f"--config {self.config!r}: choose one of {', '.join(w.CONFIGS)}")
        for name, low in (("vae_steps", 0), ("vae_batch", 1), ("steps", 1), ("batch", 1),
                          ("warmup", 0), ("ckpt_every", 1), ("log_every", 1),
                          ("eval_samples", 0), ("sample_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, "
                                 f"got {value!r}")
        for name in ("lr", "vae_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if not (self.ckpt_minutes > 0 and math.isfinite(self.ckpt_minutes)):
            raise ValueError(f"--ckpt-minutes must be > 0, got {self.ckpt_minutes}")
        if not 0 <= self.ema < 1 or not 0 <= self.drop < 1:
            raise ValueError("--ema and --drop must lie in [0, 1)")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"--precision {self.precision!r}: choose bf16 or fp32")


QUICK = dict(config="quick", vae_steps=3, vae_batch=4, steps=4, batch=4, warmup=1,
             ckpt_every=2, log_every=1, eval_samples=4, sample_steps=2)


def cosine(peak: float, warmup: int, steps: int, step: int) -> float:
    """Linear warm-up to ``peak``, then cosine to 0 at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(s: WorldTrainSettings, step: int) -> float:
    """The transformer's rate at ``step``."""
    return cosine(s.lr, s.warmup, s.steps, step)


def vae_learning_rate(s: WorldTrainSettings, step: int) -> float:
    """The VAE's rate at ``step``: the same shape, a warm-up of 2 % (sharp edges at the end)."""
    return cosine(s.vae_lr, max(1, s.vae_steps // 50), s.vae_steps, step)


# --------------------------------------------------------------------------- batches


def world_batch(world: ShapesWorld, seed: int, step: int, stream: int, batch: int
                ) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """``(generator, images [B,3,H,W], labels [B])`` of one step: a pure function."""
    g = torch.Generator().manual_seed(step_seed(seed, step, stream))
    indices = torch.randint(0, WORLD_INDICES, (batch,), generator=g)
    images, labels = world.get(indices.tolist())
    return g, images, labels


@torch.no_grad()
def text_table(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T5 states [92, L, D], CLIP pooled [92, D])``: the 91 prompts, then the empty one."""
    prompts = [w.prompt_text(i) for i in range(NUM_CLASSES)] + [""]
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device="cpu",
                                           num_images_per_prompt=1,
                                           max_sequence_length=w.TEXT_TOKENS)
    return embeds.float(), pooled.float()


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Normalised latents (``(mode − shift) · scale``) of images in [-1, 1]."""
    z = vae.encode(images).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


# --------------------------------------------------------------------------- training state


class WorldTrainer:
    """One run in ``out`` (module docstring)."""

    def __init__(self, out: str | Path, settings: WorldTrainSettings, *,
                 progress: bool = True) -> None:
        settings.validate()
        self.out, self.s, self.progress = Path(out), settings, progress
        self.cfg = settings.model
        self.world = ShapesWorld(self.cfg.image_size, seed=settings.world_seed)
        self.pipe = w.build_pipeline(self.cfg, seed=settings.seed)
        self.vae, self.tr = self.pipe.vae, self.pipe.transformer
        self.ema = copy.deepcopy(self.tr).requires_grad_(False)
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=settings.vae_lr)
        self.opt = torch.optim.AdamW(self.tr.parameters(), lr=settings.lr,
                                     weight_decay=settings.weight_decay)
        self.stage, self.step = "vae", 0
        self.autocast = torch.bfloat16 if settings.precision == "bf16" else None
        self.texts: tuple[torch.Tensor, torch.Tensor] | None = None
        self.elapsed = 0.0

    # ----- the folder -------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        data = asdict(self.s)
        for key in ("ckpt_every", "ckpt_minutes", "log_every"):  # when, not what, is trained
            data.pop(key)
        data["model"] = self.cfg.to_dict()
        return json.loads(json.dumps(data, default=list))

    def prepare(self, *, resume: bool, force: bool) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"--train-pipeline {out} is a file: pass a folder")
        runfolder.lock_folder(out, "world --train-pipeline")
        if resume:
            if not (out / CHECKPOINT_FILE).is_file():
                raise FileNotFoundError(f"--resume: {out} holds no {CHECKPOINT_FILE} to resume")
            record = json.loads((out / RUN_FILE).read_text())
            saved, mine = record["identity"], self.identity()
            diff = sorted(k for k in set(saved) | set(mine)
                          if k != "steps" and saved.get(k) != mine.get(k))
            if diff:
                what = ", ".join(f"{k}={saved.get(k)!r}, now {mine.get(k)!r}" for k in diff[:3])
                raise ValueError(f"--resume: {out} was started with other settings ({what}): "
                                 "pass the same flags (only --steps may change), or start a "
                                 "new folder")
            self._load(load_training_checkpoint(out / CHECKPOINT_FILE))
            if saved["steps"] != self.s.steps:
                self._change_length(record, saved["steps"])
        else:
            existing = [n for n in (CHECKPOINT_FILE, RUN_FILE, LOG_FILE) if (out / n).exists()]
            if existing and not force:
                raise ValueError(f"--train-pipeline {out} already holds a run "
                                 f"({', '.join(existing)}): pass --resume to continue it, "
                                 "--force to start over, or choose another folder")
            runfolder.claim_files(out, OUTPUTS, force=force, kind="training",
                                  flag="--train-pipeline")
            for name in (CHECKPOINT_FILE, LOG_FILE):
                (out / name).unlink(missing_ok=True)
            atomic_write_json(out / RUN_FILE, {"identity": self.identity(),
                                               "settings": asdict(self.s),
                                               "command": "world --train-pipeline"})
        runfolder.remove_temporaries(out)

    def _change_length(self, record: dict[str, Any], before: int) -> None:
        """Resume with another ``--steps``: the cosine re-derived from here, and said so.

        The transformer's schedule is the one setting a run may change mid-way (to fit
        the time left, or to train a finished run longer); a shorter run must still lie
        ahead of the flow step reached. A finished run given more steps goes back to the
        flow stage: its learning rate rises from 0 to the longer cosine's value there (a
        warm restart, as SGDR's). The change is appended to ``run.json``'s
        ``length_changes`` so the shipped pipeline's record says it was not one
        uninterrupted schedule.
        """
        at = self.step if self.stage in ("flow", "done") else 0
        if self.s.steps <= at:
            raise ValueError(f"--steps {self.s.steps}: {self.out} has already trained {at} "
                             "transformer steps; pass more than that, or start a new folder")
        finished = self.stage == "done"
        if finished:
            self.stage = "flow"
        record.setdefault("length_changes", []).append(
            {"flow_step": at, "stage": self.stage, "steps_before": before,
             "steps_after": self.s.steps,
             "lr_before": 0.0 if finished else learning_rate(replace(self.s, steps=before), at),
             "warm_restart": finished,
             "lr_after": learning_rate(self.s, at)})
        record["identity"] = self.identity()
        record["settings"] = asdict(self.s)
        atomic_write_json(self.out / RUN_FILE, record)

    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "stage": self.stage, "model": self.tr.state_dict(),
                "ema": self.ema.state_dict(), "vae": self.vae.state_dict(),
                "vae_scale": [float(self.vae.config.shift_factor),
                              float(self.vae.config.scaling_factor)],
                "optimizer": self.opt.state_dict(), "vae_optimizer": self.vae_opt.state_dict(),
                "elapsed": self.elapsed, "run": self.identity()}

    def _load(self, state: dict[str, Any]) -> None:
        self.step, self.stage = int(state["step"]), str(state["stage"])
        self.tr.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.vae.load_state_dict(state["vae"])
        shift, scale = state["vae_scale"]
        self.vae.register_to_config(shift_factor=float(shift), scaling_factor=float(scale))
        self.opt.load_state_dict(state["optimizer"])
        self.vae_opt.load_state_dict(state["vae_optimizer"])
        self.elapsed = float(state.get("elapsed", 0.0))

    def save(self) -> None:
        """The checkpoint, then ``pipeline/`` (EMA), then the loss curve."""
        atomic_torch_save(self._state(), self.out / CHECKPOINT_FILE)
        self.export()
        self.plot()

    def export_pipeline(self):
        d = w.import_diffusers()
        p = self.pipe
        return d.FluxPipeline(scheduler=p.scheduler, vae=self.vae, text_encoder=p.text_encoder,
                              tokenizer=p.tokenizer, text_encoder_2=p.text_encoder_2,
                              tokenizer_2=p.tokenizer_2, transformer=self.ema)

    def export(self, evaluation: dict[str, Any] | None = None) -> Path:
        from ..integrations.diffusers.pipelines import quiet

        quiet()
        pipe = self.export_pipeline()
        training = {"settings": asdict(self.s), "model": self.cfg.to_dict(), "stage": self.stage,
                    "step": self.step, "elapsed_s": round(self.elapsed, 1),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "command": "python -m attnbench world --train-pipeline OUT",
                    **({"eval": evaluation} if evaluation else {})}

        def write(staging: Path) -> None:
            pipe.save_pretrained(staging, safe_serialization=True)
            w.write_prompts(staging)
            (staging / w.TRAINING_FILE).write_text(json.dumps(training, indent=2,
                                                              sort_keys=True) + "\n")
            w.write_sums(staging)

        return runfolder.atomic_folder(self.out / PIPELINE_DIR, write)

    def plot(self) -> None:
        rows = [r for _, r in runfolder.read_jsonl(self.out / LOG_FILE, repair=True)]
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, stage, key in ((axes[0], "vae", "l1"), (axes[1], "flow", "loss")):
            pts = [(r["step"], r[key]) for r in rows if r.get("stage") == stage]
            if pts:
                ax.plot(*zip(*pts, strict=True), lw=0.8)
            ax.set(title=f"{stage} ({key})", xlabel="step", yscale="log")
        fig.tight_layout()
        runfolder.atomic_write(self.out / LOSS_PNG, lambda tmp: fig.savefig(tmp, format="png",
                                                                             dpi=90))
        plt.close(fig)

    def log(self, row: dict[str, Any]) -> None:
        runfolder.append_jsonl(self.out / LOG_FILE, row)

    # ----- the stages -------------------------------------------------------------------
    def vae_step(self, step: int) -> dict[str, float]:
        g, images, _ = world_batch(self.world, self.s.seed, step, VAE_STREAM, self.s.vae_batch)
        post = self.vae.encode(images).latent_dist
        eps = torch.randn(post.mean.shape, generator=g)
        recon = self.vae.decode(post.mean + post.std * eps).sample
        l1 = (recon - images).abs().mean()
        kl = post.kl().mean() / images[0].numel()
        loss = l1 + self.s.vae_kl * kl
        for group in self.vae_opt.param_groups:
            group["lr"] = vae_learning_rate(self.s, step)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        return {"l1": float(l1.detach()), "kl": float(kl.detach())}

    @torch.no_grad()
    def set_latent_stats(self) -> dict[str, float]:
        _, images, _ = world_batch(self.world, self.s.seed, 0, STATS_STREAM,
                                   min(STATS_IMAGES, max(8, self.s.vae_batch * 4)))
        z = self.vae.encode(images).latent_dist.mode()
        shift, scale = float(z.mean()), 1.0 / float(z.std())
        self.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        return {"shift_factor": shift, "scaling_factor": scale,
                **reconstruction_quality(self.vae, self.world)}

    def flow_step(self, step: int) -> dict[str, float]:
        s = self.s
        g, images, labels = world_batch(self.world, s.seed, step, FLOW_STREAM, s.batch)
        drop = torch.rand(s.batch, generator=g) < s.drop
        sigma = torch.sigmoid(torch.randn(s.batch, generator=g))
        with torch.no_grad():
            z = encode_latents(self.vae, images)
        b, c, h, wd = z.shape
        noise = torch.randn(z.shape, generator=g)
        s_ = sigma.view(-1, 1, 1, 1)
        x = (1 - s_) * z + s_ * noise
        pack = w.import_diffusers().FluxPipeline._pack_latents
        x, target = pack(x, b, c, h, wd), pack(noise - z, b, c, h, wd)
        rows = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        embeds, pooled = self.texts
        img_ids, txt_ids = _ids(h // 2, wd // 2, embeds.shape[1])
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(s, step)
        ctx = (torch.autocast("cpu", dtype=self.autocast) if self.autocast
               else torch.autocast("cpu", enabled=False))
        with ctx, _sdpa_backends(torch.device("cpu"), self.autocast):
            pred = self.tr(hidden_states=x, encoder_hidden_states=embeds[rows],
                           pooled_projections=pooled[rows], timestep=sigma, img_ids=img_ids,
                           txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(self.tr.parameters(), s.grad_clip)
        self.opt.step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.tr.parameters(), strict=True):
                e.lerp_(p, 1 - s.ema)
        return {"loss": float(loss.detach()), "grad_norm": float(grad),
                "lr": learning_rate(s, step)}

    # ----- the loop ---------------------------------------------------------------------
    def run(self, *, resume: bool = False, force: bool = False,
            stop_at: int | None = None) -> dict[str, Any]:
        """Train to the end (or to global step ``stop_at``, for tests); the summary."""
        from tqdm.auto import tqdm

        self.prepare(resume=resume, force=force)
        total = self.s.vae_steps + self.s.steps
        done = self.step if self.stage == "vae" else self.s.vae_steps + self.step
        signals = _StopSignals()
        signals.install()
        bar = tqdm(total=total, initial=done, disable=not self.progress, desc="world-t2i",
                   unit="step", dynamic_ncols=True)
        stopped, last_save = None, time.monotonic()
        try:
            while self.stage != "done":
                if stop_at is not None and done >= stop_at:
                    stopped = "stop_at"
                    break
                if signals.signum is not None:
                    stopped = f"signal {signals.signum}"
                    break
                start = time.perf_counter()
                if self.stage == "vae":
                    if self.step >= self.s.vae_steps:
                        row = self.set_latent_stats()
                        self.log({"stage": "vae_stats", "step": self.step, **row})
                        self.stage, self.step = "flow", 0
                        continue
                    terms = self.vae_step(self.step)
                else:
                    if self.texts is None:
                        self.texts = text_table(self.pipe)
                    if self.step >= self.s.steps:
                        self.stage = "done"
                        break
                    terms = self.flow_step(self.step)
                self.elapsed += time.perf_counter() - start
                self.step += 1
                done += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items() if k != "lr"})
                if self.step % self.s.log_every == 0 or self.step == 1:
                    self.log({"stage": self.stage, "step": self.step,
                              "elapsed_s": round(self.elapsed, 2), **terms})
                if self.step % self.s.ckpt_every == 0 or \
                        time.monotonic() - last_save >= 60 * self.s.ckpt_minutes:
                    self.save()
                    last_save = time.monotonic()
            self.save()
        finally:
            bar.close()
            signals.restore()
        summary = {"stage": self.stage, "step": self.step, "elapsed_s": round(self.elapsed, 1),
                   "stopped": stopped, "out": str(self.out)}
        if self.stage == "done":
            summary["eval"] = self.finish()
        return summary

    def finish(self) -> dict[str, Any] | None:
        """The GenEval proxy and sample grid of the exported pipeline; re-export with them."""
        if not self.s.eval_samples:
            return None
        result, images, _ = evaluate_pipeline(
            self.export_pipeline(), count=self.s.eval_samples, steps=self.s.sample_steps)
        write_grid(self.out / SAMPLES_PNG, images[:64])
        self.export(evaluation=result)
        return result


@torch.no_grad()
def reconstruction_quality(vae, world: ShapesWorld, per_label: int = 2) -> dict[str, float]:
    """The GenEval proxy and L1 of VAE reconstructions of held-out world images (world
    seed + 1, every label ``per_label`` times): the ceiling of the pipeline's score."""
    from ..metrics.geneval import geneval_score

    labels = [i % NUM_CLASSES for i in range(per_label * NUM_CLASSES)]
    images = to_tensor(held_out_images(world.image_size, labels, world.seed + 1))
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    return {"recon_geneval": geneval_score(to_uint8(recon), labels).overall,
            "recon_l1": float((recon - images).abs().mean())}


def held_out_images(size: int, labels: list[int], world_seed: int) -> np.ndarray:
    """uint8 ``[N, size, size, 3]`` world images of ``labels`` (image ``i`` of label
    ``labels[i]``) from a world seed the training never draws from."""
    world = ShapesWorld(size, seed=world_seed)
    return np.stack([render(world.scene(i, label=label)) for i, label in enumerate(labels)])


def _ids(h: int, wd: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ..integrations.diffusers.families import flux_ids

    return flux_ids((h, wd), text)


# --------------------------------------------------------------------------- evaluation


def eval_labels(count: int) -> list[int]:
    """``count`` labels taking the six tasks in turn, each task's labels in order (every
    task covered from 6 samples up, equally from 6·k)."""
    by_task = [task_labels(task) for task in TASKS]
    return [by_task[i % len(TASKS)][(i // len(TASKS)) % len(by_task[i % len(TASKS)])]
            for i in range(count)]


@torch.no_grad()
def generate(pipe, labels: list[int], *, steps: int = 28, seed: int = 0, batch: int = 32,
             true_cfg: float = 1.0) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` samples of ``pipe`` for world labels (image ``i``: seed
    ``(seed, i)``)."""
    size = pipe.vae.config.sample_size
    out = []
    for start in range(0, len(labels), batch):
        chunk = labels[start:start + batch]
        gens = [torch.Generator().manual_seed(step_seed(seed, start + i, 7))
                for i in range(len(chunk))]
        kw = {"negative_prompt": [""] * len(chunk), "true_cfg_scale": true_cfg} \
            if true_cfg > 1 else {}
        images = pipe([w.prompt_text(x) for x in chunk], height=size, width=size,
                      num_inference_steps=steps, generator=gens, output_type="pt",
                      max_sequence_length=w.TEXT_TOKENS, **kw).images
        out.append(to_uint8(images * 2 - 1))
    return np.concatenate(out)


def evaluate_pipeline(pipe, *, count: int = 182, steps: int = 28, seed: int = 0,
                      true_cfg: float = 1.0) -> tuple[dict[str, Any], np.ndarray, list[int]]:
    """The GenEval proxy (exact detector) of ``count`` samples; ``(result, images, labels)``."""
    from ..metrics.geneval import geneval_score

    pipe.set_progress_bar_config(disable=True)
    labels = eval_labels(count)
    images = generate(pipe, labels, steps=steps, seed=seed, true_cfg=true_cfg)
    score = geneval_score(images, labels)
    result = {"geneval": score.overall, "tasks": score.tasks, "strict": score.strict_overall,
              "samples": count, "steps": steps, "seed": seed, "true_cfg": true_cfg,
              "tasks_present": [t for t in TASKS if t in score.tasks]}
    if count >= 2:
        result["realism"] = realism(images, labels)
    return result, images, labels


#: the world seeds of the real images the samples are compared with (training draws seed 0)
REAL_SEEDS = (2, 3)


def realism(images: np.ndarray, labels: list[int]) -> dict[str, Any]:
    """FID and KID of samples against real world images of the same labels, in the shipped
    shapes classifier's feature space; beside them the same numbers for a second real set
    against the first, the floor that the sample count alone sets (FID of a few hundred
    images is biased upwards: read the gap to the floor, not the value)."""
    from ..metrics.fid import Reference, quality_metrics

    size = images.shape[1]
    real, other = (held_out_images(size, labels, s) for s in REAL_SEEDS)
    reference = Reference(f"world seed {REAL_SEEDS[0]}, the samples' labels", images=real)
    kw = dict(metrics=("fid", "kid"), kid_subset_size=min(1000, len(labels)))
    samples = quality_metrics(images, reference, **kw)
    floor = quality_metrics(other, reference, **kw)
    return {"fid": samples["metrics"]["fid"], "kid": samples["metrics"]["kid"],
            "fid_real_vs_real": floor["metrics"]["fid"],
            "kid_real_vs_real": floor["metrics"]["kid"],
            "feature_space": "shapes classifier (attnbench/assets/shapes_classifier)",
            "reference": reference.description, "count": len(labels),
            "floor": f"world seed {REAL_SEEDS[1]} against the reference"}


def write_grid(path: Path, images: np.ndarray, nrow: int = 8, scale: int = 2) -> Path:
    from ..data.images import encode_png, make_grid, upscale

    grid = upscale(make_grid(images, nrow=nrow), scale)
    return runfolder.atomic_write(path, encode_png(grid))


def settings_from(quick: bool, **overrides) -> WorldTrainSettings:
    """The run's settings: the defaults (or :data:`QUICK`), then the flags given."""
    base = WorldTrainSettings(**QUICK) if quick else WorldTrainSettings()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


__all__ = [
    "WorldTrainSettings",
    "WorldTrainer",
    "evaluate_pipeline",
    "generate",
    "settings_from",
]
