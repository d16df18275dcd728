"""FID and friends: float64 feature statistics, reference sets, and the metrics of a sample set.

The numbers come from the engines (:mod:`.engines`: torch-fidelity by default,
clean-fid as the alternative); this module supplies what they consume and records
how each number was made:

* :class:`FeatureStats` -- mean and covariance in **float64** (features are cast
  before ``np.mean`` / ``np.cov``, ``ddof = 1``), saved and loaded in ADM's
  reference-batch layout (``mu``, ``sigma`` in an ``.npz``);
* :func:`load_reference` -- a reference set: the shapes world itself
  (``shapes[:N]``), an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``:
  ``arr_0`` images and/or ``mu``/``sigma``), any ``.npz`` with ``arr_0``, or a
  folder of images;
* :func:`frechet_distance` -- an engine-independent float64 implementation (the
  symmetric form, eigendecompositions only) that the tests hold both engines to;
* :func:`quality_metrics` -- FID, KID, IS and precision/recall of generated images
  against a reference, with the provenance every FID row carries (engine and
  version, extractor and its weights' sha256, resize mode, sample counts).
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.shapes import ShapesWorld
from . import engines

#: metrics :func:`quality_metrics` can compute, by name
METRICS = ("fid", "kid", "is", "prc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# --------------------------------------------------------------------------- statistics


@dataclass
class FeatureStats:
    """Mean ``[D]`` and covariance ``[D, D]`` of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (len(self.mu), len(self.mu)):
            raise ValueError(f"statistics need mu [D] and sigma [D, D], got {self.mu.shape} and "
                             f"{self.sigma.shape}")

    @property
    def dims(self) -> int:
        return len(self.mu)

    @classmethod
    def from_features(cls, features: Any, **meta: Any) -> FeatureStats:
        """Statistics of ``[N, D]`` features, computed in float64 (``np.cov``, ``ddof = 1``)."""
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"need at least 2 feature vectors [N, D], got shape {feats.shape}")
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False), count=len(feats), meta=meta)

    def save(self, path: str | Path) -> Path:
        """``.npz`` with ``mu``, ``sigma`` (ADM's keys), ``count`` and a JSON ``meta``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, mu=self.mu, sigma=self.sigma, count=np.int64(self.count or -1),
                 meta=np.array(json.dumps(self.meta, default=str)))
        return path

    @classmethod
    def load(cls, path: str | Path, flag: str = "") -> FeatureStats:
        """Statistics from an ``.npz`` with ``mu`` and ``sigma`` (as ADM reference batches)."""
        path = Path(path)
        with _open_npz(path, flag) as data:
            if "mu" not in data or "sigma" not in data:
                raise NpzContentError(f"{path} has no 'mu'/'sigma' arrays (keys: "
                                      f"{sorted(data.files)})")
            count = int(data["count"]) if "count" in data else None
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
            return cls(data["mu"], data["sigma"], count=None if count == -1 else count,
                       meta={**meta, "file": str(path)})


class NpzContentError(ValueError):
    """An .npz that opens but lacks what is asked of it (raised as it is, not re-worded)."""


def _npz_error(path: Path, flag: str, err: BaseException) -> ValueError:
    """Why ``path`` could not be read as an .npz of plain arrays, naming ``flag`` and the file."""
    where = f"{flag} {path}" if flag else str(path)
    if path.stat().st_size == 0:
        reason = "is empty (0 bytes)"
    elif not zipfile.is_zipfile(path):
        reason = "is not an .npz archive (numpy.savez writes one; this file is something else)"
    elif "pickle" in str(err).lower() or "object" in str(err).lower():
        reason = ("holds object arrays (Python pickles), which attnbench never loads: save "
                  "plain numeric arrays")
    else:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = f"is not a readable .npz ({detail})"
    return ValueError(f"{where} {reason}")


@contextlib.contextmanager
def _open_npz(path: Path, flag: str = ""):
    """The arrays of an .npz (never a pickle); any failure is one line naming ``flag``."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag + ' ' if flag else ''}{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise NpzContentError(f"{flag + ' ' if flag else ''}{path} is a single .npy array, "
                                  "not an .npz archive")
        with loaded as data:
            yield data
    except NpzContentError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise _npz_error(path, flag, err) from None


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½, in float64.

    The symmetric form: ``Σ₁^½ Σ₂ Σ₁^½`` is symmetric PSD, so its square root's
    trace is the sum of the square roots of its (clipped) eigenvalues -- no
    complex ``sqrtm``. Equal to ``tr (Σ₁Σ₂)^½`` (similar matrices).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------- references


@dataclass
class Reference:
    """A reference set: images (uint8 ``[N, H, W, 3]``), precomputed statistics, or both."""

    description: str
    images: np.ndarray | None = None
    stats: FeatureStats | None = None

    @property
    def count(self) -> int | None:
        if self.images is not None:
            return len(self.images)
        return self.stats.count if self.stats is not None else None


def load_images_npz(path: str | Path, flag: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """``(arr_0 uint8 [N, H, W, 3], arr_1 labels or None)`` of an ADM-format sample ``.npz``."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    with _open_npz(path, flag) as data:
        if "arr_0" not in data:
            raise NpzContentError(f"{where} has no 'arr_0' image array (keys: "
                                  f"{sorted(data.files)})")
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data else None
    check_images(images, where)
    if not len(images):
        raise ValueError(f"{where} holds no images (arr_0 has 0 rows)")
    return images, labels


def check_images(images: np.ndarray, where: str = "images") -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: expected uint8 images [N, H, W, 3], got {images.dtype} "
                         f"{images.shape}")


def load_image_folder(folder: str | Path, num: int | None = None) -> np.ndarray:
    """Images of a folder (sorted by name, recursively), RGB uint8; all must share one size."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:num] if num else files
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(np.asarray(im.convert("RGB")))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: images of several sizes {sorted(shapes)[:4]}; resize them "
                         "to one size first")
    return np.stack(images)


def load_reference(spec: str | Path, *, image_size: int | None = None, num: int | None = None,
                   seed: int = 1) -> Reference:
    """A reference set from ``spec``.

    * ``shapes`` or ``shapes:N`` -- ``N`` (default ``num``, else 10,000) images of the
      shapes world at ``image_size``, world seed ``seed`` (labels uniform, as sampling);
    * a ``.npz`` -- ``arr_0`` images and/or ``mu``/``sigma`` statistics (ADM's
      reference batches hold both; ``num`` keeps the first ``num`` images);
    * a folder of images (``num`` keeps the first ``num`` by name).
    """
    text = str(spec)
    if text == "shapes" or text.startswith("shapes:"):
        count = num or 10_000
        if ":" in text:
            try:
                count = int(text.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"reference {text!r}: expected shapes or shapes:N") from None
        if count < 2:
            raise ValueError(f"reference {text!r}: need at least 2 images")
        if image_size is None:
            raise ValueError("a shapes-world reference needs the image size of the samples")
        world = ShapesWorld(image_size, seed=seed)
        images = np.stack([world.image(i) for i in range(count)])
        return Reference(f"shapes world, {count} images at {image_size} px, seed {seed}", images)
    path = Path(text).expanduser()
    if path.is_dir():
        images = load_image_folder(path, num)
        return Reference(f"image folder {path} ({len(images)} images)", images)
    if path.suffix == ".npz":
        with _open_npz(path, "--reference") as data:
            has_images, has_stats = "arr_0" in data, "mu" in data and "sigma" in data
        if not has_images and not has_stats:
            raise ValueError(f"--reference {path} has neither 'arr_0' images nor 'mu'/'sigma' "
                             "statistics")
        images = load_images_npz(path, "--reference")[0] if has_images else None
        if images is not None and num:
            images = images[:num]
        stats = FeatureStats.load(path, "--reference") if has_stats else None
        parts = ([f"{len(images)} images"] if images is not None else []) + (
            ["mu/sigma"] if stats is not None else [])
        return Reference(f"{path.name} ({', '.join(parts)})", images, stats)
    if not path.exists():
        raise FileNotFoundError(f"no reference at {path} (give shapes[:N], an .npz with arr_0 "
                                "or mu/sigma, or a folder of images)")
    raise ValueError(f"reference {path}: expected a folder or an .npz")


# --------------------------------------------------------------------------- metrics


def quality_metrics(images: np.ndarray, reference: Reference, *,
                    metrics: tuple[str, ...] = ("fid", "kid", "is", "prc"),
                    engine: str = "torch-fidelity", extractor: str = "shapes",
                    weights: str | Path | None = None, clean_mode: str = "clean",
                    batch: int = 256, device: str = "cpu", kid_subsets: int = 100,
                    kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """FID (and KID, IS, precision/recall) of uint8 ``images`` against ``reference``.

    Returns ``{"metrics": {name: value}, "fid": provenance}``. KID and
    precision/recall need reference *images*; the IS needs an extractor with
    logits; the IS and precision/recall exist in torch-fidelity only (under
    clean-fid they are left out and the provenance says so).
    """
    check_images(images, "samples")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown FID-family metrics {unknown}; valid: {', '.join(METRICS)}")
    engine = engines.check_engine(engine)
    ext = engines.get_extractor(extractor, engine, weights, clean_mode=clean_mode)
    gen = engines.extract(images, ext, engine, batch=batch, device=device)
    gen_stats = FeatureStats.from_features(gen.features)
    ref_feats = None
    if reference.images is not None:
        ref_feats = engines.extract(reference.images, ext, engine, batch=batch, device=device)
    use_given = reference.stats is not None and (ref_feats is None
                                                 or ext.kind == "inception")
    if use_given:
        ref_stats = reference.stats
        if ref_stats.dims != gen_stats.dims:
            raise ValueError(
                f"the reference statistics have {ref_stats.dims} dimensions but the "
                f"{ext.name} features have {gen_stats.dims}: ADM reference batches hold "
                "Inception pool3 statistics (use --feature-extractor inception)")
    else:
        ref_stats = FeatureStats.from_features(ref_feats.features)
    out: dict[str, float] = {}
    spread: dict[str, float | None] = {}  # std over KID subsets / IS splits (None: not given)
    skipped: dict[str, str] = {}
    if "fid" in metrics:
        out["fid"] = engines.fid(gen_stats, ref_stats, engine)
    if "kid" in metrics:
        if ref_feats is None:
            skipped["kid"] = "the reference has statistics only (no images)"
        else:
            size = min(kid_subset_size, len(gen.features), len(ref_feats.features))
            mean, std = engines.kid(gen.features, ref_feats.features, engine,
                                    subsets=kid_subsets, subset_size=size, seed=seed)
            out["kid"] = mean
            spread["kid_std"] = std
    if "is" in metrics:
        if gen.logits is None:
            skipped["is"] = f"{engine} with the {ext.name} extractor gives no logits"
        else:
            out["inception_score"], spread["inception_score_std"] = engines.inception_score(
                gen.logits, seed=seed)
    if "prc" in metrics:
        if ref_feats is None:
            skipped["prc"] = "the reference has statistics only (no images)"
        elif engine != "torch-fidelity":
            skipped["prc"] = "clean-fid has no precision/recall"
        else:
            out["precision"], out["recall"] = engines.precision_recall(
                gen.features, ref_feats.features)
    provenance = {
        "engine": engine,
        "engine_version": engines.engine_version(engine),
        "feature_extractor": ext.name,
        "feature_layer": ext.feature_layer,
        "feature_dims": gen_stats.dims,
        "extractor_weights": str(ext.weights),
        "extractor_sha256": ext.sha256,
        "resize": gen.resize,
        "num_samples": len(images),
        "num_reference": reference.count,
        "reference": reference.description,
        "reference_statistics": "given (mu/sigma)" if use_given else "computed",
        "statistics": "float64 (features cast before mean / np.cov, ddof=1)",
        "sqrtm": engines.SQRTM[engine],
        "kid": {"subsets": kid_subsets, "subset_size": min(kid_subset_size, len(images)),
                "kernel": "polynomial, degree 3, gamma 1/D, coef 1", "seed": seed},
        **spread,
        "skipped": skipped,
        "torchvision": engines.torchvision_info(),
    }
    return {"metrics": out, "fid": provenance}


# --------------------------------------------------------------------------- the metric group


def check_group(ctx) -> None:
    """``fid``'s inputs (:mod:`.groups`): the reference and the extractor's weights exist."""
    s = ctx.settings
    if ctx.kind == "pair":
        if s["extractor"] == "inception":
            from .engines import inception_weights

            s["weights"] = inception_weights(s["engine"], s.get("weights"))
        return
    config, ref_spec = ctx.dit.config, ctx.dit.ref_spec
    if ref_spec is None:
        raise ValueError("--reference is needed for FID of a non-shapes model (an ADM "
                         "reference batch .npz, an .npz with arr_0, or an image folder)")
    if not str(ref_spec).startswith("shapes") and not Path(ref_spec).exists():
        raise FileNotFoundError(f"--reference {ref_spec}: no such file or folder")
    if ctx.dit.extractor == "inception":
        from .engines import inception_weights

        inception_weights(config.engine, config.inception_weights)
    elif config.shapes_weights is not None and not Path(config.shapes_weights).is_file():
        raise FileNotFoundError(f"--shapes-weights {config.shapes_weights}: no such file")


def compute_group(ctx) -> tuple[dict[str, float], dict[str, Any]]:
    """FID and friends of ``ctx.images``: against the teacher's samples (a pair, CLEAR's
    protocol) or the DiT evaluation's reference, with the real-images floor of the shapes
    world."""
    s = ctx.settings
    if ctx.kind == "pair":
        reference = Reference(description=s["teacher_description"], images=ctx.teacher_images)
        result = quality_metrics(ctx.images, reference, metrics=("fid", "kid"),
                                 engine=s["engine"], extractor=s["extractor"],
                                 weights=s.get("weights"), device=ctx.device,
                                 kid_subset_size=len(ctx.images))
        return result["metrics"], result["fid"]
    config, extractor, ref_spec = ctx.dit.config, ctx.dit.extractor, ctx.dit.ref_spec
    images = ctx.images
    weights = config.shapes_weights if extractor == "shapes" else config.inception_weights
    reference = load_reference(ref_spec, image_size=images.shape[1],
                               num=config.ref_num or (max(len(images), 1000)
                                                      if ref_spec == "shapes" else None),
                               seed=config.ref_seed)
    ctx.log(f"eval: FID family ({config.engine}, {extractor} features) against "
            f"{reference.description}")
    result = quality_metrics(images, reference, metrics=config.fid_metrics,
                             engine=config.engine, extractor=extractor, weights=weights,
                             clean_mode=config.clean_mode, device=ctx.device,
                             seed=config.sampling.seed)
    provenance = result["fid"]
    if "fid" in result["metrics"] and str(ref_spec).startswith("shapes"):
        # the floor: real world images, as many as the samples, against the same reference
        real = load_reference(f"shapes:{len(images)}", image_size=images.shape[1],
                              seed=config.ref_seed + 1000)
        floor = quality_metrics(real.images, reference, metrics=("fid",),
                                engine=config.engine, extractor=extractor, weights=weights,
                                clean_mode=config.clean_mode, device=ctx.device)
        provenance["real_images_fid"] = floor["metrics"]["fid"]
        provenance["real_images_fid_note"] = (
            f"{len(images)} real world images (seed {config.ref_seed + 1000}) against the "
            "same reference: the FID of a perfect model at this sample count")
    return result["metrics"], provenance
