"""The shapes-world feature extractor: a small CNN trained on shapes data, shipped with its weights.

Inception-v3 features mean little on 32-px flat shapes, and its weights are a
download. FID on the shapes world is therefore computed in the feature space of
this classifier (like FID on MNIST uses a LeNet): a 5-layer CNN trained on world
images to predict each image's prompt label (91 classes) and how many objects of
each (shape, colour) it holds (12 heads × 0-4), with light pixel noise as
augmentation (σ ≤ 0.05 of the [-1, 1] range: samples of a diffusion model land in
the same feature space, yet heavier noise still moves the features).

* ``features`` -- the 64-d penultimate layer, standardised with the mean and std
  of world images (stored with the weights): FID, KID, precision/recall;
* ``logits`` -- the 91 label logits: the Inception Score analogue.

Inputs are uint8 ``[B, 3, H, W]`` (or float in [0, 255], as clean-fid passes
them); any size is resized to 32 × 32 with area interpolation (an exact 2 × 2
mean for the world's 64-px images; nothing at 32 px).

The weights ship in ``attnbench/assets/shapes_classifier/`` (``model.safetensors``,
``config.json``, ``training.json``, ``SHA256SUMS``); ``python -m
attnbench.metrics.shapes_classifier --out DIR`` retrains them (minutes on a CPU;
``training.json`` records the run that made them). :func:`register_torch_fidelity`
registers the extractor with torch-fidelity as ``"attnbench-shapes"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.shapes import NUM_CLASSES, PALETTE, SHAPES, ShapesWorld, render, to_tensor
from ..models.checkpoint import file_sha256

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes_classifier"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_FILE = "training.json"
SHA_FILE = "SHA256SUMS"
TORCH_FIDELITY_NAME = "attnbench-shapes"
INPUT_SIZE = 32
MAX_COUNT = 4
#: (shape, colour) pairs of the count heads, in this order
PAIRS: tuple[tuple[str, str], ...] = tuple((s, c) for s in SHAPES for c in PALETTE)
FEATURE_NAMES = ("features", "logits")


class ShapesClassifier(nn.Module):
    """uint8 images → (64-d features, 91 label logits, 12 × 5 count logits)."""

    def __init__(self, width: int = 16, feature_dim: int = 64) -> None:
        super().__init__()
        w = width
        self.config = {"width": width, "feature_dim": feature_dim, "input_size": INPUT_SIZE,
                       "num_classes": NUM_CLASSES, "pairs": len(PAIRS), "max_count": MAX_COUNT}
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),                       # 32 × 32
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),         # 16 × 16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),     # 8 × 8
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2),                                                # 4 × 4
        )
        self.fc = nn.Linear(4 * w * 16, feature_dim)
        self.label_head = nn.Linear(feature_dim, NUM_CLASSES)
        self.count_head = nn.Linear(feature_dim, len(PAIRS) * (MAX_COUNT + 1))
        # the features' mean and std on world images (set by calibrate()): the extractor
        # outputs standardised features, so FID is in units of the data's feature variance
        # and KID's polynomial kernel sees O(1) inner products, as with Inception features
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """uint8 / [0, 255] float ``[B, 3, H, W]`` → float in [-1, 1] at 32 × 32 (area resize)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
        x = x.float() / 127.5 - 1.0
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        return x

    def forward_normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(features, label logits, count logits ``[B, 12, 5]``) of preprocessed images."""
        feats = self.fc(self.body(x).flatten(1))
        counts = self.count_head(feats).view(-1, len(PAIRS), MAX_COUNT + 1)
        return feats, self.label_head(feats), counts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(standardised features ``[B, 64]``, label logits ``[B, 91]``) of uint8 images."""
        feats, logits, _ = self.forward_normalized(self.preprocess(x))
        return (feats - self.feature_mean) / self.feature_std, logits

    @torch.no_grad()
    def calibrate(self, n: int = 4000, seed: int = 30_000) -> None:
        """Set the feature standardisation from ``n`` world images (half 32 px, half 64 px)."""
        images = [ShapesWorld(32, seed=seed).get(range(n // 2))[0],
                  F.interpolate(ShapesWorld(64, seed=seed + 1).get(range(n - n // 2))[0],
                                size=(INPUT_SIZE, INPUT_SIZE), mode="area")]
        feats = torch.cat([self.forward_normalized(x)[0] for x in images]).double()
        self.feature_mean.copy_(feats.mean(0).float())
        self.feature_std.copy_(feats.std(0).clamp(min=1e-6).float())


# --------------------------------------------------------------------------- weights


def default_weights_path() -> Path:
    """The shipped weights file (an error naming how to rebuild it if it is missing)."""
    path = ASSET_DIR / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the shipped shapes classifier is missing ({path}): reinstall attnbench or "
            "retrain it with `python -m attnbench.metrics.shapes_classifier --out DIR` and pass "
            "--shapes-weights DIR/model.safetensors"
        )
    return path


def load_classifier(path: str | Path | None = None, *,
                    device: torch.device | str = "cpu") -> ShapesClassifier:
    """The classifier from a ``model.safetensors`` (default: the shipped one), in eval mode."""
    path = Path(path) if path is not None else default_weights_path()
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no shapes-classifier weights at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a safetensors file of the shapes classifier: "
                         f"{err}") from None
    config = json.loads(meta.get("config", "{}"))
    model = ShapesClassifier(width=int(config.get("width", 16)),
                             feature_dim=int(config.get("feature_dim", 64)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not hold shapes-classifier weights: "
                         f"{' '.join(str(err).split())[:300]}") from None
    model.weights_path = str(path)
    return model.to(device).eval().requires_grad_(False)


def save_classifier(model: ShapesClassifier, directory: str | Path,
                    training: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors``, ``config.json``, ``training.json`` and ``SHA256SUMS``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"config": json.dumps(model.config, sort_keys=True),
                                             "format": "attnbench-shapes-classifier"})
    (directory / CONFIG_FILE).write_text(json.dumps(model.config, indent=2) + "\n")
    names = [WEIGHTS_FILE, CONFIG_FILE]
    if training is not None:
        (directory / TRAINING_FILE).write_text(json.dumps(training, indent=2) + "\n")
        names.append(TRAINING_FILE)
    (directory / SHA_FILE).write_text(
        "".join(f"{file_sha256(directory / n)}  {n}\n" for n in names))
    return weights


# --------------------------------------------------------------------------- torch-fidelity

_EXTRACTOR_CLASS: type | None = None


def extractor_class() -> type:
    """The torch-fidelity ``FeatureExtractorBase`` subclass (built on first use)."""
    global _EXTRACTOR_CLASS
    if _EXTRACTOR_CLASS is not None:
        return _EXTRACTOR_CLASS
    from ..torchvision_compat import import_torch_fidelity

    import_torch_fidelity()
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class FeatureExtractorShapes(FeatureExtractorBase):
        """torch-fidelity feature extractor of the shapes classifier (uint8 ``[B, 3, H, W]``)."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.net = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return FEATURE_NAMES

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features",
                    "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)

        def forward(self, x):
            feats, logits = self.net(x)
            out = {"features": feats, "logits": logits}
            return tuple(out[name] for name in self.features_list)

    _EXTRACTOR_CLASS = FeatureExtractorShapes
    return FeatureExtractorShapes


def register_torch_fidelity() -> str:
    """Register the extractor with torch-fidelity (idempotent); its registry name."""
    from ..torchvision_compat import import_torch_fidelity

    import_torch_fidelity()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if TORCH_FIDELITY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TORCH_FIDELITY_NAME, extractor_class())
    return TORCH_FIDELITY_NAME


# --------------------------------------------------------------------------- training


def _count_targets(scenes) -> torch.Tensor:
    index = {pair: i for i, pair in enumerate(PAIRS)}
    out = torch.zeros(len(scenes), len(PAIRS), dtype=torch.long)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            out[row, index[(obj.shape, obj.color)]] += 1
    return out


def training_batch(world32: ShapesWorld, world64: ShapesWorld, indices: np.ndarray,
                   rng: np.random.Generator, noise: float) -> tuple[torch.Tensor, ...]:
    """Images (half drawn at 64 px and area-resized), labels, counts; pixel-noise augmented."""
    half = len(indices) // 2
    scenes32 = [world32.scene(int(i)) for i in indices[:half]]
    scenes64 = [world64.scene(int(i)) for i in indices[half:]]
    x32 = to_tensor(np.stack([render(s) for s in scenes32]))
    x64 = F.interpolate(to_tensor(np.stack([render(s) for s in scenes64])), size=(32, 32),
                        mode="area")
    x = torch.cat([x32, x64])
    sigma = torch.from_numpy(rng.uniform(0, noise, size=(len(x), 1, 1, 1))).float()
    x = x + sigma * torch.from_numpy(rng.standard_normal(x.shape)).float()
    scenes = scenes32 + scenes64
    y = torch.tensor([s.label for s in scenes])
    return x.clamp(-1, 1), y, _count_targets(scenes)


def accuracy(model: ShapesClassifier, *, n: int = 1000, image_size: int = 32,
             seed: int = 999) -> dict[str, float]:
    """Count-head exactness (every pair's count right) and label accuracy on fresh world images."""
    world = ShapesWorld(image_size, seed=seed)
    scenes = [world.scene(i) for i in range(n)]
    x = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2)
    with torch.no_grad():
        _, logits, counts = model.forward_normalized(model.preprocess(x))
    target = _count_targets(scenes)
    labels = torch.tensor([s.label for s in scenes])
    return {"counts_exact": float((counts.argmax(-1) == target).all(-1).float().mean()),
            "label_top1": float((logits.argmax(-1) == labels).float().mean())}


def train(*, steps: int = 3000, batch: int = 128, lr: float = 2e-3, seed: int = 0,
          noise: float = 0.05, width: int = 16, feature_dim: int = 64,
          log_every: int = 100, calibration: int = 4000,
          held_out: int = 1000) -> tuple[ShapesClassifier, dict[str, Any]]:
    """Train the classifier on world seed ``10_000 + seed`` (never an evaluation seed)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ShapesClassifier(width=width, feature_dim=feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    world32 = ShapesWorld(32, seed=10_000 + seed)
    world64 = ShapesWorld(64, seed=20_000 + seed)
    start, log = time.time(), []
    for step in range(steps):
        indices = np.arange(step * batch, (step + 1) * batch)
        x, y, counts = training_batch(world32, world64, indices, rng, noise)
        _, logits, count_logits = model.forward_normalized(x)
        loss_label = F.cross_entropy(logits, y)
        loss_counts = F.cross_entropy(count_logits.reshape(-1, MAX_COUNT + 1), counts.reshape(-1))
        loss = loss_label + loss_counts
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "loss_label": round(loss_label.item(), 4),
                     "loss_counts": round(loss_counts.item(), 4),
                     "seconds": round(time.time() - start, 1)}
            log.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
    model.eval()
    model.calibrate(calibration)
    summary = {
        "objective": "cross-entropy on the prompt label (91) + on each (shape, colour) count "
                     "(12 × 0-4)",
        "data": f"shapes world seeds {10_000 + seed} (32 px) and {20_000 + seed} (64 px, "
                "area-resized to 32), uniform pixel noise sigma in [0, "
                f"{noise}] (images in [-1, 1])",
        "steps": steps, "batch": batch, "lr": lr, "optimizer": "AdamW, one-cycle",
        "seed": seed, "seconds": round(time.time() - start, 1), "torch": torch.__version__,
        "standardisation": f"features minus mean, over std, of {calibration} world images "
                           "(seeds 30000 at 32 px, 30001 at 64 px)",
        "log": log,
        "held_out": {"32px": accuracy(model, n=held_out, image_size=32),
                     "64px": accuracy(model, n=held_out, image_size=64)},
    }
    return model, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attnbench.metrics.shapes_classifier",
        description="Train the shapes-world feature extractor (the shipped weights' recipe).")
    parser.add_argument("--out", default=str(ASSET_DIR), help=f"directory (default {ASSET_DIR})")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, summary = train(steps=args.steps, batch=args.batch, seed=args.seed)
    weights = save_classifier(model, args.out, summary)
    print(json.dumps(summary["held_out"]), file=sys.stderr)
    print(weights)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
