"""A distilled student of a diffusers transformer: saved as a delta, loaded onto its teacher.

A student is its teacher with ``swap_attention`` and trained weights. What
differs is small: the method's new parameters and the trained ones (the
attention projections under CLEAR's recipe). ``save_student`` writes those
tensors -- every one that is new or no longer equal to the teacher's -- to
``student.safetensors`` and a small ``student.json`` (family, method, resolved
options, recipe, the teacher's config hash). ``load_student(transformer, DIR)``
puts it on top of a stock teacher with one call; a student made for another
family or teacher (config hash) is refused before anything changes.

>>> handle = load_student(pipe.transformer, "runs/clear/student")   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from ... import runfolder
from .families import family_of
from .pipelines import config_hash
from .swap import SwapHandle, swap_attention

WEIGHTS = "student.safetensors"
META = "student.json"


def changed_tensors(student: nn.Module, teacher_state: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """The student's state entries that are new or differ from ``teacher_state``."""
    out = {}
    for name, value in student.state_dict().items():
        ref = teacher_state.get(name)
        same = (ref is not None and ref.shape == value.shape
                and torch.equal(ref.to(value.device, value.dtype), value))
        if not same:
            out[name] = value.detach().cpu().contiguous()
    return out


def save_student(folder: str | Path, student: nn.Module, handle: SwapHandle,
                 teacher_state: dict[str, torch.Tensor], *, recipe: dict[str, Any] | None = None,
                 teacher_hash: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/student.safetensors`` + ``student.json`` (atomically, file by file)."""
    folder = Path(folder)
    tensors = changed_tensors(student, teacher_state)
    meta = {"family": handle.family, "method": handle.method, "options": handle.options,
            "recipe": recipe, "teacher_config_sha256": teacher_hash,
            "transformer": type(student).__name__, "tensors": len(tensors),
            "parameters": int(sum(t.numel() for t in tensors.values())), **(extra or {})}
    runfolder.atomic_write(folder / WEIGHTS, st_save(tensors, metadata={"format": "pt"}))
    runfolder.atomic_write(folder / META,
                           json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return folder


def read_student(folder: str | Path, flag: str = "--student") -> tuple[Path, dict[str, Any]]:
    """``(folder, student.json)`` or ``ValueError`` naming ``flag``."""
    folder = Path(folder).expanduser()
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise ValueError(f"{flag} {folder}: not a student folder (it needs {META} and "
                         f"{WEIGHTS}, as `attnbench distill --model-path` writes in OUT/student)")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag} {folder / META}: not readable JSON ({err})") from None
    return folder, meta


def check_student(meta: dict[str, Any], family: str, config, folder: Path,
                  flag: str = "--student") -> None:
    """Refuse a student made for another family or teacher (config hash). ``config``: the
    teacher transformer or its ``config.json`` as a dict (:func:`~.pipelines.config_hash`)."""
    if meta.get("family") != family:
        raise ValueError(f"{flag} {folder}: a {meta.get('family')} student cannot go on this "
                         f"{family} model; pass a student distilled from this --model-path")
    mine = config_hash(config)
    if meta.get("teacher_config_sha256") != mine:
        raise ValueError(f"{flag} {folder}: made for another teacher (config hash "
                         f"{str(meta.get('teacher_config_sha256'))[:12]}, this model "
                         f"{mine[:12]}); pass the --model-path it was distilled from")


def student_for(folder: str | Path, family: str, config: dict[str, Any],
                flag: str = "--student") -> tuple[Path, dict[str, Any]]:
    """``(folder, student.json)`` of a student checked against a teacher known by its family
    and ``config.json`` alone: every ``--student`` is refused before any weight loads."""
    folder, meta = read_student(folder, flag)
    check_student(meta, family, config, folder, flag)
    from ... import attention

    try:
        attention.get(meta.get("method")).resolve(dict(meta.get("options") or {}), mixer=True)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{flag} {folder}: its method {meta.get('method')!r} with options "
                         f"{meta.get('options')} does not load here ({err}); pass a student "
                         "distilled by this attnbench") from None
    return folder, meta


def load_student(transformer: nn.Module, folder: str | Path, *, flag: str = "--student",
                 impl: str = "auto") -> SwapHandle:
    """Install the student in ``folder`` on ``transformer`` (its stock teacher): the method's
    attention with the saved options, then the saved tensors. Returns the swap handle."""
    folder, meta = read_student(folder, flag)
    check_student(meta, family_of(transformer).name, transformer, folder, flag)
    tensors = load_file(folder / WEIGHTS)
    handle = swap_attention(transformer, meta["method"], inherit_projections=True, impl=impl,
                            **meta.get("options", {}))
    state = transformer.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        handle.restore()
        raise ValueError(f"{flag} {folder}: {len(unknown)} tensors (e.g. {unknown[0]}) do not "
                         "exist in this model; the student does not belong to it")
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value.to(state[name].dtype))
    return handle
