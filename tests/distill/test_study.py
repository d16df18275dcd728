"""scripts/distill_study.py end to end on a tiny teacher: the closing note's table."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "distill_study.py"


def _load():
    spec = importlib.util.spec_from_file_location("distill_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_spec_names_each_variant_apart():
    study = _load()
    assert study.parse_spec("lit") == ("lit", {}, "lit")
    assert study.parse_spec("sla:block_q=4,topk=0.5") == (
        "sla", {"block_q": "4", "topk": "0.5"}, "sla-block_q4-topk0.5")


def test_study_writes_the_table_curves_and_quality_rows(teacher_dir, tmp_path):
    study = _load()
    out = tmp_path / "study"
    assert study.main(["--out", str(out), "--teacher", str(teacher_dir), "--steps", "3",
                       "--eval-every", "2", "--eval-samples", "4", "--batch-size", "4",
                       "--gen-samples", "8", "--quality-num", "6", "--quality-steps", "2",
                       "--methods", "lit", "clear:radius=1"]) == 0
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [r["method"] for r in rows] == ["teacher (softmax)", "lit", "clear"]
    for r in rows[1:]:
        before, after = float(r["eps_vs_teacher_before"]), float(r["eps_vs_teacher_after"])
        assert before > 0 and after > 0
        assert abs(float(r["gap_closed"]) - (1 - after / before)) < 1e-9
        assert int(r["trainable"]) > 0 and float(r["median_step_s"]) > 0
        assert r["geneval_before"] and r["geneval_after"] and r["fid_after"]
    assert (out / "curves.png").stat().st_size > 0
    assert "| clear | radius=1 |" in (out / "table.md").read_text()
    for stage in ("converted", "distilled"):
        assert (out / "quality" / stage / "results.jsonl").is_file()
    # the teacher's self-samples are generated once and reused by the next method
    assert (out / "clear-radius1" / "teacher_samples.npz").is_file()
