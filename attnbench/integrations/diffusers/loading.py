"""``--model-path DIR``: a local diffusers transformer folder, never a download.

``DIR`` is a transformer folder (``config.json`` + ``*.safetensors``, as
``save_pretrained`` writes it) or a pipeline folder whose ``transformer/`` is
one. Loading is ``from_pretrained(..., local_files_only=True,
use_safetensors=True)``: nothing is fetched from the Hub, and only safetensors
weights are read (a checkpoint is untrusted input). Every problem -- no such
folder, no ``config.json``, a class the adapter does not handle, no safetensors
weights -- is a ``ValueError`` naming ``--model-path`` before any weight loads.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from ...models.diffusers_configs import FAMILY_CLASSES, DiffusersConfig, config_from_transformer
from .compat import import_diffusers

_FAMILY_OF_CLASS = {cls: family for family, cls in FAMILY_CLASSES.items()}


def transformer_folder(path: str | Path) -> Path:
    """The folder holding the transformer's ``config.json`` (``path`` or ``path/transformer``)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"--model-path {root}: no such folder")
    if not root.is_dir():
        raise ValueError(f"--model-path {root}: not a folder (pass the folder save_pretrained "
                         "wrote, or a pipeline folder with transformer/)")
    for folder in (root, root / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"--model-path {root}: no config.json here or in {root / 'transformer'} "
                     "(a diffusers transformer folder holds config.json and *.safetensors)")


def read_transformer_config(path: str | Path) -> tuple[Path, DiffusersConfig]:
    """``(folder, entry)`` of a local transformer: its config and its family's pipeline facts."""
    folder = transformer_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--model-path {folder}: config.json is not readable JSON "
                         f"({err})") from None
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name not in _FAMILY_OF_CLASS:
        raise ValueError(f"--model-path {folder}: transformer class {class_name!r} is not "
                         f"supported; supported: {', '.join(FAMILY_CLASSES.values())}")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"--model-path {folder}: no *.safetensors weights (attnbench reads "
                         "only safetensors: save with save_pretrained(safe_serialization=True))")
    name = folder.parent.name if folder.name == "transformer" else folder.name
    entry = config_from_transformer(name or str(folder), _FAMILY_OF_CLASS[class_name], config,
                                    source=f"--model-path {folder}")
    return folder, entry


def load_transformer(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
) -> tuple[nn.Module, DiffusersConfig]:
    """The transformer in ``path`` on ``device`` (in ``dtype``; ``None``: as stored) and its entry.

    The entry (a :class:`DiffusersConfig` from the folder's config and the
    family's pipeline defaults: text length, VAE factor) gives its true shapes.
    """
    folder, entry = read_transformer_config(path)
    cls = getattr(import_diffusers(), entry.class_name)
    low_memory = importlib.util.find_spec("accelerate") is not None  # diffusers needs it for that
    model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                torch_dtype=dtype, low_cpu_mem_usage=low_memory)
    return model.to(device).eval().requires_grad_(False), entry
