"""Does zero-shot fidelity predict quality after a short distillation? (shapes world, CPU)

For every method variant: its zero-shot fidelity to the shipped teacher right after
conversion (``python -m attnbench fidelity``'s measurement: layer relative error,
cosine, mass recall, end-to-end ε error, trajectory PSNR), then a short distillation
with the method's recipe (``attnbench.distill``, as ``scripts/distill_study.py``
does) and the ε error against the teacher and the shapes-FID after it
(``distill_study.quality_of``). Reports the Spearman rank correlation of every
zero-shot number with every outcome, with the number of variants it is over.

    ./dev python scripts/zero_shot_study.py --out reports/zero-shot-cpu

Writes ``OUT/README.md`` (the findings), ``OUT/table.csv``, ``OUT/spearman.csv``,
``OUT/scatter.png``, ``OUT/meta.json``, the zero-shot run (``OUT/zero-shot/``: its
tables and report) and the distillation runs (``OUT/runs/<variant>/``, not committed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

#: the teacher's grid is 8×8 tokens and 64 tokens: SLA with blocks of one token row
#: keeps 1, 2 or 4 of the 8 KV blocks; CLEAR's radii cover ~24 %, ~44 %, ~68 % of the pairs
VARIANTS = ("clear:radius=2", "clear:radius=3", "clear:radius=4",
            *(f"sla:topk={k}:block_q=8:block_kv=8:order=row-major" for k in (0.125, 0.25, 0.5)),
            "lit:heads=2", "lit:heads=4")
PREDICTORS = {  # zero-shot number: what "better" is
    "rel_error": "lower", "cosine": "higher", "mass_recall": "higher",
    "eps_rel_error": "lower", "psnr_trajectory": "higher",
}
OUTCOMES = {"eps_mse_after": "ε-MSE vs teacher after distillation",
            "fid_after": "shapes-FID after distillation"}


def spearman(x: list[float], y: list[float]) -> tuple[float, int]:
    """Spearman's ρ (Pearson on average ranks) over the pairs where both are finite; n."""
    import pandas as pd

    pairs = [(a, b) for a, b in zip(x, y, strict=True)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return float("nan"), len(pairs)
    frame = pd.DataFrame(pairs, columns=["x", "y"]).rank(method="average")
    return float(frame["x"].corr(frame["y"])), len(pairs)


def distil_variant(label: str, variant, teacher: Path, run: Path, config, args,
                   shared_samples: Path | None) -> dict:
    """Distil one variant (skipped when its summary exists); its ``summary.json``."""
    from attnbench.distill.pipeline import SELF_SAMPLES_FILE, distill

    summary_path = run / "summary.json"
    if not summary_path.is_file():
        run.mkdir(parents=True, exist_ok=True)
        if shared_samples is not None and shared_samples.is_file() \
                and not (run / SELF_SAMPLES_FILE).exists():
            shutil.copy(shared_samples, run / SELF_SAMPLES_FILE)  # same key: a cache hit
        print(f"distilling {label} ({args.steps} steps) ...", flush=True)
        distill(run, variant.method, config, teacher=teacher, options=dict(variant.options),
                num_heads=variant.heads, data="self", gen_samples=args.gen_samples,
                device=args.device, force=True)
    return json.loads(summary_path.read_text())


def plot_scatter(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=120)
    for ax, (outcome, title) in zip(axes, OUTCOMES.items(), strict=True):
        for r in rows:
            ax.scatter(r["rel_error"], r[outcome], s=25)
            ax.annotate(r["label"].replace(":block_q=8:block_kv=8", ""),
                        (r["rel_error"], r[outcome]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("zero-shot relative error (mean over layers × timesteps)")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    fig.suptitle("Zero-shot fidelity right after conversion vs quality after distillation",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default=None, help="default: the shipped teacher")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: each recipe's, with its optimiser)")
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--gen-samples", type=int, default=512)
    p.add_argument("--quality-num", type=int, default=256)
    p.add_argument("--quality-steps", type=int, default=25)
    p.add_argument("--zero-shot-num", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch
    from distill_study import quality_of

    from attnbench.common.environment import environment
    from attnbench.distill.pipeline import SELF_SAMPLES_FILE, resolve_teacher
    from attnbench.distill.trainer import TrainConfig
    from attnbench.metrics.zero_shot import FidelityConfig, parse_variants, zero_shot_fidelity
    from attnbench.models import load_dit
    from attnbench.report.zero_shot import write_zero_shot_report
    from attnbench.results import ZERO_SHOT_LEVEL
    from attnbench.zero_shot import SUMMARY_FILE, write_outputs

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = resolve_teacher(args.teacher)
    variants = parse_variants(",".join(args.variants))
    model = load_dit(teacher)
    meta = {**environment(args.device, ["python", *sys.argv]), "args": vars(args),
            "teacher": str(teacher), "threads": torch.get_num_threads()}

    # 1. zero-shot fidelity of every variant, right after conversion
    zs_config = FidelityConfig(variants=variants, num=args.zero_shot_num, device=args.device)
    done = out / "zero-shot" / SUMMARY_FILE
    if not done.is_file():  # kept from an earlier run of the study: the same measurement
        print("zero-shot fidelity ...", flush=True)
        zs = zero_shot_fidelity(model, zs_config, progress=False)
        write_outputs(out / "zero-shot", zs, model, zs_config, {**meta, "stage": ZERO_SHOT_LEVEL})
        write_zero_shot_report(out / "zero-shot")
    measured = json.loads(done.read_text())
    zero_shot = {s["label"]: s for s in measured["summaries"]}
    meta["zero_shot_s"] = measured["elapsed_s"]

    # 2. a short distillation of each, then its ε error and FID
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         eval_samples=args.eval_samples, eval_every=0, progress=False)
    quality = {"num": args.quality_num, "steps": args.quality_steps, "device": args.device}
    teacher_q = quality_of(None, teacher, out / "quality", **quality)
    rows, shared = [], None
    for variant in variants:
        label = variant.label
        slug = label.replace(":", "-").replace("=", "")
        run = out / "runs" / slug
        summary = distil_variant(label, variant, teacher, run, config, args, shared)
        shared = run / SELF_SAMPLES_FILE
        after = quality_of(run / "student", teacher, out / "quality", **quality)
        z = zero_shot[label]
        ev = summary["eval"]
        rows.append({
            "label": label, "method": variant.method, "heads": z["heads"],
            **{k: z[k] for k in PREDICTORS},
            "eps_mse_before": ev["initial"]["eps_mse_vs_teacher"],
            "eps_mse_after": ev["final_ema"]["eps_mse_vs_teacher"],
            "fid_after": after.get("fid"), "geneval_after": after.get("geneval"),
            "psnr_after": after.get("psnr"), "steps": summary["steps"],
            "median_step_s": summary["timing"]["median_step_s"],
        })
        print(f"  {label}: zero-shot rel. error {z['rel_error']:.3f}; ε-MSE after "
              f"{rows[-1]['eps_mse_after']:.4g}; FID after {rows[-1]['fid_after']:.1f}",
              flush=True)

    # 3. rank correlations
    corr = []
    for predictor, better in PREDICTORS.items():
        for outcome in [*OUTCOMES, "eps_mse_before"]:
            rho, n = spearman([r[predictor] for r in rows], [r[outcome] for r in rows])
            corr.append({"predictor": predictor, "better": better, "outcome": outcome,
                         "spearman": rho, "n": n})
    _write_csv(out / "table.csv", rows)
    _write_csv(out / "spearman.csv", corr)
    plot_scatter(rows, out / "scatter.png")
    meta.update({"elapsed_s": time.perf_counter() - started, "teacher_quality": teacher_q})
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    (out / "results.md").write_text(results_markdown(rows, corr, args, teacher_q))
    print((out / "results.md").read_text())
    return 0


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _f(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, fmt)


def results_markdown(rows: list[dict], corr: list[dict], args, teacher_q: dict) -> str:
    """The measured tables (the README's numbers come from here)."""
    lines = [f"Settings: {len(rows)} variants; zero-shot on {args.zero_shot_num} shapes-world "
             f"images at timesteps 100, 300, 500, 700, 900; distillation {args.steps} steps, "
             f"batch {args.batch_size}, lr {args.lr}, teacher self-samples "
             f"({args.gen_samples}), ε-MSE on {args.eval_samples} held-out samples (EMA "
             f"student); FID: {args.quality_num} samples, {args.quality_steps} DDPM steps, "
             f"CFG 1.5, shapes-classifier features (teacher: "
             f"{_f(teacher_q.get('fid'), '.1f')}); {args.device}.", "",
             "| variant | heads | zero-shot rel. error | cosine | mass recall | ε rel. error "
             "end to end | trajectory PSNR dB | ε-MSE converted | ε-MSE after | FID after |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['heads']} | {_f(r['rel_error'], '.3f')} | "
            f"{_f(r['cosine'], '.3f')} | {_f(r['mass_recall'], '.3f')} | "
            f"{_f(r['eps_rel_error'], '.3f')} | {_f(r['psnr_trajectory'], '.1f')} | "
            f"{_f(r['eps_mse_before'], '.4f')} | {_f(r['eps_mse_after'], '.4f')} | "
            f"{_f(r['fid_after'], '.1f')} |")
    lines += ["", "| zero-shot number (better) | outcome | Spearman ρ | n |", "|---|---|--:|--:|"]
    for c in corr:
        lines.append(f"| {c['predictor']} ({c['better']}) | {c['outcome']} | "
                     f"{_f(c['spearman'], '+.2f')} | {c['n']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
