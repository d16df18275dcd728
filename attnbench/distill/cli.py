"""``python -m attnbench distill`` and ``python -m attnbench train-teacher``.

    python -m attnbench distill --method lit --steps 200 --out runs/lit
    python -m attnbench distill --teacher DIR --method clear --option radius=3 \\
        --weight kd_attn=1.0 --steps 500 --out runs/clear-r3
    torchrun --nproc_per_node 2 -m attnbench distill --method sla ... --out runs/sla
    python -m attnbench train-teacher --out runs/teacher --steps 4000 --max-minutes 25

Without ``--teacher`` the shipped teacher (``attnbench/assets/teacher``) is used.
"""

from __future__ import annotations

import argparse
import json

import torch

from .. import runfolder
from ..cliutil import UsageError, non_empty, non_negative_int, number, parse_options, positive_int
from ..common.agreement import check_same_options
from ..common.dist import launched_by_torchrun, setup, teardown
from ..integrations.diffusers.world_t2i import apply_default_model
from ..models.teacher import TEACHER_CONFIG
from .pipeline import distill, train_teacher
from .trainer import TrainConfig


def _steps_spec(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _default(value, what: str = "") -> str:
    """A flag's default in its help: the value, or the recipe's (distill)."""
    return f"default {value}" if value is not None else f"default: the recipe's{what}"


def _add_training_flags(p: argparse.ArgumentParser, *, steps: int, batch: int,
                        lr: float | None, ema: float | None, warmup: int | None,
                        schedule: str = "constant", precision: str = "fp32",
                        weight_decay: float | None = 0.0, grad_clip: float | None = 1.0,
                        optimizer: str | None = "adamw") -> None:
    """The optimisation flags; ``None`` defaults take the distillation recipe's values
    (``attnbench list`` shows them; optim.py)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=steps, help=f"steps (default {steps})")
    g.add_argument("--batch-size", type=positive_int, default=batch,
                   help=f"global batch, split over the processes (default {batch})")
    g.add_argument("--optimizer", choices=("adamw", "prodigy"), default=optimizer,
                   help=f"optimiser ({_default(optimizer, '; CLEAR: prodigy')}; prodigy needs "
                        "pip install 'attnbench[prodigy]')")
    g.add_argument("--lr", type=number("--lr", low=0, low_open=True), default=lr,
                   help=f"learning rate ({_default(lr)})")
    g.add_argument("--weight-decay", type=number("--weight-decay", low=0), default=weight_decay,
                   help=f"decoupled weight decay ({_default(weight_decay)})")
    g.add_argument("--warmup-steps", type=non_negative_int, default=warmup,
                   help=f"linear learning-rate warm-up ({_default(warmup)})")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=schedule,
                   help=f"after the warm-up: constant, or cosine decay to 0 (default {schedule})")
    g.add_argument("--ema-decay", type=number("--ema-decay", low=0, high=1), default=ema,
                   help=f"EMA decay, warmed up as min(decay, (1+s)/(10+s)); 0 = no EMA "
                        f"({_default(ema)})")
    g.add_argument("--grad-clip", type=number("--grad-clip", low=0), default=grad_clip,
                   help=f"max gradient norm, 0 = off ({_default(grad_clip)})")
    g.add_argument("--precision", choices=("fp32", "bf16"), default=precision,
                   help=f"autocast dtype of the forward passes (default {precision})")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    g.add_argument("--ckpt-every", type=non_negative_int, default=0,
                   help="save checkpoint.pt every K steps (default 0: at the end only)")
    g.add_argument("--eval-samples", type=non_negative_int, default=64,
                   help="held-out samples of the ε evaluation before and after (default 64)")
    g.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="also evaluate every K steps, to eval.jsonl (default 0: before/after)")
    g.add_argument("--max-minutes", type=number("--max-minutes", low=0, low_open=True),
                   default=None,
                   help="stop (and save) after this much training time")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads of torch (1 is fastest on a busy machine: "
                        "oversubscribed threads wait on each other)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the student and the frozen teacher over the "
                        "ranks with FSDP2 (fully_shard per transformer block, then the root) "
                        "instead of replicating them (DDP): rank 0 alone reads the weights "
                        "(onto its CPU) and sends each rank its shards; checkpoints are the "
                        "same file")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block's activations in the backward "
                        "pass (less memory, one more forward per step)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--force", action="store_true", help="start over in an --out holding a run")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")


def _train_config(args: argparse.Namespace):
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.fsdp and not launched_by_torchrun():
        raise UsageError("--fsdp shards the model over torchrun's processes: launch with "
                         "torchrun --nproc_per_node N -m attnbench ... (N >= 2), or drop --fsdp")

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        ema_decay=args.ema_decay, grad_clip=args.grad_clip, precision=args.precision,
        seed=args.seed, ckpt_every=args.ckpt_every, eval_samples=args.eval_samples,
        eval_every=args.eval_every, max_minutes=args.max_minutes, progress=not args.no_progress,
        fsdp=args.fsdp, activation_checkpointing=args.activation_checkpointing,
    )
    config.validate()
    return config


def _same_on_every_rank(args: argparse.Namespace) -> None:
    """Under torchrun: join the process group and refuse ranks given other options."""
    if not launched_by_torchrun():
        return
    info = setup(args.device)
    try:
        check_same_options(info, {k: v for k, v in vars(args).items()
                                  if k not in ("func", "argv")})
    except BaseException:
        teardown(info)
        raise


def _print_summary(summary: dict, as_json: bool) -> None:
    if not summary:  # ranks other than 0
        return
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    ev = summary.get("eval") or {}
    timing = summary.get("timing") or {}
    print(f"{summary.get('steps')} steps in {summary.get('elapsed_s', 0):.1f} s "
          f"(median {timing.get('median_step_s', float('nan')):.3f} s/step); "
          f"model: {summary.get('model')}")
    for name in ("initial", "final_ema", "final_raw"):
        e = ev.get(name)
        if not e:
            continue
        parts = [f"{k}={e[k]:.5f}" for k in ("eps_mse_vs_teacher", "eps_mse") if k in e]
        print(f"  held-out {name:<9} " + " ".join(parts))


def _distill(args: argparse.Namespace) -> int:
    apply_default_model(args)  # --model world-t2i: the shipped pipeline folder
    config = _train_config(args)
    _same_on_every_rank(args)
    runfolder.lock_folder(args.out, "distill")
    if args.model_path is not None or args.model is not None:
        from .diffusers_cli import distill_command  # lazy: diffusers is an optional extra

        return _print_summary(distill_command(args, config), args.json) or 0
    weights = parse_options(args.weight, flag="--weight", example="kd_out=0.5")
    options = parse_options(args.option)
    gen_steps = _steps_spec(args.gen_steps)
    if args.gen_samples <= 0:
        raise UsageError("--gen-samples must be > 0")
    summary = distill(
        args.out, args.method, config, teacher=args.teacher, options=options,
        num_heads=args.num_heads, weights=weights, trainable=args.trainable,
        recipe=args.recipe, data=args.data,
        gen_samples=args.gen_samples, gen_steps=gen_steps, gen_cfg=args.gen_cfg,
        device=args.device, resume=args.resume, force=args.force,
        convert_seed=args.convert_seed,
    )
    _print_summary(summary, args.json)
    return 0


def _train_teacher(args: argparse.Namespace) -> int:
    config = _train_config(args)
    _same_on_every_rank(args)
    runfolder.lock_folder(args.out, "train-teacher")
    overrides = {}
    for key in ("hidden_size", "depth", "num_heads", "patch_size", "input_size"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    model_config = TEACHER_CONFIG.replace(**overrides) if overrides else TEACHER_CONFIG
    summary = train_teacher(args.out, config, model_config=model_config,
                            data_seed=args.data_seed, device=args.device, resume=args.resume,
                            force=args.force, grid=not args.no_grid)
    _print_summary(summary, args.json)
    if summary and not args.json:
        print(f"teacher: {summary.get('teacher')}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``distill`` and ``train-teacher``."""
    p = subparsers.add_parser(
        "distill",
        description=(
            "Convert the teacher (default: the shipped shapes-world DiT) to METHOD by weight "
            "inheritance, then train the student with the method's recipe (python -m "
            "attnbench list shows each with its source): lit = diffusion + 0.5·kd_eps + "
            "0.05·kd_sigma; clear = diffusion + 0.5·kd_out + 0.5·kd_attn (attention only, "
            "Prodigy); sla = kd_out (AdamW 1e-5, topk 0.1). Works under torchrun "
            "(DistributedDataParallel: NCCL on GPUs, gloo on CPU)."
        ),
    )
    p.add_argument("--teacher", default=None,
                   help="DiT checkpoint (file or directory); default: the shipped teacher")
    p.add_argument("--model-path", default=None, type=non_empty("--model-path", "a folder"),
                   help="a local diffusers pipeline folder (FLUX, SD3, PixArt-Σ, SANA, Wan): "
                        "distil its transformer with its family's objective "
                        "(attnbench/distill/diffusers_distill.py)")
    p.add_argument("--method", required=True, help="attention method (python -m attnbench list)")
    p.add_argument("--out", required=True, type=non_empty("--out", "a folder"),
                   help="run directory")
    p.add_argument("--option", "--options", dest="option", action="extend", nargs="+",
                   default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. --option radius=3)")
    p.add_argument("--num-heads", type=positive_int, default=None,
                   help="student heads (default: the conversion recipe's; LiT: few heads)")
    p.add_argument("--convert-seed", type=int, default=0,
                   help="seed of the non-inherited initialisation (default 0)")
    p.add_argument("--weight", action="extend", nargs="+", default=[], metavar="TERM=W",
                   help="a loss weight: diffusion, kd_eps, kd_sigma, kd_out, kd_attn")
    p.add_argument("--recipe", default=None,
                   help="a named recipe instead of the method's (e.g. sla-attnbench, "
                        "clear-post-proj; python -m attnbench list shows them)")
    p.add_argument("--trainable", choices=("all", "attention"), default=None,
                   help="parameters that train (default: the recipe's; CLEAR: attention)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="self",
                   help="self (teacher samples, default), shapes, or an .npz / folder of latents")
    d.add_argument("--gen-samples", type=positive_int, default=512,
                   help="teacher samples to generate with --data self (default 512)")
    d.add_argument("--gen-steps", default="50",
                   help="DDIM steps of those samples (default 50)")
    d.add_argument("--gen-cfg", type=number("--gen-cfg", low=0), default=1.0,
                   help="guidance scale of those samples (default 1.0: the teacher's own "
                        "distribution)")
    from .diffusers_cli import add_pipeline_flags  # lazy: diffusers is an optional extra

    add_pipeline_flags(p)
    # optimiser, lr, weight decay, warm-up, EMA and clipping: the recipe's unless given
    _add_training_flags(p, steps=200, batch=32, lr=None, ema=None, warmup=None,
                        weight_decay=None, grad_clip=None, optimizer=None)
    p.set_defaults(func=_distill)

    t = subparsers.add_parser(
        "train-teacher",
        description=(
            "Train a class-conditional DiT on the procedural shapes world with DiT's "
            "objective (ε-MSE + VB, learned variance) and write OUT/teacher/ (weights, "
            "config, training.json, SHA256SUMS) and OUT/samples.png."
        ),
    )
    t.add_argument("--out", required=True, type=non_empty("--out", "a folder"),
                   help="run directory")
    t.add_argument("--data-seed", type=int, default=0, help="seed of the shapes world")
    m = t.add_argument_group("model (default: the shipped teacher's config)")
    m.add_argument("--hidden-size", type=positive_int, default=None)
    m.add_argument("--depth", type=positive_int, default=None)
    m.add_argument("--num-heads", type=positive_int, default=None)
    m.add_argument("--patch-size", type=positive_int, default=None)
    m.add_argument("--input-size", type=positive_int, default=None,
                   help="image side in pixels (32 or 64)")
    t.add_argument("--no-grid", action="store_true", help="skip the sample grid")
    # the shipped teacher's recipe (its training.json records the run): bf16 autocast
    # reaches fp32's held-out ε error in fewer seconds per step on CPUs with bf16 support
    _add_training_flags(t, steps=6500, batch=64, lr=2e-3, ema=0.999, warmup=200,
                        schedule="cosine", precision="bf16")
    t.set_defaults(func=_train_teacher)
