"""One denoising step of a diffusers model with a method swapped in: what the benchmarks run.

>>> w = diffusers_workload("flux.1-dev", 1024, method="clear", options={"radius": 16},
...                        device="cuda", dtype=torch.bfloat16)        # doctest: +SKIP
>>> w.step()                                 # one transformer call (model level)
>>> b, h, n, d, layout = w.attention_shape   # the attention level: [B, H, N, d] over layout
>>> w.description                            # what ran: model, weights, shapes, method, FLOPs

Everything that can be refused is refused before any weight is made: a size
the model cannot run (:func:`~.build.model_shapes`), a bad method option, a
model whose weights do not fit in the device's free memory. The message is a
sentence a results row can carry as its ``skipped`` reason. The weights are
random (seeded) unless ``model`` is a local folder: speed and memory need no
trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import attention
from ...attention import Layout
from ...models.diffusers_configs import DIFFUSERS_CONFIGS, DiffusersConfig, get_diffusers_config
from .build import ModelShapes, build_transformer, make_inputs, model_shapes
from .families import get_family
from .flops import step_flops
from .loading import load_transformer, read_transformer_config
from .swap import SwapHandle, swap_attention


@dataclass
class DiffusersWorkload:
    """A built (or loaded) transformer with ``method`` installed and one step's inputs."""

    model: nn.Module
    inputs: dict[str, Any]
    shapes: ModelShapes
    entry: DiffusersConfig
    handle: SwapHandle
    batch: int
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return self.shapes.layout

    @property
    def attention_shape(self) -> tuple[int, int, int, int, Layout]:
        """``(B, H, N, d, layout)`` of the main self-attention call."""
        return self.shapes.attention_shape(self.batch)

    def attention_calls(self) -> list[tuple[int, tuple[int, int, int, int, Layout]]]:
        """``(calls per step, (B, H, N, d, layout))`` of every self-attention kind."""
        b, h, d = self.batch, self.shapes.heads, self.shapes.head_dim
        calls = [(self.shapes.attention_layers, self.attention_shape)]
        if self.shapes.image_only_layers:
            image = Layout(self.shapes.grid)
            calls.append((self.shapes.image_only_layers, (b, h, image.tokens, d, image)))
        return calls

    def step(self) -> torch.Tensor:
        """One forward of the transformer (one denoising step), without autograd."""
        with torch.no_grad():
            return self.model(**self.inputs)[0]


def _is_path(model: str | Path | DiffusersConfig) -> bool:
    if isinstance(model, Path):
        return True
    return isinstance(model, str) and model.strip().lower() not in DIFFUSERS_CONFIGS and (
        "/" in model or Path(model).expanduser().exists())


def _weight_bytes(entry: DiffusersConfig, dtype: torch.dtype) -> int:
    meta = build_transformer(entry, device="meta", dtype=dtype)
    return sum(p.numel() * p.element_size() for p in meta.parameters())


def _check_fits(entry: DiffusersConfig, dtype: torch.dtype, device: torch.device) -> int:
    need = _weight_bytes(entry, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise ValueError(f"{entry.name} does not fit on {device}: its weights take "
                             f"{need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, "
                             f"{free / 2**30:.1f} GiB free")
    return need


def diffusers_workload(
    model: str | Path | DiffusersConfig,
    res: int | tuple[int, int] | None = None,
    frames: int | None = None,
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    method: str | attention.AttentionBackend = "softmax",
    options: dict[str, Any] | None = None,
    impl: str = "auto",
    seed: int = 0,
) -> DiffusersWorkload:
    """Build (zoo name) or load (local folder) a transformer, swap ``method`` in, make inputs.

    ``res`` -- px, square or ``(height, width)`` (default: the model's published
    size); ``frames`` -- video models only. Raises ``ValueError`` with the reason
    before any weight is made when the model cannot run this.
    """
    device = torch.device(device)
    options = dict(options or {})
    backend = method if isinstance(method, attention.AttentionBackend) else attention.get(method)
    resolved = backend.resolve(options, mixer=True)
    if batch <= 0:
        raise ValueError(f"batch must be >= 1, got {batch}")
    folder = None
    if _is_path(model):
        folder, entry = read_transformer_config(model)
    else:
        entry = get_diffusers_config(model)
    shapes = model_shapes(entry, res, frames)
    weights = _check_fits(entry, dtype, device)
    if folder is None:
        transformer = build_transformer(entry, device=device, dtype=dtype, seed=seed)
    else:
        transformer, entry = load_transformer(folder, device=device, dtype=dtype)
    handle = swap_attention(transformer, backend, impl=impl, **resolved)
    generator = torch.Generator().manual_seed(seed)
    inputs = make_inputs(entry, shapes, batch=batch, device=device, dtype=dtype,
                         generator=generator)
    b, h, n, d, _ = shapes.attention_shape(batch)
    try:
        path = backend.select(device, dtype, (b, h, n, d), impl=impl)
    except ValueError as err:
        path = f"unavailable: {err}"
    description = {
        **shapes.describe(),
        "class": get_family(entry.family).transformer, "source": entry.source,
        "weights": f"random (seed {seed})" if folder is None else f"--model-path {folder}",
        "weight_bytes": weights, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "attention_layers": shapes.attention_layers,
        "image_only_layers": shapes.image_only_layers, "cross_layers": shapes.cross_layers,
        "path": path, **handle.describe(),
        "flops": step_flops(transformer, shapes, backend, resolved, batch).to_dict(),
    }
    return DiffusersWorkload(transformer, inputs, shapes, entry, handle, batch, description)
