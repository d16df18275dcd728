"""The run-folder mechanisms on their own: lock, whose files, atomic writes, JSONL."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from attnbench import runfolder
from tests.runfolder.helpers import hold_lock


@pytest.fixture(autouse=True)
def _release():
    yield
    runfolder.release_all()


def test_second_writer_is_refused_naming_the_pid(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(runfolder.FolderLocked, match=f"PID {holder.pid}"):
            runfolder.lock_folder(tmp_path, "run")
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_message(tmp_path):
    holder = hold_lock(tmp_path)
    holder.kill()
    holder.wait()
    (tmp_path / f".checkpoint.pt.tmp{holder.pid}").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f".student.tmp{holder.pid}").mkdir()
    messages = []
    runfolder.lock_folder(tmp_path, "distill", log=messages.append)
    assert any(f"took over the lock of PID {holder.pid}" in m for m in messages), messages
    assert any("removed 2 temporary" in m for m in messages), messages
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert json.loads((tmp_path / runfolder.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_reused_pid_is_not_the_writer(tmp_path):
    (tmp_path / runfolder.LOCK_FILE).write_text(json.dumps(
        {"pid": os.getppid(), "started": "1", "host": None, "command": "run"}))
    runfolder.lock_folder(tmp_path, "run", log=lambda m: None)  # start time differs: stale


def test_the_lock_is_reentrant_and_released(tmp_path):
    runfolder.lock_folder(tmp_path, "run")
    runfolder.lock_folder(tmp_path, "report")
    runfolder.release(tmp_path)
    assert (tmp_path / runfolder.LOCK_FILE).exists()
    runfolder.release(tmp_path)
    assert not (tmp_path / runfolder.LOCK_FILE).exists()


def test_lock_under_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(runfolder.RunFolderError, match="cannot write to run directory"):
        runfolder.lock_folder(tmp_path / "f" / "sub", "report")


def test_a_users_file_is_never_claimed_without_force(tmp_path):
    (tmp_path / "report.md").write_text("my notes")
    with pytest.raises(runfolder.RunFolderError, match="report.md.*--force"):
        runfolder.claim_files(tmp_path, ["report.md", "report.html"])
    runfolder.claim_files(tmp_path, ["report.md"], force=True)
    runfolder.claim_files(tmp_path, ["report.md"])  # now recorded as attnbench's


def test_atomic_write_leaves_no_temporary_on_enospc(tmp_path, monkeypatch):
    target = tmp_path / "results.csv"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.os, "fsync", full)
    with pytest.raises(runfolder.DiskFull, match="disk is full.*kept"):
        runfolder.atomic_write(target, "new", kept="3 rows kept")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


@pytest.mark.parametrize("tail, kept", [(b'{"a": 3', 2), (b'{"a": 3}', 3), (b"", 2)])
def test_append_repairs_a_partial_last_line(tmp_path, tail, kept):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n' + tail)
    assert len(runfolder.read_jsonl(path)) == kept
    runfolder.append_jsonl(path, {"a": 4})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["a"] for r in rows] == [*[1, 2, 3][:kept], 4]


def test_a_damaged_middle_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a"\n{"a": 2}\n')
    with pytest.raises(runfolder.RunFolderError, match="rows.jsonl:2"):
        runfolder.read_jsonl(path)


def test_runfolder_is_a_leaf():
    code = ("import sys, attnbench.runfolder, attnbench.cliutil; "
            "print([m for m in sys.modules if m.startswith('attnbench.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout
    assert sorted(eval(out)) == ["attnbench.cliutil", "attnbench.runfolder"]
