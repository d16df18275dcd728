"""The budget-matched study of LiT, CLEAR and SLA on the world-t2i pipeline.

Every student distils the same teacher (the shipped world-t2i FLUX pipeline, or
``--model-path``) from the same teacher-generated data (``distill --data self``
with the same prompts, count, steps and seed: the same latents), with the same
steps, batch and seed; only the method, its published recipe and the ablated
setting differ. The matrix (``cells``):

* **main** -- LiT, CLEAR at two radii, SLA at two top-k, each with its recipe, at
  ``--steps``;
* **steps** -- each variant at ``--ablate-steps`` (0 = the converted student,
  untrained, saved by :func:`converted_student`);
* **trainable** -- each variant with the other ``--trainable`` (attention ↔ all);
* **kd_attn** -- each variant with the attention-output KD switched (CLEAR's recipe
  has it: off; LiT's and SLA's have not: on at 0.5, CLEAR's weight).

For each cell: ``sample`` (the world's prompts, the teacher's seeds), ``eval``
against the teacher's samples (FID/KID in the shipped shapes classifier's
feature space, PSNR/SSIM on the same prompts and seeds) and the GenEval proxy
(the exact detector; :func:`geneval_of`). For each variant: zero-shot
``fidelity`` before training and speed (``run``: attention and model level, at
the model's size and at ``--large-res``). Then ``OUT/report.md``, ``OUT/rows.jsonl``
(one row per cell, with the commands that made it) and ``OUT/pareto.png``.

Resumable: a stage whose output exists is skipped, an interrupted ``distill`` is
resumed; ``commands.jsonl`` logs every command run. ``--quick`` runs every stage
for a few steps on a tiny untrained pipeline (CI):

    python scripts/world_t2i_study.py --out reports/world_t2i_study
    python scripts/world_t2i_study.py --out /tmp/study --quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: the main variants: method, options (SLA: blocks of one token row of the 16×16 grid)
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lit", {}),
    ("clear", {"radius": 3}),
    ("clear", {"radius": 6}),
    ("sla", {"block_q": 16, "block_kv": 16, "topk": 0.1}),
    ("sla", {"block_q": 16, "block_kv": 16, "topk": 0.25}),
)
#: the recipes that carry the attention-output KD (kd_attn); the others get it at this weight
KD_ATTN = {"clear": True}
KD_ATTN_WEIGHT = 0.5
#: what a recipe made for DiT's learned-variance objective cannot take on a flow model:
#: LiT's kd_sigma (the variance head's KD) is off, said in the report
FLOW_WEIGHTS = {"lit": {"kd_sigma": 0.0}}
#: the zero-shot numbers the report shows (``fidelity``: layer output error, end-to-end ε)
ZERO_SHOT = ("rel_error", "eps_rel_error")
#: every method's recipe trains this (attnbench list); the ablation takes the other
RECIPE_TRAINABLE = {"lit": "all", "clear": "attention", "sla": "all"}


@dataclass
class Cell:
    """One student: a variant, its steps and the ablated setting (``what``)."""

    method: str
    options: dict[str, Any]
    steps: int
    what: str = "main"  # main, steps, trainable, kd_attn
    trainable: str | None = None  # None: the recipe's
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """``run``'s syntax: ``sla:block_q=16:block_kv=16:topk=0.1``."""
        return ":".join([self.method, *(f"{k}={v}" for k, v in self.options.items())])

    @property
    def slug(self) -> str:
        parts = [self.method, *(f"{k}{v}" for k, v in self.options.items()), f"s{self.steps}"]
        if self.trainable:
            parts.append(f"train-{self.trainable}")
        parts.extend(f"{k}{v:g}" for k, v in self.weights.items())
        return "-".join(parts).replace(".", "p")


def cells(steps: int, ablate_steps: list[int], ablate_all: bool = True) -> list[Cell]:
    """The matrix: every variant's main cell and its ablations (``ablate_all=False``: the
    ablations of the first variant only, as ``--quick`` runs them)."""
    out = []
    for index, (method, options) in enumerate(VARIANTS):
        out.append(Cell(method, options, steps))
        if index and not ablate_all:
            continue
        out.extend(Cell(method, options, n, "steps") for n in ablate_steps if n != steps)
        other = "all" if RECIPE_TRAINABLE[method] == "attention" else "attention"
        out.append(Cell(method, options, steps, "trainable", trainable=other))
        weight = 0.0 if KD_ATTN.get(method) else KD_ATTN_WEIGHT
        out.append(Cell(method, options, steps, "kd_attn", weights={"kd_attn": weight}))
    return out


# --------------------------------------------------------------------------- running commands


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = Path(args.model_path)
        self.size = json.loads((self.model / "vae" / "config.json").read_text())["sample_size"]

    def attnbench(self, *argv: str) -> list[str]:
        """Run ``python -m attnbench ARGV`` (logged in commands.jsonl); the command."""
        cmd = [sys.executable, "-m", "attnbench", *map(str, argv)]
        start = time.time()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        row = {"command": " ".join(["python", *cmd[1:]]), "rc": done.returncode,
               "seconds": round(time.time() - start, 1)}
        with open(self.out / "commands.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            raise RuntimeError(f"{row['command']} failed ({done.returncode}): {tail[0]}")
        return cmd

    def sample_flags(self) -> list[str]:
        a = self.args
        return ["--model-path", self.model, "--prompts", self.model / "prompts.txt",
                "--height", self.size, "--width", self.size, "--num", a.samples, "--steps",
                a.sample_steps, "--seed", 0, "--no-progress"]

    # ----- stages ------------------------------------------------------------------------
    def teacher_samples(self) -> Path:
        out = self.out / "samples" / "teacher"
        if not (out / "samples.json").is_file():
            self.attnbench("sample", *self.sample_flags(), "--out", out, "--force")
        return out

    def distill(self, cell: Cell) -> Path:
        run = self.out / "runs" / cell.slug
        if cell.steps == 0:
            if not (run / "student" / "student.json").is_file():
                converted_student(self.model, cell.method, cell.options, run / "student")
            return run / "student"
        if (run / "summary.json").is_file():
            return run / "student"
        a = self.args
        argv = ["distill", "--model-path", self.model, "--method", cell.method, "--out", run,
                "--steps", cell.steps, "--batch-size", a.batch, "--seed", a.seed,
                "--gen-samples", a.gen_samples, "--gen-steps", a.sample_steps,
                "--height", self.size, "--width", self.size,
                "--prompts", self.model / "prompts.txt", "--eval-samples", a.eval_samples,
                "--ckpt-every", max(1, cell.steps // 4), "--no-progress"]
        for key, value in cell.options.items():
            argv += ["--option", f"{key}={value}"]
        if cell.trainable:
            argv += ["--trainable", cell.trainable]
        for key, value in {**FLOW_WEIGHTS.get(cell.method, {}), **cell.weights}.items():
            argv += ["--weight", f"{key}={value:g}"]
        if (run / "checkpoint.pt").is_file():
            argv.append("--resume")
        elif (run / "run.json").is_file():
            argv.append("--force")  # stopped before its first checkpoint: nothing to keep
        self.attnbench(*argv)
        return run / "student"

    def quality(self, cell: Cell, student: Path, teacher: Path) -> dict[str, Any]:
        samples = self.out / "samples" / cell.slug
        if not (samples / "samples.json").is_file():
            self.attnbench("sample", *self.sample_flags(), "--student", student, "--out",
                           samples, "--force")
        evaluation = self.out / "eval" / cell.slug
        if not (evaluation / "results.json").is_file():
            self.attnbench("eval", "--pipeline-samples", samples, "--teacher-samples", teacher,
                           "--feature-extractor", "shapes", "--out", evaluation, "--force")
        row = json.loads((evaluation / "results.json").read_text())["rows"][0]
        extra = json.loads(row["extra"]) if isinstance(row["extra"], str) else row["extra"]
        return {**extra["metrics"], **geneval_of(samples)}

    def fidelity(self, variant: str) -> dict[str, Any]:
        out = self.out / "fidelity" / variant.replace(":", "_").replace(",", "_")
        if not (out / "results.json").is_file():
            self.attnbench("fidelity", "--model-path", self.model, "--methods", variant,
                           "--res", self.size, "--num", self.args.fidelity_num,
                           "--timesteps", self.args.fidelity_timesteps, "--sample-steps",
                           self.args.sample_steps, "--out", out, "--no-progress", "--force")
        return _fidelity_numbers(out / "results.json")

    def speed(self, study: list[Cell]) -> dict[str, dict[str, Any]]:
        """``{variant: {"<level>@<px>": speed-up vs softmax}}`` from one ``run``."""
        out = self.out / "speed"
        variants = {c.variant: c for c in study}
        if not (out / "results.json").is_file():
            res = ",".join(str(r) for r in dict.fromkeys((self.size, self.args.large_res)))
            self.attnbench("run", "--model-path", self.model, "--res", res, "--methods",
                           ",".join(["softmax", *variants]), "--level", "attention,model",
                           "--out", out, "--no-report", "--no-progress", "--force")
        return {v: _speedups(out / "results.json", c.method, c.options)
                for v, c in variants.items()}

    # ----- the whole study ----------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        a = self.args
        teacher = self.teacher_samples()
        rows_path = self.out / "rows.jsonl"
        done = {}
        if rows_path.is_file():
            for line in rows_path.read_text().splitlines():
                row = json.loads(line)
                done[row["slug"]] = row
        study = cells(a.steps, a.ablate_steps, ablate_all=not a.quick)
        variants = list(dict.fromkeys(c.variant for c in study))
        speed = self.speed(study) if not a.skip_speed else {}
        fidelity = {v: self.fidelity(v) for v in variants}
        teacher_row = {"slug": "teacher", "what": "teacher", **geneval_of(teacher)}
        rows = [teacher_row]
        for cell in study:
            if cell.slug in done:
                rows.append(done[cell.slug])
                continue
            student = self.distill(cell)
            row = {"slug": cell.slug, "variant": cell.variant, **asdict(cell),
                   **self.quality(cell, student, teacher),
                   "zero_shot": fidelity[cell.variant], "speed": speed.get(cell.variant, {})}
            with open(rows_path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            rows.append(row)
        write_report(self.out, rows, a)
        return rows


# --------------------------------------------------------------------------- measurements


def converted_student(model_path: Path, method: str, options: dict[str, Any], out: Path) -> Path:
    """The student right after conversion (0 steps): the teacher with ``method`` swapped in."""
    import copy

    from attnbench.integrations.diffusers.pipelines import config_hash, load_pipeline
    from attnbench.integrations.diffusers.student import save_student
    from attnbench.integrations.diffusers.swap import swap_attention

    pipe, _ = load_pipeline(model_path)
    teacher = pipe.transformer
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = copy.deepcopy(teacher)
    handle = swap_attention(student, method, **options)
    return save_student(out, student, handle, state, teacher_hash=config_hash(teacher),
                        extra={"steps": 0, "note": "converted, not trained"})


def geneval_of(samples: Path) -> dict[str, Any]:
    """The GenEval proxy of a ``sample`` folder of world prompts (labels from its prompts)."""
    import numpy as np

    from attnbench.data.shapes import PROMPTS
    from attnbench.integrations.diffusers.world_t2i import prompt_text
    from attnbench.metrics.geneval import geneval_score

    label_of = {prompt_text(p.label): p.label for p in PROMPTS}
    prompts = [json.loads(line)["prompt"] for line in
               (samples / "prompts.jsonl").read_text().splitlines()]
    images = np.load(samples / "samples.npz")["arr_0"]
    score = geneval_score(images, [label_of[p] for p in prompts])
    return {"geneval": score.overall, "geneval_tasks": score.tasks,
            "geneval_strict": score.strict_overall, "geneval_images": score.num_images}


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = json.loads(path.read_text())["rows"]
    for row in rows:
        if isinstance(row.get("extra"), str):
            row["extra"] = json.loads(row["extra"] or "{}")
    return rows


def _matches(row: dict[str, Any], method: str, options: dict[str, Any]) -> bool:
    """Is a result row (its options resolved in full) the variant ``method`` + ``options``?"""
    resolved = json.loads(row["options"]) if isinstance(row["options"], str) else row["options"]
    return row["method"] == method and all(
        str(resolved.get(k)) == str(v) or _close(resolved.get(k), v) for k, v in options.items())


def _close(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-9
    except (TypeError, ValueError):
        return False


def _fidelity_numbers(path: Path) -> dict[str, Any]:
    """A zero-shot ``fidelity`` table's numbers of its one variant (softmax's row dropped)."""
    out = {}
    for row in _rows(path):
        if row["method"] == "softmax":
            continue
        metrics = row["extra"].get("metrics", {})
        out.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return out


def _speedups(path: Path, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``{"<level>@<px>": speed-up vs softmax}`` of one variant in a ``run`` table."""
    return {f"{row['level']}@{row['resolution']}": row["speedup_vs_softmax"]
            for row in _rows(path)
            if row.get("speedup_vs_softmax") is not None and _matches(row, method, options)}


# --------------------------------------------------------------------------- the report


def write_report(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    columns = ("geneval", "geneval_strict", "fid", "kid", "psnr", "ssim")
    lines = [
        "# LiT, CLEAR and SLA on the world-t2i pipeline (budget-matched)", "",
        f"Teacher: `{args.model_path}`. Every student: {args.steps} steps (ablations aside), "
        f"batch {args.batch}, seed {args.seed}, the same {args.gen_samples} teacher samples; "
        f"quality on {args.samples} samples ({args.sample_steps} steps, the teacher's seeds). "
        "Commands: `commands.jsonl`; rows: `rows.jsonl`. "
        + "".join(f"{m}: {', '.join(f'{k}={v:g}' for k, v in w.items())} (the recipe's term "
                  "needs a learned-variance model; a flow model has none). "
                  for m, w in FLOW_WEIGHTS.items()), "",
        "| cell | what | steps | " + " | ".join(columns) + " | zero-shot | speed-up |",
        "|---|---|---|" + "---|" * (len(columns) + 2),
    ]
    for row in rows:
        values = [row.get(c) for c in columns]
        cells_ = [f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
                  for v in values]
        zero = row.get("zero_shot") or {}
        speed = row.get("speed") or {}
        lines.append(f"| {row['slug']} | {row.get('what', '')} | {row.get('steps', '')} | "
                     + " | ".join(cells_) + " | "
                     + ", ".join(f"{k} {zero[k]:.3g}" for k in ZERO_SHOT if k in zero) + " | "
                     + ", ".join(f"{k} {v:.2f}×" for k, v in speed.items()) + " |")
    lines += ["", correlation_line(rows)]
    lines += ["", "What may not be read into it: a 2.3 M-parameter model of a 64-px world of "
              "flat shapes is not FLUX; differences smaller than the spread over seeds "
              "(rerun with another --seed) are noise."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_pareto(out / "pareto.png", rows)


def correlation_line(rows: list[dict[str, Any]]) -> str:
    """Spearman's ρ of zero-shot ε error with post-distillation quality over the main cells."""
    from scipy.stats import spearmanr

    main = [r for r in rows if r.get("what") == "main" and "eps_rel_error" in
            (r.get("zero_shot") or {})]
    if len(main) < 3:
        return "Zero-shot fidelity vs quality after distillation: fewer than 3 variants."
    zero = [r["zero_shot"]["eps_rel_error"] for r in main]
    parts = []
    for key in ("geneval", "psnr"):
        rho = spearmanr(zero, [r.get(key) for r in main]).statistic
        parts.append(f"{key} ρ = {rho:.2f}")
    return (f"Zero-shot ε error (before training) vs quality after distillation, Spearman over "
            f"the {len(main)} main variants: {'; '.join(parts)} (a negative ρ: the closer "
            "zero-shot, the better after; with this few points only a sign, and compare the "
            "class-conditional teacher's in reports/).")


def plot_pareto(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for row in rows:
        speed = row.get("speed") or {}
        model = [v for k, v in speed.items() if k.startswith("model@")]
        if row.get("what") != "main" or not model:
            continue
        ax.scatter(max(model), row["geneval"], label=row["variant"])
    teacher = next((r for r in rows if r["slug"] == "teacher"), None)
    if teacher:
        ax.axhline(teacher["geneval"], color="grey", ls="--", lw=0.8, label="teacher")
    ax.set(xlabel="model-level speed-up vs softmax (largest size)", ylabel="GenEval proxy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- main


QUICK = dict(steps=2, ablate_steps=[0, 1], batch=2, gen_samples=4, samples=4,
             sample_steps=2, eval_samples=2, fidelity_num=2, fidelity_timesteps="500")


def quick_pipeline(out: Path) -> Path:
    """A tiny untrained world-t2i pipeline (``--quick`` without ``--model-path``)."""
    from attnbench.integrations.diffusers import world_t2i as w

    folder = out / "quick-pipeline"
    if not (folder / w.SHA_FILE).is_file():
        w.build_pipeline(w.CONFIGS["quick"]).save_pretrained(folder, safe_serialization=True)
        w.write_prompts(folder)
        w.write_sums(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model-path", default=None,
                   help="the teacher pipeline (default: the shipped world-t2i)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--ablate-steps", type=int, nargs="*", default=[0, 100, 300])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-samples", type=int, default=1024)
    p.add_argument("--samples", type=int, default=364, help="quality samples (4 per label)")
    p.add_argument("--sample-steps", type=int, default=28)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--fidelity-num", type=int, default=8)
    p.add_argument("--fidelity-timesteps", default="100,300,500,700,900")
    p.add_argument("--large-res", type=int, default=1024)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="every stage for a few steps, the ablations on LiT only (a tiny "
                        "untrained pipeline by default)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.large_res = 64
    if args.model_path is None:
        if args.quick:
            args.model_path = str(quick_pipeline(Path(args.out)))
        else:
            from attnbench.integrations.diffusers.world_t2i import default_pipeline_path

            args.model_path = str(default_pipeline_path())
    rows = Study(args).run()
    print(f"{len(rows) - 1} students; report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
