"""What one benchmark point runs: a method at a level, resolution, batch and dtype.

Levels (the same shapes as the model the sweep names):

* ``attention`` -- one layer's ``attend`` on ``[B, H, N, d]``;
* ``block`` -- one DiT block (adaLN, the method's mixer, MLP) on ``[B, N, C]``;
* ``model`` -- one denoising step of the whole DiT on a latent ``[B, 4, px/8, px/8]``.

A diffusers transformer (:class:`DiffusersModel`: FLUX, SD3, PixArt, SANA, Wan, DiT
from the zoo or a local folder) is measured at its true shapes: ``attention`` is one
self-attention call over its layout (text tokens, video grid), ``model`` one
denoising step; the block level is DiT-only.

A :class:`Workload` holds the timed call, its analytic FLOPs (2 FLOPs per
multiply-add, forward), its predicted bytes, and the overhead steps (mask or
block-map building) that are timed apart from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import attention
from ..attention.costs import Flops
from ..attention.layout import Layout
from ..models.configs import VAE_DOWNSAMPLE, DiTConfig
from ..models.diffusers_configs import DiffusersConfig, get_diffusers_config
from ..models.dit import DiT, DiTBlock
from ..results import SPEED_LEVELS, STATUS_SKIPPED, STATUS_UNAVAILABLE, Size


@dataclass(frozen=True)
class Point:
    """Where a workload sits: the model's shapes at one image size.

    ``resolution`` is the width in px; ``height`` the height when the image is not
    square (0: square), as in a results row."""

    config: DiTConfig
    resolution: int
    batch: int
    height: int = 0

    @property
    def size(self) -> Size:
        return Size.of_row(self.resolution, self.height)

    @property
    def latent(self) -> tuple[int, int]:
        """The latent's ``(height, width)``."""
        return self.size.height // VAE_DOWNSAMPLE, self.size.width // VAE_DOWNSAMPLE

    @property
    def grid(self) -> tuple[int, int]:
        p = self.config.patch_size
        return self.latent[0] // p, self.latent[1] // p

    @property
    def tokens(self) -> int:
        hg, wg = self.grid
        return hg * wg

    @property
    def layout(self) -> Layout:
        """The attention's token layout: the plain image grid of a DiT."""
        return Layout(self.grid)

    @property
    def heads(self) -> int:
        return self.config.heads

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.heads


def check_resolution(resolution: int | Size, patch_size: int) -> None:
    """Sizes are image pixels: each side a multiple of 8·patch (VAE ×8, then patches)."""
    step = VAE_DOWNSAMPLE * patch_size
    size = Size.of(resolution)
    for name, side in (("height", size.height), ("width", size.width)):
        if side <= 0 or side % step:
            lower = max(step, side // step * step)
            what = f"resolution {side} px" if size.square else f"{size}: the {name} {side} px"
            raise ValueError(
                f"{what} is not a multiple of {step} (8 × patch {patch_size}); "
                f"nearest valid: {lower} or {lower + step}"
            )


@dataclass
class Workload:
    fn: Callable[[], Any]
    flops: Flops
    predicted_bytes: float
    impl: str
    overheads: dict[str, Callable[[], Any]] = field(default_factory=dict)
    #: whether FlopCounterMode can run through ``fn`` (not through compiled FlexAttention)
    countable: bool = True
    #: why each fast path ahead of ``impl`` could not run (``Selection.passed_over``)
    passed_over: dict[str, list[str]] = field(default_factory=dict)
    #: False when the method's FLOP model does not cover the point (``flops.actual`` is
    #: then the dense count, used only to predict the point's time)
    flops_modelled: bool = True
    #: what the row carries in ``extra`` about the point (layout, weights, ...)
    extra: dict[str, Any] = field(default_factory=dict)
    #: builds what ``fn`` needs (a model's weights), called once the point is to run
    prepare: Callable[[], None] | None = None


def block_linear_flops(config: DiTConfig, batch: int, tokens: int) -> float:
    """qkv, proj and the MLP per token; adaLN per sample (2 FLOPs per multiply-add)."""
    c = config.hidden_size
    mlp = int(c * config.mlp_ratio)
    per_token = 3 * c * c + c * c + 2 * c * mlp
    return 2.0 * batch * (tokens * per_token + 6 * c * c)


def model_flops(
    config: DiTConfig, batch: int, tokens: int, attention_flops: Flops, *, mixer_flops: float = 0
) -> Flops:
    """One denoising step: ``depth`` blocks plus embedders and the final layer."""
    c, p = config.hidden_size, config.patch_size
    blocks = config.depth * (block_linear_flops(config, batch, tokens) + mixer_flops)
    embed = 2.0 * batch * tokens * c * p * p * config.in_channels
    final = 2.0 * batch * (tokens * c * p * p * config.out_channels + 2 * c * c)
    t_embed = 2.0 * batch * (256 * c + c * c)
    linear = blocks + embed + final + t_embed
    return Flops(
        actual=linear + config.depth * attention_flops.actual,
        dense=linear + config.depth * attention_flops.dense,
        overhead=config.depth * attention_flops.overhead,
    )


def _activation_bytes(config: DiTConfig, batch: int, tokens: int, element_size: int) -> float:
    """A block's live activations at inference: x, its norm, qkv, attention out, MLP hidden."""
    c = config.hidden_size
    return float(batch * tokens * c * (1 + 1 + 3 + 1 + config.mlp_ratio) * element_size)


def build_workload(
    level: str,
    method: str,
    options: dict[str, Any],
    point: Point | DiffusersPoint,
    dtype: torch.dtype,
    device: torch.device,
    *,
    seed: int = 0,
) -> Workload:
    """The timed call of ``method`` at ``level`` on ``point`` (inputs allocated here)."""
    if isinstance(point, DiffusersPoint):
        return build_diffusers_workload(level, method, options, point, dtype, device, seed=seed)
    if level not in SPEED_LEVELS:
        raise ValueError(f"unknown level {level!r}; valid: {', '.join(SPEED_LEVELS)}")
    backend = attention.get(method)
    attend_options = backend.resolve(backend.attend_options(options))
    b, h, n, d = point.batch, point.heads, point.tokens, point.head_dim
    grid = point.grid
    element = torch.empty((), dtype=dtype).element_size()
    attn_flops = backend.flops(b, h, n, d, grid, **attend_options)
    layer = backend.mixer_flops(b, h, n, d, **options)  # the mixer's learned parts
    selection = backend.selection(device, dtype, (b, h, n, d))
    impl, passed = selection.path, selection.passed_over
    # the bytes of the implementation that will run (LiT's Triton kernel keeps no φ(q), φ(k))
    attn_mem = backend.memory(b, h, n, d, grid, element_size=element, impl=impl,
                              **attend_options)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    countable = backend.flop_countable(impl)
    if level == "attention":
        q, k, v = randn(b, h, n, d), randn(b, h, n, d), randn(b, h, n, d)

        def fn():
            return backend.attend(q, k, v, grid=grid, **attend_options)

        overheads = backend.overhead_steps(q, k, v, grid=grid, impl=impl, **attend_options)
        return Workload(fn, attn_flops, attn_mem.actual, impl, overheads, countable, passed)

    config = point.config.replace(attention=method, attention_options=dict(options))
    activations = _activation_bytes(config, b, n, element)
    if level == "block":
        block = DiTBlock(config.hidden_size, config.heads, config.mlp_ratio, method, options)
        block = block.to(device=device, dtype=dtype).eval()
        x, c = randn(b, n, config.hidden_size), randn(b, config.hidden_size)

        def fn():
            return block(x, c, grid)

        linear = block_linear_flops(config, b, n) + layer
        flops = Flops(linear + attn_flops.actual, linear + attn_flops.dense, attn_flops.overhead)
        params = sum(p.numel() for p in block.parameters()) * element
        return Workload(fn, flops, params + activations + attn_mem.workspace, impl,
                        countable=countable, passed_over=passed)

    model = DiT(config).to(device=device, dtype=dtype).eval()
    x = randn(b, config.in_channels, *point.latent)
    t = torch.randint(0, 1000, (b,), generator=gen).to(device)
    y = torch.randint(0, config.num_classes, (b,), generator=gen).to(device)

    def fn():
        return model(x, t, y)

    params = sum(p.numel() for p in model.parameters()) * element
    flops = model_flops(config, b, n, attn_flops, mixer_flops=layer)
    return Workload(fn, flops, params + activations + attn_mem.workspace, impl,
                    countable=countable, passed_over=passed)



# --------------------------------------------------------------------------- diffusers models


class Refused(ValueError):
    """A point that cannot run, said before anything is built: its row's status and reason."""

    def __init__(self, reason: str, status: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class DiffusersModel:
    """A diffusers transformer measured at its true shapes: a zoo entry or a local folder.

    ``folder`` -- a ``--model-path`` folder (its config gives ``entry``); ``frames`` --
    the frames of a video model (``None`` for image models).
    """

    entry: DiffusersConfig
    folder: Path | None = None
    frames: int | None = None

    @property
    def family(self):
        """The entry's :class:`~attnbench.integrations.diffusers.families.Family`."""
        from ..integrations.diffusers.families import get_family

        return get_family(self.entry.family)

    @property
    def name(self) -> str:
        """The rows' ``model``: the zoo name, or the folder's class and path."""
        if self.folder is None:
            return self.entry.name
        return f"{self.family.transformer} ({self.folder})"

    def point(self, size: int | Size, batch: int) -> DiffusersPoint:
        from ..integrations.diffusers import model_shapes  # lazy: diffusers is an optional extra

        size = Size.of(size)
        try:
            shapes = model_shapes(self.entry, tuple(size), self.frames)
        except ValueError as err:
            return DiffusersPoint(self, size, batch, error=str(err))
        return DiffusersPoint(self, size, batch, shapes)

    def describe(self) -> dict[str, Any]:
        """What the run's metadata records about the model."""
        return {"name": self.name, "family": self.entry.family, "class": self.family.transformer,
                "source": self.entry.source, "config": dict(self.entry.config),
                "text_tokens": self.entry.text_tokens, "vae_factor": self.entry.vae_factor,
                "frames": self.frames, "folder": str(self.folder) if self.folder else None}


def diffusers_model(name: str | None = None, path: str | Path | None = None,
                    frames: int | None = None) -> DiffusersModel:
    """The model of ``--model NAME`` (a diffusers zoo name) or ``--model-path DIR``, checked.

    ``frames`` defaults to a video model's usual frames and is refused for image models;
    every problem is a ValueError naming the flag.
    """
    folder = None
    if path is not None:
        # lazy: diffusers is an optional extra
        from ..integrations.diffusers import read_transformer_config

        folder, entry = read_transformer_config(path)
    else:
        entry = get_diffusers_config(name or "")
    from ..integrations.diffusers.families import get_family

    if not get_family(entry.family).video:
        if frames is not None:
            raise ValueError(f"--frames {frames}: {entry.name} is an image model; --frames is "
                             "for video models (e.g. wan2.1-t2v-1.3b)")
    else:
        frames = entry.default_frames if frames is None else frames
        from ..integrations.diffusers import model_shapes  # lazy: diffusers is an optional extra

        model_shapes(entry, entry.default_res, frames)  # a bad frame count raises here
    return DiffusersModel(entry, folder, frames)


@dataclass(frozen=True)
class DiffusersPoint:
    """A diffusers model at one image size: its true shapes, or why it cannot run there."""

    model: DiffusersModel
    size: Size
    batch: int
    shapes: Any = None  # integrations.diffusers.ModelShapes
    error: str = ""

    @property
    def layout(self) -> Layout | None:
        return self.shapes.layout if self.shapes is not None else None

    @property
    def tokens(self) -> int:
        return self.shapes.tokens if self.shapes is not None else 0

    @property
    def heads(self) -> int:
        return int(self.model.entry.config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.model.entry.config["attention_head_dim"])

    def row_extra(self) -> dict[str, Any]:
        """What a row of this point carries in ``extra``: the layout and the model's facts."""
        extra: dict[str, Any] = {"family": self.model.entry.family,
                                 "class": self.model.family.transformer,
                                 "source": self.model.entry.source}
        if self.shapes is not None:
            extra.update(layout=self.shapes.layout.describe(),
                         text_tokens=self.shapes.text_tokens)
            if self.shapes.frames is not None:
                extra["frames"] = self.shapes.frames
        return extra


def _layout_reason(backend: attention.AttentionBackend, layout: Layout,
                   options: dict[str, Any]) -> str | None:
    """Why ``backend`` does not take ``layout`` (text tokens, video), or None."""
    try:
        backend.check_layout(layout, backend.resolve(backend.attend_options(options)))
    except ValueError as err:
        return str(err)
    return None


def _diffusers_attention_cost(backend, b, h, n, d, layout, opts, impl, element):
    """``(flops or None, dense flops, bytes)`` of one self-attention call over ``layout``."""
    # lazy: diffusers is an optional extra
    from ..integrations.diffusers.flops import attention_flops

    actual = attention_flops(backend, b, h, d, layout, opts)
    dense = attention_flops(attention.get("softmax"), b, h, d, layout, {})
    memory = backend.memory(b, h, n, d, layout=layout, element_size=element, impl=impl,
                            **backend.attend_options(opts))
    return actual, dense, memory.actual


def _diffusers_activation_bytes(point: DiffusersPoint, element: int) -> float:
    """A block's live activations at inference (as for a DiT block: x, its norm, qkv,
    attention out, a 4× MLP hidden) over the joint sequence: an estimate for skipping."""
    c = point.heads * point.head_dim
    return float(point.batch * (point.tokens + point.shapes.text_tokens) * c * 10 * element)


def build_diffusers_workload(
    level: str, method: str, options: dict[str, Any], point: DiffusersPoint,
    dtype: torch.dtype, device: torch.device, *, seed: int = 0,
) -> Workload:
    """The timed call of ``method`` at ``level`` on a diffusers model's true shapes.

    ``attention`` -- one self-attention call over the model's layout (text tokens,
    video grid) through the method's ``attend``; ``model`` -- one denoising step
    (``DiffusersWorkload.step``), the weights random (speed needs none) or the
    folder's. The weights are built by ``Workload.prepare``, after the sweep's
    predictions (from the model on the meta device) have decided the point runs.
    Raises :class:`Refused` for what cannot run: an impossible size (``skipped``), a
    layout the method does not take (``unavailable``), the block level.
    """
    if level not in SPEED_LEVELS:
        raise ValueError(f"unknown level {level!r}; valid: {', '.join(SPEED_LEVELS)}")
    if level == "block":
        raise Refused("the block level is DiT-only (attnbench's own DiT block); diffusers "
                      "models are measured at the attention and model levels",
                      STATUS_UNAVAILABLE)
    if point.shapes is None:
        raise Refused(point.error, STATUS_SKIPPED)
    backend = attention.get(method)
    attend_options = backend.resolve(backend.attend_options(options))
    layout = point.layout
    reason = _layout_reason(backend, layout, attend_options)
    if reason:
        raise Refused(reason, STATUS_UNAVAILABLE)
    b, h, n, d = point.batch, point.heads, point.tokens, point.head_dim
    element = torch.empty((), dtype=dtype).element_size()
    selection = backend.selection(device, dtype, (b, h, n, d))
    impl, passed = selection.path, selection.passed_over
    countable = backend.flop_countable(impl)
    actual, dense, attn_bytes = _diffusers_attention_cost(backend, b, h, n, d, layout,
                                                          attend_options, impl, element)
    extra = point.row_extra()
    if level == "attention":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype)
                   for _ in range(3))
        geometry: dict[str, Any] = ({"grid": tuple(layout.grid)} if layout.is_plain
                                    else {"layout": layout})

        def fn():
            return backend.attend(q, k, v, **geometry, **attend_options)

        overheads = (backend.overhead_steps(q, k, v, grid=tuple(layout.grid), impl=impl,
                                            **attend_options) if layout.is_plain else {})
        extra["weights"] = "none (attention level: random q, k, v)"
        return Workload(fn, Flops(dense if actual is None else actual, dense), attn_bytes, impl,
                        overheads, countable, passed, flops_modelled=actual is not None,
                        extra=extra)

    # lazy: diffusers is an optional extra
    from ..integrations.diffusers import build_transformer, diffusers_workload, step_flops

    meta = build_transformer(point.model.entry, device="meta", dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    step = step_flops(meta, point.shapes, backend, backend.resolve(options, mixer=True), b)
    del meta
    predicted = weights + _diffusers_activation_bytes(point, element) + attn_bytes
    extra["weights"] = (f"random (seed {seed})" if point.model.folder is None
                        else f"--model-path {point.model.folder}")
    extra["weight_bytes"] = weights
    built: dict[str, Any] = {}

    def prepare() -> None:
        try:
            built["w"] = diffusers_workload(
                point.model.folder or point.model.entry, tuple(point.size),
                point.model.frames, batch=b, dtype=dtype, device=device, method=backend,
                options=options, seed=seed)
        except ValueError as err:  # refused before building (e.g. weights do not fit)
            raise Refused(str(err), STATUS_SKIPPED) from None

    def fn():
        return built["w"].step()

    flops = Flops(step.total_dense if step.total is None else step.total, step.total_dense)
    return Workload(fn, flops, predicted, impl, countable=countable, passed_over=passed,
                    flops_modelled=step.total is not None, extra=extra, prepare=prepare)
