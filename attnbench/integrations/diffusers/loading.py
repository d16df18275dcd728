"""``--model-path DIR``: a local diffusers transformer folder, never a download.

``DIR`` is a transformer folder (``config.json`` + ``*.safetensors``, as
``save_pretrained`` writes it) or a pipeline folder whose ``transformer/`` is
one. Loading is ``from_pretrained(..., local_files_only=True,
use_safetensors=True)``: nothing is fetched from the Hub, and only safetensors
weights are read (a checkpoint is untrusted input). Every problem -- no such
folder, no ``config.json``, a class the adapter does not handle, no safetensors
weights, a weight file that is truncated, empty or not safetensors, a missing shard, a
config whose tensors differ from the weights' -- is a ``ValueError`` naming
``--model-path`` before any weight loads (:func:`check_weights` reads headers only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from ...models.diffusers_configs import DiffusersConfig, config_from_transformer
from .compat import import_diffusers
from .families import BY_CLASS, get_family


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
    if class_name not in BY_CLASS:
        raise ValueError(f"--model-path {folder}: transformer class {class_name!r} is not "
                         f"supported; supported: {', '.join(BY_CLASS)}")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"--model-path {folder}: no *.safetensors weights (attnbench reads "
                         "only safetensors: save with save_pretrained(safe_serialization=True))")
    name = folder.parent.name if folder.name == "transformer" else folder.name
    try:
        family = BY_CLASS[class_name]
        entry = config_from_transformer(name or str(folder), family.name, config,
                                        source=f"--model-path {folder}",
                                        defaults=family.pipeline_defaults())
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"--model-path {folder}: config.json does not describe a "
                         f"{class_name} ({type(err).__name__}: {err})") from None
    check_weights(folder, class_name, config)
    if folder.name == "transformer":  # in a pipeline: its VAE and tokenizers fix the rest
        from .pipelines import pipeline_facts

        facts = pipeline_facts(folder.parent, entry.family)
        if facts:
            entry = dataclasses.replace(entry, **facts)
    return folder, entry


def _safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file, checked against the file's size (a truncated,
    empty or foreign file is refused without reading its weights)."""
    size = path.stat().st_size
    problem = None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= size - 8:
                problem = "empty" if size == 0 else "not a safetensors file (no header)"
            else:
                header = json.loads(f.read(length))
                ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
                if max(ends, default=0) > size - 8 - length:
                    problem = "truncated (its tensors run past the end of the file)"
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        problem = "not a safetensors file (its header is not readable)"
    if problem:
        raise ValueError(f"--model-path {path}: {problem}; save the model again with "
                         "save_pretrained")
    return {k: t for k, t in header.items() if k != "__metadata__"}


def check_weights(folder: Path, class_name: str, config: dict) -> None:
    """Every weight file readable, every shard of an index present, and every tensor of the
    shape ``config.json`` implies: a broken folder is refused before anything is measured."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        shapes.update({k: t.get("shape") for k, t in _safetensors_header(path).items()})
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"--model-path {index}: not a readable shard index") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ValueError(f"--model-path {folder}: shard {missing[0]} named by {index.name} "
                             "is missing")
    try:
        cls = getattr(import_diffusers(), class_name)
        with torch.device("meta"):
            expected = {k: list(v.shape) for k, v in cls.from_config(config).state_dict().items()}
    except ImportError:
        return  # the load itself says diffusers is needed
    except Exception as err:  # a config diffusers cannot build from
        raise ValueError(f"--model-path {folder}: config.json does not build a {class_name} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                         ) from None
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ValueError(f"--model-path {folder}: the weights lack {len(missing)} tensor(s) "
                         f"config.json implies (e.g. {missing[0]}); a shard is missing or the "
                         "config is not the weights'")
    wrong = [k for k in expected if list(shapes[k]) != expected[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(f"--model-path {folder}: {k} is {tuple(shapes[k])} in the weights but "
                         f"{tuple(expected[k])} by config.json ({len(wrong)} tensor(s) differ): "
                         "the config is not the weights'")


def load_transformer(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
) -> tuple[nn.Module, DiffusersConfig]:
    """The transformer in ``path`` on ``device`` (in ``dtype``; ``None``: as stored) and its entry.

    The entry (a :class:`DiffusersConfig` from the folder's config and the
    family's pipeline defaults: text length, VAE factor) gives its true shapes.
    """
    folder, entry = read_transformer_config(path)
    cls = getattr(import_diffusers(), get_family(entry.family).transformer)
    low_memory = importlib.util.find_spec("accelerate") is not None  # diffusers needs it for that
    model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                torch_dtype=dtype, low_cpu_mem_usage=low_memory)
    return model.to(device).eval().requires_grad_(False), entry
