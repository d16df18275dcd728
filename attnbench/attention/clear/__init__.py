"""CLEAR: local attention inside a circle on the token grid (Liu et al., arXiv 2412.16112).

Each image token ``(qy, qx)`` of a row-major ``Hg × Wg`` grid attends only to
the image tokens with ``(qy−ky)² + (qx−kx)² < r²`` (strict), with exact
softmax over that neighbourhood; cost O(N·πr²·d) instead of O(N²·d).

Text tokens (the layout's ``text``; official, Huage001/CLEAR
``attention_processor.py`` and ``distill.py``, checked against them): every text
token attends to every text and image token, and every image token attends to
every text token besides its circle -- FLUX's 512 T5 tokens, placed before the
image. Text after the grid (SD3) is the same window: ``attend`` moves the text
to the front and back (``AttentionBackend.dispatch``). The retired option
``global_tokens`` G (a text prefix of G tokens on a plain grid) is refused with
its replacement named: the layout's text count, ``Layout(grid, text=G)``.

Video (attnbench's extension; the official code and paper are image-only): on a
``T × Hg × Wg`` layout an image token ``(t, y, x)`` attends to ``(t', y', x')``
when the circle holds in the frame plane *and* ``|t − t'| ≤ radius_t`` -- a
cylinder, the spatial circle repeated over the frames within reach.
``radius_t`` defaults to ``None``, every frame: the window is local in space,
where the paper showed locality suffices, and global in time, where nothing
shows it does; an integer bounds it (``0``: each frame alone, CLEAR per frame).
Pooled keys (``down_factor`` > 1) are defined on image grids only: a video
layout with them is refused before any work.

The official code's pooling addition (``distill.py``, ``distill.sh``):

* ``down_factor`` -- f > 1 appends ``(Hg//f)·(Wg//f)`` extra key/value tokens,
  each the weighted sum of one f×f patch of the image keys (and values); 1 (the
  official default) and 0 mean no pooled tokens, as ``distill.py`` does (f = 1
  selects the plain local processor there). Who sees them follows
  ``init_local_downsample_mask_flex``: every *image* query attends to all of
  them; the global (text) queries do not. The weights are one ``[f, f]``
  tensor per layer, shared by heads, channels, K and V (``spatial_weight``,
  initialised ``1/f²``): the stateless ``attend`` uses that initial average,
  the core (``core.py``) owns and learns them. Grid sides that are not a
  multiple of f pool the top-left ``(Hg//f·f) × (Wg//f·f)`` region only.

Defaults: radius 16 without pooling, the official training default
(``distill.py``: ``--window_size 16``, ``--down_factor 1``); the paper's 8192²
headline uses r = 8 (its README notes r = 8 without pooling repeats patterns).

Files: ``window.py`` the window (:meth:`Window.of`, its one builder), its mask and
pair counts, ``pooling.py`` the pooled keys, ``reference.py`` the float64-capable
reference, ``flex.py`` (FlexAttention, tokens in tile order; auto on CUDA), ``halo.py``
(halo-tiled SDPA; auto on CPU) and ``masked_sdpa.py`` (dense boolean mask) the fast
paths, ``core.py`` the learned part (``pool_weight``, an extra input of ``attend``).
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

import torch

from ..backend import AttentionBackend
from ..costs import Flops, dense_flops
from ..inputs import ExtraInput, Grid
from ..layout import KINDS, Layout
from ..options import Option, non_negative
from ..recipes import ConversionRecipe, DistillRecipe, Optimisation
from ..registry import register
from .core import ClearCore
from .flex import (
    FLEX,
    FLEX_BLOCK,
    FLEX_RECOMPILE_LIMIT,
    TILE,
    _build_block_mask,
    _cached_block_mask,
    _cached_tile_perm,
    _tile_permute_step,
    block_density,
    block_mask,
    build_block_mask,
    compiled_flex_attention,
    flex_tile_order,
    tile_permutation,
)
from .halo import HALO, choose_tile, halo_index
from .masked_sdpa import MASKED_SDPA, _cached_dense_mask, _dense_mask, dense_mask
from .pooling import _window_of, extend_kv, pool_patches, weight_reason
from .reference import clear_reference, reference_workspace
from .window import (
    _POOLED_VIDEO,
    DEFAULT_DOWN_FACTOR,
    DEFAULT_RADIUS,
    Window,
    _finite_positive,
    allowed,
    allowed_pairs,
    local_pairs,
    pools,
)

SOURCE = "Huage001/CLEAR distill.py (training default)"
HIGHRES = "Huage001/CLEAR attention_processor.py (train_seq_len = 64 ** 2 + 512)"


def clear_mask_caches() -> None:
    """Drop the cached block and dense masks and tile permutations (e.g. between cases)."""
    _cached_block_mask.cache_clear()
    _cached_dense_mask.cache_clear()
    _cached_tile_perm.cache_clear()


@register
class Clear(AttentionBackend):
    """CLEAR local (circular-window) attention; reference, FlexAttention and masked SDPA."""

    name = "clear"
    summary = "CLEAR: softmax inside a circle of radius r on the token grid"
    paper = "Liu et al., CLEAR, arXiv 2412.16112"
    options = (
        Option(
            "radius",
            DEFAULT_RADIUS,
            "circle radius in grid tokens: attend where dy²+dx² < r² (released: 8, 16, 32; "
            "the paper's 8192² headline uses 8)",
            float,
            check=_finite_positive,
            source=SOURCE + ": --window_size 16",
        ),
        Option(
            "radius_t",
            None,
            "video: largest frame distance |dt| of the window (none = every frame; 0 = "
            "each frame alone)",
            int,
            check=non_negative,
            source="attnbench's choice (the official code is image-only): local in space, "
            "every frame in time unless bounded",
        ),
        Option(
            "down_factor",
            DEFAULT_DOWN_FACTOR,
            "0 or 1 = no pooling; f > 1 adds one K/V token per f×f patch, seen by every "
            "image query (released: 4)",
            int,
            check=non_negative,
            source=SOURCE + ": --down_factor 1",
        ),
        Option(
            "proportional_attention",
            False,
            "high resolution: scale the logits by √(log_L n / d) (n keys, L = 64²+512 "
            "FLUX's training length; 10·n with pooled keys, as the official code) "
            "instead of √(1/d)",
            bool,
            mixer_only=True,
            source=HIGHRES + ": off by default (proportional_attention=False in every "
            "processor); the 2048×4096 example turns it on",
        ),
        Option(
            "ntk_factor",
            1.0,
            "high resolution on FLUX: multiply the RoPE base θ by this (NTK scaling); 1 = "
            "off; models without RoPE (attnbench's DiT) refuse other values",
            float,
            check=_finite_positive,
            mixer_only=True,
            source="Huage001/CLEAR transformer_flux.py (FluxPosEmbed ntk_factor=1 by "
            "default); the 2048×4096 example in inference_t2i_highres.ipynb uses 10",
        ),
    )
    retired_options = MappingProxyType({
        "global_tokens": "give the text tokens in the layout, layout=Layout(grid, text=G) "
        "(a text prefix of G tokens; FLUX: 512)",
    })
    notes = (
        "high resolution: the official 2048×4096 example (inference_t2i_highres.ipynb) "
        "runs FLUX's img2img pipeline (SDEdit, strength 0.7) from a 512×1024 image with "
        "ntk_factor=10 and proportional_attention=True; attnbench offers both options "
        "(off by default, as the official processors) but not that pipeline",
        "kd_attn layers on FLUX follow the official rule (single-stream layers at a "
        "position ≡ 0 mod 4 of all 57: single blocks 1, 5, ..., 37); attnbench's DiT, "
        "single-stream only, taps blocks 0, 4, 8, ...",
    )
    core_class = ClearCore
    extra_inputs = (
        ExtraInput("pool_weight", "[f, f] weights of the pooled keys' patch sums (the core's "
                   "learned part; default: the mean 1/f²)",
                   check=lambda weight, opts: weight_reason(weight, opts["down_factor"])),
    )
    fast_paths = (FLEX, HALO, MASKED_SDPA)
    layout_kinds = KINDS
    conversion_recipe = ConversionRecipe(
        "clear",
        "CLEAR: inherit q/k/v/out (the same projections); new parameters only with "
        "pooled KV tokens (down_factor > 1); teacher's heads",
        "CLEAR, arXiv 2412.16112; Huage001/CLEAR distill.py (loads every teacher weight)",
        inherit_projections=True,
    )
    distill_recipe = DistillRecipe(
        "clear", {"diffusion": 1.0, "kd_out": 0.5, "kd_attn": 0.5}, "attention",
        "CLEAR: diffusion + 0.5·output MSE + 0.5·attention MSE before the output "
        "projection; only the attention trains. kd_attn layers, the official rule: count "
        "every attention layer in the model's order (FLUX: 19 double-stream, then 38 "
        "single-stream) and tap the single-stream ones at a position ≡ 0 mod 4 -- FLUX's "
        "single blocks 1, 5, ..., 37 (tapped_layers). attnbench's DiT has single-stream "
        "blocks only, so it taps blocks 0, 4, 8, ...",
        "Huage001/CLEAR distill.py (loss = loss_fm + 0.5·loss_distill + 0.5·loss_attn; "
        "distill='single' in name and idx % 4 == 0 over enumerate(attn_processors))",
        attn_tap="pre_proj",
        attn_every=4,
        attn_kind="single",
        optimisation=Optimisation(
            "prodigy", 1.0, 1e-4,
            {"betas": (0.9, 0.999), "eps": 1e-8, "decouple": True,
             "use_bias_correction": True, "safeguard_warmup": True},
            ema_decay=0.0, warmup_steps=0, grad_clip=1.0, steps=50_000,
            batch="2 per GPU × 4 accumulation × 4 GPUs = 32 images of 1024 px",
            source="Huage001/CLEAR distill.sh (--optimizer prodigy --learning_rate 1. "
            "--max_train_steps 50000 --train_batch_size 2 --gradient_accumulation_steps 4, "
            "constant schedule, no warm-up), distill.py (adam_weight_decay 1e-4, "
            "prodigy_decouple, bias correction and safeguard warm-up on, max_grad_norm 1.0, "
            "no EMA), deepspeed_config.yaml (4 processes)",
            substitutes="the paper reports 10K iterations, the released script 50K; "
            "attnbench takes no gradient accumulation: --batch-size is the global batch"),
    )
    distill_alternatives = (
        DistillRecipe(
            "clear-post-proj", {"diffusion": 1.0, "kd_out": 0.5, "kd_attn": 0.5}, "attention",
            "CLEAR's weights with kd_attn after the output projection on every block "
            "(attnbench's earlier definition, kept for comparison)",
            "attnbench's choice (a variant of Huage001/CLEAR distill.py)",
            attn_tap="post_proj",
            attn_every=1,
        ),
    )

    def mixer(self, dim: int, num_heads: int, **options: Any):
        """The DiT mixer; ``ntk_factor`` is refused there: it scales a RoPE base, and
        attnbench's DiT has absolute position embeddings (FLUX in diffusers takes it)."""
        if float(options.get("ntk_factor", 1.0)) != 1.0:
            raise ValueError("clear: option 'ntk_factor' scales the RoPE base of a model "
                             "with rotary embeddings (FLUX); attnbench's DiT has none: "
                             "drop it or use swap_attention on FLUX")
        return super().mixer(dim, num_heads, **options)

    def check_layout(self, layout: Layout, options: dict[str, Any]) -> None:
        super().check_layout(layout, options)
        if layout.is_video and pools(options["down_factor"]):
            raise ValueError(_POOLED_VIDEO.format(f=options["down_factor"]))

    def reference(
        self,
        q,
        k,
        v,
        *,
        grid: Grid | None = None,
        layout: Layout | None = None,
        radius: float = DEFAULT_RADIUS,
        radius_t: int | None = None,
        down_factor: int = DEFAULT_DOWN_FACTOR,
        pool_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        window = _window_of(q, layout, grid, radius, radius_t, down_factor=down_factor,
                            pool_weight=pool_weight)
        return clear_reference(q, k, v, window, pool_weight)

    def overhead_steps(self, q, k, v, *, grid=None, layout=None, impl: str, **options: Any):
        """CLEAR's work besides the attention proper, each step from scratch (uncached).

        ``text_first`` (text after the grid): moving the text tokens of q, k, v to the
        front; ``pool_kv`` (when ``down_factor`` > 1): the pooled K/V tokens and the
        concatenation; ``block_mask`` (flex) or ``dense_mask`` (masked_sdpa): the
        mask, which the paths otherwise build once per window and cache;
        ``tile_permute`` (flex, when it runs in tile order): building the
        permutation and re-ordering q, k, v into tiles and an output back;
        ``halo_index`` (halo): the tiling's gather indices and shared mask. The
        reference builds its small chunk masks inline; it has no separate step.
        """
        impl, layout, opts = self.prepare(q, k, v, grid=grid, layout=layout, impl=impl,
                                          options=options)
        window = Window.of(layout.text_first_form, **opts)
        steps: dict[str, Any] = {}
        if layout.text and not layout.text_first:
            steps["text_first"] = lambda: tuple(layout.to_text_first(t) for t in (q, k, v))
        if window.pooled:
            steps["pool_kv"] = lambda: extend_kv(k, v, window)
        if impl == "flex":
            tiled = flex_tile_order(window)
            steps["block_mask"] = lambda: _build_block_mask(window, q.device, tiled=tiled)
            if tiled:
                steps["tile_permute"] = lambda: _tile_permute_step(window, q, k, v)
        elif impl == "masked_sdpa":
            steps["dense_mask"] = lambda: _dense_mask(window, q.device)
        elif impl == "halo":  # the tiling, its gather indices and shared mask (uncached)
            tiling = choose_tile(window, q.shape[0] * q.shape[1], q.shape[-1], q.element_size())
            steps["halo_index"] = lambda: halo_index.__wrapped__(tiling, q.device)
        return steps

    sparse_pairs = True

    def exact_rows_model(self, q, k, layout, **opts):
        """The window's mask over the input tokens (pooled keys are not input pairs)."""
        n = k.shape[2]
        mask = _cached_dense_mask(Window.of(layout.text_first_form, **opts), k.device)[:, :n]
        return lambda r0, r1: mask[r0:r1]

    # ----- cost models --------------------------------------------------------------
    def flop_model(self, batch, heads, tokens, head_dim, layout, **opts) -> Flops:
        """``4·B·H·pairs·d`` over the allowed pairs only (CLEAR's own convention): the
        window on every frame pair within reach, the text rows and columns, the pooled
        columns.

        No implementation here computes exactly that many (flex computes whole
        128×128 tiles, masked_sdpa and the reference dense rows); the pooling is
        element-wise and not counted.
        """
        return Flops(
            actual=4.0 * batch * heads * self._pairs(layout, opts) * head_dim,
            dense=dense_flops(batch, heads, tokens, head_dim),
        )

    def _pairs(self, layout: Layout, opts: dict[str, Any]) -> int:
        return allowed_pairs(layout.text_first_form, **opts)

    def reference_workspace(self, batch, heads, tokens, head_dim, layout, *, element_size,
                            **opts) -> float:
        return reference_workspace(Window.of(layout.text_first_form, **opts), batch, heads,
                                   head_dim, element_size=element_size)

    # ----- honest labels ------------------------------------------------------------
    def density_model(self, layout, **opts) -> float:
        """The window's exact pairs over N²: the window, the text rows and columns and the
        pooled columns (N = text + image tokens of every frame; pooled keys can push it
        past 1)."""
        return self._pairs(layout, opts) / float(layout.tokens) ** 2

    def rounded_options(self, layout, **opts):
        window = Window.of(layout.text_first_form, **opts)
        rounded = {
            "max_sq_distance": window.limit,  # dy² + dx² ≤ this integer
            "covers_grid": window.covers_grid,
            "pooled_tokens": window.pooled,
            "keys": window.keys,
            "text_tokens": window.global_tokens,
        }
        if layout.is_video:
            rounded["max_frame_distance"] = window.limit_t  # |dt| ≤ this integer
        return rounded

    def rounding_checks(self, layout, **opts):
        window = Window.of(layout.text_first_form, **opts)
        hg, wg = layout.frame_grid
        radius, radius_t, down_factor = opts["radius"], opts["radius_t"], opts["down_factor"]
        checks = []
        diameter = math.sqrt((hg - 1) ** 2 + (wg - 1) ** 2)
        if radius > diameter:
            checks.append((radius, diameter, f"clear:radius={radius:g} covers the whole "
                           f"{hg}×{wg} grid (diameter {diameter:.1f}): exact softmax attention"
                           + (" in each frame" if layout.is_video else "")))
        if layout.is_video and radius_t is not None and radius_t > window.frames - 1:
            checks.append((float(radius_t), float(window.frames - 1),
                           f"clear:radius_t={radius_t} reaches every one of the "
                           f"{window.frames} frames"))
        if pools(down_factor) and not window.pooled:
            checks.append((float(down_factor), 0.0, f"clear:down_factor={down_factor} adds no "
                           f"pooled keys on a {hg}×{wg} grid (smaller than one patch)"))
        return checks


__all__ = [
    "DEFAULT_RADIUS", "FLEX_BLOCK", "FLEX_RECOMPILE_LIMIT", "TILE", "Clear", "ClearCore",
    "Window", "allowed", "allowed_pairs", "block_density", "block_mask", "build_block_mask",
    "clear_mask_caches", "clear_reference", "compiled_flex_attention", "dense_mask", "extend_kv",
    "flex_tile_order", "local_pairs", "pool_patches", "tile_permutation",
]
