"""``python -m attnbench sample`` and ``python -m attnbench eval``: the quality stage.

``sample`` draws images with DiT's evaluation protocol (DDPM, 250 respaced steps,
CFG 1.5 on the first three channels by default) into PNGs and an ADM-format
``samples.npz``; under ``torchrun --nproc_per_node N -m attnbench sample ...``
the ranks split the seeded chunks and the union equals a one-process run (there,
write ``--num-samples N``: torchrun's own parser rejects ``--num`` as an ambiguous
abbreviation of its ``--numa-binding``).

``eval`` samples a checkpoint and writes its quality row -- FID family, GenEval
proxy, fidelity to the teacher -- into a results table (the one ``run`` writes,
so the report shows speed and quality side by side).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from ..cliutil import non_empty, number, positive_int
from ..common.paths import REPO_ROOT
from . import groups
from .engines import CLEAN_MODES, ENGINES, EXTRACTORS
from .fid import METRICS as FID_METRICS
from .pipeline_eval import GROUPS, evaluate_pair, score_student
from .pipeline_sample import add_pipeline_flags, sample_command
from .quality import METRIC_GROUPS, EvalConfig, evaluate, parse_metrics
from .sample import LABEL_MODES, SampleSettings, run_sampling


def _steps(text: str) -> int | str:
    """``250`` or a respacing string (``ddim50``, ``10,15,20``)."""
    try:
        value = int(text)
    except ValueError:
        return text
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--steps must be positive, got {value}")
    return value


def _cfg_channels(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg-channels takes an integer or 'all', got {text!r}"
                                         ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("--cfg-channels must be positive")
    return value


def _labels(text: str) -> str | list[int]:
    if text in LABEL_MODES:
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--labels takes {' / '.join(LABEL_MODES)} or comma-separated label ids") from None


def _settings(args: argparse.Namespace, num: int) -> SampleSettings:
    steps = 250 if args.steps is None else args.steps
    return SampleSettings(num=num, steps=steps, cfg_scale=args.cfg, sampler=args.sampler,
                          eta=args.eta, cfg_channels=args.cfg_channels, batch=args.batch,
                          seed=args.seed, labels=args.labels)


def _add_sampling_flags(p: argparse.ArgumentParser, *, num_default: int | None) -> None:
    g = p.add_argument_group("sampling (DiT's protocol by default)")
    # --num-samples / -n: under torchrun, whose parser takes --num for an ambiguous prefix of
    # its own --numa-binding before the script sees it
    names = ("--num", "--num-samples", "-n")
    if num_default is None:
        g.add_argument(*names, dest="num", type=positive_int, required=True,
                       help="number of samples (under torchrun write --num-samples or -n)")
    else:
        g.add_argument(*names, dest="num", type=positive_int, default=num_default,
                       help=f"number of samples (default {num_default}; DiT: 50,000; under "
                            "torchrun write --num-samples or -n)")
    g.add_argument("--steps", type=_steps, default=None,
                   help="sampling steps: respacing of the 1000 training steps (default 250); "
                        "also 'ddimN' or 'N1,N2,...'")
    g.add_argument("--cfg", type=number("--cfg", low=1), default=1.5,
                   help="classifier-free guidance scale (default 1.5; 1 = none)")
    g.add_argument("--cfg-channels", type=_cfg_channels, default=3, metavar="N|all",
                   help="channels guided: 3 = DiT's first-three-channels behaviour (default), "
                        "'all' = the standard formulation")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                   help="ancestral DDPM (DiT's evaluation) or DDIM (default ddpm)")
    g.add_argument("--eta", type=number("--eta", low=0, high=1), default=0.0,
                   help="DDIM eta, 0 to 1 (default 0)")
    g.add_argument("--batch", type=positive_int, default=64,
                   help="samples per chunk; each chunk has its own seed (default 64)")
    g.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    g.add_argument("--labels", type=_labels, default="uniform",
                   help="uniform (random, as DiT), balanced (cycle GenEval's six tasks) or ids")
    g.add_argument("--vae", type=non_empty("--vae", "a folder"),
                   help="diffusers AutoencoderKL folder decoding a latent model's samples")
    g.add_argument("--device", help="cpu or cuda[:N] (default: cuda when visible)")


# --------------------------------------------------------------------------- sample


def _sample(args: argparse.Namespace) -> int:
    from ..integrations.diffusers.world_t2i import apply_default_model

    apply_default_model(args)
    if args.model is not None:
        raise ValueError(f"--model {args.model!r}: sample takes --model world-t2i or "
                         "--model-path DIR (a diffusers pipeline folder)")
    if args.model_path is not None:
        summary = sample_command(args)
        if summary:
            print(f"{summary['num']} samples in {args.out}", file=sys.stderr)
        return 0
    summary = run_sampling(args.ckpt, _settings(args, args.num), args.out, device=args.device,
                           vae_path=args.vae, png=not args.no_png, force=args.force,
                           progress=not args.no_progress, argv=args.argv)
    if summary:
        print(f"{summary['num']} samples in {args.out} ({Path(summary['samples']).name}"
              f"{', PNGs' if summary['png'] else ''})", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- eval


def _eval(args: argparse.Namespace) -> int:
    if args.pipeline_samples is not None or args.model_path is not None:
        return _eval_pipeline(args)
    fid_metrics = tuple(m.strip() for m in args.fid_metrics.split(",") if m.strip())
    bad = [m for m in fid_metrics if m not in FID_METRICS]
    if bad:
        raise ValueError(f"--fid-metrics {args.fid_metrics!r}: choose from "
                         f"{', '.join(FID_METRICS)}")
    if args.samples and not Path(args.samples).is_file():
        raise FileNotFoundError(f"--samples {args.samples}: no such file")
    config = EvalConfig(
        metrics=parse_metrics(args.metrics), sampling=_settings(args, args.num),
        fid_metrics=fid_metrics, reference=args.reference, ref_num=args.ref_num,
        ref_seed=args.ref_seed, engine=args.fid_engine, extractor=args.feature_extractor,
        inception_weights=args.inception_weights, shapes_weights=args.shapes_weights,
        clean_mode=args.clean_mode, fidelity_num=args.fidelity_num, samples=args.samples,
        device=args.device, vae=args.vae,
    )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.out:
        out = Path(args.out)
    else:
        out = REPO_ROOT / "reports" / "runs" / f"eval-{stamp}"

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = evaluate(args.ckpt, config, out, teacher=args.teacher, argv=args.argv,
                      progress=not args.no_progress, log=log, force=args.force)
    metrics = result["metrics"]
    if args.json:
        print(json.dumps({"label": result["label"], "run_dir": str(out), "metrics": metrics},
                         indent=2))
    else:
        print(f"{result['label']}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    print(f"quality row written to {out}/results.json", file=sys.stderr)
    return 0


def _eval_pipeline(args: argparse.Namespace) -> int:
    """``eval --pipeline-samples DIR --teacher-samples DIR`` or ``eval --model-path DIR
    --student DIR`` (:mod:`.pipeline_eval`)."""
    if not args.out:
        raise ValueError("--out RUN_DIR is needed: the results table receiving the row")
    groups = GROUPS if args.metrics == ",".join(METRIC_GROUPS) else tuple(
        g.strip() for g in args.metrics.split(",") if g.strip())
    scoring = dict(groups=groups, engine=args.fid_engine,
                   extractor=args.feature_extractor or "inception",
                   weights=args.shapes_weights if args.feature_extractor == "shapes"
                   else args.inception_weights, clip_model=args.clip_model,
                   lpips_backbone=args.lpips_backbone, lpips_weights=args.lpips_weights,
                   device=args.device or "cpu", argv=args.argv, force=args.force)
    if args.model_path is not None:
        if args.pipeline_samples is not None or args.teacher_samples is not None:
            raise ValueError("--model-path samples the teacher and --student itself: drop "
                             "--pipeline-samples/--teacher-samples (or drop --model-path)")
        if args.student is None:
            raise ValueError("--model-path: eval scores a distilled student against its "
                             "teacher; pass --student DIR (distill --model-path OUT/student)")
        if args.steps is not None and not isinstance(args.steps, int):
            raise ValueError(f"--steps {args.steps!r}: with --model-path give a number of steps")
        result = score_student(args.model_path, args.student, args.out, num=args.num,
                               steps=args.steps, height=args.height, width=args.width,
                               frames=args.frames, prompts=args.prompts, seed=args.seed,
                               guidance=args.guidance,
                               max_sequence_length=args.max_sequence_length,
                               progress=not args.no_progress, **scoring)
    else:
        if not args.teacher_samples:
            raise ValueError("--pipeline-samples needs --teacher-samples DIR (the teacher's "
                             "`sample --model-path` folder)")
        result = evaluate_pair(args.pipeline_samples, args.teacher_samples, args.out, **scoring)
    print(f"{result['label']}: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                              result["metrics"].items()))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=non_empty("--ckpt", "a checkpoint"),
                   help="DiT checkpoint or attnbench model folder "
                                  "(default: the shipped teacher)")
    p.add_argument("--out", required=True, type=non_empty("--out", "a folder"),
                   help="output directory")
    _add_sampling_flags(p, num_default=None)
    p.add_argument("--no-png", action="store_true", help="write only samples.npz")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_pipeline_flags(p)
    p.set_defaults(func=_sample)

    p = subparsers.add_parser(
        "eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=non_empty("--ckpt", "a checkpoint"),
                   help="the model to evaluate (default: the shipped teacher)")
    p.add_argument("--teacher", type=non_empty("--teacher", "a checkpoint"),
                   help="teacher for --metrics fidelity (default: the shipped one)")
    p.add_argument("--metrics", default=",".join(METRIC_GROUPS),
                   help=f"comma-separated groups. A DiT: {groups.describe('dit')} (default "
                        f"all). A diffusers student (--pipeline-samples / --model-path): "
                        f"{groups.describe('pair')} (default {','.join(GROUPS)})")
    p.add_argument("--out", type=non_empty("--out", "a folder"),
                   help="run directory whose results table receives the quality row "
                                 "(default reports/runs/eval-<timestamp>/)")
    _add_sampling_flags(p, num_default=1000)
    p.add_argument("--samples", help="score this .npz (arr_0 images, arr_1 labels) instead of "
                                     "sampling")
    g = p.add_argument_group("FID and friends")
    g.add_argument("--fid-engine", choices=ENGINES, default="torch-fidelity",
                   help="torch-fidelity (default) or clean-fid")
    g.add_argument("--fid-metrics", default=",".join(FID_METRICS),
                   help=f"which of {', '.join(FID_METRICS)} (default all; IS and prc need "
                        "torch-fidelity)")
    g.add_argument("--feature-extractor", choices=EXTRACTORS,
                   help="shapes (the shipped shapes classifier; default for shapes-world models) "
                        "or inception (default otherwise)")
    g.add_argument("--inception-weights", help="local Inception file (never downloaded): "
                   "weights-inception-2015-12-05-6726825d.pth for torch-fidelity, "
                   "inception-2015-12-05.pt for clean-fid")
    g.add_argument("--shapes-weights", help="shapes-classifier weights (default: shipped)")
    g.add_argument("--clean-mode", choices=CLEAN_MODES, default="clean",
                   help="clean-fid's resize mode for Inception (default clean)")
    g.add_argument("--reference", help="shapes[:N] (default for shapes-world models), an ADM "
                   "reference batch / .npz with arr_0 or mu/sigma, or an image folder")
    g.add_argument("--ref-num", type=positive_int,
                   help="reference images (default: max(samples, 1000) for shapes)")
    g.add_argument("--ref-seed", type=int, default=1, help="shapes-world reference seed")
    g = p.add_argument_group("a diffusers pipeline's student (sample --model-path folders)")
    g.add_argument("--pipeline-samples", type=non_empty("--pipeline-samples", "a folder"),
                   help="the student's `sample --model-path` folder: "
                   "PSNR/SSIM against --teacher-samples image by image, FID/KID against them")
    g.add_argument("--teacher-samples", type=non_empty("--teacher-samples", "a folder"),
                   help="the teacher's folder (same prompts and seeds)")
    g.add_argument("--clip-model", type=non_empty("--clip-model", "a folder"),
                   help="a local CLIP model folder (transformers CLIPModel, its tokenizer and "
                        "image processor, save_pretrained): --metrics clip")
    g.add_argument("--lpips-backbone", type=non_empty("--lpips-backbone", "a file"),
                   help="AlexNet's weights (torchvision's alexnet state dict, .safetensors or "
                        ".pth): --metrics lpips")
    g.add_argument("--lpips-weights", type=non_empty("--lpips-weights", "a file"),
                   help="LPIPS' linear layers (the lpips package's weights/v0.1/alex.pth): "
                        "--metrics lpips")
    add_pipeline_flags(p, sample=False)
    g = p.add_argument_group("fidelity to the teacher")
    g.add_argument("--fidelity-num", type=positive_int, default=64,
                   help="samples drawn by both student and teacher (default 64)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--force", action="store_true",
                   help="overwrite files in --out that attnbench did not write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)
