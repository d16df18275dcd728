"""The shipped teacher: a small pixel-space DiT trained on the shapes world.

``python -m attnbench train-teacher --out DIR`` trains it with DiT's objective
(ε-MSE + VB, learned variance, label dropout 0.1 for CFG) on the shapes world
streamed from its seed, and writes ``DIR/teacher/`` (``model.safetensors``,
``config.json``, ``training.json``, ``SHA256SUMS``) -- the folder shipped as
``attnbench/assets/teacher/``, which :func:`default_teacher_path` returns and
which ``run``, ``distill`` and ``eval`` use when no checkpoint is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import runfolder
from .checkpoint import WEIGHTS_FILE, file_sha256
from .configs import DiTConfig

#: the shipped teacher's architecture: DiT-S-like blocks, much narrower and shallower,
#: patch 4 on 32-px RGB images (an 8×8 token grid), 91 shapes-world classes + null
TEACHER_CONFIG = DiTConfig(
    input_size=32,
    patch_size=4,
    in_channels=3,
    hidden_size=128,
    depth=6,
    num_heads=4,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    num_classes=91,
    learn_sigma=True,
    name="DiT-shapes/4",
)
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "teacher"
TRAINING_FILE = "training.json"
SHA_FILE = "SHA256SUMS"


def default_teacher_path() -> Path:
    """The shipped teacher's directory (``load_dit`` reads it); an error if it is missing."""
    if not (ASSET_DIR / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"the shipped teacher is missing ({ASSET_DIR / WEIGHTS_FILE}): reinstall attnbench, "
            "or train one with `python -m attnbench train-teacher --out DIR` and pass "
            "--teacher DIR/teacher"
        )
    return ASSET_DIR


def verify_teacher(path: str | Path | None = None) -> dict[str, Any]:
    """Check a teacher directory's files against its ``SHA256SUMS``; its training summary."""
    path = Path(path) if path is not None else default_teacher_path()
    sums = path / SHA_FILE
    if not sums.is_file():
        raise FileNotFoundError(f"{path} has no {SHA_FILE}")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        actual = file_sha256(path / name.strip().lstrip("*"))
        if actual != digest:
            raise ValueError(f"{path / name}: sha256 {actual} does not match {SHA_FILE} "
                             f"({digest}): the file is corrupted; reinstall or retrain")
    training = path / TRAINING_FILE
    return json.loads(training.read_text()) if training.is_file() else {}


def write_sums(directory: Path, names: list[str]) -> Path:
    """``directory/SHA256SUMS`` over the files ``names`` (those present), written atomically."""
    lines = [f"{file_sha256(directory / n)}  {n}" for n in names if (directory / n).is_file()]
    return runfolder.atomic_write(directory / SHA_FILE, "\n".join(lines) + "\n")
