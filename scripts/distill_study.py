"""Students of the shipped teacher, right after conversion and after N distillation steps.

For every method: convert the teacher by weight inheritance, distil it with the
method's recipe (``python -m attnbench distill``), and measure on the same held-out
noise the ε error against the teacher (before / every K steps / after), the wall
time per step, and the quality of its samples (GenEval proxy, shapes-FID, PSNR to
the teacher from the same noise) right after conversion and after distillation.
Writes ``OUT/table.md``, ``OUT/table.csv``, ``OUT/curves.png``, ``OUT/meta.json``
and keeps every run (``OUT/<method>/``) and the quality rows (``OUT/quality/converted``,
``OUT/quality/distilled``: results tables that ``python -m attnbench report`` renders).

    ./dev python scripts/distill_study.py --steps 1000 --eval-every 100 --out reports/distill-cpu

The teacher's grid is 8×8 tokens, so the methods' GPU defaults (CLEAR r=8, SLA
blocks of 64) would cover it whole and make the student the teacher; the default
methods here are sized to the grid: CLEAR r=3 (~44% of the pairs), SLA with blocks
of one token row and the top 2 of 8 blocks.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_METHODS = ("lit", "clear:radius=3", "sla:block_q=8,block_kv=8,topk=0.25")
DATA = {"self": "teacher self-samples", "shapes": "the shapes world (real data)"}
QUALITY = ("geneval", "geneval_strict", "fid", "psnr", "ssim")


def parse_spec(spec: str) -> tuple[str, dict[str, str], str]:
    """``"clear:radius=3"`` → ``("clear", {"radius": "3"}, "clear-radius3")``."""
    method, _, rest = spec.partition(":")
    options = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    slug = "-".join([method, *(f"{k}{v}" for k, v in options.items())])
    return method, options, slug


def quality_of(ckpt: Path | None, teacher: Path, run_dir: Path, *, num: int,
               steps: int, device: str) -> dict[str, float]:
    """GenEval proxy, shapes-FID and fidelity to the teacher of one model (rows in run_dir)."""
    from attnbench.metrics.quality import EvalConfig, evaluate
    from attnbench.metrics.sample import SampleSettings

    config = EvalConfig(metrics=("fid", "geneval", "fidelity"), fid_metrics=("fid",),
                        sampling=SampleSettings(num=num, steps=steps),
                        fidelity_num=min(64, num), device=device)
    result = evaluate(ckpt or teacher, config, run_dir, teacher=teacher, progress=False,
                      argv=sys.argv, log=lambda *a, **k: None)
    return {k: v for k, v in result["metrics"].items() if k in QUALITY}


def converted_student(teacher: Path, method: str, options: dict, out: Path) -> Path:
    """The student right after weight inheritance (no training), saved like a checkpoint."""
    from attnbench import convert
    from attnbench.models import load_dit, save_dit

    student, _ = convert(load_dit(teacher), method, seed=0, **options)
    return save_dit(student, out)


def eval_curve(run: Path, summary: dict) -> list[tuple[int, float]]:
    """(step, EMA ε-MSE vs teacher) from before training to the end."""
    points = [(0, summary["eval"]["initial"]["eps_mse_vs_teacher"])]
    path = run / "eval.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            points.append((row["step"], row["ema"]["eps_mse_vs_teacher"]))
    points.append((summary["steps"], summary["eval"]["final_ema"]["eps_mse_vs_teacher"]))
    return points


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, points in curves.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("held-out ε-MSE vs teacher (EMA student)")
    ax.set_title(f"Students of the shipped teacher: {steps} steps on CPU", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default=None, help="default: the shipped teacher")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: each recipe's, with its optimiser)")
    p.add_argument("--gen-samples", type=int, default=1024)
    p.add_argument("--quality-num", type=int, default=512)
    p.add_argument("--quality-steps", type=int, default=50)
    p.add_argument("--data", default="self",
                   help="distillation data: self (teacher samples), shapes, or latents")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    from attnbench.common.environment import environment
    from attnbench.distill.pipeline import SELF_SAMPLES_FILE, distill, resolve_teacher
    from attnbench.distill.trainer import TrainConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = resolve_teacher(args.teacher)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         eval_samples=args.eval_samples, eval_every=args.eval_every,
                         progress=False)
    quality = {"num": args.quality_num, "steps": args.quality_steps, "device": args.device}
    rows, curves = [], {}
    teacher_q = quality_of(None, teacher, out / "quality" / "distilled", **quality)
    rows.append({"method": "teacher (softmax)", "options": "", **{f"{k}_after": v
                 for k, v in teacher_q.items()}})
    shared_samples: Path | None = None
    for spec in args.methods:
        method, options, slug = parse_spec(spec)
        run = out / slug
        summary_path = run / "summary.json"
        if not summary_path.is_file():
            run.mkdir(parents=True, exist_ok=True)
            if shared_samples is not None and shared_samples.is_file() \
                    and not (run / SELF_SAMPLES_FILE).exists():
                shutil.copy(shared_samples, run / SELF_SAMPLES_FILE)  # same key: a cache hit
            print(f"distilling {spec} ({args.steps} steps) ...", flush=True)
            distill(run, method, config, teacher=teacher, options=options, data=args.data,
                    gen_samples=args.gen_samples, device=args.device, force=True)
        shared_samples = run / SELF_SAMPLES_FILE
        summary = json.loads(summary_path.read_text())
        before = quality_of(converted_student(teacher, method, options, run / "converted"),
                            teacher, out / "quality" / "converted", **quality)
        after = quality_of(run / "student", teacher, out / "quality" / "distilled", **quality)
        ev, timing = summary["eval"], summary["timing"]
        e0 = ev["initial"]["eps_mse_vs_teacher"]
        e1 = ev["final_ema"]["eps_mse_vs_teacher"]
        rows.append({
            "method": method, "options": ",".join(f"{k}={v}" for k, v in options.items()),
            "trainable": summary.get("parameters", {}).get("trainable"),
            "eps_vs_teacher_before": e0, "eps_vs_teacher_after": e1,
            "eps_vs_teacher_after_raw": ev["final_raw"]["eps_mse_vs_teacher"],
            "gap_closed": 1 - e1 / e0, "steps": summary["steps"],
            "median_step_s": timing["median_step_s"], "train_s": summary["elapsed_s"],
            **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()},
        })
        curves[f"{method} {rows[-1]['options']}".strip()] = eval_curve(run, summary)
        print(f"  {slug}: ε-MSE vs teacher {e0:.4g} → {e1:.4g}; "
              f"{timing['median_step_s']:.3f} s/step", flush=True)

    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (out / "table.md").write_text(markdown_table(rows, args))
    plot_curves(curves, out / "curves.png", args.steps)
    meta = {**environment(args.device, ["python", *sys.argv]), "args": vars(args),
            "teacher": str(teacher), "threads": torch.get_num_threads()}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    print((out / "table.md").read_text())
    return 0


def _f(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown_table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"Students of the shipped teacher after {args.steps} distillation steps "
            f"(batch {args.batch_size}, lr {args.lr}, data: {DATA.get(args.data, args.data)}, "
            f"{args.device}). "
            f"ε-MSE vs teacher: mean over {args.eval_samples} held-out "
            f"{'teacher samples' if args.data == 'self' else 'data'} at "
            f"timesteps spread over [0, 999], the same noise before and after (EMA student). "
            f"Quality: {args.quality_num} samples, {args.quality_steps} DDPM steps, CFG 1.5; "
            "GenEval proxy by the exact shapes detector, shapes-FID with the shipped shapes "
            "classifier's features, PSNR to the teacher from the same noise.\n\n")
    lines = ["| method | options | ε-MSE vs teacher: converted → distilled | gap closed | "
             "s/step | GenEval: converted → distilled | shapes-FID: converted → distilled | "
             "PSNR to teacher (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "eps_vs_teacher_before" not in r:
            lines.append(f"| {r['method']} | | — | — | — | {_f(r.get('geneval_after'), '.3f')} "
                         f"| {_f(r.get('fid_after'), '.1f')} | — |")
            continue
        lines.append(
            f"| {r['method']} | {r['options']} | {r['eps_vs_teacher_before']:.4f} → "
            f"{r['eps_vs_teacher_after']:.4f} | {r['gap_closed']:.0%} | "
            f"{r['median_step_s']:.3f} | {_f(r.get('geneval_before'), '.3f')} → "
            f"{_f(r.get('geneval_after'), '.3f')} | {_f(r.get('fid_before'), '.1f')} → "
            f"{_f(r.get('fid_after'), '.1f')} | {_f(r.get('psnr_before'), '.1f')} → "
            f"{_f(r.get('psnr_after'), '.1f')} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
