"""Where the tokens sit, read from a diffusers transformer's own inputs.

diffusers' attention processors see ``hidden_states`` and nothing of the
image: not the grid, not the frame count, not (in FLUX's single-stream blocks)
how many of the tokens are text. Every transformer's forward inputs say it,
though, so a forward pre-hook on the transformer reads them once per call and
stores them in a :class:`Geometry` that every installed processor holds:

* FLUX -- the grid from ``img_ids`` columns 1, 2 (rows, columns of the packed
  latent; it must be one row-major grid from 0: FLUX Kontext's several images
  are refused; checking it costs one device sync per forward), the text length
  from ``len(txt_ids)``;
* SD3, PixArt, SANA, DiT -- the latent ``[B, C, H, W]`` over the patch size;
* Wan -- the latent video ``[B, C, F, H, W]`` over the 3-D patch size.

Where the text sits (FLUX: first, SD3: last) is the processors' business: it
is the order their stock processor concatenates. The geometry is kept after the
forward (not cleared), so activation checkpointing's recomputation in the
backward pass sees the same grid.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...attention import Layout


@dataclass
class Geometry:
    """The token geometry of the current forward pass, shared by a model's processors.

    ``grid`` -- ``(H, W)`` or ``(F, H, W)`` tokens of the image or video;
    ``text`` -- text tokens joined to the image tokens in self-attention where
    the inputs alone tell it (FLUX's ``len(txt_ids)``; SD3's processors count
    their ``encoder_hidden_states``); ``None`` before the first forward.
    """

    grid: tuple[int, ...] | None = None
    text: int = 0

    def layout(self, text: int = 0, text_first: bool = True) -> Layout:
        if self.grid is None:
            raise RuntimeError(
                "attnbench processor called outside its transformer's forward: the token grid "
                "comes from the transformer's inputs (swap_attention's pre-hook), so call the "
                "transformer, not its attention modules"
            )
        return Layout(self.grid, text=text, text_first=text_first)


def bound_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's arguments by name, positional ones included."""
    signature = inspect.signature(module.forward)
    return dict(signature.bind_partial(*args, **kwargs).arguments)


def _refuse_ip_adapter(kwargs: dict | None, name: str) -> None:
    if kwargs and "ip_adapter_image_embeds" in kwargs:
        raise ValueError(
            f"{name}: IP-Adapter inputs (ip_adapter_image_embeds) are not handled by attnbench's "
            "processors; restore() the stock processors to use IP-Adapter"
        )
    if kwargs and kwargs.get("attention_mask") is not None:
        raise ValueError(f"{name}: attention masks are not handled by attnbench's processors")


def grid_from_ids(img_ids: torch.Tensor) -> tuple[int, int]:
    """``(H, W)`` of FLUX's ``img_ids`` ``[N, 3]``; ``ValueError`` unless one row-major grid.

    FLUX's pipeline writes row indices in column 1 and column indices in column
    2 of a zero ``[H, W, 3]`` tensor; anything else (FLUX Kontext's second image
    with column 0 = 1, offset or shuffled ids) is refused rather than guessed.
    """
    if img_ids.ndim != 2 or img_ids.shape[-1] != 3:
        raise ValueError(f"FLUX img_ids must be [tokens, 3], got {tuple(img_ids.shape)}")
    pos = img_ids[:, 1:3].round().long()
    h, w = (int(x) + 1 for x in pos.max(dim=0).values.tolist())
    rows = torch.arange(h, device=pos.device).repeat_interleave(w)
    cols = torch.arange(w, device=pos.device).repeat(h)
    one_grid = (pos.shape[0] == h * w and torch.equal(pos[:, 0], rows)
                and torch.equal(pos[:, 1], cols) and bool((img_ids[:, 0] == img_ids[0, 0]).all()))
    if not one_grid:
        raise ValueError(
            "FLUX img_ids are not one row-major grid (rows in column 1, columns in column 2, "
            "from 0): several images (FLUX Kontext), offset or shuffled ids are not supported "
            "by attnbench's processors"
        )
    return h, w


def flux_geometry(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    img_ids, txt_ids = inputs.get("img_ids"), inputs.get("txt_ids")
    if img_ids is None or txt_ids is None:
        raise ValueError("FLUX: img_ids and txt_ids are required (the token grid and text length)")
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    _refuse_ip_adapter(inputs.get("joint_attention_kwargs"), "FLUX")
    grid = grid_from_ids(img_ids)
    tokens = inputs["hidden_states"].shape[1]
    if tokens != grid[0] * grid[1]:
        raise ValueError(f"FLUX: img_ids describe a {grid[0]}x{grid[1]} grid but hidden_states "
                         f"has {tokens} tokens")
    text = inputs.get("encoder_hidden_states")
    if text is not None and text.shape[1] != txt_ids.shape[0]:
        raise ValueError(f"FLUX: encoder_hidden_states has {text.shape[1]} tokens but txt_ids "
                         f"{txt_ids.shape[0]}")
    return grid, int(txt_ids.shape[0])


def _latent_grid(name: str, latent: torch.Tensor, patch: tuple[int, ...]) -> tuple[int, ...]:
    sides = tuple(latent.shape[2:])
    if len(sides) != len(patch):
        raise ValueError(f"{name}: hidden_states must be [B, C, {', '.join('FHW'[-len(patch):])}], "
                         f"got {tuple(latent.shape)}")
    if any(s % p for s, p in zip(sides, patch, strict=False)):
        raise ValueError(f"{name}: latent {sides} is not divisible by the patch size {patch}")
    return tuple(s // p for s, p in zip(sides, patch, strict=False))


def image_geometry(name: str, kwargs_key: str | None = None) -> Callable:
    """The hook body of a model that patches a ``[B, C, H, W]`` latent (SD3, PixArt, SANA, DiT)."""

    def geometry(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[tuple[int, ...], int]:
        if kwargs_key:
            _refuse_ip_adapter(inputs.get(kwargs_key), name)
        p = int(model.config.patch_size)
        return _latent_grid(name, inputs["hidden_states"], (p, p)), 0

    return geometry


def wan_geometry(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    patch = tuple(int(p) for p in model.config.patch_size)
    return _latent_grid("Wan", inputs["hidden_states"], patch), 0


def install_hook(model: torch.nn.Module, geometry: Geometry, read: Callable):
    """Register the pre-hook that fills ``geometry`` from ``read(model, inputs)`` per forward."""

    def hook(module, args, kwargs):
        geometry.grid, geometry.text = read(module, bound_inputs(module, args, kwargs))

    return model.register_forward_pre_hook(hook, with_kwargs=True)
