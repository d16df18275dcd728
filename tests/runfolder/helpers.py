"""Subprocesses of the attnbench CLI and a process that holds a folder's lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ["run", "--model", "DiT-T/2", "--level", "attention", "--methods", "softmax,lit",
            "--no-progress", "--budget", "20", "--no-report"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    """``python -m attnbench ARGS`` in a new process (stdout/stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "attnbench", *args], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


HOLD = """
import sys, time
from attnbench import runfolder
runfolder.lock_folder(sys.argv[1], "run")
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """A process that takes ``folder``'s lock and sleeps (kill it to make the lock stale)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def wait_for(predicate, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): "
                                 f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".stale")]
