"""torchrun with 2 gloo processes on CPU = one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from attnbench.cli import main
from attnbench.distill.io import load_training_checkpoint

from .test_distill import tiny_args


@pytest.mark.slow
def test_two_gloo_processes_match_one(teacher_dir, tmp_path):
    extra = ("--steps", "3", "--batch-size", "8", "--device", "cpu")
    single, double = tmp_path / "single", tmp_path / "ddp"
    assert main([*tiny_args(teacher_dir, single, "lit"), *extra]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "attnbench", *tiny_args(teacher_dir, double, "lit")[:], *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    run = json.loads((double / "run.json").read_text())
    assert run["world_size"] == 2 and run["backend"] == "gloo"
    a = load_training_checkpoint(single / "checkpoint.pt")
    b = load_training_checkpoint(double / "checkpoint.pt")
    assert a["step"] == b["step"] == 3
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=2e-5, rtol=1e-4), key
    # the teacher samples (generated half per rank) and the logged losses agree too
    rows_a = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_a) == len(rows_b) == 3
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("loss", "diffusion", "kd_eps", "kd_sigma"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    sa = json.loads((single / "summary.json").read_text())["eval"]
    sb = json.loads((double / "summary.json").read_text())["eval"]
    assert sa["initial"]["eps_mse_vs_teacher"] == pytest.approx(
        sb["initial"]["eps_mse_vs_teacher"], rel=1e-4)
