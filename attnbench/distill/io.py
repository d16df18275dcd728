"""Atomic writes and the run directory's training checkpoint.

Everything a run writes goes through :func:`attnbench.runfolder.atomic_write` (a
temporary file in the same directory renamed over its destination), so an
interrupted write leaves the previous file intact and a full disk is one line:
a crash never costs what was already saved.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .. import runfolder
from ..models.checkpoint import WEIGHTS_FILE, save_dit

CHECKPOINT_FILE = "checkpoint.pt"
RUN_FILE = "run.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
EVAL_JSONL = "eval.jsonl"
SUMMARY_FILE = "summary.json"
#: every name a training run (``distill``, ``train-teacher``) writes into its folder:
#: claimed before work, so a user's own ``summary.json`` is never overwritten
TRAINING_OUTPUTS = (RUN_FILE, CHECKPOINT_FILE, METRICS_JSONL, METRICS_CSV, EVAL_JSONL,
                    SUMMARY_FILE, "student", "teacher", "samples.png", "teacher_samples.npz")


def is_training_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds a training run attnbench started (its ``run.json``).

    Recognises the folders written before ``.attnbench-files`` recorded their names.
    """
    try:
        document = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and isinstance(document.get("identity"), dict)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return runfolder.atomic_write(path, data)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return runfolder.atomic_write(path, text)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return runfolder.atomic_write(path, lambda tmp: torch.save(obj, tmp),
                                  kept="the previous checkpoint is intact")


def atomic_save_model(model, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """``save_dit`` into ``directory`` (with the JSON files ``extra``), through
    :func:`attnbench.runfolder.atomic_folder`; returns the weights file."""
    def write(staging: Path) -> None:
        save_dit(model, staging)
        for name, data in (extra or {}).items():
            (staging / name).write_text(json.dumps(data, indent=2, sort_keys=True,
                                                   default=str) + "\n")

    return runfolder.atomic_folder(directory, write) / WEIGHTS_FILE


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A run's ``checkpoint.pt``, read safely (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the checkpoint was not written; "
                         "start a new run or restore it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError,
            ValueError, KeyError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is truncated or corrupted ({detail.split('. ')[0]}): it cannot be resumed; "
            "start a new run in another directory, or restore the file"
        ) from None
    needed = ("step", "model", "ema", "optimizer", "run")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise ValueError(f"{path} is not an attnbench training checkpoint (expected the "
                         f"entries {list(needed)})")
    return state
