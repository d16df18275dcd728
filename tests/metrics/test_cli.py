"""``sample`` and ``eval`` end to end: the quality row lands in the results table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnbench.cli import main
from attnbench.results import load_table

FAST = ["--num", "24", "--steps", "4", "--batch", "12", "--no-progress", "--device", "cpu"]


def _quality_rows(run_dir):
    frame, _ = load_table(run_dir)
    return frame[frame["level"] == "quality"]


def test_eval_writes_one_quality_row_the_report_reads(teacher_dir, student_dir, tmp_path,
                                                     capsys):
    out = tmp_path / "run"
    assert main(["eval", "--ckpt", str(student_dir), "--teacher", str(teacher_dir), *FAST,
                 "--fidelity-num", "6", "--ref-num", "60", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = printed["metrics"]
    for name in ("fid", "kid", "inception_score", "precision", "recall", "geneval",
                 "geneval_counting", "psnr", "ssim", "eps_mse_vs_teacher"):
        assert np.isfinite(metrics[name]), name
    rows = _quality_rows(out)
    assert len(rows) == 1
    row = rows.iloc[0]
    extra = json.loads(row["extra"])
    assert extra["metrics"] == metrics
    assert extra["fid"]["engine"] == "torch-fidelity" and extra["fid"]["num_samples"] == 24
    assert len(extra["fid"]["extractor_sha256"]) == 64 and extra["fid"]["resize"]
    assert 0 <= extra["fid"]["real_images_fid"] < metrics["fid"]  # the floor of a perfect model
    assert extra["fidelity"]["num"] == 6 and len(extra["fidelity"]["eps_mse_per_step"]) == 4
    assert set(extra["geneval"]["tasks"]) <= set(extra["geneval"]["counts"])
    assert (out / extra["samples"]).is_file()
    assert row["method"] == "softmax" and row["resolution"] == 16 and row["status"] == "ok"
    assert row["latency_median_s"] > 0

    from attnbench.report.tables import load_run, quality_table

    table = quality_table(load_run(out).frame)
    assert set(table["metric"]) == set(metrics)
    assert bool(table[table["metric"] == "fid"]["higher_is_better"].iloc[0]) is False

    # evaluating again with other metrics merges into the same row
    assert main(["eval", "--ckpt", str(student_dir), *FAST, "--metrics", "fid",
                 "--fid-engine", "clean-fid", "--ref-num", "60", "--out", str(out)]) == 0
    rows = _quality_rows(out)
    assert len(rows) == 1
    extra = json.loads(rows.iloc[0]["extra"])
    assert extra["fid"]["engine"] == "clean-fid" and "psnr" in extra["metrics"]
    assert "precision" not in extra["metrics"]  # torch-fidelity's, gone with its FID group
    assert "geneval" in extra["metrics"] and "geneval" in extra


def test_sample_then_eval_the_npz(teacher_dir, tmp_path):
    samples = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(teacher_dir), *FAST, "--out", str(samples),
                 "--cfg-channels", "all", "--labels", "balanced"]) == 0
    with np.load(samples / "samples.npz") as data:
        assert data["arr_0"].shape == (24, 16, 16, 3) and data["arr_1"].shape == (24,)
    out = tmp_path / "run"
    assert main(["eval", "--ckpt", str(teacher_dir), "--samples", str(samples / "samples.npz"),
                 "--metrics", "geneval,fid", "--fid-metrics", "fid", "--ref-num", "50",
                 "--out", str(out), "--no-progress"]) == 0
    extra = json.loads(_quality_rows(out).iloc[0]["extra"])
    assert set(extra["metrics"]) == {"fid", "geneval", "geneval_strict", *(f"geneval_{t}" for t in (
        "single_object", "two_object", "counting", "colors", "position", "color_attr"))}
    assert extra["geneval"]["counts"]["counting"] == 4  # balanced labels: 24 / 6 tasks


def test_errors_are_one_line_and_exit_2(teacher_dir, tmp_path, capsys, monkeypatch):
    def run(*args):
        code = main(list(args))
        err = capsys.readouterr().err.strip().splitlines()
        return code, err[-1] if err else ""

    code, err = run("eval", "--ckpt", str(teacher_dir), "--metrics", "fid,clip")
    assert code == 2 and "--metrics" in err
    code, err = run("eval", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert code == 2 and "nope" in err
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    code, err = run("eval", "--ckpt", str(teacher_dir), *FAST, "--metrics", "fid",
                    "--feature-extractor", "inception", "--out", str(tmp_path / "r2"))
    assert code == 2 and "weights-inception-2015-12-05-6726825d.pth" in err
    assert "never downloads" in err
    code, err = run("sample", "--ckpt", str(teacher_dir), "--num", "2", "--steps", "2",
                    "--out", str(tmp_path / "x"), "--vae", str(tmp_path / "novae"))
    assert code == 2 and "AutoencoderKL" in err
    with pytest.raises(SystemExit):
        main(["sample", "--num", "0", "--out", str(tmp_path / "y")])


def test_fidelity_of_the_teacher_to_itself_is_skipped(teacher_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["eval", "--ckpt", str(teacher_dir), "--teacher", str(teacher_dir), *FAST,
                 "--metrics", "fidelity", "--out", str(out)]) == 0
    extra = json.loads(_quality_rows(out).iloc[0]["extra"])
    assert extra["fidelity"]["skipped"] == "the model is the teacher"
    assert extra["metrics"] == {}
