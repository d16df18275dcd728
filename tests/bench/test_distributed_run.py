"""``run`` under torchrun (2 gloo processes on CPU): context-parallel points, sharded sweeps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from attnbench import runfolder
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


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker ``rank`` (a child of ``parent`` with RANK=rank)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers in /proc")
def test_a_rank_killed_mid_sweep_loses_nothing_and_a_rerun_measures_each_point_once(tmp_path):
    out = tmp_path / "killed"
    args = ["--methods", "softmax,lit", "--res", "256,384,512,640", "--level", "attention",
            "--no-report", "--budget", "10", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "attnbench", "run", "--no-progress", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    handover = out / HANDOVER.format(rank=1)
    deadline = time.monotonic() + 240
    while not (handover.exists() and handover.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "rank 1 measured nothing"
        time.sleep(0.05)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)  # rank 1, in the middle of its share
    _, err = proc.communicate(timeout=240)  # rank 0 does not hang
    assert proc.returncode != 0
    said = [line for line in err.splitlines() if line.startswith("attnbench run: error:")]
    assert len(said) == 1 and "rank 0 of 2" in said[0], err[-3000:]
    assert "rerun the same command" in said[0]
    before = {}  # every row written before the kill, by point
    for path in (out / "results.jsonl", handover):
        if path.exists():
            runfolder.repair_tail(path)
            before.update({r.key(): r for r in load_rows(path)})
    assert before

    done = _torchrun(*args)  # the same command again: the rest of the sweep
    assert done.returncode == 0, done.stderr[-3000:]
    rows = load_rows(out / "results.jsonl")
    assert len(rows) == len({r.key() for r in rows}) == 8  # 2 methods × 4 sizes, once each
    assert {(r.method, r.resolution) for r in rows} == {
        (m, s) for m in ("softmax", "lit") for s in (256, 384, 512, 640)}
    after = {r.key(): r for r in rows}
    for key, row in before.items():  # kept as measured, not measured again
        assert after[key].latency_median_s == row.latency_median_s, key
        assert after[key].extra["wall_s"] == row.extra["wall_s"], key
    assert not list(out.glob("rows.rank*.jsonl"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_given_other_options_fail_with_one_line_before_writing(tmp_path):
    out = tmp_path / "mismatch"
    port = str(_free_port())
    procs = []
    for rank, budget in ((0, "10"), (1, "5")):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "attnbench", "run", "--no-progress", "--methods", "lit",
             "--res", "256", "--level", "attention", "--budget", budget, "--out", str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-2000:]
        said = [line for line in err.splitlines() if "error" in line]
        assert len(said) == 1 and "--budget: rank 0 10.0, rank 1 5.0" in said[0], err[-2000:]
    assert not out.exists()
