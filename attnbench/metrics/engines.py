"""The FID engines (torch-fidelity, clean-fid) and the feature extractors they run.

Both engines are the real libraries (imported through :mod:`attnbench.torchvision_compat`);
attnbench feeds them features and float64 statistics and calls their own metric
functions:

==============  ==========================================  ===========================
                torch-fidelity (default)                    clean-fid
==============  ==========================================  ===========================
features        its ``create_feature_extractor`` +          its resizer
                ``get_featuresdict_from_dataset``           (``make_resizer``/``build_resizer``)
                                                            + its ``get_batch_features``
FID             ``metric_fid.fid_statistics_to_metric``     ``fid.frechet_distance``
                (eigenvalues of Σ₁Σ₂)                       (``scipy.linalg.sqrtm``)
KID             ``metric_kid.kid_features_to_metric``       ``fid.kernel_distance``
IS, P/R         ``metric_isc`` / ``metric_prc``             --
==============  ==========================================  ===========================

Extractors: ``shapes`` (the shipped shapes classifier, :mod:`.shapes_classifier`,
registered with torch-fidelity as ``attnbench-shapes``) and ``inception``
(Inception-v3 of the 2015-12-05 TensorFlow graph: torch-fidelity's
``inception-v3-compat`` from ``weights-inception-2015-12-05-6726825d.pth``,
clean-fid's TorchScript ``inception-2015-12-05.pt``). Inception weights are never
downloaded: :func:`inception_weights` finds them at a given path or in torch's
hub cache, or raises an error naming the file, where it comes from and where to
put it.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.checkpoint import file_sha256
from .shapes_classifier import (
    INPUT_SIZE,
    TORCH_FIDELITY_NAME,
    default_weights_path,
    load_classifier,
    register_torch_fidelity,
)

ENGINES = ("torch-fidelity", "clean-fid")
EXTRACTORS = ("shapes", "inception")
CLEAN_MODES = ("clean", "legacy_tensorflow")
SQRTM = {
    "torch-fidelity": "torch-fidelity fid_statistics_to_metric: sqrt of eigenvalues of Σ1·Σ2",
    "clean-fid": "clean-fid frechet_distance: scipy.linalg.sqrtm(Σ1·Σ2)",
}

#: torch-fidelity's Inception weights (the same file as pytorch-fid's ``pt_inception-…``)
TORCH_FIDELITY_INCEPTION = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/"
                                "v0.2.0/weights-inception-2015-12-05-6726825d.pth")
PYTORCH_FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                             "fid_weights/pt_inception-2015-12-05-6726825d.pth")
#: clean-fid's TorchScript Inception
CLEANFID_INCEPTION = "inception-2015-12-05.pt"
CLEANFID_INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                          "metrics/inception-2015-12-05.pt")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown FID engine {engine!r}; valid: {', '.join(ENGINES)}")
    return engine


def engine_version(engine: str) -> str:
    package = {"torch-fidelity": "torch-fidelity", "clean-fid": "clean-fid"}[check_engine(engine)]
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def torchvision_info() -> dict[str, Any]:
    from ..torchvision_compat import torchvision_status

    return torchvision_status()


def _torch_fidelity():
    from ..torchvision_compat import import_torch_fidelity

    return import_torch_fidelity()


def _cleanfid():
    from ..torchvision_compat import import_cleanfid

    return import_cleanfid()


# --------------------------------------------------------------------------- extractors


@dataclass
class Extractor:
    """A feature extractor as one engine runs it, with what identifies its weights."""

    kind: str  # shapes | inception
    name: str  # registry name (torch-fidelity) or description
    weights: Path
    sha256: str
    feature_layer: str
    logits_layer: str | None
    clean_mode: str = "clean"


def get_extractor(kind: str, engine: str, weights: str | Path | None = None, *,
                  clean_mode: str = "clean") -> Extractor:
    """The ``shapes`` or ``inception`` extractor for ``engine`` (weights resolved, hashed)."""
    check_engine(engine)
    if kind == "shapes":
        path = Path(weights) if weights is not None else default_weights_path()
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no shapes-classifier weights at {path}")
        return Extractor("shapes", TORCH_FIDELITY_NAME, path, file_sha256(path),
                         "features", "logits")
    if kind == "inception":
        if clean_mode not in CLEAN_MODES:
            raise ValueError(f"unknown clean-fid mode {clean_mode!r}; valid: "
                             f"{', '.join(CLEAN_MODES)}")
        path = inception_weights(engine, weights)
        if engine == "torch-fidelity":
            return Extractor("inception", "inception-v3-compat", path, file_sha256(path),
                             "2048", "logits_unbiased")
        return Extractor("inception", "clean-fid InceptionV3W (TorchScript)", path,
                         file_sha256(path), "pool3 (2048)", None, clean_mode)
    raise ValueError(f"unknown feature extractor {kind!r}; valid: {', '.join(EXTRACTORS)}")


def inception_weights(engine: str, path: str | Path | None = None) -> Path:
    """The local Inception file for ``engine``: ``path``, else the hub cache; never a download."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if engine == "torch-fidelity":
        names, url = (TORCH_FIDELITY_INCEPTION, PYTORCH_FID_INCEPTION), TORCH_FIDELITY_INCEPTION_URL
        what = (f"{TORCH_FIDELITY_INCEPTION} (torch-fidelity's Inception-v3 state dict; "
                f"pytorch-fid's {PYTORCH_FID_INCEPTION} from {PYTORCH_FID_INCEPTION_URL} is "
                "the same file)")
    else:
        names, url = (CLEANFID_INCEPTION,), CLEANFID_INCEPTION_URL
        what = f"{CLEANFID_INCEPTION} (clean-fid's TorchScript Inception-v3)"
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            found = [path / n for n in names if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"--inception-weights {path} holds no {' / '.join(names)}"
                                        f": {engine} needs {what}, from {url}")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path}: no such file ({engine} needs "
                                    f"{what}, from {url})")
        _check_inception_file(path, engine)
        return path
    for name in names:
        if (cache / name).is_file():
            _check_inception_file(cache / name, engine)
            return cache / name
    raise FileNotFoundError(
        f"FID with Inception features under {engine} needs {what}, and attnbench never "
        f"downloads at run time: fetch {url} on a machine with internet and put it at "
        f"{cache / names[0]} (or anywhere, and pass --inception-weights PATH); the shapes "
        "world needs none (--feature-extractor shapes)")


def _check_inception_file(path: Path, engine: str) -> None:
    """Refuse a file that is not plain tensors before a library loads it.

    torch-fidelity loads the state dict with ``weights_only=False``; loading it
    here first with ``weights_only=True`` proves the pickle holds only tensors.
    clean-fid's file is TorchScript (``torch.jit.load``), which runs no Python.
    """
    if engine != "torch-fidelity":
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors of every kind
        raise ValueError(f"{path} is not a plain Inception state dict (refused: "
                         f"{' '.join(str(err).split())[:200]})") from None
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(f"{path} is not torch-fidelity's Inception-v3 state dict")


# --------------------------------------------------------------------------- extraction


@dataclass
class Features:
    features: np.ndarray  # float64 [N, D]
    logits: np.ndarray | None  # float64 [N, K]
    resize: str


class _UInt8Images(torch.utils.data.Dataset):
    """uint8 ``[N, H, W, 3]`` → uint8 ``[3, H, W]`` tensors: torch-fidelity's input format."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def extract(images: np.ndarray, extractor: Extractor, engine: str, *, batch: int = 256,
            device: str = "cpu") -> Features:
    """Features (and logits where the engine gives them) of uint8 ``[N, H, W, 3]`` images."""
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    if check_engine(engine) == "torch-fidelity":
        return _extract_torch_fidelity(images, extractor, batch, device)
    return _extract_cleanfid(images, extractor, batch, device)


def _extract_torch_fidelity(images: np.ndarray, ext: Extractor, batch: int,
                            device: str) -> Features:
    _torch_fidelity()
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    if ext.kind == "shapes":
        register_torch_fidelity()
        resize = "area to 32×32 inside the extractor (none at 32 px)"
    else:
        resize = "torch-fidelity's TensorFlow-1-compatible bilinear to 299×299"
    layers = [ext.feature_layer] + ([ext.logits_layer] if ext.logits_layer else [])
    cuda = torch.device(device).type == "cuda"
    model = create_feature_extractor(ext.name, layers, cuda=cuda, verbose=False,
                                     feature_extractor_weights_path=str(ext.weights))
    out = get_featuresdict_from_dataset(_UInt8Images(images), model, batch, cuda,
                                        save_cpu_ram=True, verbose=False)
    logits = out[ext.logits_layer].double().numpy() if ext.logits_layer else None
    return Features(out[ext.feature_layer].double().numpy(), logits, resize)


def _extract_cleanfid(images: np.ndarray, ext: Extractor, batch: int, device: str) -> Features:
    _cleanfid()
    from cleanfid.fid import get_batch_features
    from cleanfid.resize import build_resizer, make_resizer

    dev = torch.device(device)
    if ext.kind == "shapes":
        net = load_classifier(ext.weights, device=dev)
        resizer = make_resizer("PIL", False, "bicubic", (INPUT_SIZE, INPUT_SIZE))
        resize = "clean-fid PIL bicubic (float, no quantisation) to 32×32"

        def model(x: torch.Tensor) -> torch.Tensor:
            return net(x)[0]
    else:
        from cleanfid.inception_torchscript import InceptionV3W

        legacy = ext.clean_mode == "legacy_tensorflow"
        model = _load_cleanfid_inception(InceptionV3W, ext.weights, legacy).to(dev).eval()
        resizer = build_resizer(ext.clean_mode)
        resize = ("clean-fid legacy_tensorflow: TensorFlow-style resize inside the network"
                  if legacy else "clean-fid clean: PIL bicubic (float) to 299×299")
    feats = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        # the steps of clean-fid's ResizeDataset, for in-memory arrays
        resized = [resizer(np.asarray(im)) for im in chunk]
        tensors = [torch.tensor(np.asarray(r).transpose((2, 0, 1))) * 1 if r.dtype == np.uint8
                   else torch.tensor(np.asarray(r).transpose((2, 0, 1))) for r in resized]
        feats.append(get_batch_features(torch.stack(tensors).float(), model, dev))
    return Features(np.concatenate(feats).astype(np.float64), None, resize)


def _load_cleanfid_inception(cls, path: Path, resize_inside: bool):
    """clean-fid's InceptionV3W from a local file (it wants the file's folder and fixed name)."""
    if path.name == CLEANFID_INCEPTION:
        return cls(str(path.parent), download=False, resize_inside=resize_inside)
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / CLEANFID_INCEPTION
        link.symlink_to(path.resolve())
        return cls(tmp, download=False, resize_inside=resize_inside)


# --------------------------------------------------------------------------- metrics


def fid(stats1, stats2, engine: str) -> float:
    """FID between two :class:`~attnbench.metrics.fid.FeatureStats` (float64) by ``engine``."""
    if check_engine(engine) == "torch-fidelity":
        _torch_fidelity()
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        out = fid_statistics_to_metric({"mu": stats1.mu, "sigma": stats1.sigma},
                                       {"mu": stats2.mu, "sigma": stats2.sigma}, False)
        return float(out[KEY_METRIC_FID])
    _cleanfid()

    from cleanfid.fid import frechet_distance

    with warnings.catch_warnings():  # clean-fid passes sqrtm's `disp`, deprecated in SciPy 1.16
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
        return float(frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma))


def kid(features1: np.ndarray, features2: np.ndarray, engine: str, *, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float | None]:
    """KID (mean, std over subsets; clean-fid gives no std) of two float feature sets."""
    if check_engine(engine) == "torch-fidelity":
        _torch_fidelity()
        from torch_fidelity.metric_kid import (
            KEY_METRIC_KID_MEAN,
            KEY_METRIC_KID_STD,
            kid_features_to_metric,
        )

        out = kid_features_to_metric(torch.from_numpy(features1), torch.from_numpy(features2),
                                     kid_subsets=subsets, kid_subset_size=subset_size,
                                     rng_seed=seed, verbose=False)
        return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])
    _cleanfid()
    from cleanfid.fid import kernel_distance

    # clean-fid draws its subsets from NumPy's global generator: seed it, then restore it
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(features1, features2, num_subsets=subsets,
                                     max_subset_size=subset_size)), None
    finally:
        np.random.set_state(state)


def inception_score(logits: np.ndarray, *, splits: int = 10, seed: int = 0
                    ) -> tuple[float, float]:
    """torch-fidelity's Inception Score (mean, std over ``splits``) of ``[N, K]`` logits."""
    _torch_fidelity()
    from torch_fidelity.metric_isc import (
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        isc_features_to_metric,
    )

    splits = max(1, min(splits, len(logits)))
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True,
                                 rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def precision_recall(generated: np.ndarray, real: np.ndarray, *, neighborhood: int = 3
                     ) -> tuple[float, float]:
    """torch-fidelity's improved precision and recall (Kynkäänniemi et al., k = 3)."""
    _torch_fidelity()
    from torch_fidelity.metric_prc import (
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    k = min(neighborhood, len(generated) - 1, len(real) - 1)
    if k < 1:
        raise ValueError("precision/recall needs at least 2 samples on each side")
    out = prc_features_to_metric(torch.from_numpy(generated).float(),
                                 torch.from_numpy(real).float(), prc_neighborhood=k,
                                 save_cpu_ram=True, verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])
