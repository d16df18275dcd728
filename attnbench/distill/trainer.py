"""The trainer: one loop for teacher training and for every distillation recipe.

What it does each step (the same on one process or N):

1. draws the *global* batch plan from a generator seeded by ``(seed, step)``:
   data indices, timesteps, label-dropout flags and noise; rank ``r`` takes
   rows ``[r·B/N, (r+1)·B/N)``. Each rank thus draws its own samples (per-rank
   streams), their union is exactly the batch one process would draw, and a
   resumed run draws what the uninterrupted one would have;
2. computes the recipe's loss terms (``losses.py``) under fp32 or bf16 autocast;
3. back-propagates (DistributedDataParallel averages the gradients over
   ranks: the mean over the global batch; with ``config.fsdp`` FSDP2's
   reduce-scatter does, over sharded weights: ``fsdp.py``), clips the gradient
   norm, steps AdamW (linear warm-up, then constant) and the EMA of the weights;
4. logs every term (averaged over ranks) to ``metrics.jsonl`` / ``metrics.csv``
   and the progress bar; rank 0 saves ``checkpoint.pt`` every ``ckpt_every``
   steps, atomically.

At the end rank 0 exports the EMA weights (DiT's convention: the EMA is the
model) as a loadable model directory and writes ``summary.json`` with the
held-out evaluation before and after (``evaluate``).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import itertools
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .. import runfolder
from ..common import dist as _dist
from ..common.versions import versions
from ..diffusion import Diffusion
from . import fsdp as _fsdp
from . import optim as _optim
from .io import (
    CHECKPOINT_FILE,
    EVAL_JSONL,
    METRICS_CSV,
    METRICS_JSONL,
    RUN_FILE,
    SUMMARY_FILE,
    TRAINING_OUTPUTS,
    atomic_save_model,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    is_training_folder,
    load_training_checkpoint,
)
from .losses import flat_mse, recipe_losses
from .recipes import DistillRecipe

#: the noise of held-out evaluations (training draws its noise from per-step seeds)
EVAL_SEED = 20_240_917
PRECISIONS = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Optimisation settings of a run (every field is a CLI flag)."""

    steps: int = 100
    batch_size: int = 32  # global: split over the ranks
    # None: the recipe's (its Optimisation; optim.resolve fills them in the Trainer)
    optimizer: str | None = None  # adamw or prodigy
    optimizer_settings: dict[str, Any] | None = None  # betas, eps, Prodigy's switches
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str = "constant"  # or "cosine": decay to 0 at ``steps`` after the warm-up
    ema_decay: float | None = None  # 0 = no EMA
    grad_clip: float | None = None  # 0 = no clipping
    substituted: str = ""  # what the run did instead of its recipe, and why
    precision: str = "fp32"
    seed: int = 0
    ckpt_every: int = 0  # 0 = only at the end
    eval_samples: int = 64
    eval_every: int = 0  # 0 = before and after only; K = also every K steps (eval.jsonl)
    max_minutes: float | None = None
    label_dropout: float | None = None  # None = the model's class_dropout_prob
    progress: bool = True
    fsdp: bool = False  # shard student and teacher over the ranks (fsdp.py); torchrun only
    activation_checkpointing: bool = False  # recompute each block in the backward pass

    def validate(self, world_size: int = 1) -> None:
        ints = {"steps": 1, "batch_size": 1, "warmup_steps": 0, "ckpt_every": 0,
                "eval_samples": 0, "eval_every": 0}
        for key, low in ints.items():
            value = getattr(self, key)
            if value is None and key == "warmup_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if (self.grad_clip or 0) < 0 or (self.weight_decay or 0) < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got "
                             f"{self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of fp32, bf16; got {self.precision!r}")
        if self.label_dropout is not None and not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.batch_size % world_size:
            raise ValueError(
                f"the global batch {self.batch_size} does not split evenly over {world_size} "
                "processes: choose a multiple of the process count"
            )


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(config: TrainConfig, step: int) -> float:
    """The rate of step ``step`` (0-based): linear warm-up, then constant or cosine to 0."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for ``(seed, step, stream)`` (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(stream)])
    return int(state.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass
class BatchPlan:
    """The random choices of one global batch."""

    indices: torch.Tensor  # [B] data indices
    t: torch.Tensor  # [B] step indices
    drop: torch.Tensor  # [B] bool: label replaced by the null class
    noise: torch.Tensor  # [B, C, H, W]

    def rows(self, start: int, stop: int) -> BatchPlan:
        return BatchPlan(self.indices[start:stop], self.t[start:stop], self.drop[start:stop],
                         self.noise[start:stop])


def plan_batch(seed: int, step: int, batch: int, sample_shape: tuple[int, ...],
               num_data: int, num_steps: int, drop_prob: float) -> BatchPlan:
    """The global batch of ``step``: a pure function of its arguments."""
    g = torch.Generator().manual_seed(step_seed(seed, step))
    indices = torch.randint(0, num_data, (batch,), generator=g)
    t = torch.randint(0, num_steps, (batch,), generator=g)
    drop = torch.rand(batch, generator=g) < drop_prob
    noise = torch.randn((batch, *sample_shape), generator=g)
    return BatchPlan(indices, t, drop, noise)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, diffusion: Diffusion, x0: torch.Tensor, y: torch.Tensor, *,
             teacher: nn.Module | None = None, seed: int = EVAL_SEED, batch: int = 64,
             buckets: int = 4) -> dict[str, Any]:
    """Held-out ε errors of ``model``, on noise no training step draws.

    Timesteps are spread evenly over the process (``linspace(0, T−1, n)``) and the
    noise comes from ``seed``, so two models (a student right after conversion
    and after distillation) are compared on exactly the same inputs:

    * ``eps_mse_vs_teacher`` -- ``mean ‖ε_S − ε_T‖²`` (with a teacher);
    * ``eps_mse`` -- ``mean ‖ε_S − ε‖²`` against the true noise (the diffusion
      loss), and ``teacher_eps_mse`` the teacher's, for scale;
    * ``by_t`` -- the same split into ``buckets`` timestep ranges.
    """
    n = len(x0)
    if n == 0:
        return {}
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, diffusion.num_steps - 1, n).round().long()
    noise = torch.randn(x0.shape, generator=g)
    c = x0.shape[1]
    rows: dict[str, list[torch.Tensor]] = {"eps_mse": [], "eps_mse_vs_teacher": [],
                                           "teacher_eps_mse": []}
    for start in range(0, n, batch):
        sl = slice(start, start + batch)
        xb, yb, tb = x0[sl].to(device), y[sl].to(device), t[sl].to(device)
        nb = noise[sl].to(device)
        xt = diffusion.q_sample(xb, tb, nb)
        tm = diffusion.model_timesteps(tb)
        out = model(xt, tm, yb).float()
        rows["eps_mse"].append(flat_mse(out[:, :c], nb).cpu())
        if teacher is not None:
            ref = teacher(xt, tm, yb).float()
            rows["eps_mse_vs_teacher"].append(flat_mse(out[:, :c], ref[:, :c]).cpu())
            rows["teacher_eps_mse"].append(flat_mse(ref[:, :c], nb).cpu())
    model.train(was)
    result: dict[str, Any] = {"samples": n, "seed": seed}
    edges = torch.linspace(0, diffusion.num_steps, buckets + 1).long().tolist()
    by_t: dict[str, dict[str, float]] = {}
    for key, parts in rows.items():
        if not parts:
            continue
        values = torch.cat(parts).double()
        result[key] = float(values.mean())
        for lo, hi in itertools.pairwise(edges):
            mask = (t >= lo) & (t < hi)
            if mask.any():
                by_t.setdefault(f"t{lo}-{hi - 1}", {})[key] = float(values[mask].mean())
    result["by_t"] = by_t
    return result


# --------------------------------------------------------------------------- the trainer


def check_out(out: str | Path, *, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run (without ``force``) or to resume nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a directory")
    existing = [n for n in (CHECKPOINT_FILE, RUN_FILE, METRICS_JSONL) if (out / n).exists()]
    if resume:
        if not (out / CHECKPOINT_FILE).exists() and not (out / RUN_FILE).exists():
            raise FileNotFoundError(
                f"--resume: {out} holds no {CHECKPOINT_FILE} to resume"
                + (f" (it has {', '.join(existing)})" if existing else "")
            )
    elif existing and not force:
        raise ValueError(
            f"--out {out} already holds a run ({', '.join(existing)}): pass --resume to "
            "continue it, --force to start over, or choose another directory"
        )
    if runfolder.is_rank_zero():
        legacy = is_training_folder(out)
        runfolder.claim_files(out, TRAINING_OUTPUTS, force=force, kind="training",
                              ours=lambda _path: legacy)


@dataclass
class _Loop:
    """What a run carries from step to step."""

    model: nn.Module  # the module whose weights are saved (under FSDP: sharded in place)
    params: list[tuple[str, nn.Parameter]]  # trained, in the optimiser's order
    optimizer: torch.optim.Optimizer
    ema: dict[str, torch.Tensor]
    rows: slice  # this rank's rows of the global batch
    net: nn.Module | None = None  # what a step calls: the model, or DDP around it
    resumed: bool = False
    start: int = 0
    step: int = 0
    initial_eval: dict[str, Any] | None = None
    elapsed_before: float = 0.0  # training seconds of the runs resumed
    t_start: float = 0.0
    step_times: list[float] = field(default_factory=list)
    bar: Any = None
    stopped_early: bool = False

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start


class Trainer:
    """Trains ``model`` with ``recipe`` on ``source`` (module docstring).

    ``identity`` is what a resumed run must share with this one (method,
    options, recipe, teacher hash, ...): a mismatch is an error, never a
    silently mixed run. ``export_name`` is the model directory written at the
    end inside ``out``; ``export_extra`` the JSON files written beside it.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: Diffusion,
        source,
        out: str | Path,
        config: TrainConfig,
        *,
        recipe: DistillRecipe,
        teacher: nn.Module | None = None,
        identity: dict[str, Any],
        info: dict[str, Any] | None = None,
        eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_train: int | None = None,
        export_name: str = "model",
        export_extra: dict[str, Any] | None = None,
        dist_info: _dist.DistInfo | None = None,
        sharded: _fsdp.Sharded | None = None,
    ) -> None:
        self.dist = dist_info or _dist.DistInfo()
        config = _optim.resolve(config, recipe.optimisation)
        config.validate(self.dist.world_size)
        if recipe.needs_teacher and teacher is None:
            raise ValueError(f"recipe {recipe.name!r} needs a teacher")
        self.model, self.diffusion, self.source = model, diffusion, source
        self.out, self.config, self.recipe, self.teacher = Path(out), config, recipe, teacher
        self.identity = json.loads(json.dumps(identity, default=str))
        self.info = info or {}
        self.eval_data = eval_data
        self.num_train = num_train if num_train is not None else len(source)
        self.export_name, self.export_extra = export_name, dict(export_extra or {})
        self.device = self.dist.device
        if config.fsdp and not self.dist.enabled:
            raise ValueError("--fsdp shards the model over torchrun's processes: launch with "
                             "torchrun --nproc_per_node N (N >= 2), or drop --fsdp")
        # under config.fsdp: sharded by the caller (who built the models from rank 0's:
        # fsdp.build_device), or by run() from the models it is given
        self.sharded: _fsdp.Sharded | None = sharded
        self.setup_batches()

    # ----- what a subclass for another model kind replaces (diffusers_distill.py) ---------
    def setup_batches(self) -> None:
        """DiT's batches: class labels with label dropout to the null class, image noise."""
        cfg, config = self.model.config, self.config
        self.null_label = cfg.num_classes
        self.drop_prob = (cfg.class_dropout_prob if config.label_dropout is None
                          else config.label_dropout)
        if self.drop_prob > 0 and cfg.class_dropout_prob <= 0:
            raise ValueError("label dropout needs a model with a null class "
                             "(class_dropout_prob > 0)")
        self.sample_shape = (self.source.channels, self.source.image_size,
                             self.source.image_size)

    def step_terms(self, net: nn.Module, step: int, rows: slice) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch of ``step`` and the recipe's loss terms."""
        plan = plan_batch(self.config.seed, step, self.config.batch_size, self.sample_shape,
                          self.num_train, self.diffusion.num_steps,
                          self.drop_prob).rows(rows.start, rows.stop)
        x0, y = self.source.get(plan.indices.tolist())
        x0, y = x0.to(self.device), y.to(self.device)
        y = torch.where(plan.drop.to(self.device), torch.full_like(y, self.null_label), y)
        t, noise = plan.t.to(self.device), plan.noise.to(self.device)
        return recipe_losses(self.recipe, self.diffusion, net, self.teacher, x0, y, t, noise)

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return model.config.to_dict()

    def export(self, exported: nn.Module) -> Path:
        """Write the final (EMA) model into ``out/export_name``; its weights file."""
        return atomic_save_model(exported, self.out / self.export_name, self.export_extra)

    # ----- set-up -------------------------------------------------------------------------
    def trainable_names(self, model: nn.Module) -> set[str]:
        """DiT's trainable set: the blocks' attention, or everything but the fixed pos_embed."""
        named = [n for n, _ in model.named_parameters()]
        if self.recipe.trainable == "attention":
            return {n for n in named if ".attn." in n and n.startswith("blocks.")}
        return {n for n in named if n != "pos_embed"}

    def _trainable(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        named = [(n, p) for n, p in model.named_parameters()]
        chosen = self.trainable_names(model)
        for n, p in named:
            p.requires_grad_(n in chosen)
        params = [(n, p) for n, p in named if p.requires_grad]
        if not params:
            raise ValueError(f"recipe {self.recipe.name!r} leaves nothing to train")
        return params

    def prepare_directory(self, resume: bool, force: bool) -> dict[str, Any] | None:
        """Check ``out`` against ``resume``/``force``; the checkpoint to resume, if any.

        A run stopped before its first checkpoint resumes from step 0 (same identity).
        """
        check_out(self.out, resume=resume, force=force)
        if resume and not (self.out / CHECKPOINT_FILE).exists():
            try:
                saved = json.loads((self.out / RUN_FILE).read_text()).get("identity", {})
            except (OSError, ValueError, AttributeError):
                saved = {}
            self._check_identity(saved)
            print(f"attnbench: {self.out} was stopped before its first checkpoint: starting "
                  "from step 0", file=sys.stderr, flush=True)
            return None
        if resume:
            state = load_training_checkpoint(self.out / CHECKPOINT_FILE)
            self._check_identity(state.get("run", {}))
            return state
        return None

    def _check_identity(self, saved: dict[str, Any]) -> None:
        mine = self.identity
        if saved.get("kind") != mine.get("kind"):
            raise ValueError(
                f"cannot resume {self.out}: it holds a {saved.get('kind')!r} run, not "
                f"{mine.get('kind')!r}"
            )
        if saved.get("method") != mine.get("method"):
            raise ValueError(
                f"cannot resume {self.out}: it is a distillation of method "
                f"{saved.get('method')!r}, not {mine.get('method')!r}; pass --method "
                f"{saved.get('method')} or another --out"
            )
        differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if differ:
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}"
                                for k in differ)
            raise ValueError(f"cannot resume {self.out}: the run differs from this command "
                             f"({details}); repeat the original options or use another --out")

    # ----- the loop -----------------------------------------------------------------------
    def run(self, *, resume: bool = False, force: bool = False) -> dict[str, Any]:
        """Train to ``config.steps`` (or the time limit); returns the summary dict.

        Its seams: :meth:`_begin` (the folder checked, the model set up on this rank, a
        resumed checkpoint restored), :meth:`_step` (one optimisation step),
        :meth:`_after_step` (logging, evaluation, checkpoint, time limit),
        :meth:`_stop_on_signal` and :meth:`_end` (the last checkpoint, export, summary).
        """
        stop = _StopSignals()
        signum, loop = 0, None
        try:
            stop.install()  # already while the run is set up: it then stops before a step
            loop = self._begin(resume, force)
            while loop.step < self.config.steps:
                # a signal on any rank stops every rank before the same step
                signum = _dist.max_across(self.dist, stop.signum or 0)
                if signum:
                    break
                terms, stats = self._step(loop)
                if self._after_step(loop, terms, stats):
                    break
        finally:
            stop.restore()
            if loop is not None and loop.bar is not None:
                loop.bar.close()
        elapsed = loop.elapsed()
        if signum and loop.step < self.config.steps:
            self._stop_on_signal(loop, signum, elapsed)
        return self._end(loop, elapsed)

    def _open(self, resume: bool, force: bool) -> dict[str, Any] | None:
        """Rank 0 checks the folder (its verdict raised on every rank); the checkpoint to
        resume, read by every rank."""
        d = self.dist
        state, error = None, None
        if d.is_main:
            try:
                state = self.prepare_directory(resume, force)
            except (ValueError, FileNotFoundError) as err:
                error = (type(err).__name__, str(err))
        error, has_state = _dist.broadcast_object(d, (error, state is not None))
        if error is not None:
            raise (FileNotFoundError if error[0] == "FileNotFoundError" else ValueError)(error[1])
        if d.enabled and has_state:  # every rank reads the checkpoint rank 0 checked
            state = load_training_checkpoint(self.out / CHECKPOINT_FILE)
        return state

    def _begin(self, resume: bool, force: bool) -> _Loop:
        """The folder checked, the model on this rank's device (sharded by FSDP with
        ``config.fsdp``), the optimiser and EMA, a resumed checkpoint restored."""
        cfg, d = self.config, self.dist
        state = self._open(resume, force)
        model = self.model if cfg.fsdp else self.model.to(self.device)  # FSDP places shards
        model.eval()  # DiT has no dropout: label dropout is drawn by the trainer, per step
        if self.teacher is not None:
            if not cfg.fsdp:
                self.teacher.to(self.device)
            self.teacher.eval().requires_grad_(False)
        params = self._trainable(model)
        self.parameter_counts = {"trainable": sum(p.numel() for _, p in params),
                                 "total": sum(p.numel() for p in model.parameters())}
        if cfg.activation_checkpointing:
            _fsdp.checkpoint_blocks(model)
        if cfg.fsdp:
            if self.sharded is None:
                self.sharded = _fsdp.Sharded(model, self.teacher, d)
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.parameter_counts["held_by_rank0"] = _fsdp.held(model)
            self.parameter_counts["bytes_built_by_rank"] = self.sharded.materialised
        optimizer = _optim.build(cfg, [p for _, p in params])
        ema = self.ema_init(model, [n for n, _ in params])
        local = cfg.batch_size // d.world_size
        loop = _Loop(model, params, optimizer, ema, rows=slice(d.rank * local,
                                                                (d.rank + 1) * local))
        if state is not None:
            self._restore(loop, state)
        elif d.is_main:
            self._start_folder()
        if loop.initial_eval is None and self.eval_data is not None:
            with self._gathered(loop, ema=False) as (full, _):
                if d.is_main:
                    loop.initial_eval = self._evaluate(full)
        loop.net = self._replicated(model) if d.enabled and self.sharded is None else model
        if cfg.progress and d.is_main and loop.start < cfg.steps:
            loop.bar = tqdm(total=cfg.steps, initial=loop.start,
                            desc=self.identity.get("kind", "train"), dynamic_ncols=True)
        loop.t_start = time.perf_counter()
        return loop

    def _start_folder(self) -> None:
        """A new run: the outputs of an earlier one (``--force``) removed, ``run.json``."""
        self.out.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_JSONL, METRICS_CSV, EVAL_JSONL, SUMMARY_FILE):
            (self.out / name).unlink(missing_ok=True)
        atomic_write_json(self.out / RUN_FILE, self._run_document())

    def _replicated(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (every rank a full copy)."""
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda"
                   else None)

    def _restore(self, loop: _Loop, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a checkpoint written with or without FSDP)."""
        if self.sharded is not None:
            self.sharded.load(loop.model, loop.optimizer, loop.ema, state,
                              [n for n, _ in loop.params])
        else:
            loop.model.load_state_dict(state["model"])
            loop.ema = {k: v.float() for k, v in state["ema"].items()}
            loop.optimizer.load_state_dict(state["optimizer"])
        loop.resumed = True
        loop.start = loop.step = int(state["step"])
        loop.initial_eval = state.get("initial_eval")
        loop.elapsed_before = float(state.get("elapsed_s", 0.0))
        if self.dist.is_main:
            self._truncate_metrics(loop.start)
            print(f"attnbench: resuming {self.out} from step {loop.start} of "
                  f"{self.config.steps}", file=sys.stderr, flush=True)

    def _step(self, loop: _Loop) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One optimisation step: this rank's loss terms and the step's statistics."""
        cfg = self.config
        t0 = time.perf_counter()
        lr = learning_rate(cfg, loop.step)
        for group in loop.optimizer.param_groups:
            group["lr"] = lr
        autocast_dtype = PRECISIONS[cfg.precision]
        with torch.autocast(self.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None), \
                _sdpa_backends(self.device, autocast_dtype):
            terms = self.step_terms(loop.net, loop.step, loop.rows)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"step {loop.step}: the loss is {loss.item()} ({_fmt(terms)}); lower --lr "
                "or use --precision fp32"
            )
        loop.optimizer.zero_grad(set_to_none=True)
        with _sdpa_backends(self.device, autocast_dtype):  # a recomputed block chooses alike
            loss.backward()
        grads = [p for _, p in loop.params if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = float(_fsdp.full(torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip)))
        else:
            grad_norm = float(torch.linalg.vector_norm(
                torch.stack([_fsdp.full(g.grad.detach().norm()) for g in grads])))
        loop.optimizer.step()
        loop.step += 1
        decay = min(cfg.ema_decay, (1 + loop.step) / (10 + loop.step))
        with torch.no_grad():
            current = loop.model.state_dict()
            for key, _ in loop.params:
                loop.ema[key].mul_(decay).add_(current[key].detach().float(), alpha=1 - decay)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        loop.step_times.append(dt)
        return terms, {"lr": lr, "grad_norm": grad_norm, "ema_decay": decay, "step_s": dt}

    def _after_step(self, loop: _Loop, terms: dict[str, torch.Tensor],
                    stats: dict[str, float]) -> bool:
        """Log the step, evaluate and save when due; True when the time limit stops the run."""
        cfg, d, step = self.config, self.dist, loop.step
        logged = _dist.mean_across(d, {k: float(v.detach()) for k, v in terms.items()})
        if d.is_main:
            self._log({"step": step, **{k: logged[k] for k in sorted(logged)}, **stats,
                       "elapsed_s": loop.elapsed()})
            if loop.bar is not None:
                loop.bar.update(1)
                loop.bar.set_postfix_str(_fmt(logged), refresh=False)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps \
                and self.eval_data is not None:
            with self._gathered(loop) as (model, ema):
                if d.is_main:
                    self._log_eval(step, model, ema)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            self._save(loop, loop.elapsed())
        if cfg.max_minutes is not None:
            over = loop.elapsed() > cfg.max_minutes * 60
            if _dist.broadcast_flag(d, over) and step < cfg.steps:
                loop.stopped_early = True
                return True
        return False

    def _stop_on_signal(self, loop: _Loop, signum: int, elapsed: float) -> None:
        """SIGINT/SIGTERM (on any rank: every rank stops at the same step): save where the
        run stands, one line on each rank, and leave (KeyboardInterrupt or exit 128 + N)."""
        self._save(loop, elapsed)
        d = self.dist
        where = f"rank {d.rank} of {d.world_size}: " if d.enabled else ""
        by = "" if d.is_main else " by rank 0"
        print(f"attnbench: {where}{signal.Signals(signum).name} at step {loop.step} of "
              f"{self.config.steps}: {self.out / CHECKPOINT_FILE} saved{by}; continue with "
              "the same command and --resume", file=sys.stderr, flush=True)
        _dist.barrier(d)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _end(self, loop: _Loop, elapsed: float) -> dict[str, Any]:
        """The last checkpoint, the export and ``summary.json`` (rank 0's summary)."""
        if loop.step > loop.start or not loop.resumed:
            self._save(loop, elapsed)
        summary: dict[str, Any] = {}
        with self._gathered(loop) as (model, ema):
            if self.dist.is_main:
                summary = self._finish(model, ema, loop.step, loop.initial_eval,
                                       loop.step_times, elapsed, loop.stopped_early)
        _dist.barrier(self.dist)
        return summary

    @contextlib.contextmanager
    def _gathered(self, loop: _Loop, *, ema: bool = True):
        """``(model, ema)`` as rank 0 evaluates and exports them.

        Without FSDP the training model and EMA themselves; under FSDP full copies gathered
        from the shards onto rank 0's CPU (a collective: every rank enters), with the
        teacher likewise gathered for the duration (other ranks get ``(None, None)``).
        """
        if self.sharded is None:
            yield loop.model, loop.ema
            return
        full = self.sharded.gather(loop.model, loop.ema if ema else None)
        teacher = self.teacher
        if full.teacher is not None:
            self.teacher = full.teacher
        try:
            yield full.model, full.ema
        finally:
            self.teacher = teacher

    # ----- outputs ------------------------------------------------------------------------
    def _run_document(self) -> dict[str, Any]:
        return {"identity": self.identity, "recipe": self.recipe.to_dict(),
                "config": asdict(self.config), "world_size": self.dist.world_size,
                "backend": self.dist.backend, "device": str(self.device),
                "data": self.source.describe(), **self.info, "versions": versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _save(self, loop: _Loop, elapsed: float) -> None:
        """``checkpoint.pt`` (rank 0 writes; under FSDP every rank helps gather it)."""
        if self.sharded is not None:
            full = self.sharded.full_state(loop.model, loop.ema, loop.optimizer)
        elif self.dist.is_main:
            full = ({k: v.detach().cpu() for k, v in loop.model.state_dict().items()},
                    {k: v.cpu() for k, v in loop.ema.items()}, loop.optimizer.state_dict())
        if not self.dist.is_main:
            return
        model_state, ema_state, optimizer_state = full
        atomic_torch_save({
            "step": loop.step,
            "model": model_state,
            "ema": ema_state,
            "optimizer": optimizer_state,
            "run": self.identity,
            "config": self.model_config(loop.model),
            "initial_eval": loop.initial_eval,
            "elapsed_s": elapsed,
        }, self.out / CHECKPOINT_FILE)

    def _log(self, row: dict[str, Any]) -> None:
        runfolder.append_jsonl(self.out / METRICS_JSONL, row)
        path = self.out / METRICS_CSV
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _log_eval(self, step: int, model: nn.Module, ema: dict[str, torch.Tensor]) -> None:
        row = {"step": step, "ema": self._evaluate(self.ema_model(model, ema)),
               "raw": self._evaluate(model)}
        runfolder.append_jsonl(self.out / EVAL_JSONL, row)

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows logged after the checkpoint being resumed (they will be redone).

        A row cut short by a kill is dropped; ``metrics.csv`` is rebuilt from the kept
        JSONL rows (its own last line may be cut anywhere, even inside the step).
        """
        metrics: list[dict[str, Any]] = []
        for path in (self.out / METRICS_JSONL, self.out / EVAL_JSONL):
            if not path.exists():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    if row.get("step", 0) <= step:
                        kept.append(line)
                        if path.name == METRICS_JSONL:
                            metrics.append(row)
                except (json.JSONDecodeError, AttributeError):
                    continue
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        csv_path = self.out / METRICS_CSV
        if csv_path.exists():
            buf = StringIO()
            if metrics:
                writer = csv.DictWriter(buf, fieldnames=list(metrics[0]))
                writer.writeheader()
                writer.writerows(metrics)
            atomic_write_text(csv_path, buf.getvalue())

    def _evaluate(self, model: nn.Module) -> dict[str, Any] | None:
        if self.eval_data is None:
            return None
        x, y = self.eval_data
        return evaluate(model, self.diffusion, x, y, teacher=self.teacher, seed=EVAL_SEED)

    def ema_init(self, model: nn.Module, trainable_keys: list[str]) -> dict[str, torch.Tensor]:
        """The EMA's first state: a float copy of every entry (the export is the EMA)."""
        return {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def ema_model(self, model: nn.Module, ema: dict[str, torch.Tensor]) -> nn.Module:
        exported = copy.deepcopy(model)
        exported.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in ema.items()})
        return exported.eval()

    def _finish(self, model, ema, step, initial_eval, step_times, elapsed,
                stopped_early) -> dict[str, Any]:
        exported = self.ema_model(model, ema)
        weights = self.export(exported)
        timing = {}
        if step_times:
            times = sorted(step_times[1:] or step_times)  # the first step warms up
            timing = {"steps_timed": len(times), "median_step_s": times[len(times) // 2],
                      "mean_step_s": sum(times) / len(times),
                      "samples_per_s": self.config.batch_size / (sum(times) / len(times))}
        summary = {
            **self._run_document(),
            "steps": step,
            "stopped_early": stopped_early,
            "elapsed_s": elapsed,
            "timing": timing,
            "eval": {"initial": initial_eval,
                     "final_ema": self._evaluate(exported),
                     "final_raw": self._evaluate(model)},
            "model": str(weights.parent),
            "parameters": self.parameter_counts,
        }
        atomic_write_json(self.out / SUMMARY_FILE, summary)
        return summary


class _StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the current step and save a checkpoint
    (under torchrun the ranks agree before each step, so a signal to any one of them stops
    them all at the same step).

    The first signal sets ``signum``; a second one interrupts at once (the atomic
    checkpoint write keeps the previous checkpoint intact). Installed only in the
    main thread, where Python delivers signals.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _sdpa_backends(device: torch.device, autocast_dtype: torch.dtype | None):
    """SDPA kernels for a training step: PyTorch's choice, except bf16 on a CPU.

    There the flash kernel's backward is slow at the short sequences of small models
    (such as the shipped teacher's 64 tokens), where the math kernel makes a faster step.
    The backward pass runs in the same context: with activation checkpointing it
    recomputes the blocks' forwards, which must choose the kernels the forward chose.
    """
    if device.type == "cpu" and autocast_dtype == torch.bfloat16:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def _fmt(terms: dict[str, Any]) -> str:
    return " ".join(f"{k}={float(v):.4f}" for k, v in terms.items())
