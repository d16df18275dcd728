"""``python -m attnbench run``: the main job -- sweep → quality → report.

A resolution sweep of every method (:mod:`attnbench.bench`), optionally the quality
stage (:mod:`attnbench.metrics`), then the run's report (:mod:`attnbench.report`).
This is the only module that imports all three stages.

Defaults depend on the device, and the output says which were used: on a GPU
DiT-XL/2 shapes in bfloat16 at every resolution from 256 to 8192 px; on CPU a
small DiT (``CPU_DEFAULT``) in float32 at 256-1024 px, a run of minutes.

``--model`` also takes the diffusers zoo (FLUX.1-dev, SD3.5, PixArt-Σ, SANA, Wan2.1 and
their ``*-tiny`` versions) and ``--model-path`` a local diffusers transformer folder:
measured at their true shapes (text tokens, video frames with ``--frames``) with random
weights unless loaded -- speed and memory need no trained weights.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import pandas as pd
import torch

from . import attention, cliutil, runfolder
from .attention.parallel import STRATEGIES
from .attention.specs import parse_methods
from .bench import context_parallel, sharded
from .bench.sweep import RESOLUTIONS, SweepPlan, run_sweep
from .bench.workloads import DiffusersModel, diffusers_model
from .common import dist as distributed
from .common.agreement import check_same_options
from .common.environment import environment
from .common.paths import REPO_ROOT
from .metrics.quality import EvalConfig, evaluate, parse_metrics
from .metrics.sample import SampleSettings
from .models import load_dit
from .models.configs import CPU_DEFAULT, DiTConfig, config_names, get_config
from .models.diffusers_configs import DIFFUSERS_CONFIGS, diffusers_config_names
from .report import write_report
from .results import (
    SPEED_LEVELS,
    STATUS_OK,
    ResultsWriter,
    Size,
    label,
    size_text,
    to_dataframe,
)

GPU_DEFAULTS = {"model": "DiT-XL/2", "dtype": "bfloat16", "res": RESOLUTIONS,
                "levels": ("attention", "model"), "budget": 120.0}
CPU_DEFAULTS = {"model": CPU_DEFAULT, "dtype": "float32", "res": (256, 512, 1024),
                "levels": ("attention", "model"), "budget": 30.0}
SUMMARY_COLUMNS = ["label", "level", "resolution", "tokens", "status", "density", "latency_ms",
                   "speedup_vs_softmax", "peak_mib", "memory_ratio_vs_softmax", "tflops_achieved",
                   "overhead_ms", "reason"]


def _default_methods(device: torch.device, dtype: torch.dtype) -> str:
    reasons = attention.available(device, dtype)
    return ",".join(name for name, reason in reasons.items() if reason is None)


def summary_frame(rows):
    """The columns a person reads first, in readable units."""
    frame = to_dataframe(rows)
    if frame.empty:
        return frame
    frame["label"] = [label(m, o) for m, o in zip(frame["method"], frame["options"], strict=True)]
    frame["resolution"] = [size_text(r, h) for r, h in zip(frame["resolution"], frame["height"],
                                                          strict=True)]
    frame["latency_ms"] = frame["latency_median_s"] * 1e3
    frame["peak_mib"] = frame["peak_memory_bytes"] / 2**20
    frame["overhead_ms"] = frame["overhead_s"] * 1e3
    return frame[SUMMARY_COLUMNS]


def parse_sizes(text: str, flag: str = "--res") -> list[Size]:
    """``"256,480x832"`` → square 256 px and 480 (height) × 832 (width) px, checked."""
    example = "256,1024 or 480x832"
    sizes = []
    for part in cliutil.name_list(flag, text, accepted=f"px or HEIGHTxWIDTH, e.g. {example}"):
        sides = Size.sides(part)
        if sides is None:
            raise cliutil.UsageError(f"{flag} takes comma-separated px or HEIGHTxWIDTH sizes "
                                     f"(e.g. {example}), got {part!r}")
        if min(sides) <= 0:
            raise cliutil.UsageError(f"{flag} {part}: must be > 0 (every side; e.g. {example})")
        sizes.append(Size.of(sides))
    return cliutil.unique(flag, sizes)


def run(args: argparse.Namespace) -> int:
    device = cliutil.device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    dtype = cliutil.dtype(defaults["dtype"] if args.dtype is None else args.dtype)
    config = _model(args, defaults)
    strategy = _context_parallel(args)
    levels = cliutil.choices("--level", ",".join(defaults["levels"]) if args.level is None
                             else args.level, SPEED_LEVELS)
    if strategy and levels != ["attention"]:
        if args.level is not None:
            raise cliutil.UsageError(f"--context-parallel measures the attention call: --level "
                                     f"{args.level} takes attention only")
        levels = ["attention"]
    if "block" in levels and isinstance(config, DiffusersModel):
        raise cliutil.UsageError(f"--level block is DiT-only (attnbench's DiT block); "
                                 f"{config.name} is measured at --level attention,model")
    if args.res is not None:
        resolutions = parse_sizes(args.res)
    elif isinstance(config, DiffusersModel) and config.entry.is_video:
        resolutions = [Size.of(config.entry.default_res)]  # a video at its published size
    else:
        resolutions = [Size.of(r) for r in defaults["res"]]
    if args.methods is None:
        method_items = _default_methods(device, dtype)
    else:
        method_items = cliutil.unique("--methods", cliutil.name_list(
            "--methods", args.methods, accepted=attention.names()))
    methods = cliutil.unique("--methods", parse_methods(method_items, args.method_options),
                             key=lambda m: m.label)
    budget = (defaults["budget"] if args.budget is None
              else cliutil.require_positive_float("--budget", args.budget, unit="seconds"))
    cliutil.require_positive_int("--batch", args.batch)
    cliutil.requires("--quality METRICS", args.quality is not None, {
        "--quality-ckpt": args.quality_ckpt, "--quality-num": args.quality_num,
        "--quality-steps": args.quality_steps, "--teacher": args.teacher})
    if args.quality is not None:
        _check_quality_inputs(args)
    ranks = _join_ranks(device, budget * len(resolutions) * len(levels) * len(methods))
    device = ranks.device if ranks else device
    plan = SweepPlan(config=config, methods=methods, resolutions=resolutions, levels=levels,
                     batch=args.batch, dtype=dtype, device=device, budget_s=budget)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else REPO_ROOT / "reports" / "runs" / stamp
    if ranks:
        try:  # before anything is written: ranks given other options would measure apart
            check_same_options(ranks, {k: v for k, v in vars(args).items()
                                       if k not in ("func", "argv", "out")})
            out = distributed.broadcast_object(ranks, out)  # rank 0's folder for every rank
        except BaseException:
            distributed.teardown(ranks)
            raise
        if not ranks.is_main:  # rank 0 writes; this rank measures its share
            try:
                with sharded.stop_cleanly(out, ranks.rank, ranks.world_size):
                    if strategy:
                        context_parallel.run_sweep(plan, None, strategy, progress=False)
                    else:
                        sharded.run_sweep(plan, None, out, progress=not args.no_progress)
            finally:
                distributed.teardown(ranks)
            return 0
    if not args.no_report:  # before any work: a user's report.md is never overwritten
        from .report.build import REPORT_FILES, is_report_file  # lazily: matplotlib

        runfolder.lock_folder(out, "run")
        runfolder.claim_files(out, REPORT_FILES, force=args.force, ours=is_report_file)
    meta = environment(device, ["python", "-m", "attnbench", *args.argv])
    described = ({"diffusers_model": config.describe()} if isinstance(config, DiffusersModel)
                 else {"model_config": config.to_dict()})
    meta.update({
        "model": config.name, **described, "dtype": str(dtype),
        "levels": levels, "resolutions": [r.width if r.square else str(r) for r in resolutions],
        "batch": args.batch,
        "methods": [m.label for m in methods], "budget_s": plan.budget_s,
        "timer": "warm-up + repetitions by time budget, synchronised; median, p20, p80; "
                 "CUDA events with L2 flush on GPU, perf_counter on CPU",
        "flop_convention": "forward, 2 FLOPs per multiply-add of matrix contractions; "
                           "element-wise work not counted",
    })
    writer = ResultsWriter(out, meta, force=args.force)
    cpu_default = device.type == "cpu" and not (args.model or args.model_path)
    print(f"attnbench run: {config.name} on {meta['device_name']}, {args.batch}× "
          f"{', '.join(map(str, resolutions))} px, levels {', '.join(levels)}, {dtype}"
          f"{' (CPU defaults: a small model)' if cpu_default else ''}", file=sys.stderr)
    if ranks:
        meta.update({"world_size": ranks.world_size, "dist_backend": ranks.backend,
                     "context_parallel": strategy or None})
    try:
        if ranks:  # --context-parallel splits each point; without it the points are dealt
            with sharded.stop_cleanly(out, ranks.rank, ranks.world_size):
                rows = (context_parallel.run_sweep(plan, writer, strategy,
                                                   progress=not args.no_progress) if strategy
                        else sharded.run_sweep(plan, writer, out, progress=not args.no_progress))
        else:
            rows = run_sweep(plan, writer, progress=not args.no_progress)
    finally:
        if ranks:
            distributed.teardown(ranks)
    with pd.option_context("display.max_rows", 500, "display.width", 200,
                           "display.max_colwidth", 60, "display.float_format", "{:.4g}".format):
        print(summary_frame(rows).to_string(index=False))
    ok = sum(r.status == STATUS_OK for r in rows)
    print(f"\n{ok}/{len(rows)} points measured; results in {out}", file=sys.stderr)
    if args.quality:
        _quality_stage(args, out, device)
    if not getattr(args, "no_report", False):
        _write_report(out)
    return 0


def _context_parallel(args: argparse.Namespace) -> str | None:
    """The ``--context-parallel`` strategy, checked: it needs torchrun's ranks and no
    quality stage (that runs in one process)."""
    if args.context_parallel is None:
        if distributed.launched_by_torchrun() and args.quality:
            raise cliutil.UsageError("--quality runs in one process: run it without torchrun")
        return None
    strategy = cliutil.choices("--context-parallel", args.context_parallel,
                               list(STRATEGIES))
    if len(strategy) != 1:
        raise cliutil.UsageError("--context-parallel takes one strategy per run "
                                 f"({', '.join(STRATEGIES)})")
    if not distributed.launched_by_torchrun():
        raise cliutil.UsageError("--context-parallel splits each point over ranks: launch "
                                 "with torchrun --nproc_per_node N -m attnbench run ...")
    if args.quality:
        raise cliutil.UsageError("--quality runs in one process: run it without "
                                 "--context-parallel")
    return strategy[0]


def _join_ranks(device: torch.device, work_s: float):
    """torchrun's process group (``None`` for one process), with collectives that wait as
    long as a rank's share of the sweep may take, at least 30 minutes."""
    if not distributed.launched_by_torchrun():
        return None
    try:
        return distributed.setup(str(device), timeout_s=max(1800.0, 2 * work_s))
    except ValueError as err:
        raise cliutil.UsageError(str(err)) from None


def _check_quality_inputs(args: argparse.Namespace) -> None:
    """The quality stage's flags, checked before the speed sweep starts."""
    parse_metrics(args.quality, flag="--quality")
    for ckpt in args.quality_ckpt or []:
        if not Path(ckpt).exists():
            raise FileNotFoundError(f"--quality-ckpt {ckpt}: no such file or folder")
    if args.teacher is not None and not Path(args.teacher).exists():
        raise FileNotFoundError(f"--teacher {args.teacher}: no such file or folder")
    for flag, value in (("--quality-num", args.quality_num),
                        ("--quality-steps", args.quality_steps)):
        if value is not None:
            cliutil.require_positive_int(flag, value)


def _model(args: argparse.Namespace, defaults: dict) -> DiTConfig | DiffusersModel:
    """The model of ``--model`` / ``--model-path`` / ``--ckpt`` (with ``--frames``), checked."""
    given = [flag for flag, value in (("--model", args.model), ("--model-path", args.model_path),
                                      ("--ckpt", args.ckpt)) if value]
    if len(given) > 1:
        raise cliutil.UsageError(f"{' and '.join(given)}: give one model (a DiT or diffusers "
                                 "name with --model, a folder with --model-path, or a DiT "
                                 "checkpoint with --ckpt)")
    if args.frames is not None and args.frames <= 0:
        raise cliutil.UsageError(f"--frames {args.frames}: must be a positive frame count")
    name = args.model or ("" if args.model_path else defaults["model"])
    if args.model_path or name.strip().lower() in DIFFUSERS_CONFIGS:
        if args.ckpt:
            raise cliutil.UsageError("--ckpt is a DiT checkpoint; it does not combine with a "
                                     "diffusers model")
        return diffusers_model(name or None, args.model_path, args.frames)
    if args.frames is not None:
        raise cliutil.UsageError(f"--frames: {name} is an image DiT; --frames is for video "
                                 "diffusers models (e.g. wan2.1-t2v-1.3b)")
    if args.ckpt:
        return load_dit(args.ckpt).config
    try:
        return get_config(name)
    except ValueError:
        raise cliutil.UsageError(
            f"--model {name!r} is neither a DiT config ({', '.join(config_names())}) nor a "
            f"diffusers model ({', '.join(diffusers_config_names())})") from None


def _quality_stage(args: argparse.Namespace, out: Path, device: torch.device) -> None:
    """Quality rows beside the speed rows: ``eval`` of each ``--quality-ckpt`` into ``out``.

    With no checkpoint given, the shipped teacher is evaluated. Sampling defaults are
    cheap on CPU (64 samples, 50 DDPM steps) and DiT's protocol on a GPU (250 steps);
    each row records the settings it was made with.
    """
    gpu = device.type == "cuda"
    settings = SampleSettings(num=args.quality_num or (1000 if gpu else 64),
                              steps=args.quality_steps or (250 if gpu else 50))
    config = EvalConfig(metrics=parse_metrics(args.quality, flag="--quality"), sampling=settings,
                        device=str(device), fidelity_num=min(64, settings.num))
    for ckpt in args.quality_ckpt or [None]:
        evaluate(ckpt, config, out, teacher=args.teacher, argv=["python", "-m", "attnbench",
                 *args.argv], progress=not args.no_progress)


def _write_report(out: Path) -> None:
    """The run's report (report.md / report.html / plots) into its directory, if it can be.

    A report failure never loses the results (already written) nor fails the run:
    it is one line on stderr, and ``python -m attnbench report DIR`` can retry it.
    """
    try:
        files = write_report([out])
        print(f"report: {files.html} and {files.markdown.name}", file=sys.stderr)
    except Exception as err:  # the results are safe: say why and go on
        message = " ".join(str(err).split())[:300]
        print(f"attnbench run: report not written ({type(err).__name__}: {message}); "
              f"retry with python -m attnbench report {out}", file=sys.stderr)


def add_parser(subparsers) -> None:

    p = subparsers.add_parser(
        "run",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--res", help="image sizes in px, e.g. 256,1024,8192 (square) or 480x832 "
                   "(height x width: Wan's 480p) (default: GPU 256…8192, CPU 256,512,1024; "
                   "a video model: its published size)")
    p.add_argument("--methods", help="comma-separated methods, variants as clear:radius=16 "
                   "(default: every method available here)")
    p.add_argument("--method-options", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="an option for every run of a method, e.g. clear.radius=8 (repeatable)")
    p.add_argument("--level", help=f"comma-separated levels: {', '.join(SPEED_LEVELS)} "
                   "(default attention,model); block is DiT-only (diffusers models: "
                   "attention = one self-attention call at the model's true layout, model "
                   "= one denoising step)")
    p.add_argument("--dtype", help=f"{', '.join(cliutil.DTYPES)} (default: GPU bf16, CPU fp32)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when visible)")
    p.add_argument("--budget", type=float, help="seconds one point may take; points predicted "
                   "to exceed it are skipped with the reason (default GPU 120, CPU 30)")
    p.add_argument("--model", type=cliutil.non_empty("--model", "a model name"),
                   help="the model whose shapes are measured: a DiT config "
                   f"({', '.join(config_names())}) or a diffusers model "
                   f"({', '.join(diffusers_config_names())}), built with random weights "
                   f"(default: GPU DiT-XL/2, CPU {CPU_DEFAULT})")
    p.add_argument("--model-path", metavar="DIR",
                   type=cliutil.non_empty("--model-path", "a folder"),
                   help="a local diffusers transformer folder (or a pipeline folder with "
                   "transformer/), loaded from local files only")
    p.add_argument("--frames", type=int, help="frames of a video model (default: the model's "
                   "usual frames, e.g. 81 for wan2.1); refused for image models")
    p.add_argument("--ckpt", type=cliutil.non_empty("--ckpt", "a checkpoint"),
                   help="take the model config from this DiT checkpoint instead")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--out", type=cliutil.non_empty("--out", "a folder"),
                   help="run directory (default reports/runs/<timestamp>/); "
                   "an existing one resumes")
    p.add_argument("--force", action="store_true",
                   help="overwrite files in --out that attnbench did not write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quality", metavar="METRICS",
                   help="also write quality rows: fid,geneval,fidelity (see python -m attnbench "
                   "eval); of each --quality-ckpt, or of the shipped teacher")
    p.add_argument("--quality-ckpt", action="append", metavar="CKPT",
                   help="a model (e.g. a distilled student) to evaluate; repeatable")
    p.add_argument("--teacher", help="teacher for the fidelity metrics (default: the shipped one)")
    p.add_argument("--quality-num", type=int, help="samples per model (default GPU 1000, CPU 64)")
    p.add_argument("--quality-steps", type=int,
                   help="DDPM steps (default GPU 250 = DiT's protocol, CPU 50)")
    p.add_argument("--no-report", action="store_true",
                   help="do not write report.md / report.html into the run directory")
    p.add_argument("--context-parallel", metavar="STRATEGY",
                   help=f"under torchrun: split each point's sequence over the ranks "
                   f"({', '.join(STRATEGIES)}) and measure latency, bytes per rank and "
                   "scaling efficiency (attention level). Without it, torchrun deals the "
                   "sweep's points over the ranks")
    p.set_defaults(func=run)
