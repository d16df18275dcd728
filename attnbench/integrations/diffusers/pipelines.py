"""A local diffusers pipeline folder: checked before any weight loads, then loaded offline.

``check_pipeline(DIR)`` reads ``model_index.json`` and refuses, with one line
naming the flag and the fix, a folder that is not a pipeline of a supported
family, lacks a component its family needs, or holds a component whose weights
are pickles (``.bin``, ``.pt``, ``.ckpt``, ...) without safetensors: a
checkpoint is untrusted input and attnbench never unpickles one.
``load_pipeline`` is ``DiffusionPipeline.from_pretrained(DIR,
local_files_only=True, use_safetensors=True)``: never a Hub download.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .compat import import_diffusers
from .families import Family, family_of_pipeline

#: weight files that are pickles (never read)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: components whose folders hold weights
WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def check_pipeline(path: str | Path, flag: str = "--model-path") -> tuple[Path, Family]:
    """``(folder, family)`` of a pipeline folder, or ``ValueError`` naming ``flag``."""
    root = Path(path).expanduser()
    index = root / "model_index.json"
    if not root.is_dir():
        raise ValueError(f"{flag} {root}: no such folder (pass a diffusers pipeline folder, "
                         "as save_pretrained writes it)")
    if not index.is_file():
        raise ValueError(f"{flag} {root}: no model_index.json (a pipeline folder is needed "
                         "here; a transformer folder alone cannot sample or encode prompts)")
    try:
        spec = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag} {index}: not readable JSON ({err})") from None
    try:
        family = family_of_pipeline(spec.get("_class_name") if isinstance(spec, dict) else None)
    except ValueError as err:
        raise ValueError(f"{flag} {root}: {err}") from None
    for part in family.components:
        entry = spec.get(part)
        if not isinstance(entry, list) or entry[0] is None or not (root / part).is_dir():
            raise ValueError(f"{flag} {root}: the {family.pipeline} component {part!r} is "
                             f"missing (model_index.json and {root / part}/); save the whole "
                             "pipeline with save_pretrained")
    for part in WEIGHTED:
        folder = root / part
        if not folder.is_dir():
            continue
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not any(folder.glob("*.safetensors")):
            raise ValueError(f"{flag} {folder}: weights {pickles[0]} are a pickle, which "
                             "attnbench never loads; convert them to safetensors "
                             "(save_pretrained(safe_serialization=True))")
        if part in family.components and not any(folder.glob("*.safetensors")):
            raise ValueError(f"{flag} {folder}: no *.safetensors weights (save the pipeline "
                             "with save_pretrained(safe_serialization=True))")
    return root, family


def quiet() -> None:
    """diffusers' and transformers' loading chatter off (progress bars are attnbench's)."""
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
    import_diffusers().utils.logging.set_verbosity_error()
    import_diffusers().utils.logging.disable_progress_bar()


def load_pipeline(path: str | Path, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None, flag: str = "--model-path",
                  transformer: bool = True):
    """``(pipeline, family)`` from a checked local folder, on ``device``, progress bar off;
    without ``transformer`` its transformer is ``None`` (not read: :func:`load_transformer`
    gives it, set as ``pipe.transformer``)."""
    root, family = check_pipeline(path, flag)
    diffusers = import_diffusers()
    quiet()
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True,
                              **({} if transformer else {"transformer": None})}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = diffusers.DiffusionPipeline.from_pretrained(root, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), family


def load_transformer(path: str | Path, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None):
    """The transformer of a checked pipeline folder alone, on ``device`` in ``dtype`` (the
    pipeline's loading of it); on the meta device its structure only: no weight is read."""
    diffusers = import_diffusers()
    quiet()
    root = Path(path).expanduser()
    config = transformer_config(root)
    cls = getattr(diffusers, config["_class_name"])
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(root, subfolder="transformer"))
        return model.to(dtype) if dtype is not None else model
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    model = cls.from_pretrained(str(root), subfolder="transformer", **kwargs).to(device)
    model.register_to_config(_name_or_path=str(root / "transformer"))  # as the pipeline's
    return model


def config_hash(transformer_or_config) -> str:
    """SHA-256 of a transformer's configuration (canonical JSON, private keys dropped):
    what a student records of its teacher, and checks on loading. Takes the module or its
    ``config.json`` as a dict (the same hash: save_pretrained writes every init argument),
    so a student can be checked before any weight loads."""
    config = getattr(transformer_or_config, "config", transformer_or_config)
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    text = json.dumps(config, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def transformer_config(root: str | Path) -> dict[str, Any]:
    """The ``transformer/config.json`` of a checked pipeline folder (no weights read)."""
    return _json(Path(root) / "transformer" / "config.json")


def scheduler_config(pipe) -> dict[str, Any]:
    return dict(pipe.scheduler.config)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def vae_factors(root: str | Path) -> tuple[int, int]:
    """``(pixels, frames)`` per latent position of a pipeline folder's VAE, from its config
    (2 per down-sampling level; a config without levels counts as FLUX's and SD's 8)."""
    vae = _json(Path(root) / "vae" / "config.json")
    if "temperal_downsample" in vae:  # AutoencoderKLWan
        return (2 ** len(vae["temperal_downsample"]),
                2 ** sum(bool(x) for x in vae["temperal_downsample"]))
    blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels") or [0] * 4
    return 2 ** (len(blocks) - 1), 1


def pipeline_facts(root: str | Path, family: str) -> dict[str, Any]:
    """What a pipeline folder says of its transformer's inputs that the transformer's
    config does not: the VAE's factor and FLUX's text length (its T5 tokenizer's
    ``model_max_length``, below the pipeline's 512). Empty for a folder that is not a
    pipeline."""
    root = Path(root)
    if not (root / "model_index.json").is_file() or not (root / "vae").is_dir():
        return {}
    spatial, temporal = vae_factors(root)
    facts: dict[str, Any] = {"vae_factor": spatial}
    if family == "wan":
        facts["vae_temporal"] = temporal
    length = _json(root / "tokenizer_2" / "tokenizer_config.json").get("model_max_length")
    if family == "flux" and isinstance(length, int) and 0 < length < 512:
        facts["text_tokens"] = length
    return facts


def size_rule(root: str | Path, family: Family) -> tuple[int, int]:
    """``(pixels per token side, frames per latent frame)`` of a checked pipeline folder,
    from its VAE's and transformer's configs (no weights read)."""
    root = Path(root)
    tr = _json(root / "transformer" / "config.json")
    spatial, temporal = vae_factors(root)
    patch = tr.get("patch_size", 1)
    patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch or 1)
    return spatial * patch * family.pack, temporal


def check_size(root: str | Path, family: Family, height: int, width: int,
               frames: int | None = None) -> None:
    """``ValueError`` naming ``--height``/``--width``/``--frames`` when the VAE and the
    transformer's patching cannot take that size."""
    multiple, temporal = size_rule(root, family)
    for flag, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % multiple:
            raise ValueError(f"{flag} {value}: this {family.name} pipeline takes multiples of "
                             f"{multiple} px (VAE × patch), e.g. "
                             f"{max(1, value // multiple) * multiple}")
    if family.video:
        if frames is None or frames <= 0 or (frames - 1) % temporal:
            raise ValueError(f"--frames {frames}: this {family.name} pipeline takes "
                             f"1 + {temporal}·k frames (its VAE's temporal stride), e.g. "
                             f"{1 + temporal}")


def text_length(pipe, family: Family, requested: int | None = None) -> int:
    """The prompt length: ``requested``, else the family's, capped by the tokenizers'."""
    if requested is not None:
        return requested
    caps = [getattr(pipe, name).model_max_length for name in ("tokenizer", "tokenizer_2",
                                                               "tokenizer_3")
            if getattr(pipe, name, None) is not None]
    caps = [c for c in caps if isinstance(c, int) and c < 10**6]
    return min([family.sampling.max_sequence_length, *([max(caps)] if caps else [])])
