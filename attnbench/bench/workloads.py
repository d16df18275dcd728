"""What one benchmark point runs: a method at a level, resolution, batch and dtype.

Levels (the same shapes as the model the sweep names):

* ``attention`` -- one layer's ``attend`` on ``[B, H, N, d]``;
* ``block`` -- one DiT block (adaLN, the method's mixer, MLP) on ``[B, N, C]``;
* ``model`` -- one denoising step of the whole DiT on a latent ``[B, 4, px/8, px/8]``.

A :class:`Workload` holds the timed call, its analytic FLOPs (2 FLOPs per
multiply-add, forward), its predicted bytes, and the overhead steps (mask or
block-map building) that are timed apart from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import attention
from ..attention.base import Flops
from ..attention.layout import Layout
from ..models.configs import VAE_DOWNSAMPLE, DiTConfig

LEVELS = ("attention", "block", "model")


@dataclass(frozen=True)
class Point:
    """Where a workload sits: the model's shapes at one resolution."""

    config: DiTConfig
    resolution: int
    batch: int

    @property
    def latent(self) -> int:
        return self.resolution // VAE_DOWNSAMPLE

    @property
    def grid(self) -> tuple[int, int]:
        side = self.latent // self.config.patch_size
        return side, side

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


def check_resolution(resolution: int, patch_size: int) -> None:
    """Resolutions are image pixels: a multiple of 8·patch (VAE ×8, then patches)."""
    step = VAE_DOWNSAMPLE * patch_size
    if resolution <= 0 or resolution % step:
        lower = max(step, resolution // step * step)
        raise ValueError(
            f"resolution {resolution} px is not a multiple of {step} (8 × patch {patch_size}); "
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
    point: Point,
    dtype: torch.dtype,
    device: torch.device,
    *,
    seed: int = 0,
) -> Workload:
    """The timed call of ``method`` at ``level`` on ``point`` (inputs allocated here)."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; valid: {', '.join(LEVELS)}")
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
        from ..models.dit import DiTBlock

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

    from ..models.dit import DiT

    model = DiT(config).to(device=device, dtype=dtype).eval()
    x = randn(b, config.in_channels, point.latent, point.latent)
    t = torch.randint(0, 1000, (b,), generator=gen).to(device)
    y = torch.randint(0, config.num_classes, (b,), generator=gen).to(device)

    def fn():
        return model(x, t, y)

    params = sum(p.numel() for p in model.parameters()) * element
    flops = model_flops(config, b, n, attn_flops, mixer_flops=layer)
    return Workload(fn, flops, params + activations + attn_mem.workspace, impl,
                    countable=countable, passed_over=passed)

