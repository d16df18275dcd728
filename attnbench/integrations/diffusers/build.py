"""A zoo entry as a diffusers transformer: built on a device, its true shapes, its inputs.

* :func:`build_transformer` -- random weights, made directly on the device in
  the run's dtype (no float32 copy of a 12B model on the CPU first); speed and
  memory need no trained weights. Modules the model keeps in float32 when
  diffusers loads it in half precision (``_keep_in_fp32_modules``) stay float32.
* :func:`model_shapes` -- tokens, text tokens, the self-attention layout, heads
  and head_dim at a resolution (and ``frames`` for video), with a clear error
  where the model cannot run (not a multiple of its token size, beyond SD3's
  position embedding, DiT's square-only inputs).
* :func:`make_inputs` -- the forward inputs of one denoising step at those shapes.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...attention import Layout
from ...models.diffusers_configs import DiffusersConfig, get_diffusers_config
from .compat import import_diffusers
from .families import get_family


def transformer_class(entry: DiffusersConfig) -> type[nn.Module]:
    return getattr(import_diffusers(), get_family(entry.family).transformer)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(
    entry: str | DiffusersConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """The transformer of ``entry`` with random weights, created on ``device`` in ``dtype``.

    Parameters are allocated where they will run (a ``torch.device`` context)
    in the requested dtype (the default dtype while constructing); diffusers'
    constructors build their fixed tables (RoPE frequencies, sin-cos position
    embeddings) in explicit float32/float64, so those are unaffected.
    """
    entry = get_diffusers_config(entry)
    cls = transformer_class(entry)
    device = torch.device(device)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        with torch.device(device), _default_dtype(dtype):
            model = cls(**entry.config)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    half = dtype in (torch.float16, torch.bfloat16)
    for name, param in model.named_parameters():
        want = torch.float32 if half and any(m in name for m in keep) else dtype
        if param.dtype != want:
            param.data = param.data.to(want)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class ModelShapes:
    """The true shapes of one denoising step of a diffusers model at one resolution.

    ``grid`` -- image (H, W) or video (F, H, W) tokens; ``text_tokens`` -- the
    prompt length; ``layout`` -- the layout of the self-attention (text joined
    for FLUX, first, and SD3, last; image or video tokens only elsewhere);
    ``attention_layers`` -- self-attention calls per step, ``image_only_layers``
    of them on image tokens alone (SD3.5's dual attention); ``cross_layers`` --
    cross-attention calls (image queries, text keys: PixArt, SANA, Wan).
    """

    model: str
    family: str
    resolution: tuple[int, int]
    frames: int | None
    latent: tuple[int, ...]
    grid: tuple[int, ...]
    text_tokens: int
    layout: Layout
    heads: int
    head_dim: int
    attention_layers: int
    image_only_layers: int = 0
    cross_layers: int = 0
    cross_heads: int = 0
    cross_head_dim: int = 0

    @property
    def image_tokens(self) -> int:
        return self.layout.image_tokens

    @property
    def tokens(self) -> int:
        """Tokens of the main self-attention (text included where it is joint)."""
        return self.layout.tokens

    def attention_shape(self, batch: int = 1) -> tuple[int, int, int, int, Layout]:
        """``(B, H, N, d, layout)`` of the main self-attention call."""
        return batch, self.heads, self.tokens, self.head_dim, self.layout

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model, "family": self.family,
            "resolution": f"{self.resolution[0]}x{self.resolution[1]}", "frames": self.frames,
            "layout": self.layout.describe(), "tokens": self.tokens,
            "text_tokens": self.text_tokens, "heads": self.heads, "head_dim": self.head_dim,
        }


def _pair(res: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    sides = tuple(res) if isinstance(res, (tuple, list)) else (res, res)
    try:  # operator.index: "abc" and 4.7 are refused with the resolution named
        if len(sides) != 2:
            raise TypeError
        return operator.index(sides[0]), operator.index(sides[1])
    except TypeError:
        raise ValueError(f"resolution must be px or (height, width) px integers, got {res!r}"
                         ) from None


def _heads(entry: DiffusersConfig) -> tuple[int, int]:
    c = entry.config
    return int(c["num_attention_heads"]), int(c["attention_head_dim"])


def model_shapes(
    entry: str | DiffusersConfig, res: int | tuple[int, int] | None = None,
    frames: int | None = None,
) -> ModelShapes:
    """True shapes of ``entry`` at ``res`` px (square or ``(height, width)``) and ``frames``.

    ``ValueError`` (a sentence a results row can carry as its skip reason) when the
    model cannot run at that size.
    """
    entry = get_diffusers_config(entry)
    family = get_family(entry.family)
    height, width = _pair(res if res is not None else entry.default_res)
    ph, pw = entry.pixels_per_token
    if height <= 0 or width <= 0 or height % ph or width % pw:
        raise ValueError(
            f"--res {height}x{width}: {entry.name} needs positive multiples of {ph} px "
            f"(VAE ×{entry.vae_factor} × {ph // entry.vae_factor} latent positions per token)")
    lh, lw = height // entry.vae_factor, width // entry.vae_factor
    gh, gw = height // ph, width // pw
    c = entry.config
    if family.video:
        frames = entry.default_frames if frames is None else int(frames)
        if frames <= 0 or (frames - 1) % entry.vae_temporal:
            raise ValueError(f"--frames {frames}: {entry.name} takes 1 + {entry.vae_temporal}·k "
                             f"frames (e.g. 81), the VAE's temporal stride")
        lf = 1 + (frames - 1) // entry.vae_temporal
        pt = entry.patch[0]
        if lf % pt:
            raise ValueError(f"--frames {frames}: {lf} latent frames are not divisible by the "
                             f"temporal patch {pt}")
        grid: tuple[int, ...] = (lf // pt, gh, gw)
        latent: tuple[int, ...] = (entry.latent_channels, lf, lh, lw)
    else:
        if frames is not None:
            raise ValueError(f"--frames: {entry.name} is an image model (frames are for video)")
        grid = (gh, gw)
        latent = ((gh * gw, int(c["in_channels"])) if entry.pack > 1  # packed into tokens
                  else (entry.latent_channels, lh, lw))
    if family.size_check is not None:
        family.size_check(c, gh, gw, height, width, entry.name)
    heads, head_dim = _heads(entry)
    text = entry.text_tokens
    layout = (Layout(grid, text=text, text_first=family.joint_text == "first")
              if family.joint_text else Layout(grid))
    image_only = len(c.get(family.image_only_key, ())) if family.image_only_key else 0
    cross, cross_heads, cross_dim = (family.cross(c, heads, head_dim) if family.cross
                                     else (0, 0, 0))
    return ModelShapes(
        model=entry.name, family=entry.family, resolution=(height, width),
        frames=frames if family.video else None, latent=latent, grid=grid, text_tokens=text,
        layout=layout, heads=heads, head_dim=head_dim,
        attention_layers=sum(int(c[k]) for k in family.layer_keys),
        image_only_layers=image_only, cross_layers=cross,
        cross_heads=cross_heads if cross else 0, cross_head_dim=cross_dim if cross else 0,
    )


def make_inputs(
    entry: str | DiffusersConfig,
    shapes: ModelShapes,
    *,
    batch: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Keyword inputs of one forward (one denoising step) of ``entry`` at ``shapes``.

    Random latents and text embeddings (the text encoders are not part of the
    step); the timestep in the unit each pipeline passes (FLUX: t/1000).
    ``return_dict=False`` so the forward returns a tuple.
    """
    entry = get_diffusers_config(entry)
    family = get_family(entry.family)
    c = entry.config

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    b = batch
    x = randn(b, *shapes.latent)
    text = {k: v.to(device) for k, v in family.random_text(c, b, shapes.text_tokens, randn,
                                                           generator).items()}
    step = torch.full((b,), 500.0)
    t = (step.long().to(device) if family.integer_timestep
         else (step * family.timestep_scale / 1000).to(device, dtype))
    return {**family.inputs(c, x, text, t, shapes.grid, 3.5), "return_dict": False}
