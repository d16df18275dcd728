"""SIGKILL at seeded random moments: every resume ends with the uninterrupted run's data.

``run`` and ``distill`` are killed at least 10 times each (``sample``, ``eval``,
``convert``, ``world --render`` and ``compare --out`` a few times each) (moments drawn from a
seeded generator, after the process has taken its folder's lock, so the kills
land in the work and its writes), then resumed. After every kill each file
parses (a row cut short is the only allowed damage, repaired by the next writer)
and no row is duplicated; after the last resume the points equal an uninterrupted
run's and no temporary is left.
"""

from __future__ import annotations

import csv
import json
import random
import signal

import pytest

from attnbench import runfolder
from attnbench.models import save_dit
from tests.helpers import tiny_pixel_dit
from tests.runfolder.helpers import TINY_RUN, spawn, temporaries, wait_for

KILLS = 10


def _kill_at_random(args, folder, rng: random.Random, window: float, ready=None) -> int | None:
    """Start ``args``; SIGKILL it ``U(0, window)`` s after it holds the lock (or after
    ``ready()`` turns true). Its exit code, None when killed."""
    ready = ready or (lambda: (folder / runfolder.LOCK_FILE).exists())
    proc = spawn(args)
    try:
        wait_for(lambda: ready() or proc.poll() is not None, timeout=180)
        try:
            proc.wait(timeout=rng.uniform(0.0, window))
        except Exception:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        return proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _complete_rows(path) -> list[dict]:
    """The complete lines of a JSONL file, each of which must parse."""
    return [row for _, row in runfolder.read_jsonl(path)] if path.exists() else []


def _run_keys(folder) -> list[tuple]:
    rows = _complete_rows(folder / "results.jsonl")
    return [(r["method"], r["level"], r["resolution"]) for r in rows]


def _check_files_parse(folder) -> None:
    for name in ("meta.json", "results.json", "summary.json", "run.json"):
        if (folder / name).exists():
            json.loads((folder / name).read_text())
    for name in ("results.csv", "metrics.csv"):
        if (folder / name).exists():
            with open(folder / name, newline="") as f:
                list(csv.DictReader(f))


def _fresh_folders(root):
    """killed-0, killed-1, …: a run that finishes before its kills is checked and the
    kills go on in a new folder, so a fast machine still gets every kill."""
    index = 0
    while True:
        yield root / f"killed-{index}"
        index += 1


def _finish(args, folder) -> None:
    proc = spawn(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def test_run_survives_random_kills(tmp_path):
    args = [*TINY_RUN, "--res", "64,128,192"]
    reference = tmp_path / "reference"
    _finish([*args, "--out", str(reference)], reference)

    def check_finished(folder):
        assert sorted(_run_keys(folder)) == sorted(_run_keys(reference))
        assert len(_run_keys(folder)) == 6
        json.loads((folder / "results.json").read_text())
        assert not temporaries(folder) and not (folder / runfolder.LOCK_FILE).exists()

    rng = random.Random(13)
    folders = _fresh_folders(tmp_path)
    folder, kills = next(folders), 0
    while kills < KILLS:
        code = _kill_at_random([*args, "--out", str(folder)], folder, rng, window=2.0)
        assert code in (None, 0), code
        keys = _run_keys(folder)
        assert len(keys) == len(set(keys)), keys  # no duplicate row
        _check_files_parse(folder)
        if code == 0:  # finished before the kill (a fast machine): check it, kill anew
            check_finished(folder)
            folder = next(folders)
        kills += code is None
    _finish([*args, "--out", str(folder)], folder)
    check_finished(folder)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault") / "teacher"
    save_dit(tiny_pixel_dit(), path)
    return path


def test_distill_survives_random_kills(tmp_path, teacher):
    def args(out, *extra):
        return ["distill", "--teacher", str(teacher), "--method", "lit", "--out", str(out),
                "--steps", "40", "--batch-size", "2", "--gen-samples", "4", "--gen-steps", "2",
                "--eval-samples", "2", "--ckpt-every", "3", "--threads", "1", "--no-progress",
                *extra]

    reference = tmp_path / "reference"
    _finish(args(reference), reference)

    def check_finished(folder):
        ref = _complete_rows(reference / "metrics.jsonl")
        got = _complete_rows(folder / "metrics.jsonl")
        assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 41))
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-4)
        _check_files_parse(folder)
        with open(folder / "metrics.csv", newline="") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 41))
        assert (folder / "student" / "model.safetensors").is_file()
        assert not temporaries(folder) and not (folder / runfolder.LOCK_FILE).exists()

    rng = random.Random(7)
    folders = _fresh_folders(tmp_path)
    folder, kills, mid_training = next(folders), 0, 0
    for _ in range(4 * KILLS):
        if kills >= KILLS:
            break
        started = (folder / "run.json").exists()
        logged = len(_complete_rows(folder / "metrics.jsonl")) if started else 0

        def training(folder=folder, logged=logged):  # this process logged a step of its own
            return len(_complete_rows(folder / "metrics.jsonl")) > logged

        # every other kill lands in the training loop (the rest anywhere after the lock)
        code = _kill_at_random(args(folder, *(["--resume"] if started else [])), folder, rng,
                               window=1.0 if kills % 2 else 4.0,
                               ready=training if kills % 2 else None)
        if code == 0:  # finished before the kill (a fast machine): check it, kill anew
            check_finished(folder)
            folder = next(folders)
            continue
        assert code is None, code
        kills += 1
        mid_training += (folder / "checkpoint.pt").exists()
        steps = [r["step"] for r in _complete_rows(folder / "metrics.jsonl")]
        assert len(steps) == len(set(steps)), steps
        _check_files_parse(folder)
    assert kills >= KILLS and mid_training >= 3  # the kills reached the training loop
    # what the errors say: --resume a run that started, rerun one killed before it started
    _finish(args(folder, *(["--resume"] if (folder / "run.json").exists() else [])), folder)
    check_finished(folder)


# --------------------------------------------------------------------------- the other writers

QUICK_KILLS = 4


def _other_commands(teacher, runs, out) -> dict[str, tuple[list[str], list[str]]]:
    """``{command: (args, args of the rerun after a kill)}`` writing into ``out``."""
    sample = ["sample", "--ckpt", str(teacher), "-n", "6", "--batch", "2", "--steps", "3",
              "--out", str(out), "--no-progress"]
    evaluate = ["eval", "--ckpt", str(teacher), "--metrics", "geneval", "-n", "4", "--steps",
                "2", "--out", str(out), "--no-progress"]
    convert = ["convert", "--ckpt", str(teacher), "--method", "lit", "--out", str(out)]
    world = ["world", "--render", str(out / "grid.png"), "--count", "16"]
    compare = ["compare", str(runs[0]), str(runs[1]), "--out", str(out / "compare.md")]
    return {"sample": (sample, sample), "eval": (evaluate, evaluate),
            "convert": (convert, [*convert, "--force"]), "world": (world, world),
            "compare": (compare, compare)}


def _outputs(command, folder) -> dict[str, bytes]:
    """What must equal the uninterrupted run's after the last resume."""
    if command == "sample":
        import numpy as np

        with np.load(folder / "samples.npz") as data:
            return {"arr_0": data["arr_0"].tobytes(), "arr_1": data["arr_1"].tobytes()}
    if command == "eval":
        rows = _complete_rows(folder / "results.jsonl")
        assert len(rows) == 1, rows  # a rerun replaces its row, never adds one
        extra = json.loads(rows[0]["extra"])
        return {"geneval": json.dumps(extra["geneval"], sort_keys=True).encode()}
    if command == "convert":
        # the tensors and the metadata, not the file's bytes: safetensors writes its
        # metadata map in an order that differs from process to process
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            tensors = {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())}
            metadata = json.dumps(f.metadata(), sort_keys=True).encode()
        return {"metadata": metadata, **tensors}
    name = "grid.png" if command == "world" else "compare.md"
    return {name: (folder / name).read_bytes()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for name in ("a", "b"):
        _finish([*TINY_RUN, "--res", "64", "--out", str(root / name)], root / name)
    return root / "a", root / "b"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sample", "eval", "convert", "world", "compare"])
def test_other_writers_survive_random_kills(tmp_path, teacher, two_runs, command):
    reference = tmp_path / "reference"
    args, _ = _other_commands(teacher, two_runs, reference)[command]
    _finish(args, reference)
    expected = _outputs(command, reference)
    rng = random.Random(sum(map(ord, command)))
    folder = tmp_path / "killed"
    args, again = _other_commands(teacher, two_runs, folder)[command]
    kills = 0
    for attempt in range(3 * QUICK_KILLS):
        if kills >= QUICK_KILLS:
            break
        first = attempt == 0 or not folder.exists()
        code = _kill_at_random(args if first else again, folder, rng, window=3.0,
                               ready=lambda: True)
        assert code in (None, 0), code
        kills += code is None
        if folder.exists():
            _check_files_parse(folder)
    assert kills >= 1  # at least one kill landed before the command finished
    _finish(again, folder)
    assert _outputs(command, folder) == expected
    assert not temporaries(folder) and not (folder / runfolder.LOCK_FILE).exists()
