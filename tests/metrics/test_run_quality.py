"""``run --quality``: quality rows land in the same table as the speed rows, and the report."""

from __future__ import annotations

from attnbench.cli import main
from attnbench.results import load_table


def test_run_with_a_quality_stage(tmp_path, teacher_dir, student_dir):
    out = tmp_path / "run"
    args = ["run", "--res", "64", "--model", "DiT-T/2", "--methods", "softmax,lit",
            "--level", "attention", "--out", str(out), "--no-progress",
            "--quality", "fidelity", "--quality-ckpt", str(student_dir),
            "--teacher", str(teacher_dir), "--quality-num", "4", "--quality-steps", "3"]
    assert main(args) == 0
    frame, _ = load_table(out)
    assert set(frame["level"]) == {"attention", "quality"}
    quality = frame[frame["level"] == "quality"].iloc[0]
    assert quality["status"] == "ok"
    assert "quality" in (out / "report.md").read_text().lower()
