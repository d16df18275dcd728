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
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import attention, cliutil, runfolder
from .attention.parallel import STRATEGIES
from .attention.specs import MethodSpec, parse_methods
from .bench import context_parallel, sharded
from .bench.sweep import RESOLUTIONS, SweepPlan, run_sweep
from .bench.workloads import DiffusersModel, diffusers_model
from .common import dist as distributed
from .common.agreement import check_same_options
from .common.environment import environment
from .common.paths import REPO_ROOT
from .metrics import groups as metric_groups
from .metrics.pipeline_eval import score_student
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


@dataclass(frozen=True)
class RunPlan:
    """What ``run`` was asked, every flag checked (no work started): the sweep, its
    context-parallel strategy, the ``--student`` (``(folder, student.json)``) and torchrun's
    process group (``None`` for one process)."""

    sweep: SweepPlan
    strategy: str | None
    student: tuple[Path, dict] | None
    ranks: object | None

    @property
    def config(self) -> DiTConfig | DiffusersModel:
        return self.sweep.config


def run(args: argparse.Namespace) -> int:
    """Sweep → quality → report (module docstring), cut at those seams."""
    plan = _plan(args)
    out = _out_folder(args, plan.ranks)
    if plan.ranks and not plan.ranks.is_main:  # rank 0 writes; this rank measures its share
        _rank_share(args, plan, out)
        return 0
    if not args.no_report:  # before any work: a user's report.md is never overwritten
        from .report.build import REPORT_FILES, is_report_file  # lazily: matplotlib

        runfolder.lock_folder(out, "run")
        runfolder.claim_files(out, REPORT_FILES, force=args.force, ours=is_report_file)
    writer = ResultsWriter(out, _run_meta(args, plan), force=args.force)
    rows = _sweep(args, plan, writer)
    _print_rows(rows, out)
    if args.quality:
        _quality_stage(args, out, plan)
    if not args.no_report:
        _write_report(out)
    return 0


def _plan(args: argparse.Namespace) -> RunPlan:
    """Every flag of ``run`` checked and resolved against the device's defaults."""
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
    elif isinstance(config, DiffusersModel) and config.family.video:
        resolutions = [Size.of(config.entry.default_res)]  # a video at its published size
    else:
        resolutions = [Size.of(r) for r in defaults["res"]]
    student = _student(args, config)
    methods = _methods(args, device, dtype, student)
    budget = (defaults["budget"] if args.budget is None
              else cliutil.require_positive_float("--budget", args.budget, unit="seconds"))
    cliutil.require_positive_int("--batch", args.batch)
    cliutil.requires("--quality METRICS", args.quality is not None, {
        "--quality-ckpt": args.quality_ckpt, "--quality-num": args.quality_num,
        "--quality-steps": args.quality_steps, "--teacher": args.teacher})
    if args.quality is not None:
        _check_quality_inputs(args, config, student)
    ranks = _join_ranks(device, budget * len(resolutions) * len(levels) * len(methods))
    device = ranks.device if ranks else device
    sweep = SweepPlan(config=config, methods=methods, resolutions=resolutions, levels=levels,
                      batch=args.batch, dtype=dtype, device=device, budget_s=budget)
    return RunPlan(sweep, strategy, student, ranks)


def _methods(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
             student: tuple[Path, dict] | None) -> list:
    """``--methods`` (default: every method available here), then the student's method with
    its saved options (so its speed rows and its quality row carry one label)."""
    if args.methods is None:
        items = _default_methods(device, dtype) if student is None else "softmax"
    else:
        items = cliutil.unique("--methods", cliutil.name_list(
            "--methods", args.methods, accepted=attention.names()))
    methods = parse_methods(items, args.method_options)
    if student is not None:
        meta = student[1]
        methods.append(MethodSpec(meta["method"], dict(meta.get("options") or {})))
    return cliutil.unique("--methods", methods, key=lambda m: m.label)


def _student(args: argparse.Namespace, config) -> tuple[Path, dict] | None:
    """``--student DIR`` checked against the model before any work (family, config hash)."""
    if args.student is None:
        return None
    if not isinstance(config, DiffusersModel) or config.folder is None:
        raise cliutil.UsageError("--student goes on the diffusers model it was distilled from: "
                                 "pass that model's folder with --model-path")
    from .integrations.diffusers.student import student_for  # lazy: diffusers is optional

    teacher = json.loads((config.folder / "config.json").read_text())
    return student_for(args.student, config.entry.family, teacher)


def _out_folder(args: argparse.Namespace, ranks) -> Path:
    """``--out`` or a fresh time-stamped folder (rank 0's, under torchrun)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else REPO_ROOT / "reports" / "runs" / stamp
    if not ranks:
        return out
    try:  # before anything is written: ranks given other options would measure apart
        check_same_options(ranks, {k: v for k, v in vars(args).items()
                                   if k not in ("func", "argv", "out")})
        return distributed.broadcast_object(ranks, out)  # rank 0's folder for every rank
    except BaseException:
        distributed.teardown(ranks)
        raise


def _rank_share(args: argparse.Namespace, plan: RunPlan, out: Path) -> None:
    """A rank other than 0: its share of the sweep, nothing written."""
    try:
        with sharded.stop_cleanly(out, plan.ranks.rank, plan.ranks.world_size):
            if plan.strategy:
                context_parallel.run_sweep(plan.sweep, None, plan.strategy, progress=False)
            else:
                sharded.run_sweep(plan.sweep, None, out, progress=not args.no_progress)
    finally:
        distributed.teardown(plan.ranks)


def _run_meta(args: argparse.Namespace, plan: RunPlan) -> dict:
    """The run's metadata (results.json's header): environment, model, sweep, timer."""
    sweep, config = plan.sweep, plan.config
    meta = environment(sweep.device, ["python", "-m", "attnbench", *args.argv])
    described = ({"diffusers_model": config.describe()} if isinstance(config, DiffusersModel)
                 else {"model_config": config.to_dict()})
    meta.update({
        "model": config.name, **described, "dtype": str(sweep.dtype),
        "levels": sweep.levels,
        "resolutions": [r.width if r.square else str(r) for r in sweep.resolutions],
        "batch": sweep.batch,
        "methods": [m.label for m in sweep.methods], "budget_s": sweep.budget_s,
        "timer": "warm-up + repetitions by time budget, synchronised; median, p20, p80; "
                 "CUDA events with L2 flush on GPU, perf_counter on CPU",
        "flop_convention": "forward, 2 FLOPs per multiply-add of matrix contractions; "
                           "element-wise work not counted",
    })
    if plan.student is not None:
        meta["student"] = {"folder": str(plan.student[0]), **{
            k: plan.student[1].get(k) for k in ("family", "method", "options", "recipe")}}
    if plan.ranks:
        meta.update({"world_size": plan.ranks.world_size, "dist_backend": plan.ranks.backend,
                     "context_parallel": plan.strategy or None})
    return meta


def _sweep(args: argparse.Namespace, plan: RunPlan, writer: ResultsWriter) -> list:
    """The speed sweep: one process, torchrun's shares, or context-parallel points."""
    sweep = plan.sweep
    cpu_default = sweep.device.type == "cpu" and not (args.model or args.model_path)
    print(f"attnbench run: {plan.config.name} on {writer.meta['device_name']}, {sweep.batch}× "
          f"{', '.join(map(str, sweep.resolutions))} px, levels {', '.join(sweep.levels)}, "
          f"{sweep.dtype}{' (CPU defaults: a small model)' if cpu_default else ''}",
          file=sys.stderr)
    progress = not args.no_progress
    try:
        if plan.ranks:  # --context-parallel splits each point; without it the points are dealt
            with sharded.stop_cleanly(writer.run_dir, plan.ranks.rank, plan.ranks.world_size):
                if plan.strategy:
                    return context_parallel.run_sweep(sweep, writer, plan.strategy,
                                                      progress=progress)
                return sharded.run_sweep(sweep, writer, writer.run_dir, progress=progress)
        return run_sweep(sweep, writer, progress=progress)
    finally:
        if plan.ranks:
            distributed.teardown(plan.ranks)


def _print_rows(rows: list, out: Path) -> None:
    with pd.option_context("display.max_rows", 500, "display.width", 200,
                           "display.max_colwidth", 60, "display.float_format", "{:.4g}".format):
        print(summary_frame(rows).to_string(index=False))
    ok = sum(r.status == STATUS_OK for r in rows)
    print(f"\n{ok}/{len(rows)} points measured; results in {out}", file=sys.stderr)


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


def _check_quality_inputs(args: argparse.Namespace, config, student) -> None:
    """The quality stage's flags, checked before the speed sweep starts."""
    for flag, value in (("--quality-num", args.quality_num),
                        ("--quality-steps", args.quality_steps)):
        if value is not None:
            cliutil.require_positive_int(flag, value)
    if isinstance(config, DiffusersModel):
        _check_pipeline_quality(args, config, student)
        return
    parse_metrics(args.quality, flag="--quality")
    for ckpt in args.quality_ckpt or []:
        if not Path(ckpt).exists():
            raise FileNotFoundError(f"--quality-ckpt {ckpt}: no such file or folder")
    if args.teacher is not None and not Path(args.teacher).exists():
        raise FileNotFoundError(f"--teacher {args.teacher}: no such file or folder")


def _check_pipeline_quality(args: argparse.Namespace, config: DiffusersModel,
                            student) -> None:
    """A diffusers model's quality is its student's against the teacher's own samples."""
    if student is None:
        raise cliutil.UsageError("--quality on a diffusers model scores a distilled student "
                                 "against its teacher: pass --student DIR (and the pipeline "
                                 "folder with --model-path)")
    if args.quality_ckpt or args.teacher:
        raise cliutil.UsageError("--quality-ckpt/--teacher are attnbench DiT checkpoints; with "
                                 "--model-path the pipeline is the teacher and --student the "
                                 "model scored (drop them)")
    metric_groups.parse_groups(args.quality, "--quality", kind="pair")
    if not (Path(args.model_path) / "model_index.json").is_file():
        raise cliutil.UsageError(f"--model-path {args.model_path}: --quality samples through "
                                 "the stock pipeline: pass the pipeline folder (model_index.json "
                                 "beside transformer/), not the transformer folder")
    _pipeline_quality_size(args)


def _pipeline_quality_size(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """The size the quality stage samples at: the first ``--res`` (so its row pairs with
    that size's speed rows), else the family's default."""
    if args.res is None:
        return None, None
    size = parse_sizes(args.res)[0]
    return size.height, size.width


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


def _quality_stage(args: argparse.Namespace, out: Path, plan: RunPlan) -> None:
    """Quality rows beside the speed rows.

    A diffusers model: its ``--student`` scored against the teacher's own samples (same
    prompts and seeds) at the first ``--res``, through the stock pipeline
    (:func:`~attnbench.metrics.pipeline_eval.score_student`). attnbench's DiT: ``eval`` of
    each ``--quality-ckpt`` (with none, the shipped teacher). Sampling defaults are cheap on
    CPU (64 samples, 50 DDPM steps) and DiT's protocol on a GPU (250 steps); each row
    records the settings it was made with.
    """
    device = plan.sweep.device
    gpu = device.type == "cuda"
    argv = ["python", "-m", "attnbench", *args.argv]
    if isinstance(plan.config, DiffusersModel):
        height, width = _pipeline_quality_size(args)
        score_student(args.model_path, plan.student[0], out, num=args.quality_num or 16,
                      steps=args.quality_steps, height=height, width=width,
                      frames=plan.config.frames,
                      groups=metric_groups.parse_groups(args.quality, "--quality", kind="pair"),
                      device=str(device), argv=args.argv, force=args.force,
                      progress=not args.no_progress)
        return
    settings = SampleSettings(num=args.quality_num or (1000 if gpu else 64),
                              steps=args.quality_steps or (250 if gpu else 50))
    config = EvalConfig(metrics=parse_metrics(args.quality, flag="--quality"), sampling=settings,
                        device=str(device), fidelity_num=min(64, settings.num))
    for ckpt in args.quality_ckpt or [None]:
        evaluate(ckpt, config, out, teacher=args.teacher, argv=argv,
                 progress=not args.no_progress)


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
                   help=f"also write quality rows: {','.join(metric_groups.names('dit'))} (see "
                   "python -m attnbench eval) of each --quality-ckpt, or of the shipped "
                   "teacher; with --model-path PIPELINE_DIR --student DIR: "
                   f"{','.join(metric_groups.names('pair'))} of the student against the "
                   "teacher's own samples")
    p.add_argument("--student", metavar="DIR", type=cliutil.non_empty("--student", "a folder"),
                   help="a student of the --model-path model (distill --model-path "
                   "OUT/student): its method measured with its saved options, and with "
                   "--quality scored against the teacher, so the report shows its quality "
                   "beside its speed")
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
