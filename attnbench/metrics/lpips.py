"""LPIPS (Zhang et al., 2018): perceptual distance of a student image to its teacher's.

The formula of the official ``lpips`` package (v0.1, AlexNet): inputs scaled to
[-1, 1], shifted and scaled per channel by its ``ScalingLayer``; the five ReLU outputs
of AlexNet's ``features`` (after conv1 … conv5); each unit-normalised over channels
(``x / (‖x‖₂ + 1e-10)``); the squared difference weighted by the layer's learnt 1×1
linear layer (no bias), averaged over space and summed over layers.

Implemented here rather than taken from a library: ``lpips`` and torchmetrics fetch the
AlexNet backbone from the network at run time (torchvision's pretrained weights), which
attnbench never does. Both weight files are given locally:

* ``--lpips-backbone FILE`` -- AlexNet's weights (torchvision's ``alexnet`` state dict,
  ``features.*`` keys; ``.safetensors``, or a plain state dict read with
  ``torch.load(weights_only=True)``, e.g. ``alexnet-owt-7be5be79.pth``);
* ``--lpips-weights FILE`` -- the linear layers (``lin0.model.1.weight`` …
  ``lin4.model.1.weight``, as the ``lpips`` package ships them in ``weights/v0.1/alex.pth``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: ``lpips.pretrained_networks.alexnet``'s slices of ``features``: the five ReLU outputs
SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
CHANNELS = (64, 192, 384, 256, 256)
#: the ScalingLayer of ``lpips``
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
#: AlexNet's first conv (11, stride 4, padding 2) and two 3×3/2 max-pools leave a 1×1 map
MIN_SIDE = 31


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` (its state-dict keys), randomly initialised."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=False),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2))


def read_weights(path: str | Path, flag: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a plain ``torch.save`` (``weights_only``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / torch raise their own types
        raise ValueError(f"{flag} {path}: not a readable state dict ({type(err).__name__}: "
                         f"{err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{flag} {path}: holds a {type(state).__name__}, not a state dict")
    return state


class LPIPS(nn.Module):
    """LPIPS-Alex with the weights of two local files (module docstring)."""

    def __init__(self, backbone: dict[str, torch.Tensor], linear: dict[str, torch.Tensor]):
        super().__init__()
        self.features = alexnet_features()
        own = {k.removeprefix("features."): v for k, v in backbone.items()
               if k.startswith("features.")}
        missing = sorted(set(self.features.state_dict()) - set(own))
        if missing:
            raise ValueError(f"--lpips-backbone: no AlexNet tensor features.{missing[0]} (give "
                             "torchvision's alexnet state dict)")
        self.features.load_state_dict(own)
        self.lins = nn.ParameterList()
        for i, c in enumerate(CHANNELS):
            key = f"lin{i}.model.1.weight"
            if key not in linear or tuple(linear[key].shape) != (1, c, 1, 1):
                raise ValueError(f"--lpips-weights: no {key} of shape (1, {c}, 1, 1) (give the "
                                 "lpips package's weights/v0.1/alex.pth)")
            self.lins.append(nn.Parameter(linear[key].float(), requires_grad=False))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for start, stop in SLICES:
            for module in self.features[start:stop]:
                x = module(x)
            out.append(x)
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS of each pair of ``[N, 3, H, W]`` images in [-1, 1]: ``[N]``."""
        total = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        for fa, fb, w in zip(self.layers(a), self.layers(b), self.lins, strict=True):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += ((na - nb) ** 2 * w.to(fa.dtype).view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return total


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 ``N×H×W×3`` → float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def lpips_distances(model: LPIPS, a: np.ndarray, b: np.ndarray, *, device: str = "cpu",
                    batch: int = 32) -> np.ndarray:
    model = model.to(device)
    dtype = model.shift.dtype
    out = [model(to_input(a[i:i + batch]).to(device, dtype),
                 to_input(b[i:i + batch]).to(device, dtype)) for i in range(0, len(a), batch)]
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


# --------------------------------------------------------------------------- the metric group


def check_group(ctx) -> None:
    """Both files named and readable, and images large enough, before any work."""
    s = ctx.settings
    for flag, key, what in (("--lpips-backbone", "lpips_backbone", "AlexNet's weights "
                             "(torchvision's alexnet state dict, .safetensors or .pth)"),
                            ("--lpips-weights", "lpips_weights", "the linear layers "
                             "(the lpips package's weights/v0.1/alex.pth)")):
        if s.get(key) is None:
            raise ValueError(f"--metrics lpips needs {flag} FILE: {what}")
        s[f"{key}_state"] = read_weights(s[key], flag)
    LPIPS(s["lpips_backbone_state"], s["lpips_weights_state"])  # every tensor present
    height, width = s["size"]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"--metrics lpips: {height}x{width} px images are too small for "
                         f"AlexNet (at least {MIN_SIDE} px a side)")


def compute_group(ctx) -> tuple[dict[str, float], dict[str, Any]]:
    s = ctx.settings
    model = LPIPS(s["lpips_backbone_state"], s["lpips_weights_state"])
    d = lpips_distances(model, ctx.images, ctx.teacher_images, device=ctx.device)
    return {"lpips": float(d.mean())}, {
        "network": "AlexNet (lpips v0.1 formula, implemented in attnbench/metrics/lpips.py)",
        "backbone": str(s["lpips_backbone"]), "linear_layers": str(s["lpips_weights"]),
        "reference": "the teacher's sample for the same prompt and seed",
        "per_image": [round(float(x), 5) for x in d]}
