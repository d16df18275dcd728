"""Loading and saving DiT checkpoints; a checkpoint is untrusted input.

Reads

* raw state dicts (``DiT-XL-2-256x256.pt``, the released checkpoints),
* ``train.py``-style dicts ``{"model", "ema", "opt", "args"}`` (``"ema"`` is
  taken unless ``entry=`` says otherwise),
* safetensors files, and the directories :func:`save_dit` writes
  (``model.safetensors`` + ``config.json``).

PyTorch files are read with ``torch.load(..., weights_only=True)``: tensors and
plain containers only. The one class allowed beyond PyTorch's defaults is
``argparse.Namespace``, the ``"args"`` entry of DiT's ``train.py`` checkpoints
(a bag of attributes, no code). Anything else -- a pickled object, a function
-- is refused with a message saying how to re-save the weights alone.

The config is inferred from the tensors' shapes (hidden size, depth, patch,
channels, classes, learn_sigma, the stored grid) unless the file carries one;
only the number of heads cannot be read from shapes and comes from the zoo
config of the same hidden size and depth, or ``num_heads=``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .configs import DIT_CONFIGS, DiTConfig, get_config, zoo_heads
from .dit import DiT

#: the files a saved model directory holds
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: key of the attnbench config in safetensors metadata and in .pt dicts
CONFIG_KEY = "attnbench_config"
FORMAT = "attnbench-dit"
FORMAT_VERSION = 1

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
_WHERE = (
    f"official DiT checkpoints (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) are at {OFFICIAL_URL}"
    "<name>; attnbench never downloads them"
)
#: entries of a train.py-style checkpoint holding a state dict, in order of preference
STATE_ENTRIES = ("ema", "model", "state_dict", "module")
#: key prefixes added by wrappers: DistributedDataParallel and torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: how many keys an error message lists before "... and N more"
LIST_LIMIT = 12


@dataclass
class CheckpointInfo:
    """Where a model's weights came from: the file, its format, the entry taken."""

    path: str
    format: str  # "torch" | "torch-legacy" | "safetensors"
    entry: str | None = None  # "ema" / "model" for train.py-style files
    size: int = 0
    _sha256: str | None = field(default=None, repr=False)

    def sha256(self) -> str:
        """The file's sha256 (computed once, on demand: large files take seconds)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def to_dict(self, *, with_hash: bool = True) -> dict[str, Any]:
        data = {"path": self.path, "format": self.format, "entry": self.entry, "size": self.size}
        if with_hash:
            data["sha256"] = self.sha256()
        return data


@dataclass
class RawCheckpoint:
    """A checkpoint file's state dict, the config it carries (if any) and its origin."""

    state_dict: dict[str, torch.Tensor]
    info: CheckpointInfo
    config: dict[str, Any] | None = None


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _listing(items: list[str], limit: int = LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------- reading


def _resolve_path(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """The weights file for ``path`` (a file or a saved directory) and a config beside it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: check the path ({_WHERE})")
    if not path.is_dir():
        return path, None
    for name in (WEIGHTS_FILE, "model.pt"):
        if (path / name).is_file():
            weights = path / name
            break
    else:
        raise ValueError(
            f"{path} is a directory without {WEIGHTS_FILE}: pass a checkpoint file, or a "
            "directory written by attnbench.models.save_dit / `python -m attnbench convert`"
        )
    check_sums(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        return weights, None
    try:
        data = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{config_path} is not valid JSON ({err}): restore it, or delete it to infer "
            "the config from the tensors"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(
            f"{config_path} is not an attnbench DiT config (no 'config' object): restore it, "
            "or delete it to infer the config from the tensors"
        )
    return weights, data["config"]


SUMS_FILE = "SHA256SUMS"


def check_sums(folder: Path) -> None:
    """A model folder's files against its ``SHA256SUMS`` (``HASH  NAME`` lines), if it has one.

    A folder whose weights do not match is refused: they were damaged, or replaced
    without updating the sums.
    """
    sums = folder / SUMS_FILE
    if not sums.is_file():
        return
    for number, line in enumerate(sums.read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{sums}:{number} is not a 'SHA256  FILE' line: restore the file")
        expected, name = parts[0].lower(), parts[1].lstrip("*")
        target = folder / name
        if not target.is_file():
            raise ValueError(f"{sums} lists {name}, which {folder} does not hold: restore it")
        if file_sha256(target) != expected:
            raise ValueError(f"{target} does not match its sha256 in {sums}: the file was damaged "
                             "or replaced; restore it (or, if the change is intended, write new "
                             "sums with sha256sum)")


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ValueError(
            f"{path} is empty (0 bytes): the download or copy did not complete; fetch it again"
        )
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise ValueError(
        f"{path} is not a checkpoint: expected a PyTorch file (.pt, a zip archive) or a "
        f"safetensors file, but it starts with {head[:8]!r}"
    )


def _corrupted(path: Path, detail: str) -> ValueError:
    detail = detail.strip().splitlines()[0] if detail.strip() else "unreadable"
    detail = detail.split(". ")[0]  # torch's miniz messages run on for several sentences
    return ValueError(
        f"{path} is truncated or corrupted ({path.stat().st_size} bytes; {detail}): "
        "download or copy it again and compare its sha256 with the source's"
    )


def _torch_load(path: Path, fmt: str) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "torch")
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = (
                f"it contains the Python global {found.group(1)!r}, which could run code"
                if found
                else "it contains Python objects beyond tensors"
            )
            raise ValueError(
                f"{path} was refused by the safe loader ({what}): checkpoints are untrusted "
                "input and attnbench never unpickles arbitrary objects. From a Python session "
                "you trust, re-save the weights alone: torch.save(model.state_dict(), PATH) or "
                "safetensors.torch.save_file(model.state_dict(), PATH)"
            ) from None
        raise _corrupted(path, text) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise _corrupted(path, f"{type(err).__name__}: {err}") from None


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a dependency
        raise ValueError(
            f"{path} is a safetensors file but the safetensors package is missing: "
            "pip install safetensors"
        ) from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # SafetensorError and friends: a bad header or short data
        raise _corrupted(path, f"safetensors: {err}") from None
    return tensors, metadata


def _unwrap(obj: Any, path: Path, entry: str | None) -> tuple[dict, str | None]:
    """The state dict inside a loaded object (raw, or an entry of a train.py dict)."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict: expected a mapping of "
            "parameter names to tensors (or a train.py checkpoint with 'ema'/'model')"
        )
    if entry is not None:
        if entry not in obj or not isinstance(obj[entry], Mapping):
            raise ValueError(
                f"{path} has no state dict under {entry!r}; its entries: {_listing(list(obj))}"
            )
        return dict(obj[entry]), entry
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None
    for key in STATE_ENTRIES:
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key]), key
    raise ValueError(
        f"{path} is not a state dict: its entries ({_listing([str(k) for k in obj])}) are not "
        f"all tensors and none of {list(STATE_ENTRIES)} holds one"
    )


def read_checkpoint(path: str | Path, *, entry: str | None = None) -> RawCheckpoint:
    """The state dict of a checkpoint file or saved directory, validated, on CPU.

    ``entry`` picks the state dict of a train.py-style file (default: ``"ema"``,
    else ``"model"``). Wrapper prefixes (``module.``, ``_orig_mod.``) are removed.
    """
    weights, config = _resolve_path(path)
    fmt = _sniff(weights)
    taken: str | None = None
    if fmt == "safetensors":
        if entry is not None:
            raise ValueError(f"--entry {entry}: {weights} is a safetensors file holding one "
                             "state dict; --entry picks an entry of a train.py .pt checkpoint "
                             "(leave it out)")
        state, metadata = _safetensors_load(weights)
        if CONFIG_KEY in metadata and config is None:
            try:
                config = json.loads(metadata[CONFIG_KEY])
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{weights}: its embedded attnbench config is not valid JSON ({err})"
                ) from None
    else:
        obj = _torch_load(weights, fmt)
        if isinstance(obj, Mapping) and isinstance(obj.get(CONFIG_KEY), Mapping):
            config = config or dict(obj[CONFIG_KEY])
        state, taken = _unwrap(obj, weights, entry)
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(
            f"{weights}: not a state dict of tensors; these entries are not tensors: "
            f"{_listing(bad)}"
        )
    if not state:
        raise ValueError(f"{weights} holds an empty state dict: no weights to load")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    info = CheckpointInfo(str(weights), fmt, taken, weights.stat().st_size)
    return RawCheckpoint(state, info, config)


# --------------------------------------------------------------------------- config inference

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
#: the tensors config inference reads
REQUIRED = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "blocks.0.mlp.fc1.weight",
)


def shape_config(state: Mapping[str, torch.Tensor], source: str = "the checkpoint",
                 class_dropout_prob: float = 0.1) -> dict[str, Any]:
    """The config fields the tensors' shapes determine, with the tensor each comes from."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(
            f"{source} does not look like a DiT checkpoint: it has no {_listing(missing)} "
            f"(its keys: {_listing(sorted(state))}); pass a DiT state dict"
        )

    def shape_error(key: str, expected: str) -> ValueError:
        return ValueError(
            f"{source} is not a DiT checkpoint: {key} has shape {tuple(state[key].shape)}, "
            f"expected {expected}"
        )

    w = state["x_embedder.proj.weight"]
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise shape_error("x_embedder.proj.weight", "[hidden, channels, patch, patch]")
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    pos = state["pos_embed"]
    tokens = int(pos.shape[1]) if pos.dim() == 3 else -1
    side = round(max(tokens, 0) ** 0.5)
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden or side * side != tokens:
        raise shape_error("pos_embed", f"[1, side², {hidden}] (a square token grid)")
    final = state["final_layer.linear.weight"]
    out, rem = divmod(int(final.shape[0]), patch * patch)
    if final.dim() != 2 or final.shape[1] != hidden or rem or out not in (in_channels,
                                                                          2 * in_channels):
        raise shape_error(
            "final_layer.linear.weight",
            f"[{patch}²·{in_channels} or {patch}²·{2 * in_channels}, {hidden}]",
        )
    table = state["y_embedder.embedding_table.weight"]
    if table.dim() != 2 or table.shape[1] != hidden:
        raise shape_error("y_embedder.embedding_table.weight", f"[classes (+1), {hidden}]")
    num_classes = int(table.shape[0]) - (1 if class_dropout_prob > 0 else 0)
    if num_classes <= 0:
        raise shape_error(
            "y_embedder.embedding_table.weight", "at least one class besides the CFG null row"
        )
    fc1 = state["blocks.0.mlp.fc1.weight"]
    if fc1.dim() != 2 or fc1.shape[1] != hidden:
        raise shape_error("blocks.0.mlp.fc1.weight", f"[mlp hidden, {hidden}]")
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    return {
        "hidden_size": hidden,
        "in_channels": in_channels,
        "patch_size": patch,
        "input_size": side * patch,
        "learn_sigma": out == 2 * in_channels,
        "num_classes": num_classes,
        "mlp_ratio": fc1.shape[0] / hidden,
        "depth": depth,
    }


#: which tensor each inferred field is read from (for contradiction messages)
_EVIDENCE = {
    "hidden_size": "x_embedder.proj.weight",
    "in_channels": "x_embedder.proj.weight",
    "patch_size": "x_embedder.proj.weight",
    "input_size": "pos_embed",
    "learn_sigma": "final_layer.linear.weight",
    "num_classes": "y_embedder.embedding_table.weight",
    "mlp_ratio": "blocks.0.mlp.fc1.weight",
    "depth": "blocks.{i}.*",
}


def infer_config(
    state: Mapping[str, torch.Tensor],
    *,
    config: str | DiTConfig | Mapping[str, Any] | None = None,
    source: str = "the checkpoint",
    **overrides: Any,
) -> DiTConfig:
    """The :class:`DiTConfig` of ``state``: shapes, then ``config``, then ``overrides``.

    ``config`` (a zoo name, a config, or the dict a saved model carries) and
    ``overrides`` may set anything; a value that contradicts the tensors is an
    error naming both. Heads come from ``overrides``/``config``, else from the zoo
    config of the same hidden size and depth, else it is an error.
    """
    if isinstance(config, Mapping):
        try:
            base: DiTConfig | None = DiTConfig.from_dict(dict(config))
        except ValueError as err:
            raise ValueError(f"{source}: its saved config is invalid: {err}") from None
    elif config is not None:
        base = get_config(config)
    else:
        base = None
    given = {**(base.to_dict() if base else {}), **overrides}
    dropout = given.get("class_dropout_prob", DiTConfig.class_dropout_prob)
    found = shape_config(state, source, class_dropout_prob=dropout)

    contradictions = []
    for key, value in found.items():
        if key == "mlp_ratio" and key in given:
            rows = int(state["blocks.0.mlp.fc1.weight"].shape[0])
            if int(found["hidden_size"] * given[key]) == rows:
                found[key] = given[key]  # e.g. 2.6667 for 1024 units: keep the given ratio
                continue
        if key in given and given[key] != value:
            origin = "given" if key in overrides else f"in config {base.name or ''}".rstrip()
            contradictions.append(
                f"{key}={given[key]!r} {origin} but {_EVIDENCE[key]} says {value!r}"
            )
    if contradictions:
        raise ValueError(
            f"the config contradicts {source}: " + "; ".join(contradictions)
            + ". Drop the contradicting setting (shapes are read from the tensors) or pass "
            "the checkpoint that config belongs to"
        )

    fields = {**given, **found}
    if "num_heads" not in fields:
        zoo = zoo_heads(found["hidden_size"], found["depth"])
        if zoo is None:
            raise ValueError(
                f"cannot infer the number of heads of {source}: hidden size "
                f"{found['hidden_size']} and depth {found['depth']} match no zoo config "
                f"(heads are not visible in tensor shapes); pass num_heads=N "
                f"(CLI: --teacher-heads N)"
            )
        fields["num_heads"] = zoo[1]
    if fields.get("name") is None or (base and base.patch_size != found["patch_size"]):
        fields["name"] = next(
            (
                name
                for name, c in DIT_CONFIGS.items()
                if (c.hidden_size, c.depth, c.patch_size, c.num_heads)
                == (found["hidden_size"], found["depth"], found["patch_size"], fields["num_heads"])
            ),
            None,
        )
    try:
        return DiTConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid config for {source}: {err}") from None


def check_state_dict(model: DiT, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ValueError listing missing / unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    c = model.config
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    hint = (
        "If it is a converted student saved without its config, pass attention=METHOD, "
        "attention_options={...} and attention_heads=N as it was converted; otherwise "
        "pass the config it was trained with (config='DiT-XL/2', ...)"
    )
    raise ValueError(
        f"{source} does not match DiT {c.name or 'config'} (attention {c.attention!r}, "
        f"{c.heads} heads): " + "; ".join(problems) + f". {hint}"
    )


# --------------------------------------------------------------------------- public API

#: the torch.nn.init functions modules call to initialise their parameters
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_",
)


@contextmanager
def _skip_init() -> Iterator[None]:
    """Build modules without initialising their parameters (all of them are loaded next).

    Default inits cost seconds for DiT-XL on a CPU and every value is overwritten
    by the checkpoint; ``check_state_dict`` guarantees every key is loaded.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS
             if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)



def model_from_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    config: str | DiTConfig | Mapping[str, Any] | None = None,
    source: str = "the state dict",
    **overrides: Any,
) -> DiT:
    """A DiT holding ``state`` (config inferred as in :func:`infer_config`), in eval mode."""
    cfg = infer_config(state, config=config, source=source, **overrides)
    try:
        with _skip_init():
            model = DiT(cfg, initialize=False)
    except ValueError as err:  # e.g. a student of a method not registered here
        raise ValueError(
            f"{source}: cannot build its attention {cfg.attention!r} "
            f"(options {cfg.attention_options}): {err}"
        ) from None
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_dit(
    path: str | Path,
    *,
    config: str | DiTConfig | None = None,
    entry: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> DiT:
    """Load a DiT (official, train.py, safetensors, or a saved attnbench student).

    ``overrides`` are :class:`DiTConfig` fields (``num_heads=16``,
    ``attention="lit"``, ...); ``config`` a zoo name or config to check the
    tensors against. The model comes back in eval mode, on ``device`` in
    ``dtype`` (default: CPU, float32), with ``model.checkpoint`` saying where it
    came from (a :class:`CheckpointInfo`).
    """
    raw = read_checkpoint(path, entry=entry)
    source = raw.info.path
    if config is not None and raw.config is not None:
        raise ValueError(
            f"{source} carries its own config; pass field overrides (num_heads=..., ...) "
            "instead of config="
        )
    model = model_from_state_dict(
        raw.state_dict, config=config if config is not None else raw.config, source=source,
        **overrides,
    )
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    model.checkpoint = raw.info
    return model


def save_dit(model: DiT, path: str | Path) -> Path:
    """Save weights and config so that :func:`load_dit` rebuilds the same model.

    ``path`` ending in ``.safetensors`` or ``.pt`` is one self-describing file
    (the config in the safetensors metadata / under ``"attnbench_config"``);
    any other path is a directory receiving ``model.safetensors`` and
    ``config.json``. Returns the weights file.
    """
    path = Path(path).expanduser()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    if path.suffix in (".pt", ".pth"):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, CONFIG_KEY: config}, path)
        return path

    metadata = {CONFIG_KEY: json.dumps(config, sort_keys=True), "format": FORMAT}
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata=metadata)
        return path
    path.mkdir(parents=True, exist_ok=True)
    weights = path / WEIGHTS_FILE
    save_file(state, str(weights), metadata=metadata)
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config}
    (path / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return weights
