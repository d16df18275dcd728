"""``python -m attnbench fidelity``: zero-shot, every method against softmax on a model's q, k, v.

A pipeline command beside ``run``: it chains the measurement
(``attnbench.metrics.zero_shot``) and its report section (``attnbench.report.zero_shot``).

Before any distillation: per attention layer × timestep × method, how close the
method's attention is to softmax on the q, k, v the model computes on
shapes-world images noised to each timestep (relative error, cosine, the share of
softmax's probability mass on the pairs the method computes exactly), softmax's own
entropy, effective rank and locality, and end to end (every layer converted at
once) the ε error per timestep and the PSNR of a short DDIM trajectory from the
same noise. See ``attnbench.metrics.zero_shot``.

Models: the shipped teacher, any softmax DiT checkpoint (``--ckpt``; with ``--inputs``
when it is not a shapes-world model), or a diffusers transformer (``--model-path`` /
``--model``: :mod:`attnbench.metrics.zero_shot_diffusers`).

Writes into ``--out``: ``fidelity.csv`` (the long table), ``end_to_end.csv``,
``locality.csv``, the results table (one ``level = zero-shot`` row per method) and
``report.md`` / ``report.html`` with the heatmaps, the ranking and the locality curve.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import cliutil, runfolder
from .bench.workloads import diffusers_model
from .common.environment import environment
from .common.paths import REPO_ROOT
from .integrations.diffusers.world_t2i import apply_default_model
from .metrics.quality import is_shapes_model
from .metrics.zero_shot import (
    CHUNK_ELEMENTS,
    DEFAULT_METHODS,
    DEFAULT_TIMESTEPS,
    END_TO_END_CSV,
    FIDELITY_CSV,
    HEADS_OPTION,
    HIGHER_IS_BETTER,
    LOCALITY_CSV,
    FidelityConfig,
    FidelityResult,
    check_timesteps,
    load_inputs,
    parse_variants,
    read_tensors,
    zero_shot_fidelity,
)
from .metrics.zero_shot_diffusers import (
    check_softmax_model,
    step_inputs,
    zero_shot_fidelity_diffusers,
)
from .models import load_dit
from .models.configs import VAE_DOWNSAMPLE
from .models.diffusers_configs import DIFFUSERS_CONFIGS, diffusers_config_names
from .models.teacher import default_teacher_path
from .report.build import REPORT_FILES, is_report_file
from .report.zero_shot import write_zero_shot_report
from .results import ZERO_SHOT_LEVEL, Result, ResultsWriter, Size, canonical_options

SUMMARY_FILE = "fidelity.json"
#: shapes-world images measured when ``--num`` is not given
DEFAULT_NUM = 8


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty: give e.g. 100,500,900")
    return values


def _load_model(ckpt: str | None, device: str, given_inputs: bool):
    """The model to measure (default: the shipped teacher): a softmax DiT; a shapes-world
    pixel DiT unless the inputs come from a file (``--inputs``)."""
    if ckpt is None:
        ckpt = str(default_teacher_path())
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such file or directory (an attnbench/DiT "
                                "checkpoint; omit --ckpt for the shipped teacher)")
    model = load_dit(ckpt, device=device)
    if not given_inputs and not is_shapes_model(model.config):
        raise ValueError(f"--ckpt {ckpt}: without --inputs, fidelity draws its inputs from "
                         f"the shapes world, which needs a shapes-world pixel model (3 "
                         f"channels, 91 classes); this one has {model.config.in_channels} "
                         f"channels and {model.config.num_classes} classes: pass --inputs "
                         "FILE with clean inputs of its own (x0 [N, C, H, W], labels y)")
    if model.config.attention != "softmax":
        raise ValueError(f"--ckpt {ckpt}: the model's attention is {model.config.attention!r}; "
                         "zero-shot measures methods against a softmax model")
    return model, ckpt


#: the files the command writes beside the results table and the report
OUTPUT_FILES = (FIDELITY_CSV, END_TO_END_CSV, LOCALITY_CSV, SUMMARY_FILE)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as a CSV, atomically (a kill leaves the previous file or none)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    runfolder.atomic_write(path, write)


@dataclass
class Subject:
    """What was measured, as the results rows name it: the model, the image size, the
    tokens of one attention call, the model's width per head count, and the inputs."""

    model: str
    size: Size
    tokens: int
    width: int  # channels of q (heads × head_dim)
    inputs: dict[str, Any]
    impl: str = "reference (float64) per layer; the converted student end to end"


def dit_subject(model, config: FidelityConfig) -> Subject:
    cfg = model.config
    hg, wg = _token_grid(cfg, config)
    return Subject(cfg.name or "custom", _image_size(cfg, config), hg * wg, cfg.hidden_size,
                   _inputs(config))


def result_rows(result: FidelityResult, subject: Subject, config: FidelityConfig,
                device: str) -> list:
    """One :class:`~attnbench.results.Result` per variant (``level = zero-shot``).

    ``options`` hold the method's resolved options and the student's ``heads`` (two
    variants that differ only in heads are two rows) and a trained student's folder
    (``--student``: beside its zero-shot conversion, another row); the numbers sit in
    ``extra["metrics"]`` with their direction in ``extra["higher_is_better"]``.
    """
    rows = []
    for summary in result.summaries:
        info = result.students[summary["label"]]
        heads = info["heads"]
        metrics = {k: summary[k] for k in HIGHER_IS_BETTER}
        rows.append(Result(
            method=summary["method"],
            options=canonical_options({**info["options"], HEADS_OPTION: heads,
                                       **({"student": info["student"]} if "student" in info
                                          else {})}),
            level=ZERO_SHOT_LEVEL, resolution=subject.size.width,
            height=subject.size.row_height, tokens=subject.tokens,
            batch=config.num, dtype="float64", device=device, model=subject.model,
            heads=heads, head_dim=subject.width // heads, impl=subject.impl,
            extra={
                "metrics": metrics, "higher_is_better": dict(HIGHER_IS_BETTER),
                "label": summary["label"], "computed": info["computed"],
                "mass_recall_note": summary["mass_recall_note"],
                **({"psnr_note": summary["psnr_note"]} if "psnr_note" in summary else {}),
                "timesteps": list(config.timesteps), "inputs": subject.inputs,
            },
        ))
    return rows


def _token_grid(cfg, config: FidelityConfig) -> tuple[int, int]:
    """The token grid the inputs make (the model's own grid for shapes-world images)."""
    if config.inputs is None:
        return cfg.grid
    h, w = config.inputs.x0.shape[-2:]
    return h // cfg.patch_size, w // cfg.patch_size


def _image_size(cfg, config: FidelityConfig) -> Size:
    """The image size of the inputs in px (latents: × the VAE's 8)."""
    if config.inputs is None:
        return Size.of(cfg.input_size)
    h, w = config.inputs.x0.shape[-2:]
    scale = 1 if cfg.is_pixel else VAE_DOWNSAMPLE
    return Size(h * scale, w * scale)


def _inputs(config: FidelityConfig) -> dict[str, Any]:
    given = config.inputs
    data = ("shapes world" if given is None else
            f"--inputs {given.source}: x0 {list(given.x0.shape)}, labels y")
    num = config.num if given is None else given.x0.shape[0]
    return {"data": data, "num": num, "seed": config.seed,
            "timesteps": list(config.timesteps), "noise": f"torch.randn, seed {config.seed}",
            "trajectory": f"DDIM {config.sample_steps} steps (eta 0), no guidance, "
                          "same noise and labels for the model and each student"}


def write_outputs(out: Path, result: FidelityResult, subject: Subject, config: FidelityConfig,
                  meta: dict[str, Any], *, force: bool = False) -> None:
    """The long tables, the results rows and ``fidelity.json`` into ``out``."""

    writer = ResultsWriter(out, meta, force=force)
    _write_csv(out / FIDELITY_CSV, result.layers)
    _write_csv(out / END_TO_END_CSV, result.end_to_end)
    _write_csv(out / LOCALITY_CSV, result.locality)
    for row in result_rows(result, subject, config, meta.get("device", "cpu")):
        writer.append(row)
    writer.finalize()
    runfolder.atomic_write(out / SUMMARY_FILE, json.dumps(
        {"summaries": result.summaries, "students": result.students,
         "inputs": subject.inputs, "elapsed_s": result.elapsed_s}, indent=2, default=str))


def _check_device(device: str) -> None:
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device {device!r}: use cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")


def _claim(args: argparse.Namespace) -> Path:
    """The run folder, locked, its files claimed (after every check, before any work)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else REPO_ROOT / "reports" / "runs" / f"fidelity-{stamp}"
    runfolder.lock_folder(out, "fidelity")  # one writer, a user's files kept
    runfolder.claim_files(out, OUTPUT_FILES, force=args.force)
    runfolder.claim_files(out, REPORT_FILES, force=args.force, ours=is_report_file)
    return out


def fidelity(args: argparse.Namespace) -> int:
    # every check before any work
    variants = parse_variants(args.methods, args.method_options)
    timesteps = check_timesteps(_ints(args.timesteps, "--timesteps"), 1000) \
        if args.timesteps is not None else DEFAULT_TIMESTEPS
    num = None if args.num is None else cliutil.require_positive_int("--num", args.num)
    steps = cliutil.require_positive_int("--sample-steps", args.sample_steps)
    chunk = cliutil.require_positive_int("--chunk-elements", args.chunk_elements)
    _check_device(args.device)
    config = FidelityConfig(variants=variants, timesteps=timesteps, num=num or DEFAULT_NUM,
                            seed=args.seed, sample_steps=steps, chunk_elements=chunk,
                            device=args.device)
    if args.model or args.model_path:
        return _fidelity_diffusers(args, config)
    if args.student is not None:
        raise ValueError("--student is a diffusers student (distill --model-path OUT/student): "
                         "pass its teacher with --model-path; a DiT student goes in --ckpt")
    if args.res or args.frames:
        raise ValueError(f"{'--res' if args.res else '--frames'} is for diffusers models "
                         "(--model / --model-path); a DiT's size is its inputs'")
    model, ckpt = _load_model(args.ckpt, args.device, given_inputs=args.inputs is not None)
    if args.inputs is not None:
        config.inputs = load_inputs(args.inputs, model.config, num)
        config.num = config.inputs.x0.shape[0]
    out = _claim(args)
    subject = dit_subject(model, config)
    meta = environment(args.device, ["python", "-m", "attnbench", *args.argv])
    meta.update({"stage": ZERO_SHOT_LEVEL, "model": model.config.name, "checkpoint": str(ckpt),
                 "model_config": model.config.to_dict(), "dtype": "float64",
                 "methods": ["softmax", *(v.label for v in variants)],
                 "inputs": subject.inputs})
    hg, wg = _token_grid(model.config, config)
    source = "shapes-world images" if args.inputs is None else f"inputs from {args.inputs}"
    print(f"attnbench fidelity: {model.config.name} ({model.config.depth} layers, grid "
          f"{hg}×{wg}), {len(variants)} method(s) + softmax, timesteps "
          f"{', '.join(map(str, timesteps))}, {config.num} {source}", file=sys.stderr)
    result = zero_shot_fidelity(model, config, progress=not args.no_progress)
    return _finish(out, result, subject, config, meta, args)


def _fidelity_diffusers(args: argparse.Namespace, config: FidelityConfig) -> int:
    """``fidelity --model NAME / --model-path DIR``: a diffusers transformer."""
    if args.ckpt:
        raise ValueError("--ckpt is an attnbench/DiT checkpoint; it does not combine with "
                         "--model / --model-path")
    apply_default_model(args)
    if args.model and args.model_path:
        raise ValueError("--model and --model-path: give one model")
    if args.model and args.model.strip().lower() not in DIFFUSERS_CONFIGS:
        raise ValueError(f"--model {args.model!r}: fidelity takes a diffusers zoo name "
                         f"({', '.join(diffusers_config_names())}); a DiT goes in --ckpt")

    # lazy: diffusers is an optional extra
    from .integrations.diffusers import build_transformer, load_transformer, model_shapes

    chosen = diffusers_model(args.model, args.model_path, args.frames)
    entry = chosen.entry
    check_softmax_model(entry, chosen.name)
    if args.student is not None:
        config.variants = [*config.variants, student_variant(args.student, chosen)]
    for variant in config.variants:
        if variant.heads is not None:
            raise ValueError(f"--methods {variant.label}: a diffusers model keeps its heads "
                             "(its QK norms are per head); leave heads= out")
    try:
        size = Size.of(args.res) if args.res else Size.of(entry.default_res)
    except ValueError:
        raise ValueError(f"--res {args.res!r}: one size, px (1024) or HEIGHTxWIDTH (480x832)") \
            from None

    shapes = model_shapes(entry, tuple(size), chosen.frames)  # a size it cannot run: here
    given, source = None, ""
    if args.inputs is not None:
        given, source = read_tensors(args.inputs, "--inputs", "tensors named as the "
                                     "transformer's forward inputs, e.g. hidden_states")
    clean = step_inputs(entry, shapes, num=config.num, seed=config.seed, device="cpu",
                        dtype=torch.float32, given=given, source=source)  # names, shapes
    if chosen.folder is None:
        model = build_transformer(entry, seed=args.seed)
        weights = (f"random (seed {args.seed}): an untrained model's zero-shot numbers say "
                   "nothing about a trained one; use --model-path")
        print(f"warning: {entry.name} with {weights}", file=sys.stderr)
    else:
        model, entry = load_transformer(chosen.folder, dtype=torch.float32)
        weights = f"--model-path {chosen.folder}"
    out = _claim(args)
    meta = environment(args.device, ["python", "-m", "attnbench", *args.argv])
    meta.update({"stage": ZERO_SHOT_LEVEL, "model": chosen.name, "diffusers_model":
                 chosen.describe(), "weights": weights, "dtype": "float64",
                 "methods": ["softmax", *(v.label for v in config.variants)]})
    print(f"attnbench fidelity: {chosen.name} ({shapes.attention_layers} attention layers, "
          f"{shapes.layout.describe()} tokens), {len(config.variants)} method(s) + softmax, "
          f"timesteps {', '.join(map(str, config.timesteps))}, {config.num} inputs",
          file=sys.stderr)
    result = zero_shot_fidelity_diffusers(model, entry, shapes, config, clean=clean,
                                          progress=not args.no_progress)
    inputs = {"data": clean.source, "num": config.num, "seed": config.seed,
              "timesteps": list(config.timesteps), "noise": f"torch.randn, seed {config.seed + 1}",
              "layout": shapes.layout.describe(), "weights": weights,
              "trajectory": "not measured: attnbench has no sampler for diffusers models"}
    meta["inputs"] = inputs
    subject = Subject(chosen.name, size, shapes.layout.tokens, shapes.heads * shapes.head_dim,
                      inputs, impl="reference (float64) per layer on the model's q, k, v; the "
                                   "swapped student end to end")
    return _finish(out, result, subject, config, meta, args)


def student_variant(folder: str, chosen):
    """``--student DIR``: the trained student as one more variant, checked against the
    ``--model-path`` model (family, config hash) before any weight loads."""
    from .integrations.diffusers.student import student_for
    from .metrics.zero_shot import Variant

    if chosen.folder is None:
        raise ValueError("--student goes on the model it was distilled from: pass that "
                         "model's folder with --model-path")
    teacher = json.loads((chosen.folder / "config.json").read_text())
    _, meta = student_for(folder, chosen.entry.family, teacher)
    return Variant(meta["method"], dict(meta.get("options") or {}), student=str(folder))


def _finish(out: Path, result: FidelityResult, subject: Subject, config: FidelityConfig,
            meta: dict[str, Any], args: argparse.Namespace) -> int:
    write_outputs(out, result, subject, config, meta, force=args.force)
    _print_ranking(result)
    files = write_zero_shot_report(out)
    print(f"results in {out}; report: {files[0].name}, {files[1].name}", file=sys.stderr)
    return 0


def _print_ranking(result: FidelityResult) -> None:
    print(f"{'method':<40} {'rel_error':>10} {'cosine':>8} {'mass':>7} {'ε rel err':>10} "
          f"{'PSNR dB':>8}")
    for s in sorted(result.summaries, key=lambda s: s["rel_error"]):
        print(f"{s['label']:<40} {s['rel_error']:>10.4g} {s['cosine']:>8.4f} "
              f"{s['mass_recall']:>7.3f} {s['eps_rel_error']:>10.4g} "
              f"{s['psnr_trajectory']:>8.2f}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fidelity",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", type=cliutil.non_empty("--ckpt", "a checkpoint"),
                   help="a softmax shapes-world DiT checkpoint "
                   "(default: the shipped teacher)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated variants as in run, e.g. clear:radius=3, "
                   "sla:topk=0.25:block_q=8:block_kv=8; heads=N sets the student's head "
                   f"count (lit:heads=4); softmax is always measured (default {DEFAULT_METHODS})")
    p.add_argument("--method-options", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="an option for every variant of a method (repeatable)")
    p.add_argument("--timesteps", help="comma-separated diffusion steps in [0, 999] "
                   f"(default {','.join(map(str, DEFAULT_TIMESTEPS))})")
    p.add_argument("--model", type=cliutil.non_empty("--model", "a model name"),
                   help="a diffusers zoo model (random weights: a check of the "
                   "path, not of a trained model), e.g. flux-tiny; see --model-path")
    p.add_argument("--model-path", metavar="DIR",
                   type=cliutil.non_empty("--model-path", "a folder"),
                   help="a local diffusers transformer folder "
                   "(a pipeline folder's transformer/ too; local files only)")
    p.add_argument("--student", metavar="DIR", type=cliutil.non_empty("--student", "a folder"),
                   help="a trained student of the --model-path model (distill --model-path "
                   "OUT/student), measured beside the zero-shot --methods")
    p.add_argument("--res", help="a diffusers model's image size, px or HEIGHTxWIDTH "
                   "(default: its published size)")
    p.add_argument("--frames", type=int, help="frames of a video diffusers model (default: "
                   "the model's usual frames)")
    p.add_argument("--inputs", metavar="FILE",
                   help="clean inputs of the model's own instead of the shapes world: a "
                   ".safetensors / .npz / .pt file (never unpickled) holding x0 [N, C, H, W] "
                   "(latents or pixels) and optionally y [N] (class labels; default the null "
                   "class); any softmax DiT checkpoint then works with --ckpt. With --model / "
                   "--model-path: tensors named as the transformer's forward inputs "
                   "(hidden_states: the clean latents, encoder_hidden_states, ...) in place of "
                   "the random ones")
    p.add_argument("--num", type=int, help=f"shapes-world images (default {DEFAULT_NUM}); with "
                   "--inputs the first NUM samples (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of images, labels and noise")
    p.add_argument("--sample-steps", type=int, default=20,
                   help="DDIM steps of the trajectory compared by PSNR (default 20)")
    p.add_argument("--chunk-elements", type=int, default=CHUNK_ELEMENTS,
                   help=f"attention scores held at once (default {CHUNK_ELEMENTS})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--out", type=cliutil.non_empty("--out", "a folder"),
                   help="run directory (default reports/runs/fidelity-<timestamp>/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="overwrite files in --out that attnbench did not write")
    p.set_defaults(func=fidelity)
