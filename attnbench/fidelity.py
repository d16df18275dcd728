"""``python -m attnbench fidelity``: zero-shot fidelity of every method on a model's activations.

A pipeline command beside ``run``: it chains the measurement
(``attnbench.metrics.zero_shot``) and its report section (``attnbench.report.zero_shot``).

Before any distillation: per attention layer × timestep × method, how close the
method's attention is to softmax on the q, k, v the model computes on
shapes-world images noised to each timestep (relative error, cosine, the share of
softmax's probability mass on the pairs the method computes exactly), softmax's own
entropy, effective rank and locality, and end to end (every layer converted at
once) the ε error per timestep and the PSNR of a short DDIM trajectory from the
same noise. See ``attnbench.metrics.zero_shot``.

Writes into ``--out``: ``fidelity.csv`` (the long table), ``end_to_end.csv``,
``locality.csv``, the results table (one ``level = fidelity`` row per method) and
``report.md`` / ``report.html`` with the heatmaps, the ranking and the locality curve.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

from . import cliutil, runfolder
from .bench.environment import REPO_ROOT, environment
from .distill.teacher import default_teacher_path
from .metrics.quality import is_shapes_model
from .metrics.zero_shot import (
    CHUNK_ELEMENTS,
    DEFAULT_METHODS,
    DEFAULT_TIMESTEPS,
    END_TO_END_CSV,
    FIDELITY_CSV,
    FIDELITY_LEVEL,
    HEADS_OPTION,
    HIGHER_IS_BETTER,
    LOCALITY_CSV,
    FidelityConfig,
    FidelityResult,
    check_timesteps,
    load_inputs,
    parse_variants,
    zero_shot_fidelity,
)
from .models import load_dit
from .models.configs import VAE_DOWNSAMPLE
from .report.build import REPORT_FILES, is_report_file
from .report.zero_shot import write_zero_shot_report
from .results import Result, ResultsWriter, Size, canonical_options

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
                         "zero-shot fidelity measures methods against a softmax model")
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


def result_rows(result: FidelityResult, model, config: FidelityConfig, device: str) -> list:
    """One :class:`~attnbench.results.Result` per variant (``level = fidelity``).

    ``options`` hold the method's resolved options and the student's ``heads`` (two
    variants that differ only in heads are two rows); the numbers sit in
    ``extra["metrics"]`` with their direction in ``extra["higher_is_better"]``.
    """

    cfg = model.config
    size = _image_size(cfg, config)
    hg, wg = _token_grid(cfg, config)
    rows = []
    for summary in result.summaries:
        info = result.students[summary["label"]]
        heads = info["heads"]
        metrics = {k: summary[k] for k in HIGHER_IS_BETTER}
        rows.append(Result(
            method=summary["method"],
            options=canonical_options({**info["options"], HEADS_OPTION: heads}),
            level=FIDELITY_LEVEL, resolution=size.width,
            height=0 if size.square else size.height, tokens=hg * wg,
            batch=config.num, dtype="float64", device=device, model=cfg.name or "custom",
            heads=heads, head_dim=cfg.hidden_size // heads,
            impl="reference (float64) per layer; the converted student end to end",
            extra={
                "metrics": metrics, "higher_is_better": dict(HIGHER_IS_BETTER),
                "label": summary["label"], "computed": info["computed"],
                "mass_recall_note": summary["mass_recall_note"],
                "timesteps": list(config.timesteps), "inputs": _inputs(config),
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


def write_outputs(out: Path, result: FidelityResult, model, config: FidelityConfig,
                  meta: dict[str, Any], *, force: bool = False) -> None:
    """The long tables, the results rows and ``fidelity.json`` into ``out``."""

    writer = ResultsWriter(out, meta, force=force)
    _write_csv(out / FIDELITY_CSV, result.layers)
    _write_csv(out / END_TO_END_CSV, result.end_to_end)
    _write_csv(out / LOCALITY_CSV, result.locality)
    for row in result_rows(result, model, config, meta.get("device", "cpu")):
        writer.append(row)
    writer.finalize()
    runfolder.atomic_write(out / SUMMARY_FILE, json.dumps(
        {"summaries": result.summaries, "students": result.students,
         "inputs": _inputs(config), "elapsed_s": result.elapsed_s}, indent=2, default=str))


def fidelity(args: argparse.Namespace) -> int:
    # every check before any work
    variants = parse_variants(args.methods, args.method_options)
    timesteps = check_timesteps(_ints(args.timesteps, "--timesteps"), 1000) if args.timesteps \
        else DEFAULT_TIMESTEPS
    num = None if args.num is None else cliutil.require_positive_int("--num", args.num)
    steps = cliutil.require_positive_int("--sample-steps", args.sample_steps)
    chunk = cliutil.require_positive_int("--chunk-elements", args.chunk_elements)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device {args.device!r}: use cpu or cuda[:N]")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu")
    model, ckpt = _load_model(args.ckpt, args.device, given_inputs=args.inputs is not None)
    given = None if args.inputs is None else load_inputs(args.inputs, model.config, num)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    out = Path(args.out) if args.out else REPO_ROOT / "reports" / "runs" / f"fidelity-{stamp}"
    runfolder.lock_folder(out, "fidelity")  # before any work: one writer, a user's files kept
    runfolder.claim_files(out, OUTPUT_FILES, force=args.force)
    runfolder.claim_files(out, REPORT_FILES, force=args.force, ours=is_report_file)
    config = FidelityConfig(variants=variants, timesteps=timesteps,
                            num=given.x0.shape[0] if given else (num or DEFAULT_NUM),
                            seed=args.seed, sample_steps=steps, chunk_elements=chunk,
                            device=args.device, inputs=given)
    meta = environment(args.device, ["python", "-m", "attnbench", *args.argv])
    meta.update({"stage": FIDELITY_LEVEL, "model": model.config.name, "checkpoint": str(ckpt),
                 "model_config": model.config.to_dict(), "dtype": "float64",
                 "methods": ["softmax", *(v.label for v in variants)],
                 "inputs": _inputs(config)})
    hg, wg = _token_grid(model.config, config)
    source = "shapes-world images" if given is None else f"inputs from {args.inputs}"
    print(f"attnbench fidelity: {model.config.name} ({model.config.depth} layers, grid "
          f"{hg}×{wg}), {len(variants)} method(s) + softmax, timesteps "
          f"{', '.join(map(str, timesteps))}, {config.num} {source}", file=sys.stderr)
    result = zero_shot_fidelity(model, config, progress=not args.no_progress)
    write_outputs(out, result, model, config, meta, force=args.force)
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
        "fidelity", help="zero-shot fidelity: each method vs softmax on the model's own q, k, v",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", help="a softmax shapes-world DiT checkpoint "
                   "(default: the shipped teacher)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated variants as in run, e.g. clear:radius=3, "
                   "sla:topk=0.25:block_q=8:block_kv=8; heads=N sets the student's head "
                   f"count (lit:heads=4); softmax is always measured (default {DEFAULT_METHODS})")
    p.add_argument("--method-options", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="an option for every variant of a method (repeatable)")
    p.add_argument("--timesteps", help="comma-separated diffusion steps in [0, 999] "
                   f"(default {','.join(map(str, DEFAULT_TIMESTEPS))})")
    p.add_argument("--inputs", metavar="FILE",
                   help="clean inputs of the model's own instead of the shapes world: a "
                   ".safetensors / .npz / .pt file (never unpickled) holding x0 [N, C, H, W] "
                   "(latents or pixels) and optionally y [N] (class labels; default the null "
                   "class); any softmax DiT checkpoint then works with --ckpt")
    p.add_argument("--num", type=int, help=f"shapes-world images (default {DEFAULT_NUM}); with "
                   "--inputs the first NUM samples (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of images, labels and noise")
    p.add_argument("--sample-steps", type=int, default=20,
                   help="DDIM steps of the trajectory compared by PSNR (default 20)")
    p.add_argument("--chunk-elements", type=int, default=CHUNK_ELEMENTS,
                   help=f"attention scores held at once (default {CHUNK_ELEMENTS})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--out", help="run directory (default reports/runs/fidelity-<timestamp>/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="overwrite files in --out that attnbench did not write")
    p.set_defaults(func=fidelity)
