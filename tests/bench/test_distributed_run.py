"""``run`` under torchrun (2 gloo processes on CPU): context-parallel points, sharded sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from attnbench.bench.sharded import HANDOVER, deal, merge_handovers
from attnbench.cli import main
from attnbench.results import Result, ResultsWriter, load_rows


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "attnbench", "run", "--no-progress", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_context_parallel_halo_rows_bytes_efficiency_and_report(tmp_path):
    out = tmp_path / "cp"
    done = _torchrun("--context-parallel", "halo", "--methods", "clear,lit,softmax",
                     "--res", "512", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["method"]: r for r in _rows(out)}
    for method in ("clear", "lit"):
        row = rows[method]
        assert row["status"] == "ok", row["reason"]
        assert (row["world_size"], row["strategy"], row["dist_backend"]) == (2, "halo", "gloo")
        assert row["comm_bytes"] == pytest.approx(row["comm_bytes_model"], rel=0.05)
        assert row["comm_bytes"] > 0 and 0 < row["scaling_efficiency"]
        assert row["impl"].startswith("halo/")
        assert row["latency_one_rank_s"] > 0 and row["peak_memory_bytes"] is not None
    assert rows["softmax"]["status"] == "unavailable"
    assert "ulysses or ring" in rows["softmax"]["reason"]
    report = (out / "report.md").read_text()
    assert "## Context parallelism" in report and "lit: latency and communication" in report


def test_context_parallel_needs_torchrun(capsys):
    assert main(["run", "--context-parallel", "halo", "--methods", "lit", "--res", "256",
                 "--out", "unused"]) == 2
    assert "torchrun" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sharded_two_rank_sweep_measures_the_points_of_one_process(tmp_path):
    args = ("--methods", "softmax,lit", "--res", "256,512", "--level", "attention",
            "--no-report", "--budget", "10")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", "--no-progress", *args, "--out", str(one)]) == 0
    done = _torchrun(*args, "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    keys = {r.key() for r in load_rows(one / "results.jsonl")}
    rows = load_rows(two / "results.jsonl")
    assert {r.key() for r in rows} == keys and len(rows) == len(keys)
    assert {r.extra["rank"] for r in rows} == {0, 1}  # both ranks measured a share
    assert not list(two.glob("rows.rank*.jsonl"))  # every hand-over merged


def test_points_are_dealt_by_size_and_level_group():
    points = [(s, lvl, m) for s in (256, 512, 1024) for lvl in ("attention",)
              for m in ("lit", "softmax")]
    shares = deal(points, 2)
    assert sorted(p for share in shares for p in share) == sorted(points)  # each once
    assert [p[0] for p in shares[0]] == [256, 256, 1024, 1024]  # a group stays together


def test_handed_over_rows_of_a_killed_rank_are_merged_once(tmp_path):
    row = Result("lit", "{}", "attention", 256, 256, 1, "float32", "cpu", "m", 2, 8)
    (tmp_path / HANDOVER.format(rank=1)).write_text(json.dumps(row.as_row()) + "\n{\"cut")
    writer = ResultsWriter(tmp_path, {})
    assert merge_handovers(writer) == 1
    assert [r.key() for r in writer.rows] == [row.key()]
    assert not (tmp_path / HANDOVER.format(rank=1)).exists()
    assert merge_handovers(writer) == 0 and len(load_rows(tmp_path / "results.jsonl")) == 1
