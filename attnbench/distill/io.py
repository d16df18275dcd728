"""Atomic writes and the run directory's training checkpoint.

Everything a run writes goes to a temporary file in the same directory and is
renamed over its destination (``os.replace`` is atomic on POSIX and Windows),
so an interrupted write leaves the previous file intact: a crash never costs
what was already saved.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"
RUN_FILE = "run.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
EVAL_JSONL = "eval.jsonl"
SUMMARY_FILE = "summary.json"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_save_model(model, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """``save_dit`` into ``directory`` file by file, each atomically; ``extra`` JSON files too.

    The files are first written to a temporary sibling directory, then renamed
    one by one over the destination's (so a reader sees old or new files,
    never a half-written one). Returns the weights file.
    """
    from ..models.checkpoint import WEIGHTS_FILE, save_dit

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        save_dit(model, staging)
        for name, data in (extra or {}).items():
            (staging / name).write_text(json.dumps(data, indent=2, sort_keys=True,
                                                   default=str) + "\n")
        for item in sorted(staging.iterdir()):
            os.replace(item, directory / item.name)
    finally:
        for item in staging.glob("*"):
            item.unlink(missing_ok=True)
        staging.rmdir()
    return directory / WEIGHTS_FILE


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
