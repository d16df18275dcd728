"""Data sources for training and distillation: one small interface, several origins.

A source has ``len()``, ``channels``, ``image_size`` and ``get(indices) → (x, y)``
with ``x`` float32 ``[B, C, H, W]`` (pixels in [-1, 1] or VAE latents already
scaled by 0.18215) and ``y`` int64 labels. Indices are drawn by the trainer
from its seeded generator, so the same run reads the same samples on one
process or many.

* :class:`~attnbench.data.shapes.ShapesWorld` -- the procedural shapes world;
* :class:`TensorSource` -- tensors in memory (teacher-generated samples,
  an ``.npz``);
* :class:`NpyFolderSource` -- one ``.npy`` per sample in ``features/`` and
  ``labels/`` folders (the layout of fast-DiT's ``extract_features.py``),
  read lazily: ImageNet's 1.28M latents do not fit in memory.

:func:`open_source` turns the CLI's ``--data`` value into one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .shapes import ShapesWorld

#: keys an .npz may use for the samples and for the labels, in order of preference
X_KEYS = ("latents", "x", "features", "images", "arr_0")
Y_KEYS = ("labels", "y", "classes", "arr_1")


class DataSource(Protocol):
    channels: int
    image_size: int

    def __len__(self) -> int: ...

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


class TensorSource:
    """Samples held in memory: ``x [N, C, H, W]`` float, ``y [N]`` int64."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, origin: str = "tensors") -> None:
        if x.dim() != 4:
            raise ValueError(f"{origin}: samples must be [N, C, H, W], got shape {tuple(x.shape)}")
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"{origin}: labels must be [N] with N = {len(x)}, got "
                             f"{tuple(y.shape)}")
        if len(x) == 0:
            raise ValueError(f"{origin} holds no samples")
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"{origin}: samples must be square, got {tuple(x.shape[-2:])}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{origin}: samples contain NaN or infinite values")
        self.x = x.float().contiguous()
        self.y = y.long().contiguous()
        self.origin = origin
        self.channels = int(x.shape[1])
        self.image_size = int(x.shape[-1])

    def __len__(self) -> int:
        return len(self.x)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]

    def describe(self) -> dict[str, Any]:
        return {"kind": "tensors", "origin": self.origin, "samples": len(self),
                "channels": self.channels, "image_size": self.image_size}


def _pick(keys, available, path, what) -> str | None:
    for key in keys:
        if key in available:
            return key
    return None


def _as_samples(array: np.ndarray, origin: str) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` images (DiT's sample .npz) → [-1, 1]; floats kept as [N, C, H, W]."""
    if array.dtype == np.uint8:
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{origin}: uint8 images must be [N, H, W, 3], got {array.shape}")
        return torch.from_numpy(array).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{origin}: samples must be float latents or uint8 images, got "
                         f"{array.dtype}")
    if array.ndim == 5 and array.shape[1] == 1:  # fast-DiT saves [1, C, H, W] per sample
        array = array[:, 0]
    return torch.from_numpy(np.ascontiguousarray(array)).float()


def load_npz(path: str | Path) -> TensorSource:
    """An ``.npz`` of samples and labels (keys: see ``X_KEYS`` / ``Y_KEYS``)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            xk = _pick(X_KEYS, keys, path, "samples")
            yk = _pick([k for k in Y_KEYS if k != xk], keys, path, "labels")
            if xk is None or yk is None:
                raise ValueError(
                    f"{path} must hold samples under one of {list(X_KEYS)} and labels under "
                    f"one of {list(Y_KEYS)}; it has {keys}"
                )
            x, y = data[xk], data[yk]
    except (OSError, EOFError, ValueError) as err:
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(f"{path} is not a readable .npz ({err})") from None
    labels = torch.from_numpy(np.asarray(y).reshape(-1).astype(np.int64))
    return TensorSource(_as_samples(x, str(path)), labels, origin=str(path))


class NpyFolderSource:
    """fast-DiT's layout: ``DIR/features/<name>.npy`` and ``DIR/labels/<name>.npy``, lazily."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        features, labels = root / "features", root / "labels"
        names = sorted(p.name for p in features.glob("*.npy"))
        missing = [n for n in names if not (labels / n).is_file()]
        if not names:
            raise ValueError(f"{root}: no .npy files under {features}")
        if missing:
            raise ValueError(f"{root}: {len(missing)} features have no label file in {labels} "
                             f"(e.g. {missing[0]})")
        self.root, self.names = root, names
        first = self._load_x(0)
        self.channels, self.image_size = int(first.shape[0]), int(first.shape[-1])

    def _load_x(self, i: int) -> torch.Tensor:
        array = np.load(self.root / "features" / self.names[i], allow_pickle=False)
        array = array.reshape(array.shape[-3:]) if array.ndim == 4 else array
        return torch.from_numpy(np.ascontiguousarray(array)).float()

    def __len__(self) -> int:
        return len(self.names)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in indices:
            i = int(i)
            xs.append(self._load_x(i))
            label = np.load(self.root / "labels" / self.names[i], allow_pickle=False)
            ys.append(int(np.asarray(label).reshape(-1)[0]))
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    def describe(self) -> dict[str, Any]:
        return {"kind": "npy-folder", "origin": str(self.root), "samples": len(self),
                "channels": self.channels, "image_size": self.image_size}


def load_folder(path: str | Path) -> DataSource:
    """A folder: fast-DiT's ``features/`` + ``labels/``, or ``.npz`` files concatenated."""
    path = Path(path)
    if (path / "features").is_dir():
        return NpyFolderSource(path)
    files = sorted(path.glob("*.npz"))
    if not files:
        raise ValueError(
            f"{path} holds neither features/ + labels/ folders of .npy files (fast-DiT's "
            "extract_features layout) nor .npz files of latents and labels"
        )
    parts = [load_npz(f) for f in files]
    shapes = {tuple(p.x.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"{path}: its .npz files hold samples of different shapes {shapes}")
    return TensorSource(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]),
                        origin=str(path))


def open_source(spec: str | Path, *, image_size: int = 32, seed: int = 0) -> DataSource:
    """``"shapes"`` (the procedural world), an ``.npz`` file, or a folder (see above)."""
    if str(spec) == "shapes":
        return ShapesWorld(image_size, seed=seed)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"no data at {path}: pass 'shapes', 'self' (teacher samples), an .npz of latents "
            "and labels, or a folder of them"
        )
    if path.is_dir():
        return load_folder(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: data files must be .npz (latents + labels), or a folder")
    return load_npz(path)


def check_compatible(source: DataSource, channels: int, num_classes: int,
                     patch_size: int) -> None:
    """Raise ValueError when ``source`` cannot feed a model of these dimensions."""
    if source.channels != channels:
        raise ValueError(
            f"the data has {source.channels} channels but the model takes {channels}: "
            + ("pixel data cannot train a latent-space DiT (encode it with the SD VAE first)"
               if source.channels == 3 else "pass data in the model's space")
        )
    if source.image_size % patch_size:
        raise ValueError(f"the data's side {source.image_size} is not divisible by the "
                         f"model's patch size {patch_size}")
    if isinstance(source, TensorSource):
        bad = source.y[(source.y < 0) | (source.y > num_classes)]
        if len(bad):
            raise ValueError(f"the data has labels outside [0, {num_classes}] "
                             f"(e.g. {int(bad[0])}) for a model of {num_classes} classes")
