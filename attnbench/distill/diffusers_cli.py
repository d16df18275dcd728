"""The ``distill`` flags and command of a ``--model-path`` pipeline run.

A light module (no torch model or diffusers import) so the CLI's parser stays fast;
the run itself is :func:`attnbench.distill.diffusers_distill.distill_pipeline`.
"""

from __future__ import annotations

from typing import Any

from ..cliutil import UsageError, non_empty, number, parse_options, positive_int


def add_pipeline_flags(p) -> None:
    """The ``distill`` flags of a ``--model-path`` pipeline run."""
    g = p.add_argument_group("diffusers pipeline (--model-path) or zoo entry (--model)")
    g.add_argument("--model", default=None, type=non_empty("--model", "a zoo name"),
                   help="world-t2i: the shipped shapes-world FLUX pipeline as --model-path "
                        "(its 64-px size and the world's prompts unless given); or a diffusers "
                        "zoo entry (e.g. flux.1-dev, wan-tiny) with random weights and --data "
                        "random or a .safetensors of latents and text embeddings: the "
                        "training's memory and speed without the weights")
    g.add_argument("--prompts", default=None, type=non_empty("--prompts", "a file"),
                   help="prompt file of --data self, one per line (default: the shipped set)")
    g.add_argument("--height", type=positive_int, default=None,
                   help="pixel height of --data self (default: the family's)")
    g.add_argument("--width", type=positive_int, default=None,
                   help="pixel width of --data self (default: the family's)")
    g.add_argument("--frames", type=positive_int, default=None,
                   help="video frames of --data self (Wan; default: the family's)")
    g.add_argument("--gen-guidance", type=number("--gen-guidance", low=0), default=None,
                   help="guidance of --data self (default: the pipeline's usual)")
    g.add_argument("--max-sequence-length", type=positive_int, default=None,
                   help="prompt tokens (default: the family's, capped by the tokenizers')")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the student's blocks in the backward pass (less memory)")


def distill_command(args, config) -> dict[str, Any]:
    """``distill --model-path`` / ``--model``: the flags checked (one line, exit 2), then the
    run."""
    if args.model is not None and args.model_path is not None:
        raise UsageError("--model and --model-path: give one model")
    if args.teacher is not None:
        raise UsageError("--teacher is for attnbench's DiT; with --model-path the pipeline's "
                         "transformer is the teacher (drop --teacher)")
    if args.num_heads is not None:
        raise UsageError("--num-heads: a diffusers student keeps its teacher's heads (their QK "
                         "norms are per head); drop --num-heads")
    gen_steps = None if args.gen_steps == "50" else _int_flag("--gen-steps", args.gen_steps)
    from .diffusers_distill import distill_pipeline  # lazy: diffusers is an optional extra

    return distill_pipeline(
        args.out, args.method, config, model_path=args.model_path, model=args.model,
        options=parse_options(args.option), weights=parse_options(args.weight),
        trainable=args.trainable, recipe=args.recipe, data=args.data, prompts=args.prompts,
        gen_samples=args.gen_samples, gen_steps=gen_steps, gen_guidance=args.gen_guidance,
        height=args.height, width=args.width, frames=args.frames,
        max_sequence_length=args.max_sequence_length, device=args.device,
        resume=args.resume, force=args.force,
        gradient_checkpointing=args.gradient_checkpointing)


def _int_flag(flag: str, text: str) -> int:
    if not str(text).isdigit() or int(text) <= 0:
        raise UsageError(f"{flag} {text!r}: with --model-path give a number of steps (e.g. 28)")
    return int(text)


