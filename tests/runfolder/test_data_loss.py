"""Issue cases 1-6: run folders never lose, mix or corrupt data."""

from __future__ import annotations

import errno
import json
import signal

import pytest

from attnbench import runfolder
from attnbench.cli import main
from attnbench.models import save_dit
from attnbench.results import load_table
from tests.helpers import tiny_pixel_dit
from tests.runfolder.helpers import TINY_RUN, hold_lock, spawn, temporaries, wait_for


def tiny_run(out, res="64", *extra):
    return [*TINY_RUN, "--res", res, "--out", str(out), *extra]


def points(out) -> set[tuple]:
    frame, _ = load_table(out)
    return {(m, int(r)) for m, r in zip(frame["method"], frame["resolution"], strict=True)}


def jsonl_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- 1. partial line


def test_any_number_of_kills_mid_row_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_run(out, "64")) == 0
    for res in ("64,128", "64,128,192"):
        with (out / "results.jsonl").open("a") as f:
            f.write('{"method": "softmax", "options": "{}", "lev')  # killed mid-row
        assert main(tiny_run(out, res)) == 0, capsys.readouterr().err
    rows = jsonl_rows(out / "results.jsonl")  # every line parses
    keys = [(r["method"], r["resolution"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6
    assert points(out) == {(m, r) for m in ("softmax", "lit") for r in (64, 128, 192)}


# --------------------------------------------------------------------------- 2. stale json


def test_report_and_compare_see_every_measured_row(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(tiny_run(a, "64")) == 0
    assert main(tiny_run(b, "64")) == 0
    # an interrupted resume: rows of 128 px appended, results.json not rewritten
    rows = jsonl_rows(a / "results.jsonl")
    with (a / "results.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, "resolution": 128}) + "\n")
    assert points(a) >= {("softmax", 128), ("lit", 128)}
    capsys.readouterr()
    assert main(["report", str(a)]) == 0
    assert "128" in (a / "report.md").read_text()
    assert main(["compare", str(a), str(b), "--fail-if-regression"]) == 1
    printed = capsys.readouterr().out
    assert "| 128 |" in printed and "2 only in A" in printed


# --------------------------------------------------------------------------- 3. the lock


@pytest.fixture
def locked(tmp_path):
    out = tmp_path / "run"
    assert main(tiny_run(out, "64")) == 0
    holder = hold_lock(out)
    yield out, holder.pid
    holder.kill()
    holder.wait()


def _commands(out, tmp_path):
    teacher = tmp_path / "teacher"
    save_dit(tiny_pixel_dit(), teacher)
    return {
        "run": tiny_run(out, "64"),
        "eval": ["eval", "--ckpt", str(teacher), "--metrics", "geneval", "-n", "4", "--steps",
                 "2", "--out", str(out), "--no-progress"],
        "sample": ["sample", "--ckpt", str(teacher), "-n", "2", "--steps", "2", "--out",
                   str(out), "--force", "--no-progress"],
        "distill": ["distill", "--teacher", str(teacher), "--method", "lit", "--out", str(out),
                    "--steps", "2", "--batch-size", "2", "--no-progress"],
        "train-teacher": ["train-teacher", "--out", str(out), "--steps", "2", "--no-progress"],
        "convert": ["convert", "--ckpt", str(teacher), "--method", "lit", "--out", str(out)],
        "report": ["report", str(out)],
    }


def test_every_writer_takes_the_lock(locked, tmp_path, capsys):
    out, pid = locked
    for name, args in _commands(out, tmp_path).items():
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert f"PID {pid}" in err and "Traceback" not in err, (name, err)


def test_two_runs_on_one_folder(tmp_path):
    out = tmp_path / "run"
    first = spawn(tiny_run(out, ",".join(str(64 * i) for i in range(1, 17))))  # killed below
    try:
        wait_for(lambda: (out / runfolder.LOCK_FILE).exists(), proc=first)
        second = spawn(tiny_run(out, "64"))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and f"PID {first.pid}" in err, err
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    holder.kill()
    holder.wait()
    assert main(tiny_run(out, "64")) == 0
    assert f"took over the lock of PID {holder.pid}" in capsys.readouterr().err
    assert not (out / runfolder.LOCK_FILE).exists()  # released at the end


# --------------------------------------------------------------------------- 4. user files


@pytest.mark.parametrize("name", ["report.md", "results.csv", "plots/latency.png"])
def test_a_users_file_is_not_overwritten(tmp_path, capsys, name):
    out = tmp_path / "notes"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_text("my own notes\n")
    args = [*TINY_RUN[:-1], "--res", "64", "--out", str(out)]  # with the report
    assert main(args) == 2
    err = capsys.readouterr().err
    assert name in err and "--force" in err
    assert (out / name).read_text() == "my own notes\n"
    assert not (out / "results.jsonl").exists()  # refused before any work
    assert main([*args, "--force"]) == 0
    assert main(args) == 0  # now attnbench's: resumes


def test_eval_does_not_overwrite_a_users_file(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "results.csv").write_text("a,b\n1,2\n")
    teacher = tmp_path / "teacher"
    save_dit(tiny_pixel_dit(), teacher)
    assert main(["eval", "--ckpt", str(teacher), "--metrics", "geneval", "-n", "2",
                 "--steps", "2", "--out", str(out), "--no-progress"]) == 2
    assert "results.csv" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == "a,b\n1,2\n"


# --------------------------------------------------------------------------- 5. signals


def distill_args(teacher, out, steps, *extra):
    return ["distill", "--teacher", str(teacher), "--method", "lit", "--out", str(out),
            "--steps", str(steps), "--batch-size", "2", "--gen-samples", "4", "--gen-steps", "2",
            "--eval-samples", "2", "--no-progress", "--threads", "1", *extra]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_resume_continues(tmp_path, sig, code):
    teacher, out = tmp_path / "teacher", tmp_path / "lit"
    save_dit(tiny_pixel_dit(), teacher)
    proc = spawn(distill_args(teacher, out, 100_000))  # --ckpt-every 0: the default
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, proc=proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "checkpoint.pt saved" in err and "Traceback" not in err
    assert (out / "checkpoint.pt").is_file() and not temporaries(out)
    saved = json.loads(err.split("at step ")[1].split()[0]) if "at step " in err else None
    (out / ".checkpoint.pt.tmp999999").write_bytes(b"left by a killed writer")
    done = spawn(distill_args(teacher, out, saved + 2, "--resume"))
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert f"from step {saved} of {saved + 2}" in err
    assert [r["step"] for r in jsonl_rows(metrics)] == list(range(1, saved + 3))
    assert not temporaries(out)


# --------------------------------------------------------------------------- 6. disk full


def test_disk_full_mid_sweep_is_one_line_and_keeps_rows(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = runfolder.os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 6:  # meta.json, then a few rows: then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(runfolder.os, "fsync", fsync)
    assert main(tiny_run(out, "64,128,192")) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "rows kept" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
    assert not temporaries(out) and not (out / runfolder.LOCK_FILE).exists()
    kept = jsonl_rows(out / "results.jsonl")
    assert kept
    monkeypatch.setattr(runfolder.os, "fsync", real)
    assert main(tiny_run(out, "64,128,192")) == 0
    assert len(points(out)) == 6 and len(jsonl_rows(out / "results.jsonl")) == 6
